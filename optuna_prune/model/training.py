"""Short fine-tunes of a masked model: DarwinLM's training-aware selection and post-compression training.

The best mask before training is not always the best after it, so DarwinLM trains every candidate
briefly before judging it. Here a candidate trains in place, inside ``layers.masked``: AdamW on the
kept decoder layers (or LoRA adapters on them, through ``peft``), with either the KL divergence to
the dense model's next-token distribution (distillation) or the plain LM loss.

Training must never leak from one candidate into the next, and a search must not copy the model
per candidate: :class:`ParamSnapshot` keeps one copy of the decoder layers, taken before any
training, and :class:`MaskTraining` puts the trained tensors back in place (``param.data.copy_``)
when it exits, whatever happened inside. The dense model's targets are the outputs of its last
decoder layer, recorded once before any training; the untrained tail (final norm, ``lm_head``)
turns them into the dense logits when needed, so distillation stays exact while layers change.

Training text comes from the calibration split of the corpus, taken from its end (calibration
windows come from its start) and with every window that shares text with a calibration sample
left out. Everything here is model side: it knows nothing of Optuna.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optuna_prune.model.calibration import CHARS_PER_TOKEN, CalibrationError, load_texts, tokenize
from optuna_prune.model.devices import inference_mode, pick_dtype
from optuna_prune.model.fitness import NonFiniteLossError, token_losses
from optuna_prune.model.layers import find_layer_stack, lm_tail, masked, model_features

TRAIN_LOSSES = ("kl", "lm")
_OVERLAP_NGRAM = 32  # tokens in a row that a training window may not share with a calibration sample


class TrainingError(ValueError):
    """Training settings out of range, or a training option whose package is missing."""


@dataclass(frozen=True)
class TrainSettings:
    """How a masked model is trained.

    Args:
        loss: "kl" (distil the dense model's next-token distribution, DarwinLM) or "lm" (next-token
            cross-entropy on the training text).
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        batch_size: Windows per optimiser step (and per scoring forward pass).
        lora: LoRA rank; 0 trains the kept layers' weights themselves. LoRA needs ``peft``
            (``pip install optuna-prune[train]``) and saves the optimiser's memory on large models.
        lora_alpha: LoRA scaling numerator (default ``2 * lora``).
        max_grad_norm: Gradient clipping (0 turns it off).
        seed: Seeds the LoRA initialisation and any dropout, so the same candidate trains the same.
    """

    loss: str = "kl"
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 1
    lora: int = 0
    lora_alpha: float | None = None
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in TRAIN_LOSSES:
            raise TrainingError(f"unknown training loss {self.loss!r}; use one of {', '.join(TRAIN_LOSSES)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise TrainingError(
                f"lr={self.lr} must be > 0, weight_decay={self.weight_decay} and "
                f"max_grad_norm={self.max_grad_norm} >= 0"
            )
        if self.batch_size < 1 or self.lora < 0:
            raise TrainingError(f"batch_size={self.batch_size} must be >= 1 and lora={self.lora} >= 0")


@dataclass
class TokenData:
    """Token windows ``[W, T]`` and, for distillation, the dense model's last-layer output on them."""

    input_ids: torch.Tensor
    dense_hidden: torch.Tensor | None = None  # [W, T, H] on the CPU, the model's dtype

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def training_windows(
    tokenizer: Any,
    source: str,
    n_tokens: int,
    seq_len: int,
    data_dir: str | Path | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ceil(n_tokens / seq_len)`` consecutive windows of training text, ``[W, seq_len]`` int64.

    The text is the end of the calibration split of ``source`` (``calibration.load_texts``), so it
    is far from where calibration windows are drawn; any window sharing 32 tokens in a row with a
    row of ``exclude`` (the calibration samples) is skipped all the same. The same arguments give
    the same windows, in the same order.
    """
    n_windows = math.ceil(n_tokens / seq_len) if n_tokens > 0 else 0
    if n_windows == 0:
        return torch.empty(0, seq_len, dtype=torch.int64)
    text = "\n\n".join(load_texts(source, "calibration", data_dir))
    banned = _ngrams(exclude) if exclude is not None else set()
    budget = CHARS_PER_TOKEN * 3 * n_windows * seq_len // 2
    while True:
        tail = text[max(0, len(text) - budget) :]
        ids = tokenize(tokenizer, tail, add_special_tokens=False)
        if budget < len(text):
            ids = ids[1:]  # the cut may split a word: drop its first token
        windows = []
        for s in range(0, len(ids) - seq_len + 1, seq_len):
            window = ids[s : s + seq_len]
            if banned.isdisjoint(_ngrams([window])):
                windows.append(window)
        if len(windows) >= n_windows:
            return torch.tensor(windows[:n_windows], dtype=torch.int64)
        if budget >= len(text):
            raise CalibrationError(
                f"{source!r} has {len(windows) * seq_len} tokens of training text apart from the "
                f"calibration samples, fewer than the {n_tokens} asked for; lower the training "
                "tokens (search: --train-tokens, finetune: --tokens) or use a larger corpus"
            )
        budget *= 2


def _ngrams(rows: torch.Tensor | list[list[int]]) -> set[tuple[int, ...]]:
    n = _OVERLAP_NGRAM
    out: set[tuple[int, ...]] = set()
    for row in rows:
        seq = row.tolist() if isinstance(row, torch.Tensor) else list(row)
        out.update(tuple(seq[i : i + n]) for i in range(max(1, len(seq) - n + 1)))
    return out


def dense_last_hidden(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """The dense model's last decoder layer output on each window, ``[W, T, H]`` on the CPU.

    ``layers.lm_tail`` of it gives the dense logits; recorded before any training, it stays the
    distillation target while the layers train (the tail is never trained).
    """
    stack = find_layer_stack(model)
    device = next(model.parameters()).device
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        outputs.append((output[0] if isinstance(output, tuple) else output).detach().cpu())

    handle = stack.layers[-1].register_forward_hook(keep)
    try:
        with inference_mode(device):
            for s in range(0, len(input_ids), batch_size):
                model(input_ids=input_ids[s : s + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return torch.cat(outputs) if outputs else torch.empty(0)


def token_data(model: nn.Module, input_ids: torch.Tensor, loss: str, batch_size: int = 1) -> TokenData:
    """Windows plus what ``loss`` needs of the dense model (its last-layer outputs for "kl")."""
    dense = dense_last_hidden(model, input_ids, batch_size) if loss == "kl" else None
    return TokenData(input_ids, dense)


class ParamSnapshot:
    """Copies of a model's decoder-layer parameters, put back in place after a candidate trains.

    Taken once (one copy of the layer stack, on ``device``), it serves every candidate: restoring
    copies into the same ``Parameter`` tensors, so nothing that holds them (hooks, the masked
    model, a fitness) sees a new object.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self._layers = find_layer_stack(model).layers
        self._saved = [
            {name: p.detach().to(device, copy=True) for name, p in layer.named_parameters()}
            for layer in self._layers
        ]

    def restore(self, layers: Sequence[int] | None = None) -> None:
        """Copy the saved values back into the parameters of ``layers`` (default: all)."""
        with torch.no_grad():
            for i in range(len(self._layers)) if layers is None else layers:
                saved = self._saved[i]
                for name, p in self._layers[i].named_parameters():
                    p.data.copy_(saved[name])


class MaskTraining(contextlib.AbstractContextManager):
    """One mask's fine-tune, in place: on entry the model runs masked and its kept layers (or LoRA
    adapters on them) become trainable; :meth:`train` and :meth:`score` may alternate (the
    optimiser state carries over, as in DarwinLM's stages); on exit everything is undone.

    On exit the mask is lifted, gradients, ``requires_grad`` flags and train/eval mode are reset,
    and the training is undone: LoRA adapters are removed, or the kept layers get their
    ``restore`` snapshot values back. With ``keep`` the training stays instead (LoRA merged into
    the weights): that is post-compression training, whose model is then saved.

    Full fine-tuning updates the weights in their own dtype: train fp32 weights (CUDA autocast
    still computes in bf16); bf16 weights lose small updates, use LoRA for those.

    Args:
        model: The model, unmasked; it is masked for the duration.
        dropped: Layers the candidate drops.
        data: Training windows (and dense targets for "kl"), consumed in order by :meth:`train`.
        settings: Loss, optimiser, LoRA.
        restore: Snapshot to restore the trained layers from on exit (needed to undo a full
            fine-tune; one snapshot, taken before any training, serves every candidate).
        keep: Keep the training on exit instead of undoing it.
    """

    def __init__(
        self,
        model: nn.Module,
        dropped: Sequence[int],
        data: TokenData,
        settings: TrainSettings,
        restore: ParamSnapshot | None = None,
        keep: bool = False,
    ) -> None:
        if not keep and not settings.lora and restore is None:
            raise ValueError("undoing a full fine-tune needs a ParamSnapshot (restore=...), or pass keep=True")
        if settings.loss == "kl" and data.dense_hidden is None and len(data):
            raise ValueError("kl training needs the dense targets: build data with token_data(..., 'kl')")
        self.model = model
        self.dropped = tuple(dropped)
        self.data = data
        self.settings = settings
        self._restore = restore
        self._keep = keep
        self._stack = find_layer_stack(model)
        self._kept = [i for i in range(self._stack.num_layers) if i not in set(self.dropped)]
        self._tail = lm_tail(model)
        self.device = next(model.parameters()).device
        self.cursor = 0  # training windows consumed so far
        self.steps = 0
        self._exit = contextlib.ExitStack()
        self._lora: Any = None

    # --- context ---------------------------------------------------------------------------------

    def __enter__(self) -> MaskTraining:
        with contextlib.ExitStack() as stack:
            flags = {p: p.requires_grad for p in self.model.parameters()}
            training = self.model.training
            stack.callback(self._reset, flags, training)
            devices = [self.device] if self.device.type == "cuda" else []
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.manual_seed(self.settings.seed)
            stack.enter_context(masked(self.model, self.dropped))
            if self.settings.lora:
                stack.callback(self._remove_lora)
                params = self._add_lora()
            else:
                if not self._keep:
                    assert self._restore is not None
                    stack.callback(self._restore.restore, self._kept)
                params = self._kept_params()
            for p in flags:  # every parameter, the dropped layers' too
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            self._params = params
            self.optimizer = torch.optim.AdamW(
                params, lr=self.settings.lr, weight_decay=self.settings.weight_decay
            )
            self._exit = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.optimizer = None
        self._exit.close()

    def _reset(self, flags: dict[nn.Parameter, bool], training: bool) -> None:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
        self.model.train(training)

    def _kept_params(self) -> list[nn.Parameter]:
        return [p for i in self._kept for p in self._stack.layers[i].parameters()]

    def _add_lora(self) -> list[nn.Parameter]:
        try:
            # deferred: loads peft only when this runs
            from peft import LoraConfig, LoraModel
        except ImportError:
            raise TrainingError(
                "LoRA training needs peft: pip install 'optuna-prune[train]' (or train without --lora)"
            ) from None
        # Exact module names inside the kept layers: the masked model lists only those.
        inside = {id(m) for i in self._kept for m in self._stack.layers[i].modules()}
        targets = [
            name for name, m in self.model.named_modules()
            if id(m) in inside and isinstance(m, nn.Linear)
        ]
        rank = self.settings.lora
        config = LoraConfig(
            r=rank, lora_alpha=self.settings.lora_alpha or 2 * rank, lora_dropout=0.0,
            target_modules=targets,
        )
        self._lora = LoraModel(self.model, config, "default")
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def _remove_lora(self) -> None:
        if self._lora is None:
            return
        if self._keep:
            self._lora.merge_and_unload()
        else:
            self._lora.unload()
        if "peft_config" in vars(self.model):
            del self.model.peft_config
        self._lora = None

    # --- training and scoring --------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=pick_dtype(self.device))
        return contextlib.nullcontext()

    def _batches(self, data: TokenData, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for s in range(start, stop, self.settings.batch_size):
            e = min(s + self.settings.batch_size, stop)
            ids = data.input_ids[s:e].to(self.device)
            dense = None
            if data.dense_hidden is not None:
                with torch.no_grad(), self._autocast():
                    dense = self._tail.features(data.dense_hidden[s:e].to(self.device))
            yield ids, dense

    def train(self, n_windows: int) -> list[float]:
        """Train on the next ``n_windows`` training windows; the mean loss of each step."""
        stop = self.cursor + n_windows
        if stop > len(self.data):
            raise ValueError(
                f"asked to train on windows {self.cursor}..{stop - 1} but only {len(self.data)} exist"
            )
        losses: list[float] = []
        self.model.train()
        for ids, dense in self._batches(self.data, self.cursor, stop):
            with self._autocast():
                features = model_features(self.model, ids)
                loss = token_losses(self._tail, features, ids, dense if self.settings.loss == "kl" else None).mean()
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"training loss of mask {list(self.dropped)} is {float(loss)} at step {self.steps}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self._params, self.settings.max_grad_norm)
            self.optimizer.step()
            losses.append(float(loss.detach()))
            self.steps += 1
        self.model.eval()
        self.cursor = stop
        return losses

    def score(
        self, data: TokenData, n_samples: int | None = None, loss: str = "lm", stop_above: float | None = None
    ) -> list[float]:
        """Per-window sums of the per-token ``loss`` on the first ``n_samples`` windows of ``data``.

        With ``stop_above`` it stops once the running sum over all of ``data``'s tokens exceeds it
        (the per-token losses are non-negative, so the candidate cannot get below it any more).
        """
        n = len(data) if n_samples is None else n_samples
        total_tokens = len(data) * (data.seq_len - 1)
        sums: list[float] = []
        with inference_mode(self.device):
            for ids, dense in self._batches(data, 0, n):
                features = model_features(self.model, ids)
                for s in token_losses(self._tail, features, ids, dense if loss == "kl" else None).sum(dim=1).tolist():
                    if not math.isfinite(s):
                        raise NonFiniteLossError(
                            f"loss of trained mask {list(self.dropped)} is {s} on sample {len(sums)}"
                        )
                    sums.append(s)
                if stop_above is not None and sum(sums) / total_tokens > stop_above:
                    break
        return sums
