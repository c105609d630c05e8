"""optuna-prune: search which decoder layers of an LLM to drop, as an Optuna study."""

__version__ = "0.1.0"
