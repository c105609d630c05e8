"""The error that means "this configuration is wrong", shared by the config, the method registry and
the model side, so that none of them has to import another to raise it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""
