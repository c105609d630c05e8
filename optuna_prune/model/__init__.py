"""The model side: torch and transformers, never optuna.

Loading models, dropping decoder layers, calibration data (CCDS), the fitness of a mask, fine-tuning,
and the held-out measures (perplexity, lm-eval accuracy, speed). Everything here takes a mask as a
plain list of booleans, so it runs without a study.
"""
