"""Text to token ids, and the error for text that cannot become the windows asked for.

The floor under the two ways of making calibration windows: random windows of a corpus
(``calibration``) and EvoP's cluster-based samples (``ccds``). Both tokenise the same way and refuse
the same bad requests; ``calibration`` builds on ``ccds``, so what they share lives here.
"""

from __future__ import annotations

from typing import Any


class CalibrationError(ValueError):
    """A calibration or evaluation corpus cannot be read or cannot supply the tokens asked for."""


def tokenize(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` in one call (no too-long-sequence warning: long streams are the point)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def check_request(n_samples: int, seq_len: int) -> None:
    """CalibrationError unless ``n_samples`` windows of ``seq_len`` tokens make a usable request."""
    if n_samples < 1:
        raise CalibrationError(f"n_samples must be >= 1, got {n_samples!r}; pass --n-samples 1 or more")
    if seq_len < 2:
        raise CalibrationError(f"seq_len must be >= 2, got {seq_len!r}; pass --seq-len 2 or more")
