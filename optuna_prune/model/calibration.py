"""Where calibration (and evaluation) text comes from, and how it becomes N x T token windows.

A *source* is a named corpus (``wikitext2``, ``c4``, ``ptb``, ``pydoc``) or a local ``.txt`` /
``.jsonl`` / ``.parquet`` file or folder of such files. Every source has two disjoint *splits*:
``"calibration"`` (what a search scores masks on) and ``"eval"`` (what perplexity is reported on), so
calibration text never leaks into evaluation:

=========  ==========================================  ==========================================
source     calibration                                 eval
=========  ==========================================  ==========================================
wikitext2  hub ``wikitext-2-raw-v1`` train;             ``wikitext-2-raw-v1`` test;
           offline ``wikitext2/wiki.valid.tokens``     offline ``wikitext2/wiki.test.raw``
c4         hub ``allenai/c4`` en train shard 0          en validation shard 0, documents 1000-1999;
           (first 20,000 documents); offline first      offline last half of
           half of ``c4/c4_validation_2k.jsonl``        ``c4/c4_validation_2k.jsonl``
ptb        hub ``ptb_text_only`` train (no offline)    ``ptb_text_only`` test
pydoc      even-numbered distinct topics of             odd-numbered topics less any paragraph
           ``pydoc_data.topics`` (sorted keys)          also in a calibration topic; offline
file(s)    first half of the documents (by chars)       second half; ``split="all"`` takes both
=========  ==========================================  ==========================================

Named corpora are read from ``data_dir`` (argument, else ``$OPTUNA_PRUNE_DATA``) when it holds the
layout above, else from the Hugging Face hub through ``datasets.load_dataset``.

Documents are joined with ``"\\n\\n"``, except line-based corpora (WikiText, PTB), whose documents are
the dataset rows (blank rows dropped) joined with ``"\\n"``: the WikiText-2 test stream is then exactly
``wiki.test.raw``, the text the reference perplexities were measured on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optuna_prune.model.ccds import CCDSConfig, Clusters, cluster_chunks, sample_from_clusters
from optuna_prune.model.tokens import CalibrationError, check_request, tokenize

NAMED_SOURCES = ("wikitext2", "c4", "ptb", "pydoc")
SPLITS = ("calibration", "eval")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
DATA_ENV = "OPTUNA_PRUNE_DATA"

# Tokenising is bounded: only the first CHARS_PER_TOKEN * OVERSAMPLE * (N * T) characters of the
# calibration text are tokenised (doubled while that yields fewer than N * T tokens), so the random
# windows are drawn from about 3x the tokens they need (English: ~4 characters a token), whatever the
# size of the corpus.
CHARS_PER_TOKEN = 4
OVERSAMPLE = 3
C4_HUB_CALIBRATION_DOCS = 20_000

_LINE_SOURCES = ("wikitext2", "ptb")


@dataclass(frozen=True)
class CalibrationSet:
    """N token windows of length T for scoring masks, plus what is needed to reproduce them.

    Equality and hashing go by ``(source, seed, sha256, cluster_ids)``; ``sha256`` covers the ids and
    their shape, so two sets compare equal exactly when they hold the same tokens.
    """

    input_ids: torch.Tensor = field(compare=False, repr=False)  # [N, T] int64, CPU
    source: str
    seed: int
    sha256: str
    cluster_ids: tuple[int, ...] | None = None  # CCDS cluster of each sample
    clusters: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # Clusters.to_dict()

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description to record on a study (no token ids, no cluster figure data)."""
        meta: dict[str, Any] = {
            "source": self.source,
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "sha256": self.sha256,
            "ccds": self.cluster_ids is not None,
        }
        if self.cluster_ids is not None:
            meta["cluster_ids"] = list(self.cluster_ids)
        if self.clusters is not None:
            meta["ccds_config"] = self.clusters.get("config")
        return meta


def ids_sha256(input_ids: torch.Tensor) -> str:
    """SHA-256 of the shape and the little-endian int64 bytes of ``input_ids``."""
    arr = np.ascontiguousarray(input_ids.detach().cpu().numpy().astype("<i8"))
    h = hashlib.sha256("x".join(map(str, arr.shape)).encode() + b"\0")
    h.update(arr.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading sources


def _resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV) or None
    return Path(data_dir).expanduser() if data_dir is not None else None


def _rows_to_docs(rows: list[str]) -> list[str]:
    """Line-based corpora: keep each non-blank row (its leading space too), drop its newline."""
    return [r.rstrip("\n") for r in rows if r.strip()]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8"
        ) from None
    except OSError as e:
        raise CalibrationError(f"cannot read {path}: {e.strerror or e}") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path} line {i} is not JSON ({e.msg}); expected one object a line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CalibrationError(f"{path} line {i} has no string 'text' field; each line must be {{\"text\": ...}}")
        docs.append(obj["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    # deferred: loads pandas only when this runs
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises many types for a bad file
        raise CalibrationError(f"cannot read {path} as parquet: {e}") from None
    if "text" not in frame.columns:
        raise CalibrationError(f"{path} has no 'text' column (columns: {list(frame.columns)})")
    return [t for t in frame["text"].tolist() if isinstance(t, str)]


def _read_txt(path: Path) -> list[str]:
    text = _read_utf8(path).replace("\r\n", "\n")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _read_local(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise CalibrationError(f"folder {path} holds no {'/'.join(FILE_SUFFIXES)} files")
    elif path.suffix not in FILE_SUFFIXES:
        raise CalibrationError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(FILE_SUFFIXES)}")
    else:
        files = [path]
    docs = []
    for f in files:
        file_docs = [d for d in _READERS[f.suffix](f) if d.strip()]
        if not file_docs and len(files) == 1:
            raise CalibrationError(f"{f} is empty: no text to calibrate on")
        docs.extend(file_docs)
    if not docs:
        raise CalibrationError(f"folder {path} holds no text: all its files are empty")
    return docs


def _halves(docs: list[str]) -> tuple[list[str], list[str]]:
    """Split documents into two contiguous halves of about equal characters (a single document is
    cut at the line or space nearest its middle)."""
    if len(docs) == 1:
        text = docs[0]
        mid = len(text) // 2
        cut = text.rfind("\n", 0, mid)
        if cut <= 0:
            cut = text.rfind(" ", 0, mid)
        if cut <= 0:
            cut = mid
        return [text[:cut].strip()], [text[cut:].strip()]
    cum = np.cumsum([len(d) for d in docs])
    k = min(max(int(np.searchsorted(cum, cum[-1] / 2)) + 1, 1), len(docs) - 1)
    return docs[:k], docs[k:]


def _pydoc_docs(split: str) -> list[str]:
    # deferred: loads pydoc_data only when this runs
    from pydoc_data.topics import topics

    # Topics repeat each other (aliases, shared sections), so after the even/odd split the
    # evaluation topics also lose every paragraph that a calibration topic contains.
    texts = list(dict.fromkeys(topics[k].strip() for k in sorted(topics) if topics[k].strip()))
    calib = texts[0::2]
    if split == "calibration":
        return calib
    seen = {p.strip() for t in calib for p in t.split("\n\n")}
    docs = ("\n\n".join(p for p in t.split("\n\n") if p.strip() not in seen) for t in texts[1::2])
    return [d for d in docs if d.strip()]


def _hub_load(path: str, name: str | None = None, split: str = "train", data_files: Any = None) -> Any:
    """``datasets.load_dataset`` (a separate function so tests can stand in for the hub)."""
    # deferred: loads datasets only when this runs
    from datasets import load_dataset

    return load_dataset(path, name, split=split, data_files=data_files)


def _offline_named(source: str, split: str, data_dir: Path) -> list[str] | None:
    """Read a named corpus from the shared-data layout, or None if that layout is not there."""
    if source == "wikitext2":
        path = data_dir / "wikitext2" / ("wiki.valid.tokens" if split == "calibration" else "wiki.test.raw")
        return _rows_to_docs(_read_utf8(path).split("\n")) if path.is_file() else None
    if source == "c4":
        path = data_dir / "c4" / "c4_validation_2k.jsonl"
        if not path.is_file():
            return None
        docs = _read_jsonl(path)
        half = len(docs) // 2
        return docs[:half] if split == "calibration" else docs[half:]
    return None  # ptb has no offline copy


_OFFLINE_LAYOUT = {
    "wikitext2": "wikitext2/wiki.valid.tokens and wikitext2/wiki.test.raw",
    "c4": "c4/c4_validation_2k.jsonl",
    "ptb": None,
}


def _hub_named(source: str, split: str) -> list[str]:
    if source == "wikitext2":
        ds = _hub_load("wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test")
        return _rows_to_docs(list(ds["text"]))
    if source == "ptb":
        ds = _hub_load("ptb_text_only", "penn_treebank", split="train" if split == "calibration" else "test")
        return _rows_to_docs(list(ds["sentence"]))
    if split == "calibration":  # c4, SLEB/SparseGPT's shards
        ds = _hub_load("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        return list(ds.select(range(min(C4_HUB_CALIBRATION_DOCS, len(ds))))["text"])
    ds = _hub_load("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                   split="validation")
    return list(ds.select(range(1000, min(2000, len(ds))))["text"])


def check_source(source: str, what: str = "calibration source") -> None:
    """CalibrationError unless ``source`` names a known corpus or an existing file or folder (cheap:
    nothing is read)."""
    if source in NAMED_SOURCES or Path(source).expanduser().exists():
        return
    raise CalibrationError(
        f"{what} {source!r} is neither a known corpus ({', '.join(NAMED_SOURCES)}) nor an existing "
        "file or folder; pass one of those, or the path of a .txt/.jsonl/.parquet file"
    )


def load_texts(source: str, split: str = "calibration", data_dir: str | Path | None = None) -> list[str]:
    """Documents of one split of ``source`` (see the module docstring for what each source reads).

    ``split`` is ``"calibration"`` or ``"eval"`` (disjoint); local files also accept ``"all"``.
    Raises CalibrationError naming the file or corpus and the fix when nothing can be read.
    """
    is_named = source in NAMED_SOURCES
    allowed = SPLITS if is_named else (*SPLITS, "all")
    if split not in allowed:
        raise CalibrationError(f"unknown split {split!r} for {source!r}; use one of {allowed}")
    if source == "pydoc":
        return _pydoc_docs(split)
    if not is_named:
        path = Path(source).expanduser()
        check_source(source)
        docs = _read_local(path)
        if split == "all":
            return docs
        first, second = _halves(docs)
        return first if split == "calibration" else second

    root = _resolve_data_dir(data_dir)
    tried = []
    if root is not None:
        docs = _offline_named(source, split, root)
        if docs is not None:
            if not docs:
                raise CalibrationError(f"the offline copy of {source!r} under {root} is empty")
            return docs
        layout = _OFFLINE_LAYOUT[source]
        tried.append(f"{root} has no {layout}" if layout else f"{source!r} has no offline copy")
    else:
        tried.append(f"no data dir given (--data-dir / ${DATA_ENV})")
    try:
        docs = _hub_named(source, split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        tried.append(f"the Hugging Face hub failed ({type(e).__name__}: {reason[:160]})")
        layout = _OFFLINE_LAYOUT[source]
        fix = (f"pass --data-dir pointing at a folder with {layout}, or a local .txt/.jsonl/.parquet file"
               if layout else "go online, or pass a local .txt/.jsonl/.parquet file instead")
        raise CalibrationError(f"cannot load {source!r} {split} text: {'; '.join(tried)}; {fix}") from None
    if not docs:
        raise CalibrationError(f"the hub copy of {source!r} {split} is empty")
    return docs


def source_label(source: str) -> str:
    """How a study records a calibration source: a corpus name, or a local path made absolute."""
    return source if source in NAMED_SOURCES else str(Path(source).expanduser().resolve())


def _join(source: str, docs: list[str]) -> str:
    return ("\n" if source in _LINE_SOURCES else "\n\n").join(docs)


# ----------------------------------------------------------------------------- random windows


def _window_starts(n_tokens: int, n_samples: int, seq_len: int, rng: np.random.Generator) -> list[int]:
    """Sorted starts of ``n_samples`` random windows, non-overlapping whenever the stream allows."""
    slack = n_tokens - n_samples * seq_len
    if slack >= 0:  # random composition: each window shifted by a sorted uniform offset into the slack
        offsets = np.sort(rng.integers(0, slack + 1, size=n_samples))
        return [int(o) + i * seq_len for i, o in enumerate(offsets)]
    return sorted(int(s) for s in rng.integers(0, n_tokens - seq_len + 1, size=n_samples))


def _bounded_ids(tokenizer: Any, text: str, need: int) -> list[int]:
    """Token ids of a prefix of ``text`` with at least ``need`` tokens (all of it if it has fewer):
    about OVERSAMPLE times what is needed, whatever the size of the corpus."""
    budget = CHARS_PER_TOKEN * OVERSAMPLE * need
    while True:
        ids = tokenize(tokenizer, text[:budget])
        if len(ids) >= need or budget >= len(text):
            return ids
        budget *= 2


def _check_supply(source: str, n_tokens: int, n_samples: int, seq_len: int) -> None:
    """CalibrationError unless ``n_tokens`` fill ``n_samples`` windows of ``seq_len`` without overlap."""
    if n_tokens >= n_samples * seq_len:
        return
    fits = n_tokens // seq_len
    fix = (f"at most {fits} samples of {seq_len} tokens fit: lower --n-samples or --seq-len"
           if fits else f"lower --seq-len below {n_tokens}")
    raise CalibrationError(
        f"calibration needs {n_samples} x {seq_len} = {n_samples * seq_len:,} tokens but {source} has only "
        f"{n_tokens:,}; {fix}, or use a larger corpus"
    )


def _random_windows(tokenizer: Any, source: str, text: str, n_samples: int, seq_len: int,
                    seed: int) -> torch.Tensor:
    ids = _bounded_ids(tokenizer, text, n_samples * seq_len)
    _check_supply(source, len(ids), n_samples, seq_len)
    starts = _window_starts(len(ids), n_samples, seq_len, np.random.default_rng(seed))
    stream = torch.tensor(ids, dtype=torch.int64)
    return torch.stack([stream[s : s + seq_len] for s in starts])


def build_calibration(
    tokenizer: Any,
    source: str = "pydoc",
    n_samples: int = 5,
    seq_len: int = 2048,
    seed: int = 0,
    data_dir: str | Path | None = None,
    ccds: CCDSConfig | None = None,
) -> CalibrationSet:
    """``n_samples`` windows of ``seq_len`` tokens from the calibration split of ``source``.

    Default (SLEB/EvoP): join the documents, tokenise (bounded, see OVERSAMPLE) and cut windows at
    random, seeded, non-overlapping positions. With ``ccds``, EvoP's cluster-based sampling instead:
    chunks are embedded and clustered and every sample is drawn from one cluster (``cluster_ids``).
    The same arguments and seed always give the same ids and ``sha256``.
    """
    check_request(n_samples, seq_len)
    docs = load_texts(source, "calibration", data_dir)
    label = source_label(source)
    if ccds is None:
        ids = _random_windows(tokenizer, label, _join(source, docs), n_samples, seq_len, seed)
        return CalibrationSet(input_ids=ids, source=label, seed=seed, sha256=ids_sha256(ids))

    # Refused before the (slow) embedding and clustering when the whole corpus is too short.
    _check_supply(label, len(_bounded_ids(tokenizer, _join(source, docs), n_samples * seq_len)), n_samples, seq_len)
    clusters = _clusters(source, None if data_dir is None else str(data_dir), ccds, seed)
    ids, cluster_ids = sample_from_clusters(tokenizer, clusters, n_samples, seq_len, seed)
    return CalibrationSet(input_ids=ids, source=label, seed=seed, sha256=ids_sha256(ids),
                          cluster_ids=cluster_ids, clusters=clusters.to_dict())


@functools.lru_cache(maxsize=4)
def _clusters(source: str, data_dir: str | None, ccds: CCDSConfig, seed: int) -> Clusters:
    """The corpus's clustering, kept for the process: the methods a notebook or a benchmark runs on one
    draw embed it once (about 45 s on 2 CPU cores), as one study's methods share its windows."""
    return cluster_chunks(load_texts(source, "calibration", data_dir), ccds, seed)


def forget_clusters() -> None:
    """Drop the clusterings this process kept, so the next CCDS draw embeds again (a benchmark that
    charges each method its own preparation)."""
    _clusters.cache_clear()


def split_validation(calibration: CalibrationSet, n_validation: int) -> tuple[CalibrationSet, CalibrationSet]:
    """The search windows (all but the last ``n_validation``) and the validation windows (the last ones).

    The last ones, because CCDS draws window ``i`` from cluster ``i % K``: the first windows keep every
    cluster in the search. Both parts are fixed by the draw (its seed), so every method of a study
    scores on the same search windows and is judged on the same validation ones.
    """
    n = calibration.n_samples
    if not 0 < n_validation < n:
        raise CalibrationError(f"validation windows {n_validation} must be in 1..{n - 1} of the {n} calibration samples")

    def part(rows: slice, clusters: dict[str, Any] | None) -> CalibrationSet:
        ids = calibration.input_ids[rows]
        cluster_ids = None if calibration.cluster_ids is None else calibration.cluster_ids[rows]
        return CalibrationSet(input_ids=ids, source=calibration.source, seed=calibration.seed,
                              sha256=ids_sha256(ids), cluster_ids=cluster_ids, clusters=clusters)

    return part(slice(0, n - n_validation), calibration.clusters), part(slice(n - n_validation, n), None)


def eval_token_stream(tokenizer: Any, source: str, data_dir: str | Path | None = None,
                      max_chars: int | None = None) -> torch.Tensor:
    """1-D int64 ids of the evaluation split of ``source``, for perplexity.

    The documents are joined as the module docstring says (WikiText-2: exactly ``wiki.test.raw``),
    cut to the first ``max_chars`` characters when given, and tokenised in one call with the
    tokenizer's default special tokens, as SparseGPT/SLEB tokenise their test streams.
    """
    text = _join(source, load_texts(source, "eval", data_dir))
    if max_chars is not None:
        if max_chars < 1:
            raise CalibrationError(f"max_chars must be >= 1, got {max_chars}")
        text = text[:max_chars]
    return torch.tensor(tokenize(tokenizer, text), dtype=torch.int64)
