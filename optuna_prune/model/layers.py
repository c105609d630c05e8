"""Layer surgery for Hugging Face causal LMs: find the decoder stack, mask layers in place, prune, export.

A search evaluates thousands of masks, so `masked` only swaps module references and a few config values
(no copies, no re-registration) and undoes every edit on exit. `prune_model` makes the same edits
permanent, so a pruned model saves to a checkpoint that plain transformers loads without custom code.
"""

from __future__ import annotations

import operator
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

# Attributes through which a layer (or its attention) knows its own position, e.g. to address the KV cache.
_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_index", "layer_number")
# Config fields holding the layer count under the names architectures use (aliases resolve via attribute_map).
_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Lists on the config that have one entry per model, not per layer, even when their length happens to match.
_NOT_PER_LAYER = frozenset({"architectures"})
# Names the base models give the norm applied after the last decoder layer.
_FINAL_NORMS = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f", "final_norm")
# Names decoder layers give their attention and MLP blocks, for sub-block drops.
_ATTENTION_ATTRS = ("self_attn", "attn", "attention", "self_attention")
_MLP_ATTRS = ("mlp", "feed_forward", "ffn")
_STACK_KEY = "_optuna_prune_layer_stack"
_MISSING = object()


class UnsupportedModelError(ValueError):
    """The model's layout is not one this module can find its decoder layers (or final norm) in."""


@dataclass
class LayerStack:
    """Where a model keeps its decoder layers, plus the original full list while the model is masked."""

    model: PreTrainedModel
    parent: nn.Module
    attr: str
    layers: list[nn.Module]
    # Per original layer: (module, attribute, original value) of every layer-index attribute inside it.
    _index_refs: list[list[tuple[nn.Module, str, int]]] = field(default_factory=list, repr=False)
    _undo: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _is_current(self) -> bool:
        """True while the model still holds exactly this stack (so a cached stack may be reused)."""
        live = getattr(self.parent, self.attr, None)
        return isinstance(live, nn.ModuleList) and list(live) == self.layers  # Module == is identity


def _decoder_config(model: nn.Module) -> Any:
    return model.config.get_text_config(decoder=True)


def find_layer_stack(model: nn.Module) -> LayerStack:
    """Locate the decoder layers by introspection: an nn.ModuleList of `num_hidden_layers` identical blocks.

    Works for any layout (`model.layers`, `decoder.layers`, `transformer.h`, ...) without a table of model
    names. When several lists qualify, the one whose blocks carry a layer index (they address a KV cache)
    and hold the most parameters wins. The result is cached on the model and reused while it still matches.
    """
    cached = getattr(model, "__dict__", {}).get(_STACK_KEY)
    if cached is not None and (cached._undo is not None or cached._is_current()):
        return cached
    name = type(model).__name__
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not hasattr(config, "get_text_config"):
        raise UnsupportedModelError(
            f"{name} is not a transformers model with a config; pass a PreTrainedModel (causal LM)"
        )
    config = _decoder_config(model)
    if getattr(config, "is_heterogeneous", False):
        raise UnsupportedModelError(
            f"{name} has a heterogeneous per_layer_config, whose per-layer overrides cannot be re-indexed yet"
        )
    n = getattr(config, "num_hidden_layers", None)
    candidates = [
        (path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and n is not None
        and len(mod) == n > 0
        and len({type(m) for m in mod}) == 1
    ]
    if not candidates:
        raise UnsupportedModelError(
            f"cannot find the decoder layers of {name}: looked for an nn.ModuleList of "
            f"config.num_hidden_layers={n} blocks of one class"
        )

    def score(item: tuple[str, nn.ModuleList]) -> tuple[bool, int]:
        block = item[1][0]
        has_index = any(hasattr(m, a) for m in block.modules() for a in _INDEX_ATTRS)
        return has_index, sum(p.numel() for p in block.parameters())

    path, mlist = max(candidates, key=score)  # max keeps the first (shallowest) on ties
    parent_path, _, attr = path.rpartition(".")
    layers = list(mlist)
    index_refs = [
        [
            (m, a, v)
            for m in layer.modules()
            for a in _INDEX_ATTRS
            if isinstance(v := getattr(m, a, None), int) and not isinstance(v, bool)
        ]
        for layer in layers
    ]
    stack = LayerStack(model, model.get_submodule(parent_path), attr, layers, index_refs)
    model.__dict__[_STACK_KEY] = stack
    return stack


def check_drop(num_layers: int, dropped: Sequence[int], unit: str = "layer") -> tuple[int, ...]:
    """Validate indices of layers (or other units) to drop; return them sorted and de-duplicated.

    Rejects negative and too-large indices (no Python-style wrap-around: a mask must mean one thing) and
    masks that would leave no unit.
    """
    indices = sorted({operator.index(i) for i in dropped})
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"{unit} indices {bad} out of range: the model has {num_layers} {unit}s, "
            f"valid indices are 0..{num_layers - 1}"
        )
    if len(indices) >= num_layers:
        raise ValueError(
            f"dropping {len(indices)} of {num_layers} {unit}s would drop every {unit}; keep at least one"
        )
    return tuple(indices)


class SubBlocks(tuple):
    """Dropped sub-blocks: unit ``2 l`` is layer ``l``'s attention, ``2 l + 1`` its MLP.

    A sorted tuple of unit indices whose type tells :func:`masked`, :func:`save_pruned` and the
    fitness to read it per sub-block, not per layer. A layer with both units dropped is dropped.
    """

    def __new__(cls, units: Sequence[int]) -> SubBlocks:
        return super().__new__(cls, sorted({operator.index(u) for u in units}))

    def layers(self) -> tuple[int, ...]:
        """The layers whose attention and MLP are both dropped."""
        return tuple(u // 2 for u in self if u % 2 == 0 and u + 1 in self)

    def halves(self) -> dict[int, int]:
        """Layer -> the one part it loses (0: attention, 1: MLP), for layers that keep the other."""
        full = set(self.layers())
        return {u // 2: u % 2 for u in self if u // 2 not in full}


def sub_block_names(layer: nn.Module) -> tuple[str, str]:
    """The attribute names of a decoder layer's attention and MLP blocks."""
    names = []
    for options in (_ATTENTION_ATTRS, _MLP_ATTRS):
        found = next((n for n in options if isinstance(getattr(layer, n, None), nn.Module)), None)
        if found is None:
            raise UnsupportedModelError(
                f"{type(layer).__name__} has none of {', '.join(options)}: sub-block pruning needs a "
                "decoder layer with named attention and MLP blocks (Llama, Mistral, Qwen, Gemma, GPT-2, ...)"
            )
        names.append(found)
    return names[0], names[1]


class _ZeroBlock(nn.Module):
    """Stands in for a dropped attention or MLP block: adds nothing to the residual stream.

    Attention blocks return ``(output, weights)`` in transformers, MLPs a tensor. Only the hidden
    state's shape is read, so the block costs nothing.
    """

    def __init__(self, attention: bool) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        zero = torch.zeros_like(hidden)
        return (zero, None) if self.attention else zero


_ZERO_BLOCKS = (_ZeroBlock(attention=True), _ZeroBlock(attention=False))


@contextmanager
def sub_blocks_dropped(layer: nn.Module, part: int) -> Iterator[nn.Module]:
    """Run one decoder layer without its attention (``part`` 0) or MLP (1), e.g. in a fitness."""
    name = sub_block_names(layer)[part]
    module = layer._modules[name]
    layer._modules[name] = _ZERO_BLOCKS[part]
    try:
        yield layer
    finally:
        layer._modules[name] = module


def _apply(stack: LayerStack, kept: Sequence[int]) -> Callable[[], None]:
    """Make the model run only the `kept` layers; return a function that undoes every edit exactly."""
    edits: list[tuple[Any, str, Any]] = []

    def set_attr(obj: Any, name: str, value: Any) -> None:
        edits.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    # Swap the ModuleList's registry for a new dict: same layer objects, so no weights move and
    # hooks on the layers stay; the original dict is put back untouched.
    mlist = getattr(stack.parent, stack.attr)
    set_attr(mlist, "_modules", {str(j): stack.layers[i] for j, i in enumerate(kept)})

    config = _decoder_config(stack.model)
    total = stack.num_layers
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == total and name not in _NOT_PER_LAYER:
            set_attr(config, name, type(value)(value[i] for i in kept))
    for name in _COUNT_ATTRS:
        if getattr(config, name, None) == total:
            set_attr(config, name, len(kept))

    for j, i in enumerate(kept):
        if i != j:
            for module, name, value in stack._index_refs[i]:
                edits.append((module, name, value))
                setattr(module, name, value - i + j)  # keeps 1-based schemes 1-based

    def undo() -> None:
        for obj, name, value in reversed(edits):
            setattr(obj, name, value)

    return undo


def _kept(num_layers: int, dropped: Sequence[int]) -> tuple[int, ...]:
    drop = set(check_drop(num_layers, dropped))
    return tuple(i for i in range(num_layers) if i not in drop)


def _unmasked_stack(model: nn.Module) -> LayerStack:
    stack = find_layer_stack(model)
    if stack._undo is not None:
        raise RuntimeError(f"{type(model).__name__} is already masked; leave the `masked` block first")
    return stack


@contextmanager
def masked(model: PreTrainedModel, dropped: Sequence[int]) -> Iterator[PreTrainedModel]:
    """Temporarily run `model` without the `dropped` layers (in place); everything is restored on exit.

    While masked the model behaves like a pruned one, including `generate()` with a KV cache: the config's
    layer count and per-layer lists (e.g. `layer_types`) are sliced and layer indices renumbered.
    :class:`SubBlocks` also stand in a zero block for each dropped attention or MLP of a kept layer
    (for scoring: a KV cache skips those attentions, so do not `generate()` with them).
    """
    stack = _unmasked_stack(model)
    if isinstance(dropped, SubBlocks):
        check_drop(2 * stack.num_layers, dropped, "sub-block")
        zeroed = ExitStack()
        for layer_index, part in dropped.halves().items():
            zeroed.enter_context(sub_blocks_dropped(stack.layers[layer_index], part))
        undo_halves = zeroed.close
        try:
            undo_layers = _apply(stack, _kept(stack.num_layers, dropped.layers()))
        except BaseException:
            undo_halves()
            raise

        def undo() -> None:
            undo_layers()
            undo_halves()
    else:
        undo = _apply(stack, _kept(stack.num_layers, dropped))
    stack._undo = undo
    try:
        yield model
    finally:
        stack._undo = None
        undo()


def prune_model(model: PreTrainedModel, dropped: Sequence[int]) -> PreTrainedModel:
    """Remove the `dropped` layers for good (in place) and return the model, ready for `save_pretrained`."""
    stack = _unmasked_stack(model)
    _apply(stack, _kept(stack.num_layers, dropped))
    del model.__dict__[_STACK_KEY]  # the dropped layers are no longer part of the model
    return model


def save_pruned(
    model: PreTrainedModel,
    dropped: Sequence[int],
    out_dir: str | Path,
    tokenizer: Any = None,
    extra_card: dict[str, Any] | None = None,
) -> Path:
    """Prune `model` (which the caller gives up) and save it as a plain safetensors checkpoint.

    The folder loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and no custom code; its README.md
    records which original layers were dropped plus any `extra_card` items (study, score, ...).
    """
    stack = _unmasked_stack(model)
    total = stack.num_layers
    blocks = None
    if isinstance(dropped, SubBlocks):
        blocks = SubBlocks(check_drop(2 * total, dropped, "sub-block"))
        dropped = blocks.layers()
    drop = check_drop(total, dropped)
    config = _decoder_config(model)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        # Such layers derive their attention scale from their index at load time, which pruning renumbers.
        raise UnsupportedModelError(
            f"{type(model).__name__} with scale_attn_by_inverse_layer_idx=True cannot be exported pruned: "
            "reloading would rescale the renumbered layers"
        )
    source = getattr(model.config, "name_or_path", "") or type(model).__name__
    if blocks is not None:
        extra_card = {**_zero_halves(stack, blocks.halves()), **(extra_card or {})}
    prune_model(model, drop)
    with output_folder(out_dir) as out:
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        (out / "README.md").write_text(_model_card(source, total, drop, extra_card or {}), encoding="utf-8")
    return Path(out_dir)


@contextmanager
def output_folder(out_dir: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` whose files move into ``out_dir`` when the block succeeds.

    A save that fails half-way (a model that refuses ``save_pretrained``, a full disk) then leaves no
    folder, or an existing one as it was, instead of an empty or half-written checkpoint.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            tmp.rename(out)
        else:  # an earlier export: its files are replaced one by one, others kept
            for item in tmp.iterdir():
                target = out / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                item.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _zero_halves(stack: LayerStack, halves: dict[int, int]) -> dict[str, list[int]]:
    """Zero every weight of each dropped attention or MLP of a kept layer; what the card says of it.

    With all of its weights (and biases) zero, an attention's values and output projection are
    zero, and so is an MLP's down projection: the block adds exactly nothing to the residual
    stream, in a checkpoint plain transformers loads. It still costs its compute at inference.
    """
    zeroed: dict[str, list[int]] = {"attention zeroed in layers": [], "MLP zeroed in layers": []}
    with torch.no_grad():
        for layer_index, part in sorted(halves.items()):
            block = stack.layers[layer_index].get_submodule(sub_block_names(stack.layers[layer_index])[part])
            for param in block.parameters():
                param.zero_()
            zeroed[list(zeroed)[part]].append(layer_index)
    return {k: v for k, v in zeroed.items() if v}


def _model_card(source: str, total: int, dropped: tuple[int, ...], extra: dict[str, Any]) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- optuna-prune",
        "- layer-pruning",
        "---",
        "",
        f"# {source}, {len(dropped)} of {total} decoder layers dropped",
        "",
        f"- base model: `{source}`",
        f"- dropped layers (original 0-based indices): {list(dropped)}",
        f"- layers kept: {total - len(dropped)} of {total}",
        *(f"- {key}: {value}" for key, value in extra.items()),
        "",
        "Made with optuna-prune. Loads with `AutoModelForCausalLM.from_pretrained` and no custom code.",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class LMTail:
    """The hidden state after the last decoder layer -> logits, as the model's own forward does.

    Lets a fitness run the layers itself (e.g. cache the prefix shared by many masks) and still get the
    exact logits: final norm, OPT's `project_out` if any, `lm_head`, then Gemma-style logit softcapping.
    Split in two so the logits of a few vocabulary rows cost a few rows of the head (``logits(rows=)``).
    """

    norm: nn.Module | None
    project_out: nn.Module | None
    head: nn.Module
    cap: float | None

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What ``lm_head`` reads: the final norm (and projection) of ``hidden``."""
        if self.norm is not None:  # OPT variants without a final norm keep the attribute as None
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden

    @property
    def linear(self) -> bool:
        """Whether the head is a plain weight (+ bias) whose rows can be taken on their own."""
        weight = getattr(self.head, "weight", None)
        return isinstance(self.head, nn.Linear) or (isinstance(weight, torch.Tensor) and weight.dim() == 2)

    def logits(self, features: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every vocabulary entry, or only of ``rows`` (needs a :attr:`linear` head)."""
        if rows is None:
            logits = self.head(features)
        else:
            bias = getattr(self.head, "bias", None)
            logits = nn.functional.linear(features, self.head.weight[rows], None if bias is None else bias[rows])
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(hidden))


class _KeepFeatures(nn.Module):
    """Stands in for the LM head: keeps what the head would read and returns it instead of logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.features = features
        return features


def model_features(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's forward pass up to the LM head: what ``lm_head`` reads, ``[B, T, H]``.

    The head is swapped out for the call, so the pass never holds ``[B, T, vocab]`` logits (2 GB for
    four 512-token windows of a 262k vocabulary); :class:`LMTail` turns chunks of these features into
    logits. Works with any layout, since the model's own forward does the norm and projection.
    """
    head = model.get_output_embeddings()
    path = next((name for name, module in model.named_modules() if module is head), None)
    if head is None or not path:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embeddings (lm_head)")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    keep = _KeepFeatures()
    parent._modules[attr] = keep
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        parent._modules[attr] = head
    if keep.features is None:
        raise UnsupportedModelError(f"the forward pass of {type(model).__name__} did not call its lm_head")
    return keep.features


def lm_tail(model: PreTrainedModel) -> LMTail:
    """The model's own map from the last decoder layer's output to logits (see :class:`LMTail`)."""
    base = find_layer_stack(model).parent
    norm = next(
        (found for n in _FINAL_NORMS if (found := getattr(base, n, _MISSING)) is not _MISSING), _MISSING
    )
    if norm is _MISSING:
        raise UnsupportedModelError(
            f"cannot find the final norm of {type(model).__name__}: looked for "
            f"{', '.join(_FINAL_NORMS)} on {type(base).__name__}"
        )
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return LMTail(
        norm, getattr(base, "project_out", None), head, getattr(_decoder_config(model), "final_logit_softcapping", None)
    )
