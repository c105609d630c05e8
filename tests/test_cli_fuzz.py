"""Junk on the command line or in a config file never escapes as a traceback.

Every argv ends with a model path that does not exist, so whatever the junk says, no model loads:
the CLI either prints help (exit 0), lists an empty storage (exit 0), or prints exactly one
``optuna-prune: error: ...`` line (exit 2) that is not an internal error.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optuna_prune.cli import build_parser, main
from optuna_prune.config import SearchConfig

pytestmark = pytest.mark.filterwarnings("ignore")

NO_MODEL = "/nonexistent/optuna-prune-fuzz/model"
COMMANDS = ("search", "create", "worker", "show", "studies")  # not dashboard: it would serve forever

def _search_flags() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(opt for action in sub.choices["search"]._actions for opt in action.option_strings)


FLAGS = [*_search_flags(), "--json"]
VALUES = ["0", "-1", "1", "3", "0.5", "1.5", "-0.2", "nan", "inf", "-inf", "1e309", "", "--", "-", "=", "x",
          "evop,sleb", "pydoc", "cuda:7", "sqlite://", "::", "a.log", "1,2", "none", "true", "[1]"]
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

VALID = st.sampled_from([[], ["--drop", "2"], ["--sparsity", "0.25"]])  # so junk gets past the first check
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10)
pairs = st.lists(st.tuples(st.sampled_from(FLAGS), st.one_of(st.sampled_from(VALUES), text)), max_size=4)
tokens = st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(VALUES), text), max_size=2)
argvs = st.tuples(VALID, pairs, st.one_of(st.just([]), tokens)).map(lambda t: [*t[0], *(x for pair in t[1] for x in pair), *t[2]])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    if code == 0:
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith("optuna-prune: error:") and "internal error" not in lines[0], err


@SETTINGS
@given(command=st.sampled_from(COMMANDS), junk=argvs)
def test_junk_argv_gives_one_line_or_help(workdir, monkeypatch, capsys, command, junk):
    monkeypatch.chdir(workdir)  # a default or junk storage lands here
    argv = [command, *junk, "--storage", f"sqlite:///{workdir / 'fuzz.db'}"]
    if command in ("search", "create"):
        argv += ["--model", NO_MODEL]
    code = main(argv)
    check(code, capsys.readouterr().err)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # ints, finite floats, strings: JSON spells them as TOML does


scalars = st.one_of(st.booleans(), st.integers(-10**6, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(VALUES))
known = st.sampled_from(sorted(SearchConfig.__dataclass_fields__))
keys = st.one_of(known, st.text("abcdefgh_", min_size=1, max_size=8)).filter(lambda k: len(k) > 2)
junk_tables = st.dictionaries(keys, st.one_of(scalars, st.lists(scalars, max_size=3)), max_size=5)
tables = st.tuples(st.sampled_from([{}, {"drop": 2}, {"sparsity": 0.25}]), junk_tables).map(lambda t: {**t[0], **t[1]})


@SETTINGS
@given(table=tables, section=st.booleans(), garbage=st.one_of(st.none(), st.none(), st.text(max_size=30)))
def test_junk_config_gives_one_line(workdir, monkeypatch, capsys, table, section, garbage):
    monkeypatch.chdir(workdir)
    lines = ["[search]"] if section else []
    lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    if garbage is not None:
        lines.append(garbage)
    path = workdir / "junk.toml"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    code = main(["search", "--config", str(path), "--model", NO_MODEL,
                 "--storage", f"sqlite:///{workdir / 'fuzz.db'}"])
    check(code, capsys.readouterr().err)
