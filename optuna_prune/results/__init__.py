"""The readers: what a finished study becomes (evaluations, exported checkpoints, figures, reports).

They read studies through ``optuna_prune.run`` and never steer a search.
"""
