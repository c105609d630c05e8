"""Width pruning: remove MLP channels of each decoder layer by a Wanda-style importance.

Each decoder layer ``l`` keeps the most important channels of its MLP's intermediate dimension and
loses ``units[l] / resolution`` of them (the rates :class:`~optuna_prune.search.rate_space.RateSpace`
searches). A channel's importance is the Wanda score summed over every weight it removes (as in
"Wanda-sp"): ``||h_c|| * sum_i |W_down[i, c]| + sum_j (|W_gate[c, j]| + |W_up[c, j]|) * ||x_j||``,
with ``x`` the MLP input and ``h`` the down projection's input on calibration samples.

A search scores rates without rebuilding anything: :func:`channels_masked` zeroes the pruned
channels at the down projection's input, which gives exactly the output of the smaller MLP.
:func:`prune_channels` then really removes them (smaller ``nn.Linear`` weights) for export.

Supported: Llama-style gated MLPs (``gate_proj``, ``up_proj``, ``down_proj``: Llama, SmolLM2,
Mistral, Qwen2/3, Gemma). Attention heads are not pruned: with grouped-query attention a head can
only go with its whole KV group, and MLP channels hold about two thirds of a decoder's weights.

Saving: transformers configs hold one ``intermediate_size`` for every layer, so
:func:`save_width_pruned` writes a normal checkpoint plus the config field
``optuna_prune_intermediate_sizes`` (one width per layer). ``AutoModelForCausalLM.from_pretrained``
refuses it (size mismatch); :func:`optuna_prune.model.models.load_model` recognises the field and builds the
model from its config, resizes each MLP to its recorded width (:func:`prune_channels`) and loads the
safetensors weights strictly. Model side: no Optuna here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from optuna_prune.model.calibration import CalibrationSet
from optuna_prune.model.devices import inference_mode
from optuna_prune.model.fitness import FitnessResult, NonFiniteLossError, SampleLoss, token_losses
from optuna_prune.model.layers import (
    UnsupportedModelError,
    find_layer_stack,
    lm_tail,
    model_features,
    output_folder,
)

SIZES_KEY = "optuna_prune_intermediate_sizes"
"""Config field of a width-pruned checkpoint: the MLP intermediate size of each decoder layer."""


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP of every decoder layer, checked to be a Llama-style gated MLP of nn.Linear."""
    mlps = []
    for i, layer in enumerate(find_layer_stack(model).layers):
        mlp = getattr(layer, "mlp", None)
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in parts):
            raise UnsupportedModelError(
                f"layer {i} of {type(model).__name__} has no Llama-style gated MLP (gate_proj, up_proj, "
                f"down_proj as nn.Linear; found {type(mlp).__name__}): width pruning supports Llama, "
                "Mistral, Qwen and Gemma models"
            )
        mlps.append(mlp)
    return mlps


def intermediate_sizes(model: nn.Module) -> list[int]:
    """The MLP width (intermediate channels) of each decoder layer."""
    return [mlp.down_proj.in_features for mlp in gated_mlps(model)]


def channel_importance(model: nn.Module, calibration: CalibrationSet) -> list[torch.Tensor]:
    """Wanda-sp importance of each MLP channel, per layer (float32 CPU tensors, higher = keep)."""
    mlps = gated_mlps(model)
    device = next(model.parameters()).device
    x_sq: list[torch.Tensor | float] = [0.0] * len(mlps)
    h_sq: list[torch.Tensor | float] = [0.0] * len(mlps)

    def squares(store: list, i: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            store[i] = store[i] + x.pow(2).reshape(-1, x.shape[-1]).sum(0)

        return hook

    handles = [h for i, mlp in enumerate(mlps) for h in (
        mlp.gate_proj.register_forward_pre_hook(squares(x_sq, i)),
        mlp.down_proj.register_forward_pre_hook(squares(h_sq, i)),
    )]
    try:
        with inference_mode(device):
            for row in calibration.input_ids:
                model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    scores = []
    for mlp, xs, hs in zip(mlps, x_sq, h_sq, strict=True):
        x_norm, h_norm = torch.as_tensor(xs).sqrt(), torch.as_tensor(hs).sqrt()
        into = (mlp.gate_proj.weight.detach().float().abs() + mlp.up_proj.weight.detach().float().abs()) @ x_norm
        out = mlp.down_proj.weight.detach().float().abs().sum(0) * h_norm
        scores.append((into + out).cpu())
    return scores


def kept_channels(
    importance: Sequence[torch.Tensor], units: Sequence[int], resolution: int
) -> list[torch.Tensor]:
    """Per layer, the sorted indices of the channels kept when layer ``l`` loses ``units[l]/resolution``."""
    if len(units) != len(importance):
        raise ValueError(f"{len(units)} unit counts for {len(importance)} layers")
    keep = []
    for score, u in zip(importance, units, strict=True):
        if not 0 <= u <= resolution:
            raise ValueError(f"units {list(units)} must lie in 0..{resolution}")
        n = score.numel() - round(u * score.numel() / resolution)
        keep.append(torch.sort(torch.topk(score, n).indices).values)
    return keep


@contextmanager
def channels_masked(model: nn.Module, keep: Sequence[torch.Tensor]) -> Iterator[nn.Module]:
    """Run ``model`` as if only the ``keep`` channels of each MLP existed (hooks; removed on exit)."""
    handles = []
    for mlp, idx in zip(gated_mlps(model), keep, strict=True):
        width = mlp.down_proj.in_features
        if idx.numel() == width:
            continue
        mask = torch.zeros(width, dtype=mlp.down_proj.weight.dtype, device=mlp.down_proj.weight.device)
        mask[idx.to(mask.device)] = 1
        handles.append(mlp.down_proj.register_forward_pre_hook(lambda m, args, _mask=mask: (args[0] * _mask,)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = old.weight.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=old.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias[rows.to(weight.device)] if rows is not None else old.bias)
    return new.requires_grad_(old.weight.requires_grad)


def prune_channels(model: PreTrainedModel, keep: Sequence[torch.Tensor]) -> PreTrainedModel:
    """Remove every MLP channel not in ``keep`` for good (in place); records the widths in the config."""
    with torch.no_grad():
        for mlp, idx in zip(gated_mlps(model), keep, strict=True):
            mlp.gate_proj = _linear(mlp.gate_proj, rows=idx)
            mlp.up_proj = _linear(mlp.up_proj, rows=idx)
            mlp.down_proj = _linear(mlp.down_proj, cols=idx)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = int(idx.numel())
    setattr(model.config, SIZES_KEY, intermediate_sizes(model))
    return model


def save_width_pruned(
    model: PreTrainedModel,
    keep: Sequence[torch.Tensor],
    out_dir: str | Path,
    tokenizer: Any = None,
    extra_card: dict[str, Any] | None = None,
) -> Path:
    """Prune ``model`` (which the caller gives up) to ``keep`` and save it; load with :func:`optuna_prune.model.models.load_model`."""
    dense = sum(p.numel() for p in model.parameters())
    source = getattr(model.config, "name_or_path", "") or type(model).__name__
    before = intermediate_sizes(model)
    prune_channels(model, keep)
    after = intermediate_sizes(model)
    params = sum(p.numel() for p in model.parameters())
    lines = [
        "---", "library_name: transformers", "tags:", "- optuna-prune", "- width-pruning", "---", "",
        f"# {source}, MLP channels pruned per layer", "",
        f"- base model: `{source}`",
        f"- MLP intermediate sizes per layer: {after} (originally {before})",
        f"- MLP channels removed: {1 - sum(after) / sum(before):.2%}; parameters {params:,} of {dense:,}",
        *(f"- {key}: {value}" for key, value in (extra_card or {}).items()), "",
        "Made with optuna-prune. Load with `optuna_prune.model.models.load_model(path)`: the config records",
        f"each layer's MLP width in `{SIZES_KEY}`, which plain `from_pretrained` does not read.", "",
    ]
    with output_folder(out_dir) as out:
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return Path(out_dir)


class WidthFitness:
    """Mean next-token NLL of the model with each layer's MLP pruned by a number of units.

    The channel importance is computed once on the calibration samples (or given); a candidate is
    scored by masking its pruned channels, so the model is never rebuilt during a search.
    ``evaluate`` has the interface of :meth:`optuna_prune.model.fitness.Fitness.evaluate`, with a unit
    vector instead of a drop mask.
    """

    name = "perplexity"

    def __init__(
        self,
        model: PreTrainedModel,
        calibration: CalibrationSet,
        resolution: int,
        importance: Sequence[torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.calibration = calibration
        self.resolution = int(resolution)
        self.device = next(model.parameters()).device
        self.widths = intermediate_sizes(model)
        self.importance = list(importance) if importance is not None else channel_importance(model, calibration)
        self.num_layers = len(self.widths)
        ids = calibration.input_ids
        self.total_tokens = ids.shape[0] * (ids.shape[1] - 1)
        self.layer_forwards = 0
        self._tail = lm_tail(model)

    def kept(self, units: Sequence[int]) -> list[torch.Tensor]:
        """The channels each layer keeps under ``units``."""
        return kept_channels(self.importance, units, self.resolution)

    def evaluate(self, units: Sequence[int], stop_above: float | None = None) -> FitnessResult:
        """Mean per-token loss; stops exactly once it must exceed ``stop_above`` (then incomplete)."""
        ids = self.calibration.input_ids
        samples: list[SampleLoss] = []
        partial, complete = 0.0, True
        with channels_masked(self.model, self.kept(units)), inference_mode(self.device):
            for i, row in enumerate(ids):
                row = row.to(self.device)
                loss = float(token_losses(self._tail, model_features(self.model, row[None]), row[None]).sum())
                if not math.isfinite(loss):
                    raise NonFiniteLossError(f"loss of units {list(units)} is {loss} on calibration sample {i}")
                samples.append(SampleLoss(i, loss, ids.shape[1] - 1))
                partial += loss
                if stop_above is not None and i + 1 < len(ids) and partial / self.total_tokens > stop_above:
                    complete = False
                    break
        forwards = len(samples) * self.num_layers
        self.layer_forwards += forwards
        return FitnessResult(
            dropped=(), value=partial / self.total_tokens, samples=tuple(samples), complete=complete,
            layer_forwards=forwards, total_tokens=self.total_tokens,
        )
