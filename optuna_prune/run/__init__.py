"""The glue where the two sides meet: a search config becomes an Optuna study whose trials are masks
scored by a model.

The method registry, configs, objectives, the study's storage, heartbeats and workers, the problem a
study is bound to, budgets and the study's final pick. The only floor that imports both torch (through
``optuna_prune.model``) and optuna (through ``optuna_prune.search``).
"""
