"""Studies persist, resume, refuse the wrong problem, survive SIGKILL, and take several processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from optuna_prune.cli import main
from optuna_prune.run import budget as budget_module
from optuna_prune.run import study as study_module
from optuna_prune.run.budget import Deadline, wait_for_running
from optuna_prune.run.config import SearchConfig
from optuna_prune.run.final_pick import final_pick
from optuna_prune.run.problem import StudyMismatchError, open_study
from optuna_prune.run.storage import StorageError, open_storage
from optuna_prune.run.study import run_search
from optuna_prune.run.summary import best_by_method
from optuna_prune.search.record import METHOD_KEY
from optuna_prune.search.samplers import EvoPSampler, SLEBSampler, sleb_result
from optuna_prune.search.space import LayerMaskSpace

pytestmark = pytest.mark.filterwarnings("ignore")


def tiny_config(checkpoint: Path, storage: str, **changes) -> SearchConfig:
    base = dict(
        model=str(checkpoint), drop=3, sampler="evop", calibration="pydoc", n_samples=2, seq_len=32,
        population=4, n_trials=12, seed=0, storage=storage, study="tiny", heartbeat=1,
    )
    base.update(changes)
    return SearchConfig(**base)


def finished(study: optuna.Study, method: str = "evop") -> list[optuna.trial.FrozenTrial]:
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.system_attrs.get(METHOD_KEY) == method
    ]


def test_search_resume_and_refuse_other_problem(tiny_checkpoint, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = run_search(tiny_config(tiny_checkpoint, storage), progress=False)
    trials = finished(study)
    assert len(trials) == 12
    assert all(len(t.user_attrs["dropped"]) == 3 for t in trials if t.state == TrialState.COMPLETE)
    assert study.user_attrs["problem"]["num_drop"] == 3
    assert best_by_method(study)["evop"]["dropped"] == study.user_attrs["best_dropped"]
    numbers = {t.number: t.value for t in trials}

    # The same command with a larger budget continues: old trials untouched, only the rest is run.
    study = run_search(tiny_config(tiny_checkpoint, storage, n_trials=16), progress=False)
    again = finished(study)
    assert len(again) == 16
    assert {t.number: t.value for t in again if t.number in numbers} == numbers

    with pytest.raises(StudyMismatchError, match="num_drop"):
        run_search(tiny_config(tiny_checkpoint, storage, drop=1), progress=False)
    # --new-study never deletes: it starts NAME-2 beside the old one.
    fresh = run_search(tiny_config(tiny_checkpoint, storage, drop=1, n_trials=4), new_study=True, progress=False)
    assert fresh.study_name == "tiny-2"
    assert len(optuna.get_all_study_summaries(open_storage(storage))) == 2


def test_shortgpt_and_sleb_share_the_study_with_evop(tiny_checkpoint, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    run_search(tiny_config(tiny_checkpoint, storage, sampler="sleb", n_trials=None), progress=False)
    run_search(tiny_config(tiny_checkpoint, storage, sampler="shortgpt", n_trials=None), progress=False)
    study = run_search(
        tiny_config(tiny_checkpoint, storage, seed_with=["sleb", "shortgpt"], n_trials=8), progress=False
    )
    best = best_by_method(study)
    assert set(best) == {"sleb", "shortgpt", "evop"}
    evop = EvoPSampler.__name__
    seeded = [t for t in study.trials if t.user_attrs.get("seeded_from")]
    assert {t.user_attrs["seeded_from"] for t in seeded} == {"sleb", "shortgpt"}
    assert all(t.system_attrs[f"{evop}:generation"] == 0 for t in seeded)
    # EvoP keeps the better of its seeds, so it is never worse than SLEB's result.
    assert best["evop"]["value"] <= best["sleb"]["value"] + 1e-9


def test_a_search_seeded_with_sleb_runs_it_first_ranking_in_stages(tiny_checkpoint, tmp_path, capsys):
    """--seed-with sleb on a study without SLEB's result runs SLEB first in the same study, each
    greedy step's candidates ranked on a lower bound over 1, then 2 of the 4 windows (only its mask counts), then EvoP from
    its mask; the study keeps EvoP's config, and a re-run finds SLEB's result and adds nothing."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    args = ["search", "--model", str(tiny_checkpoint), "--drop", "3", "--calibration", "pydoc", "--n-samples", "4",
            "--seq-len", "32", "--ccds-clusters", "0", "--seed-with", "sleb", "--population", "4", "--n-trials", "8",
            "--storage", storage, "--study", "seeded", "--no-progress"]
    assert main(args) == 0
    assert "sleb runs first, evop starts from its mask" in capsys.readouterr().err
    study = optuna.load_study(study_name="seeded", storage=open_storage(storage))
    sleb = [t for t in study.trials if t.system_attrs.get(METHOD_KEY) == "sleb"]
    staged = [t for t in sleb if t.state == TrialState.PRUNED and t.user_attrs["per_sample"] == []
              and max(t.intermediate_values) <= 2 * 31]
    assert staged  # candidates of a greedy step stopped on the bound of 1 or 2 of the 4 windows, no exact loss
    (seeded,) = [t for t in study.trials if t.user_attrs.get("seeded_from")]
    assert tuple(seeded.user_attrs["dropped"]) == sleb_result(study)
    assert len(finished(study)) == 8
    assert study.user_attrs["config"]["sampler"] == "evop" and study.user_attrs["config"]["seed_with"] == ["sleb"]
    before = len(study.trials)
    assert main(args) == 0
    assert "runs first" not in capsys.readouterr().err
    assert len(optuna.load_study(study_name="seeded", storage=open_storage(storage)).trials) == before


def test_a_seed_run_cut_by_the_timeout_leaves_evop_unrun_with_one_warning(tiny_checkpoint, tmp_path, monkeypatch,
                                                                         caplog):
    """When --timeout ends SLEB's seeding run before its mask, EvoP does not run from nothing: one
    warning says why, and a re-run with time resumes SLEB and then runs EvoP."""
    monkeypatch.setattr(Deadline, "seconds", lambda self: 1e9)  # every trial is the last that fits
    cfg = tiny_config(tiny_checkpoint, f"sqlite:///{tmp_path / 's.db'}", n_samples=4, ccds_clusters=0,
                      seed_with=["sleb"], n_trials=8, timeout=3600.0)
    with caplog.at_level("WARNING", logger=study_module._logger.name):
        study = run_search(cfg, progress=False)
    assert "sleb's run ended before its mask" in caplog.text and "evop did not run" in caplog.text
    assert {t.system_attrs.get(METHOD_KEY) for t in study.trials} == {"sleb"} and len(study.trials) == 1
    monkeypatch.undo()
    study = run_search(cfg.replace(timeout=None), progress=False)
    assert sleb_result(study) is not None and len(finished(study)) == 8


def test_a_timeout_spent_by_the_seed_run_says_so(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    """When SLEB's seeding run finishes with no time left for EvoP, the warning names SLEB's run,
    not the preparation, as what took the --timeout."""
    optimize = study_module._optimize

    def out_of_time_after_sleb(setup, cfg, started, *args, **kwargs):
        return optimize(setup, cfg, started - (cfg.sampler == "evop") * 1e6, *args, **kwargs)

    monkeypatch.setattr(study_module, "_optimize", out_of_time_after_sleb)
    cfg = tiny_config(tiny_checkpoint, f"sqlite:///{tmp_path / 's.db'}", n_samples=4, ccds_clusters=0,
                      seed_with=["sleb"], n_trials=8, timeout=3600.0)
    with caplog.at_level("WARNING", logger=study_module._logger.name):
        study = run_search(cfg, progress=False)
    assert sleb_result(study) is not None and not finished(study)
    assert "the preparation and sleb's run took the whole --timeout 3600 s; no evop trial ran" in caplog.text


def test_a_workers_n_trials_counts_its_seed_run_too(tiny_checkpoint, tmp_path):
    """``worker --n-trials N`` caps the worker's trials: SLEB's seeding run uses part of them and EvoP
    gets the rest, not N more."""
    cfg = tiny_config(tiny_checkpoint, f"sqlite:///{tmp_path / 's.db'}", n_samples=4, ccds_clusters=0,
                      seed_with=["sleb"], n_trials=8)
    sleb_trials = SLEBSampler(LayerMaskSpace(8, 3)).planned_trials()  # every candidate of every greedy step
    study = run_search(cfg, progress=False, max_trials=sleb_trials + 2)
    assert sleb_result(study) is not None
    assert len([t for t in study.trials if t.system_attrs.get(METHOD_KEY) == "sleb"]) == sleb_trials
    assert len(finished(study)) == 2


def test_a_worker_waits_while_other_workers_score_the_seed_runs_last_candidates(tmp_path):
    """A worker whose part of SLEB's seeding run ends while another worker scores its last candidate
    waits for that result (then SLEB's mask is in storage) instead of giving up on EvoP."""
    study = optuna.create_study(study_name="w", storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    storage = study._storage
    assert not wait_for_running(study, "sleb")  # nothing runs: no wait
    other = study.ask()
    storage.set_trial_system_attr(other._trial_id, METHOD_KEY, "sleb")
    timer = threading.Timer(0.5, lambda: study.tell(other, 1.0))
    timer.start()
    assert wait_for_running(study, "sleb", poll_interval=0.05)
    assert storage.get_trial(other._trial_id).state == TrialState.COMPLETE
    stuck = study.ask()
    storage.set_trial_system_attr(stuck._trial_id, METHOD_KEY, "sleb")
    assert not wait_for_running(study, "evop")  # another method's trial is not waited for
    assert not wait_for_running(study, "sleb", until=time.monotonic())  # the --timeout has passed


def _cli_search(checkpoint: Path, storage: str, n_trials: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable, "-m", "optuna_prune.cli", "search", "--model", str(checkpoint), "--drop", "3",
        "--calibration", "pydoc", "--n-samples", "2", "--seq-len", "32", "--population", "4",
        "--n-trials", str(n_trials), "--storage", storage, "--study", "tiny", "--heartbeat", "1",
        "--no-progress", *extra,
    ]


def test_sigkill_mid_run_then_resume_loses_nothing(tiny_checkpoint, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    proc = subprocess.Popen(_cli_search(tiny_checkpoint, storage, 400), stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="tiny", storage=storage)
            except KeyError:
                continue
            if len(finished(study)) >= 10:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = {t.number: t.value for t in finished(optuna.load_study(study_name="tiny", storage=storage))}
    assert len(before) >= 10
    generations_before = max(  # a trial killed before its sampler tagged it has no generation yet
        t.system_attrs["EvoPSampler:generation"]
        for t in optuna.load_study(study_name="tiny", storage=storage).trials
        if "EvoPSampler:generation" in t.system_attrs
    )
    done = subprocess.run(_cli_search(tiny_checkpoint, storage, len(before) + 8), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="tiny", storage=storage)
    after = {t.number: t.value for t in finished(study)}
    assert {n: after[n] for n in before} == before  # nothing stored was lost or recomputed
    assert len(after) == len(before) + 8
    assert not study.get_trials(states=(TrialState.RUNNING,))
    gens = [t.system_attrs["EvoPSampler:generation"] for t in finished(study)]
    assert min(gens) == 0 and max(gens) >= generations_before  # the evolution continued, not restarted


def test_resuming_fails_trials_whose_process_died_before_their_first_heartbeat(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=1)
    problem = {"model": "m", "num_layers": 8, "num_drop": 3}
    study = open_study(storage, "s", problem, ["minimize"])
    orphan, beating = study.ask(), study.ask()  # killed right after creating the trial / later on
    storage.record_heartbeat(beating._trial_id)
    open_study(storage, "s", problem, ["minimize"])
    trials = study.get_trials(deepcopy=False)
    assert trials[orphan.number].state == TrialState.FAIL
    assert trials[orphan.number].user_attrs["fail_reason"].startswith("orphaned")
    assert trials[beating.number].state == TrialState.RUNNING  # left to optuna's stale-heartbeat retry


def test_processes_started_together_create_the_study_once():
    class RacingStorage(optuna.storages.InMemoryStorage):
        """Both openers list the studies before either creates one."""

        barrier = threading.Barrier(2, timeout=10)

        def get_all_studies(self):  # noqa: ANN202
            studies = super().get_all_studies()
            if not studies:
                self.barrier.wait()
            return studies

    storage, problem = RacingStorage(), {"model": "m", "num_layers": 8, "num_drop": 3}
    opened: list[str] = []
    threads = [threading.Thread(target=lambda: opened.append(open_study(storage, "s", problem, ["minimize"]).study_name))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert opened == ["s", "s"]
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]


def test_two_processes_share_one_evolution(tiny_checkpoint, tmp_path):
    storage = str(tmp_path / "journal.log")
    procs = [subprocess.Popen(_cli_search(tiny_checkpoint, storage, 24), stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    study = optuna.load_study(study_name="tiny", storage=open_storage(storage))
    trials = finished(study)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both contributed
    assert 24 <= len(trials) <= 25  # the shared budget holds (one trial may be in flight at the stop)
    masks = [tuple(t.user_attrs["dropped"]) for t in trials]
    assert len(masks) == len(set(masks))
    gens: dict[int, int] = {}
    for t in trials:
        g = t.system_attrs["EvoPSampler:generation"]
        gens[g] = gens.get(g, 0) + 1
    assert max(gens) >= 2 and all(n >= 4 for g, n in gens.items() if g < max(gens))


def test_dashboard_api_lists_study_with_layer_params(tiny_checkpoint, tmp_path):
    from optuna_dashboard import wsgi

    storage = f"sqlite:///{tmp_path / 's.db'}"
    run_search(tiny_config(tiny_checkpoint, storage, n_trials=4), progress=False)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):  # noqa: ANN002
            pass

    server = make_server("127.0.0.1", 0, wsgi(open_storage(storage)), handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        import json
        import urllib.request

        base = f"http://127.0.0.1:{server.server_port}"
        studies = json.load(urllib.request.urlopen(f"{base}/api/studies"))["study_summaries"]
        assert [s["study_name"] for s in studies] == ["tiny"]
        detail = json.load(urllib.request.urlopen(f"{base}/api/studies/{studies[0]['study_id']}?after=0"))
        names = {p["name"] for t in detail["trials"] for p in t["params"]}
        assert {"layer_00", "layer_01", "layer_02", "layer_03"} <= names
        assert detail["objective_names"] == ["calibration NLL"]  # not "Objective 0"
    finally:
        server.shutdown()


def test_storage_errors_are_clear():
    with pytest.raises(StorageError, match="malformed"):
        open_storage("::not a url::")
    with pytest.raises(StorageError, match="cannot open"):
        open_storage("postgresql://nobody@127.0.0.1:1/none")


def test_cli_studies_and_show(tiny_checkpoint, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    run_search(tiny_config(tiny_checkpoint, storage, n_trials=4), progress=False)
    assert main(["studies", "--storage", storage]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["show", "tiny", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "evop" in out and "dropped layers" in out
    assert main(["show", "nope", "--storage", storage]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_no_torch_on_the_search_side():
    code = "import sys, optuna_prune.search.space, optuna_prune.search.samplers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.stdout.strip() == "False", out.stderr


def test_objectives_are_named_for_new_and_old_studies(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    problem = {"model": "m", "num_layers": 8, "num_drop": 2, "calibration": "pydoc", "calibration_sha256": "x",
               "fitness": "perplexity", "objective_mode": "mean", "ccds_clusters": 0}
    old = optuna.create_study(study_name="old", storage=storage)  # as versions before names left it
    old.set_user_attr("problem", problem)
    assert old.metric_names is None
    assert open_study(storage, "old", problem, ["minimize"]).metric_names == ["calibration NLL"]
    clusters = {**problem, "ccds_clusters": 3, "objective_mode": "clusters", "fitness": "kl"}
    made = open_study(storage, "per-cluster", clusters, ["minimize"] * 3)
    assert made.metric_names == [f"cluster {c} KL to the dense model" for c in range(3)]
    worst = open_study(storage, "worst", {**clusters, "objective_mode": "worst"}, ["minimize"])
    assert worst.metric_names == ["worst-cluster KL to the dense model"]


def test_dashboard_names_the_objectives_of_old_studies(tmp_path, monkeypatch):
    import optuna_dashboard

    url = f"sqlite:///{tmp_path / 's.db'}"
    old = optuna.create_study(study_name="old", storage=url)
    old.set_user_attr("problem", {"fitness": "perplexity", "objective_mode": "mean", "ccds_clusters": 0})
    optuna.create_study(study_name="foreign", storage=url)  # not optuna-prune's: left alone
    served = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, **kw: served.append(storage))
    assert main(["dashboard", "--storage", url]) == 0 and served
    assert optuna.load_study(study_name="old", storage=url).metric_names == ["calibration NLL"]
    assert optuna.load_study(study_name="foreign", storage=url).metric_names is None


def test_show_counts_finished_trials_and_running_ones_apart(recorded_study, capsys):
    from optuna.trial import create_trial

    storage = recorded_study.user_attrs["config"]["storage"]
    dists = recorded_study.trials[2].distributions
    recorded_study.add_trial(create_trial(  # a search killed mid-trial leaves it RUNNING
        state=TrialState.RUNNING, params=recorded_study.trials[2].params, distributions=dists,
        user_attrs={"method": "evop"},
    ))
    assert best_by_method(recorded_study)["evop"]["evaluations"] == 2  # not the FAIL, not the RUNNING
    assert main(["show", "recorded", "--storage", storage]) == 0
    out = capsys.readouterr().out
    evop = next(line.split() for line in out.splitlines() if line.startswith("evop"))
    assert evop[4] == "2", out
    assert "running, not counted in evals: 1 evop" in out


def test_every_command_and_shipped_config_use_one_default_storage(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """The README's path: search with a shipped config's storage, then show/studies/export/evaluate
    without --storage find the study; a reading command never creates an empty database."""
    import shlex

    from optuna_prune.cli import build_parser
    from optuna_prune.run.config import DEFAULT_STORAGE, load_config

    for path in sorted((Path(__file__).parents[1] / "studies").glob("*.toml")):
        assert load_config(path).storage in (None, DEFAULT_STORAGE), path.name
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest == "storage":
                assert action.default is None and DEFAULT_STORAGE in action.help, name

    monkeypatch.chdir(tmp_path)
    database = tmp_path / DEFAULT_STORAGE.removeprefix("sqlite:///")
    assert main(["studies"]) == 2 and main(["show", "tiny"]) == 2
    assert "no study database" in capsys.readouterr().err and not database.exists()

    assert main(["search", "--model", str(tiny_checkpoint), "--drop", "2", "--sampler", "random",
                 "--calibration", "pydoc", "--n-samples", "2", "--seq-len", "32", "--n-trials", "3",
                 "--study", "tiny", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert database.is_file() and f"is stored in {DEFAULT_STORAGE} ({database})" in out
    show, export, evaluate = (shlex.split(line)[1:] for line in out.splitlines() if line.startswith("  optuna-prune"))
    assert show == ["show", "tiny", "--storage", DEFAULT_STORAGE]
    assert main(["studies"]) == 0 and "tiny" in capsys.readouterr().out
    assert main(show) == 0 and "random" in capsys.readouterr().out
    assert main(export) == 0 and (tmp_path / "pruned" / "tiny" / "config.json").is_file()
    assert evaluate[:5] == ["evaluate", "tiny", "--storage", DEFAULT_STORAGE, "--per-method"]
    assert main([*evaluate, "--datasets", "pydoc", "--max-chars", "4000", "--seq-len", "64", "--tasks", "",
                 "--no-speed", "--no-progress"]) == 0
    assert "pydoc" in capsys.readouterr().out


@pytest.mark.parametrize(("sampler", "planned"), [("sleb", 6 + 5), ("evop", 8), ("exhaustive", 28)])
def test_every_method_shows_evaluations_of_its_budget_best_loss_and_time(tiny_checkpoint, tmp_path, capsys,
                                                                         sampler, planned):
    """SLEB and exhaustive stop by themselves: their bar's total is what they plan (SLEB: 6 then 5
    candidates, its ends protected; C(8, 2) masks), EvoP's is its budget."""
    cfg = tiny_config(tiny_checkpoint, f"sqlite:///{tmp_path / 's.db'}", drop=2, sampler=sampler,
                      n_trials=8 if sampler == "evop" else None)
    study = run_search(cfg, progress=True)
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith(f"{sampler}: 100%") and f" {planned}/{planned} [" in final, err
    best = min(t.value for t in study.trials if t.state == TrialState.COMPLETE)
    assert f"best loss {best:.4f}" in final and "ppl" in final
    assert re.search(r"\[\d\d:\d\d<", final)  # elapsed time
    assert "Progress bar won't be displayed" not in err


def test_the_timeout_counts_the_preparation(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    """--timeout is the run's wall time: preparation (model, windows, CCDS) slower than it leaves no trial."""
    real = study_module.prepare

    def slow_prepare(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(study_module, "prepare", slow_prepare)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    with caplog.at_level("WARNING", logger=study_module._logger.name):
        study = run_search(tiny_config(tiny_checkpoint, storage, n_trials=None, timeout=1.0), progress=False)
    assert study.get_trials(deepcopy=False) == []
    assert "the preparation took the whole --timeout 1 s; no evop trial ran: raise --timeout" in caplog.text
    monkeypatch.setattr(study_module, "prepare", real)
    # Time enough for a loaded CI machine's preparation; the search ends by its own budget long before.
    study = run_search(tiny_config(tiny_checkpoint, storage, n_trials=None, timeout=60.0), progress=False)
    assert finished(study)  # the same study, given the time, searches


def test_the_deadline_leaves_the_next_trial_and_the_pick_their_time(monkeypatch):
    """Trials took 2 s and scored a window in 0.5 s: the next trial and 5 masks on 2 validation
    windows need 7 s, so with the deadline at 100 s the search stops after the trial ending past 93 s."""
    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock[0])
    stops: list[float] = []
    study = type("Study", (), {"stop": lambda self: stops.append(clock[0])})()

    def trial(seconds: float | None, windows: int) -> optuna.trial.FrozenTrial:
        attrs = {} if seconds is None else {"eval_seconds": seconds, "per_sample": [4.2] * windows}
        done = create_trial(state=TrialState.COMPLETE, value=4.2, user_attrs=attrs)
        done.datetime_start = done.datetime_complete - timedelta(seconds=2)
        return done

    deadline = Deadline(100.0, pick_windows=2, pick_masks=5)
    assert deadline.seconds() == 0
    for now, seconds, windows in ((10.0, None, 0), (50.0, 4.0, 8), (92.9, 1.0, 2), (93.1, 0.5, 1)):
        clock[0] = now
        deadline(study, trial(seconds, windows))
    assert deadline.seconds() == pytest.approx(2.0 + 5 * 2 * 0.5)  # median of 0.5 s per window
    assert stops == [93.1]


def test_a_timed_search_ends_early_enough_for_the_validation_pick(tiny_checkpoint, tmp_path, monkeypatch):
    """With --timeout the search leaves the pick its time: a deadline that never fits stops it after
    its first trial, and the pick still scores what it found; without a timeout it runs its trials."""
    monkeypatch.setattr(Deadline, "seconds", lambda self: 1e9)
    split = dict(n_samples=3, validation_samples=1, n_trials=8)
    study = run_search(tiny_config(tiny_checkpoint, f"sqlite:///{tmp_path / 's.db'}", timeout=3600.0, **split),
                       progress=False)
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 1
    assert final_pick(study)["trial"] == 0
    study = run_search(tiny_config(tiny_checkpoint, f"sqlite:///{tmp_path / 't.db'}", **split), progress=False)
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) > 1
