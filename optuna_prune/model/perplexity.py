"""Perplexity of a dense or masked model on the evaluation split of a corpus, as SLEB and EvoP report it.

Conventions (SparseGPT/SLEB/EvoP ``eval_ppl``):

* the text is the evaluation split of ``calibration.eval_token_stream`` (never the calibration split):
  WikiText-2 test (``wiki.test.raw``), C4 validation documents 1000-1999 (offline: the last 1,000 of
  ``c4_validation_2k.jsonl``), PTB test, or the second half of a local file; documents are joined and
  tokenised in one call;
* the stream is cut into windows of ``seq_len`` tokens starting at 0, ``stride``, ``2 * stride``, ...;
  only whole windows count (the ragged tail is dropped, as SLEB does). With the default
  ``stride = seq_len`` the windows do not overlap and every window predicts its own ``seq_len - 1`` next
  tokens. With ``stride < seq_len`` a window after the first predicts only its last ``stride`` tokens,
  the ones no earlier window scored (Hugging Face's strided perplexity), so each token counts once;
* perplexity = exp(mean negative log-likelihood over all scored next-token predictions), in fp32, with
  ``use_cache=False``.

A pruned mask is evaluated in place through ``layers.masked``: no copy of the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from optuna_prune.model.calibration import CalibrationError, eval_token_stream
from optuna_prune.model.devices import inference_mode
from optuna_prune.model.fitness import token_losses
from optuna_prune.model.layers import lm_tail, masked, model_features
from optuna_prune.progress import progress_bar


def windows(
    ids: torch.Tensor, seq_len: int, stride: int | None = None, max_windows: int | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Cut a 1-D token stream into ``[W, seq_len]`` windows and the first scored position of each."""
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise CalibrationError(
            f"perplexity needs seq_len >= 2 and 1 <= stride <= seq_len (got {seq_len}, {stride})"
        )
    if max_windows is not None and max_windows < 1:
        raise CalibrationError(f"max_windows {max_windows} must be >= 1; pass 1 or more, or None for every window")
    starts = list(range(0, len(ids) - seq_len + 1, stride))[:max_windows]
    if not starts:
        raise CalibrationError(
            f"the evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}; "
            "lower seq_len or give more text (max_chars)"
        )
    # Position p of a window predicts its token p from tokens < p; the first window scores p >= 1,
    # later ones only the tokens beyond the previous window's end.
    first = [1] + [max(seq_len - stride, 1)] * (len(starts) - 1)
    return torch.stack([ids[s : s + seq_len] for s in starts]), first


def windows_perplexity(
    model: PreTrainedModel,
    ids: torch.Tensor,
    seq_len: int = 2048,
    stride: int | None = None,
    max_windows: int | None = None,
    dropped: Sequence[int] = (),
    batch_size: int = 1,
    progress: str | None = None,
) -> float:
    """Perplexity of ``model`` (without the ``dropped`` layers) on a 1-D token stream.

    ``progress`` names a bar of the windows done and the time left (None: silent).
    """
    batch, first = windows(ids, seq_len, stride, max_windows)
    device = next(model.parameters()).device
    tail = lm_tail(model)
    nll, count = 0.0, 0
    bar = progress_bar(len(batch), progress or "", "window", enabled=progress is not None)
    with masked(model, dropped) if dropped else nullcontext(), inference_mode(device), bar:
        for b in range(0, len(batch), batch_size):
            rows = batch[b : b + batch_size].to(device)
            # Logits a chunk of positions at a time: a large vocabulary's [B, T, V] never exists.
            losses = token_losses(tail, model_features(model, rows), rows)
            for loss, start in zip(losses, first[b : b + batch_size], strict=True):
                nll += float(loss[start - 1 :].sum())
                count += seq_len - start
            bar.update(len(rows))
    return math.exp(nll / count)


def perplexity(
    model: PreTrainedModel,
    tokenizer: Any,
    source: str,
    data_dir: str | Path | None = None,
    seq_len: int = 2048,
    stride: int | None = None,
    max_windows: int | None = None,
    max_chars: int | None = None,
    dropped: Sequence[int] = (),
    batch_size: int = 1,
    progress: str | None = None,
) -> float:
    """Perplexity on the evaluation split of ``source`` (``wikitext2``, ``c4``, ``ptb`` or a local file).

    See the module docstring for the conventions; ``max_chars`` and ``max_windows`` bound the cost
    (the reference numbers in the shared data README use 300,000 characters and 16 x 512 tokens).
    ``progress`` names a bar of the windows (None: silent).
    """
    ids = eval_token_stream(tokenizer, source, data_dir=data_dir, max_chars=max_chars)
    return windows_perplexity(model, ids, seq_len, stride, max_windows, dropped, batch_size, progress)


def cross_domain(
    model: PreTrainedModel,
    tokenizer: Any,
    masks: Mapping[str, Sequence[int]],
    datasets: Iterable[str] = ("wikitext2", "c4"),
    **kwargs: Any,
) -> dict[str, dict[str, float]]:
    """Perplexity of every mask on every dataset: ``{label: {dataset: ppl}}`` (EvoP Table 3).

    Typically ``masks`` holds the masks found with calibration on one corpus and on the other (and
    ``"dense": ()``), so the table shows how a mask transfers across domains. Each dataset is tokenised
    once; ``kwargs`` are ``perplexity``'s (data_dir, seq_len, stride, max_windows, max_chars, batch_size).
    """
    data_dir = kwargs.pop("data_dir", None)
    max_chars = kwargs.pop("max_chars", None)
    table: dict[str, dict[str, float]] = {label: {} for label in masks}
    for dataset in datasets:
        ids = eval_token_stream(tokenizer, dataset, data_dir=data_dir, max_chars=max_chars)
        for label, dropped in masks.items():
            table[label][dataset] = windows_perplexity(model, ids, dropped=dropped, **kwargs)
    return table
