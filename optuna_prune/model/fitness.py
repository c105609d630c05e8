"""Fitness of a drop mask on the calibration set: perplexity (EvoP/SLEB) or KL to the dense model (EvoPress).

A search scores thousands of masks, so the fitness never reruns what it already knows:

* the dense model runs once; the input of every decoder layer (and the keyword arguments each layer
  received: attention mask, rotary embeddings, ...) is kept, so a mask whose first dropped layer is j
  starts from the dense input of layer j + 1;
* hidden states after each layer of recently scored masks live in a byte-bounded LRU cache keyed by the
  mask prefix, so a candidate that shares its first p layers with a recent one resumes at layer p;
* identical masks are looked up, not recomputed;
* the loss is a mean of non-negative per-token terms, so a candidate stops exactly as soon as its
  partial sum shows it cannot beat ``stop_above`` (the result is then a lower bound, flagged incomplete);
* the LM head costs as much as a dozen decoder layers of a small model, so a candidate with a
  ``stop_above`` first gets, per sample, an exact lower bound of its loss from a few vocabulary rows
  (the targets and the dense model's likeliest tokens: the log-sum-exp over a subset of the
  vocabulary is below the one over all of it). A candidate whose bounds already exceed
  ``stop_above`` stops without a single full head; staged selection ranks its stages on the same
  bounds (``iter_bounds``).

Everything here is model side: it knows nothing of Optuna.
"""

from __future__ import annotations

import abc
import functools
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from optuna_prune.model.calibration import CalibrationSet
from optuna_prune.model.devices import inference_mode
from optuna_prune.model.layers import (
    LMTail,
    check_drop,
    find_layer_stack,
    lm_tail,
    masked,
    model_features,
    sub_block_names,
    sub_blocks_dropped,
)

# Bytes of one chunk of fp32 logits: with a 262k vocabulary, 64 positions at a time. Memory then
# grows with the hidden size per token, not the vocabulary size.
LOGIT_CHUNK_BYTES = 1 << 26


class NonFiniteLossError(FloatingPointError):
    """A candidate's loss is NaN or inf (e.g. fp16 overflow): a failed candidate, never a good score."""


@dataclass(frozen=True)
class SampleLoss:
    """Loss of one calibration sample: sum of per-token terms and their count."""

    index: int
    loss_sum: float
    n_tokens: int

    @property
    def mean(self) -> float:
        return self.loss_sum / self.n_tokens


@dataclass(frozen=True)
class FitnessResult:
    """Mean per-token loss of a mask; a lower bound of it when ``complete`` is False (stopped early)."""

    dropped: tuple[int, ...]
    value: float
    samples: tuple[SampleLoss, ...]
    complete: bool
    layer_forwards: int
    total_tokens: int

    @property
    def per_sample(self) -> tuple[float, ...]:
        return tuple(s.mean for s in self.samples)


class _Batch:
    """One batch of calibration samples with what the dense pass recorded for it."""

    def __init__(self, indices: list[int], input_ids: torch.Tensor) -> None:
        self.indices = indices
        self.input_ids = input_ids
        self.layer_args: list[tuple[tuple[Any, ...], dict[str, Any], bool]] = []
        self.dense_inputs: list[torch.Tensor] = []  # input of layer j, j = 0..L (L: last output)
        self.dense_loss_sums: list[float] = []
        self.rows: torch.Tensor | None = None  # vocabulary rows of the cheap lower bound
        self.row_targets: torch.Tensor | None = None  # [B, T - 1]: each next token's index in rows


class PrefixCache:
    """Byte-bounded LRU of hidden states keyed by (batch, mask prefix)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self._items: OrderedDict[tuple[int, bytes], torch.Tensor] = OrderedDict()

    def get(self, key: tuple[int, bytes]) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return value

    def put(self, key: tuple[int, bytes], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._items)


def _call_layer(layer: nn.Module, hidden: torch.Tensor, recorded: tuple) -> torch.Tensor:
    args, kwargs, hidden_is_kwarg = recorded
    out = layer(**kwargs, hidden_states=hidden) if hidden_is_kwarg else layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Fitness(abc.ABC):
    """Scores drop masks on a fixed calibration set; lower is better.

    Subclasses define the per-token loss (``_loss_sums``) and may define a cheap lower bound of it
    (``_bound_sums``). ``evaluate`` is the one entry point a search needs; ``iter_samples`` yields
    per-sample losses as they are computed.

    Args:
        batch_size: Calibration samples per forward pass.
        cache_bytes: Size of the prefix LRU cache.
        verify: Check once that the layer-by-layer replay reproduces the model's logits.
        bound_fraction: Share of the vocabulary whose logits give the lower bound (0: no bound).
            1/16 costs ~4% of a full head and is within ~3% of the loss of a SLEB-quality mask.
        sub_blocks: Masks index the 2L attention and MLP blocks (see ``layers.SubBlocks``), not
            the L layers. The dense inputs, prefix cache and early stops work per layer as before.
    """

    name: str = "fitness"

    def __init__(
        self,
        model: nn.Module,
        calibration: CalibrationSet,
        *,
        batch_size: int = 1,
        cache_bytes: int = 1 << 30,
        verify: bool = True,
        bound_fraction: float = 1 / 16,
        sub_blocks: bool = False,
    ) -> None:
        if not 0 <= bound_fraction <= 1:
            raise ValueError(f"bound_fraction={bound_fraction} must be in [0, 1]; 0 turns the lower bound off")
        self.model = model
        self.calibration = calibration
        self.stack = find_layer_stack(model)
        self.num_layers = self.stack.num_layers
        self._per_layer = 2 if sub_blocks else 1  # mask units per layer
        self.num_units = self.num_layers * self._per_layer
        self._unit = "sub-block" if sub_blocks else "layer"
        if sub_blocks:
            for layer in self.stack.layers:
                sub_block_names(layer)  # an unsupported layout fails here, not mid-search
        self.device = next(model.parameters()).device
        self._tail = lm_tail(model)
        vocab = self._tail.head.weight.shape[0] if self._tail.linear else 0
        self._bound_rows = int(vocab * bound_fraction) if self._defines_bound() else 0
        self.cache = PrefixCache(cache_bytes)
        self._memo: dict[tuple[int, ...], FitnessResult] = {}
        self.layer_forwards = 0
        ids = calibration.input_ids
        self.total_tokens = ids.shape[0] * (ids.shape[1] - 1)
        self._batches = [
            _Batch(list(range(s, min(s + batch_size, ids.shape[0]))), ids[s : s + batch_size])
            for s in range(0, ids.shape[0], batch_size)
        ]
        self._record_dense()
        if verify:
            self._verify()

    # ---- dense pass -------------------------------------------------------------------------
    def _record_dense(self) -> None:
        """Run the dense model once per batch, keeping each layer's inputs and keyword arguments."""
        for batch in self._batches:
            self._record_batch(batch)
            with inference_mode(self.device):
                features = self._tail.features(batch.dense_inputs[-1])
                sums = self._loss_sums(features, batch, dense=True)
                if self._bound_rows:
                    self._prepare_bound(features, batch)
            batch.dense_loss_sums = [float(s) for s in sums]

    def _prepare_bound(self, dense_features: torch.Tensor, batch: _Batch) -> None:
        """Pick the bound's rows: every target token, then the tokens the dense model expects most."""
        flat = dense_features[:, :-1].reshape(-1, dense_features.shape[-1])
        mass = sum(
            torch.softmax(self._tail.logits(flat[s : s + rows]).float(), dim=-1).sum(dim=0)
            for s, rows in _chunks(self._tail, len(flat))
        )
        targets = batch.input_ids[:, 1:].to(mass.device)
        mass[targets.reshape(-1)] = math.inf
        n_targets = int(torch.unique(targets).numel())
        rows = mass.topk(min(mass.numel(), n_targets + self._bound_rows)).indices.sort().values
        index = torch.full_like(mass, -1, dtype=torch.long)
        index[rows] = torch.arange(rows.numel(), device=rows.device)
        batch.rows, batch.row_targets = rows, index[targets]

    def _record_batch(self, batch: _Batch) -> None:
        layers = self.stack.layers
        records: list[Any] = [None] * len(layers)

        def pre_hook(index: int, args: tuple, kwargs: dict) -> None:
            if "hidden_states" in kwargs:
                hidden = kwargs["hidden_states"]
                records[index] = ((), {k: v for k, v in kwargs.items() if k != "hidden_states"}, True)
            else:
                hidden = args[0]
                records[index] = (args[1:], dict(kwargs), False)
            batch.dense_inputs.append(hidden.detach())

        def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            batch.dense_inputs.append(out.detach())

        handles = [
            layer.register_forward_pre_hook(
                lambda m, a, k, i=i: pre_hook(i, a, k), with_kwargs=True
            )
            for i, layer in enumerate(layers)
        ]
        handles.append(layers[-1].register_forward_hook(post_hook))
        try:
            with inference_mode(self.device):
                model_features(self.model, batch.input_ids.to(self.device))
        finally:
            for h in handles:
                h.remove()
        if len(batch.dense_inputs) != len(layers) + 1 or any(r is None for r in records):
            raise RuntimeError(
                f"{type(self.model).__name__}: the forward pass did not call every decoder layer once"
            )
        batch.layer_args = records

    def _verify(self) -> None:
        """Check that replaying layers + tail reproduces the model's own logits (catches odd layouts)."""
        batch = self._batches[0]
        ids = batch.input_ids.to(self.device)
        with inference_mode(self.device):
            features = model_features(self.model, ids)
            replay = self._tail.features(batch.dense_inputs[-1])
            # The model's own logits of the first few positions (a causal LM's do not depend on later
            # tokens) check the head and any softcap without a [B, T, vocab] tensor.
            head = self.model(input_ids=ids[:, :8], use_cache=False).logits
            same = torch.allclose(features.float(), replay.float(), rtol=1e-3, atol=1e-3) and torch.allclose(
                head.float(), self._tail.logits(replay[:, :8]).float(), rtol=1e-3, atol=1e-3
            )
        if not same:
            raise RuntimeError(
                f"{type(self.model).__name__}: layer-by-layer replay does not reproduce the model's "
                "forward pass; this architecture is unsupported"
            )

    def dense_hidden_states(self) -> Iterator[list[torch.Tensor]]:
        """Per batch, the dense input of every layer and the last layer's output (L + 1 tensors)."""
        for batch in self._batches:
            yield batch.dense_inputs

    # ---- loss -------------------------------------------------------------------------------
    @abc.abstractmethod
    def _loss_sums(self, features: torch.Tensor, batch: _Batch, dense: bool = False) -> torch.Tensor:
        """Per-sample sums of the non-negative per-token loss, shape [batch], from the head's input."""

    def _defines_bound(self) -> bool:
        """Whether this fitness defines ``_bound_sums``."""
        return False

    def _bound_sums(self, features: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Per-sample lower bounds of ``_loss_sums`` from the logits of ``batch.rows`` only."""
        raise NotImplementedError

    @property
    def dense_value(self) -> float:
        """The dense model's loss (a floor for KL: 0; for perplexity: the dense log-perplexity)."""
        total = sum(sum(b.dense_loss_sums) for b in self._batches)
        return total / self.total_tokens

    # ---- masked passes ----------------------------------------------------------------------
    def _bits(self, dropped: tuple[int, ...]) -> bytes:
        return bytes(1 if i in dropped else 0 for i in range(self.num_units))

    def _hidden_after_layers(self, b: int, batch: _Batch, drop_bits: bytes) -> torch.Tensor:
        """Output of the last layer under the mask, resuming from the longest cached prefix."""
        L, per = self.num_layers, self._per_layer
        first = (drop_bits.index(1) if 1 in drop_bits else len(drop_bits)) // per
        start, hidden = first, batch.dense_inputs[first]
        for p in range(L, first, -1):
            cached = self.cache.get((b, drop_bits[: p * per]))
            if cached is not None:
                start, hidden = p, cached
                break
        layers = self.stack.layers
        for j in range(start, L):
            parts = drop_bits[j * per : (j + 1) * per]
            if not all(parts):
                if any(parts):  # one of attention and MLP dropped
                    with sub_blocks_dropped(layers[j], parts.index(1)) as layer:
                        hidden = _call_layer(layer, hidden, batch.layer_args[j])
                else:
                    hidden = _call_layer(layers[j], hidden, batch.layer_args[j])
                self.layer_forwards += 1
            if j + 1 < L:
                self.cache.put((b, drop_bits[: (j + 1) * per]), hidden)
        return hidden

    def _checked(self, dropped: tuple[int, ...], batch: _Batch, sums: list[float]) -> list[SampleLoss]:
        """Per-sample results of one batch; a NaN/inf loss fails the candidate."""
        checked = []
        for idx, s in zip(batch.indices, sums, strict=True):
            if not math.isfinite(s):
                raise NonFiniteLossError(f"loss of mask {list(dropped)} is {s} on calibration sample {idx}")
            checked.append(SampleLoss(idx, s, batch.input_ids.shape[1] - 1))
        return checked

    def iter_samples(self, dropped: Sequence[int]) -> Iterator[SampleLoss]:
        """Yield per-sample losses of the masked model as they are computed."""
        dropped = check_drop(self.num_units, dropped, self._unit)
        bits = self._bits(dropped)
        for b, batch in enumerate(self._batches):
            if not dropped:
                sums = batch.dense_loss_sums
            else:
                with inference_mode(self.device):
                    hidden = self._hidden_after_layers(b, batch, bits)
                    sums = self._loss_sums(self._tail.features(hidden), batch).tolist()
            yield from self._checked(dropped, batch, sums)

    @property
    def has_bound(self) -> bool:
        """Whether :meth:`iter_bounds` gives cheap lower bounds (a linear LM head and a bound fraction)."""
        return bool(self._bound_rows)

    def iter_bounds(self, dropped: Sequence[int]) -> Iterator[SampleLoss]:
        """Yield per-sample lower bounds of the loss: the layers, then the bound's vocabulary rows only."""
        key = check_drop(self.num_units, dropped, self._unit)
        for _, bounds in self._bounds(key):
            yield from bounds

    def _bounds(self, dropped: tuple[int, ...]) -> Iterator[tuple[torch.Tensor, list[SampleLoss]]]:
        """Per batch: the head's input features under the mask and the samples' lower bounds."""
        bits = self._bits(dropped)
        for b, batch in enumerate(self._batches):
            with inference_mode(self.device):
                features = self._tail.features(self._hidden_after_layers(b, batch, bits))
                bound = self._bound_sums(features, batch)
            yield features, self._checked(dropped, batch, bound.tolist())

    def evaluate(self, dropped: Sequence[int], stop_above: float | None = None) -> FitnessResult:
        """Mean per-token loss of the mask; stops exactly once it must exceed ``stop_above``."""
        key = check_drop(self.num_units, dropped, self._unit)
        known = self._memo.get(key)
        if known is not None and (known.complete or (stop_above is not None and known.value > stop_above)):
            return known
        forwards_before = self.layer_forwards
        if stop_above is None:
            samples, loss_sum = self._in_order(key, None)
        elif key and self._bound_rows:
            samples, loss_sum = self._bounded(key, stop_above * self.total_tokens)
        else:
            samples, loss_sum = self._in_order(key, stop_above * self.total_tokens)
        result = FitnessResult(
            dropped=key,
            value=loss_sum / self.total_tokens,
            samples=tuple(samples),
            complete=len(samples) == len(self.calibration.input_ids),
            layer_forwards=self.layer_forwards - forwards_before,
            total_tokens=self.total_tokens,
        )
        self._memo[key] = result
        return result

    def _in_order(self, dropped: tuple[int, ...], limit: float | None) -> tuple[list[SampleLoss], float]:
        """Sample after sample until the loss sum passes ``limit``: the exact samples and their sum."""
        samples: list[SampleLoss] = []
        total = 0.0
        n_samples = len(self.calibration.input_ids)
        for sample in self.iter_samples(dropped):
            samples.append(sample)
            total += sample.loss_sum
            if limit is not None and len(samples) < n_samples and total > limit:
                break
        return samples, total

    def _bounded(self, dropped: tuple[int, ...], limit: float) -> tuple[list[SampleLoss], float]:
        """Every sample's layers and lower bound first, the full heads only while ``limit`` is in reach.

        Returns the exact samples and a lower bound of the loss sum (exact when all samples are).
        """
        features: list[torch.Tensor] = []
        bounds: list[float] = []
        for batch_features, batch_bounds in self._bounds(dropped):
            features.append(batch_features)
            bounds.append(sum(s.loss_sum for s in batch_bounds))
            if sum(bounds) > limit:
                return [], sum(bounds)
        samples: list[SampleLoss] = []
        lower = sum(bounds)
        for b, batch in enumerate(self._batches):
            with inference_mode(self.device):
                exact = self._checked(dropped, batch, self._loss_sums(features[b], batch).tolist())
            samples.extend(exact)
            lower += sum(s.loss_sum for s in exact) - bounds[b]
            if len(samples) < len(self.calibration.input_ids) and lower > limit:
                break
        return samples, lower


def _vocab(tail: LMTail) -> int:
    return getattr(tail.head, "out_features", None) or tail.head.weight.shape[0]


def _chunks(tail: LMTail, n: int, max_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, length)`` of chunks of ``n`` positions whose fp32 logits fit in ``max_bytes``."""
    max_bytes = LOGIT_CHUNK_BYTES if max_bytes is None else max_bytes
    rows = max(8, max_bytes // (4 * _vocab(tail)))  # a single row takes a slower, differently rounded path
    for s in range(0, n, rows):
        yield s, min(rows, n - s)


def _nll_rows(tail: LMTail, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(tail.logits(features).float(), targets, reduction="none")


def _kl_rows(tail: LMTail, features: torch.Tensor, dense: torch.Tensor, dense_is_log_probs: bool) -> torch.Tensor:
    logq = torch.log_softmax(tail.logits(features).float(), dim=-1)
    logp = dense if dense_is_log_probs else torch.log_softmax(tail.logits(dense).float(), dim=-1)
    # Clamp rounding noise: KL is non-negative per token, which the exact early stops rely on.
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(dim=-1).clamp_min(0)


def token_losses(
    tail: LMTail,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    dense: torch.Tensor | None = None,
    dense_is_log_probs: bool = False,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """Per-token loss ``[B, T - 1]`` of next-token predictions, in fp32, from the head's input ``features``.

    NLL of ``input_ids`` when ``dense`` is None, else KL(dense || model), with ``dense`` the dense
    model's features ``[B, T, H]`` (or its log-probabilities ``[B, T - 1, V]``). The logits exist only
    ``max_bytes`` (default ``LOGIT_CHUNK_BYTES``) at a time, on chunks of positions; under autograd each
    chunk is recomputed in the backward pass instead of kept. Each row's value is the whole-tensor one.
    """
    B, T = input_ids.shape
    flat = features[:, :-1].reshape(B * (T - 1), features.shape[-1])
    if dense is None:
        other, loss = input_ids[:, 1:].reshape(-1).to(flat.device), _nll_rows
    else:
        other = (dense if dense_is_log_probs else dense[:, :-1]).reshape(B * (T - 1), dense.shape[-1])
        loss = functools.partial(_kl_rows, dense_is_log_probs=dense_is_log_probs)
    grad = torch.is_grad_enabled() and flat.requires_grad
    parts = []
    for s, n in _chunks(tail, len(flat), max_bytes):
        args = (tail, flat[s : s + n], other[s : s + n].to(flat.device))
        parts.append(checkpoint(loss, *args, use_reentrant=False) if grad else loss(*args))
    return torch.cat(parts).view(B, T - 1)


class PerplexityFitness(Fitness):
    """Mean next-token negative log-likelihood (log-perplexity) on the calibration samples (EvoP, SLEB)."""

    name = "perplexity"

    def _loss_sums(self, features: torch.Tensor, batch: _Batch, dense: bool = False) -> torch.Tensor:
        return token_losses(self._tail, features, batch.input_ids.to(features.device)).sum(dim=1)

    def _defines_bound(self) -> bool:
        return True

    def _bound_sums(self, features: torch.Tensor, batch: _Batch) -> torch.Tensor:
        # NLL = logsumexp over the vocabulary - target logit >= logsumexp over rows - target logit.
        sub = self._tail.logits(features[:, :-1], batch.rows).float()
        target = sub.gather(-1, batch.row_targets[..., None].to(sub.device))[..., 0]
        return (torch.logsumexp(sub, dim=-1) - target).sum(dim=1)


class KLFitness(Fitness):
    """Mean KL(dense || masked) of the next-token distributions (EvoPress); 0 for the dense model.

    Has no vocabulary-row lower bound: KL needs the dense-weighted mean of all logits, so its
    early stop works on whole samples only.
    """

    name = "kl"

    def __init__(self, *args: Any, dense_cache_bytes: int = 1 << 30, **kwargs: Any) -> None:
        self._dense_logp: dict[int, torch.Tensor] = {}
        self._dense_cache_bytes = dense_cache_bytes
        super().__init__(*args, **kwargs)

    def _dense_target(self, batch: _Batch) -> tuple[torch.Tensor, bool]:
        """The dense log-probabilities of ``batch`` while they fit the cache, else its features."""
        key = batch.indices[0]
        cached = self._dense_logp.get(key)
        if cached is not None:
            return cached, True
        features = self._tail.features(batch.dense_inputs[-1])
        vocab = _vocab(self._tail)
        used = sum(t.numel() * t.element_size() for t in self._dense_logp.values())
        if used + features[:, :-1, :1].numel() * vocab * 4 > self._dense_cache_bytes:
            return features, False  # chunk by chunk, each time
        flat = features[:, :-1].reshape(-1, features.shape[-1])
        logp = torch.cat([
            torch.log_softmax(self._tail.logits(flat[s : s + n]).float(), dim=-1)
            for s, n in _chunks(self._tail, len(flat))
        ]).view(*features[:, :-1].shape[:2], vocab)
        self._dense_logp[key] = logp
        return logp, True

    def _loss_sums(self, features: torch.Tensor, batch: _Batch, dense: bool = False) -> torch.Tensor:
        if dense:
            return torch.zeros(features.shape[0])
        target, is_log_probs = self._dense_target(batch)
        return token_losses(self._tail, features, batch.input_ids, target, is_log_probs).sum(dim=1)


FITNESSES: dict[str, type[Fitness]] = {"perplexity": PerplexityFitness, "kl": KLFitness}


def make_fitness(name: str, model: nn.Module, calibration: CalibrationSet, **kwargs: Any) -> Fitness:
    """Build a fitness by name ("perplexity" or "kl")."""
    if name not in FITNESSES:
        raise ValueError(f"unknown fitness {name!r}; use one of {sorted(FITNESSES)}")
    return FITNESSES[name](model, calibration, **kwargs)


def plain_forward_loss(
    model: nn.Module, calibration: CalibrationSet, dropped: Sequence[int], kind: str = "perplexity"
) -> float:
    """SLEB's way: toggle the layers in place and run the whole pruned model (the reference result)."""
    device = next(model.parameters()).device
    tail = lm_tail(model)
    ids = calibration.input_ids
    total = 0.0
    dense: list[torch.Tensor] = []
    if kind == "kl":
        with inference_mode(device):
            dense = [model_features(model, row[None].to(device)) for row in ids]
    with masked(model, dropped), inference_mode(device):
        for i, row in enumerate(ids):
            features = model_features(model, row[None].to(device))
            losses = token_losses(tail, features, row[None].to(device), dense[i] if kind == "kl" else None)
            total += float(losses.sum())
    return total / (ids.shape[0] * (ids.shape[1] - 1))
