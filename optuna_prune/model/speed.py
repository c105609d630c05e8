"""Inference speed of a dense or masked model: prefill latency and decode throughput (EvoP's "SpeedUp").

Both numbers come from ``generate()`` with its KV cache on the model as it is (masked in place for a
pruned mask; ``layers.masked`` renumbers the layers' cache slots): one call producing 1 token is the
prefill, one producing ``new_tokens`` adds ``new_tokens - 1`` decode steps, so their difference times the
decode steps alone. Every variant sees the same prompt; after ``warmup`` untimed rounds the median of
``repeats`` rounds is reported. ``compare_speed`` alternates dense and pruned rounds, so a machine shared
with other jobs slows both alike and the ratios stay fair. CUDA timings synchronise the device first;
CPU timings run with a fixed number of torch threads.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from transformers import PreTrainedModel

from optuna_prune.model.devices import inference_mode
from optuna_prune.model.layers import SubBlocks, masked
from optuna_prune.progress import progress_bar


@contextmanager
def _threads(device: torch.device, threads: int | None) -> Iterator[int | None]:
    """Run CPU timings with ``threads`` torch threads (default: the current count); restore after."""
    if device.type != "cpu":
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _prompt(model: PreTrainedModel, tokenizer: Any, prompt_tokens: int, seed: int = 0) -> torch.Tensor:
    """A fixed prompt of ``prompt_tokens`` ordinary (non-special) token ids, the same for every variant."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = model.get_input_embeddings().num_embeddings
    pool = torch.tensor([i for i in range(min(vocab, len(tokenizer))) if i not in special])
    pick = torch.randint(len(pool), (prompt_tokens,), generator=torch.Generator().manual_seed(seed))
    return pool[pick][None].to(next(model.parameters()).device)


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _round(
    model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, pad_token_id: int
) -> tuple[float, float]:
    """One timed round: (prefill seconds, decode seconds for ``new_tokens - 1`` steps)."""
    device = prompt.device

    def generate(n: int) -> None:
        model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, use_cache=True, pad_token_id=pad_token_id,
        )

    with inference_mode(device):
        prefill = _seconds(lambda: generate(1), device)
        full = _seconds(lambda: generate(new_tokens), device)
    return prefill, max(full - prefill, 1e-9)


def _summary(rounds: list[tuple[float, float]], new_tokens: int) -> dict[str, float]:
    return {
        "prefill_ms": statistics.median(p for p, _ in rounds) * 1000,
        "decode_tokens_per_s": statistics.median((new_tokens - 1) / d for _, d in rounds),
    }


def _measure(
    model: PreTrainedModel,
    tokenizer: Any,
    variants: Sequence[Sequence[int]],
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    warmup: int,
    threads: int | None,
    progress: str | None = None,
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Time every drop mask in ``variants``, interleaving their rounds (``progress``: a bar's name)."""
    if new_tokens < 2 or prompt_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"speed needs new_tokens >= 2, prompt_tokens >= 1, repeats >= 1, warmup >= 0 "
            f"(got {new_tokens}, {prompt_tokens}, {repeats}, {warmup})"
        )
    device = next(model.parameters()).device
    prompt = _prompt(model, tokenizer, prompt_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rounds: list[list[tuple[float, float]]] = [[] for _ in variants]
    bar = progress_bar((warmup + repeats) * len(variants), progress or "", "round", enabled=progress is not None)
    with _threads(device, threads) as used, bar:
        for r in range(warmup + repeats):
            for timings, dropped in zip(rounds, variants, strict=True):
                with masked(model, dropped) if dropped else nullcontext():
                    timing = _round(model, prompt, new_tokens, pad or 0)
                if r >= warmup:
                    timings.append(timing)
                bar.update()
    setup = {
        "device": str(device) if device.type != "cpu" else f"cpu ({used} threads)",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
    }
    return [_summary(t, new_tokens) for t in rounds], setup


def measure_speed(
    model: PreTrainedModel,
    tokenizer: Any,
    dropped: Sequence[int] = (),
    prompt_tokens: int = 256,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    progress: str | None = None,
) -> dict[str, Any]:
    """Prefill latency (ms) and decode tokens/s of ``model`` without the ``dropped`` layers."""
    (result,), setup = _measure(
        model, tokenizer, [tuple(dropped)], prompt_tokens, new_tokens, repeats, warmup, threads, progress
    )
    return {**result, **setup}


def compare_speed(
    model: PreTrainedModel,
    tokenizer: Any,
    dropped: Sequence[int],
    prompt_tokens: int = 256,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    progress: str | None = None,
) -> dict[str, Any]:
    """Dense and pruned speed measured side by side, and the pruned model's speedups (dense time / pruned).

    Returns ``{"dense": {...}, "pruned": {...}, "prefill_speedup", "decode_speedup", "device", ...}``.
    For :class:`~optuna_prune.model.layers.SubBlocks`, only the layers dropped whole are left out: the
    exported checkpoint runs its zeroed attention and MLP blocks at full cost.
    """
    if isinstance(dropped, SubBlocks):
        dropped = dropped.layers()
    (dense, pruned), setup = _measure(
        model, tokenizer, [(), tuple(dropped)], prompt_tokens, new_tokens, repeats, warmup, threads, progress
    )
    return {
        "dense": dense,
        "pruned": pruned,
        "prefill_speedup": dense["prefill_ms"] / pruned["prefill_ms"],
        "decode_speedup": pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        **setup,
    }
