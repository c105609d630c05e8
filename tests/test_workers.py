"""Many worker processes on one study: a shared evolution and budget, crash recovery, restarts.

The PostgreSQL tests run real ``optuna-prune worker`` processes against the server on
127.0.0.1:5432 (each test in a database of its own, dropped afterwards); they skip only if no
server answers. Workers use one CPU thread each, as one worker per GPU would.
"""

from __future__ import annotations

import functools
import io
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from optuna_prune.cli import main
from optuna_prune.run.storage import ConcurrentSQLiteError, open_storage
from optuna_prune.run.worker import run_worker
from optuna_prune.search.record import LEASE_KEY, MASK_KEY, METHOD_KEY, PARENTS_KEY
from optuna_prune.search.samplers import EvoPSampler, sleb_result

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
GENERATION = f"{EvoPSampler.__name__}:generation"
PARENT_CACHE = f"{EvoPSampler.__name__}:parent:"
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
POPULATION = 4


def _admin():  # noqa: ANN202
    """An autocommit connection to the server's ``test`` database, or None if no server answers."""
    psycopg = pytest.importorskip("psycopg")  # the postgres extra's driver
    for user in ("postgres", "root"):
        try:
            conn = psycopg.connect(host="127.0.0.1", port=5432, user=user, dbname="test", connect_timeout=3,
                                   autocommit=True)
        except psycopg.OperationalError:
            continue
        return conn, user
    return None, None


@pytest.fixture(scope="module")
def deep_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny Llama with 24 layers: 2,024 masks of 3 and slower trials, so a worker that a test
    signals seconds after it starts is still running (the tiny model's 56 masks of 3 in 8 can all
    be scored before the signal is sent)."""
    import torch
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(tiny_checkpoint)
    config.num_hidden_layers = 24
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("deep-llama")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tf.AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(out)
    return out


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    conn, user = _admin()
    if conn is None:
        pytest.skip("no PostgreSQL server answers on 127.0.0.1:5432 (user postgres or root, database test)")
    name = f"optuna_prune_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def create(checkpoint: Path, storage: str, n_trials: int, heartbeat: int = 2, *extra: str) -> None:
    """``optuna-prune create`` for an 8-layer model, drop 3, EvoP with population 4."""
    args = [
        "create", "--model", str(checkpoint), "--drop", "3", "--calibration", "pydoc",
        "--n-samples", "2", "--seq-len", "32", "--population", str(POPULATION), "--seed", "0",
        "--n-trials", str(n_trials), "--storage", storage, "--study", "tiny",
        "--heartbeat", str(heartbeat), *extra,
    ]
    assert main(args) == 0


def _as_in_a_terminal() -> None:
    """Ctrl-C reaches a worker started from a terminal; CI shells start children with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_worker(storage: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "optuna_prune.cli", "worker", "--storage", storage, "--study", "tiny",
           "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=WORKER_ENV,
                            cwd=ROOT, preexec_fn=_as_in_a_terminal)


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    for p in procs:
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert code == 0, p.stderr.read()


@functools.cache
def _opened(storage: str) -> optuna.storages.BaseStorage:
    """One storage per URL: the tests poll it every 0.2 s, and an engine per read used up the
    PostgreSQL server's connections ("too many clients already") on a slow run."""
    return open_storage(storage)


def load(storage: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=_opened(storage))


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if t.system_attrs.get(METHOD_KEY) == "evop"]


def worker_id(proc: subprocess.Popen) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def check_evolution(study: optuna.Study, budget: int, killed: tuple[int, ...] = ()) -> None:
    """The shared-search invariants every multi-worker run must keep (``killed``: trials of killed workers)."""
    done = finished(study)
    assert len(done) == budget  # exact: MethodBudget waits for running trials and settles races
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    for t in study.get_trials(states=(TrialState.FAIL,)):  # else only budget races may fail here
        assert t.number in killed or t.user_attrs.get("fail_reason", "").startswith("not evaluated"), t
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert complete and all(len(t.user_attrs["dropped"]) == 3 for t in complete)  # exact k
    masks = [tuple(t.system_attrs[MASK_KEY]) for t in done]
    assert len(masks) == len(set(masks))  # no mask scored twice
    members = Counter(t.system_attrs[GENERATION] for t in done)
    last = max(members)
    assert set(members) == set(range(last + 1)) and last >= 2
    assert all(members[g] >= POPULATION for g in range(last))  # every closed generation is full
    # Parents are decided once per generation, and every offspring was bred from those parents.
    attrs = study._storage.get_study_system_attrs(study._study_id)
    by_id = {t._trial_id: t for t in study.get_trials(deepcopy=False)}
    n_elite = math.ceil(0.3 * POPULATION)
    for g in range(1, last + 1):
        parents = [by_id[i] for i in attrs[f"{PARENT_CACHE}{g}"]]
        assert len(parents) == n_elite
        assert all(p.state.is_finished() and p.state != TrialState.FAIL for p in parents)
        assert all(p.system_attrs[GENERATION] < g for p in parents)
        numbers = {p.number for p in parents}
        for t in done:
            if t.system_attrs[GENERATION] == g and PARENTS_KEY in t.system_attrs:
                assert set(t.system_attrs[PARENTS_KEY]) <= numbers


@pytest.mark.postgres
def test_three_workers_share_one_evolution_and_budget(tiny_checkpoint, pg_url):
    create(tiny_checkpoint, pg_url, n_trials=18)
    study = load(pg_url)
    assert study.user_attrs["config"]["model"] == str(tiny_checkpoint.resolve())
    assert not study.trials  # create runs nothing
    procs = [start_worker(pg_url) for _ in range(3)]
    wait_all(procs)
    study = load(pg_url)
    check_evolution(study, budget=18)
    workers = Counter(t.user_attrs["worker"] for t in finished(study))
    races = len(study.get_trials(states=(TrialState.FAIL,)))
    print(f"trials per worker: {sorted(workers.values())}; budget races settled as FAIL: {races}")
    assert set(workers) <= {worker_id(p) for p in procs} and len(workers) >= 2, workers
    assert study.user_attrs["config"].get("device") is None  # workers leave the recorded config alone


@pytest.mark.postgres
def test_workers_share_the_seeding_sleb_run_then_the_evolution(deep_checkpoint, pg_url):
    """A seeded search on three workers: SLEB's run first, its candidates spread over them; a worker
    whose part ends while others score SLEB's last candidates waits for them, then all run EvoP (the
    24-layer model: trials long enough that the last candidates overlap)."""
    create(deep_checkpoint, pg_url, 12, 2, "--seed-with", "sleb")
    procs = [start_worker(pg_url) for _ in range(3)]
    wait_all(procs)
    errors = [p.stderr.read() for p in procs]
    assert not any("ended before its mask" in e for e in errors), errors
    study = load(pg_url)
    assert sleb_result(study) is not None
    sleb = [t for t in study.trials if t.system_attrs.get(METHOD_KEY) == "sleb" and t.state.is_finished()]
    assert len({t.user_attrs["worker"] for t in sleb}) >= 2  # the seed run was shared
    (seeded,) = [t for t in study.trials if t.user_attrs.get("seeded_from") == "sleb"]
    assert tuple(seeded.user_attrs["dropped"]) == sleb_result(study)
    assert len(finished(study)) == 12


@pytest.mark.postgres
def test_plain_postgresql_url_opens_the_study_outside_optuna_prune(tiny_checkpoint, pg_url):
    """The user's own optuna.load_study and optuna-dashboard take the same postgresql:// URL."""
    create(tiny_checkpoint, pg_url, n_trials=4)
    code = (
        "import sys, optuna; s = optuna.load_study(study_name='tiny', storage=sys.argv[1]); "
        "print(s.user_attrs['problem']['num_drop'], s.metric_names); "
        "print('optuna_prune' in sys.modules, sys.modules['sqlalchemy'].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code, pg_url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3 ['calibration NLL']", "False sqlalchemy"]


@pytest.mark.postgres
def test_sigkilled_worker_trial_is_retried_by_another(deep_checkpoint, pg_url):
    # 24 layers: slow enough that the victim is caught mid-trial before the two workers finish.
    create(deep_checkpoint, pg_url, 32, 1)
    victim, survivor = start_worker(pg_url), start_worker(pg_url)
    try:
        killed, frozen_at = _kill_mid_trial(pg_url, victim)
        before = {t.number: t.value for t in finished(load(pg_url))}
        failed_after = retried_after = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and retried_after is None:
            study = load(pg_url)
            if failed_after is None and study.trials[killed].state == TrialState.FAIL:
                failed_after = time.monotonic() - frozen_at
            retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
            if retry and retry[0].state.is_finished():
                retried_after = time.monotonic() - frozen_at
            time.sleep(0.2)
        wait_all([survivor])
    finally:
        for p in (victim, survivor):
            p.kill()
            p.wait()
    study = load(pg_url)
    print(f"killed trial {killed}: FAIL {failed_after:.1f} s after the worker stopped, "
          f"its retry finished after {retried_after:.1f} s")
    lost = study.trials[killed]
    # Grace period 3 x 1 s from the last heartbeat, sent at most 1 s before the worker froze.
    assert lost.state == TrialState.FAIL and failed_after >= 2
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.user_attrs["dropped"] == lost.user_attrs["dropped"]  # same candidate
    assert retry.system_attrs[GENERATION] == lost.system_attrs[GENERATION]
    assert retry.user_attrs["worker"] == worker_id(survivor)
    after = {t.number: t.value for t in finished(study)}
    assert {n: after[n] for n in before} == before  # nothing stored was lost or recomputed
    check_evolution(study, budget=32, killed=(killed,))


def _kill_mid_trial(storage: str, proc: subprocess.Popen) -> tuple[int, float]:
    """SIGKILL ``proc`` while it evaluates a candidate (after its first two).

    The process is frozen first, so the trial seen RUNNING is still RUNNING when it dies.
    Returns that trial's number and when the process froze (``time.monotonic()``).
    """
    me = worker_id(proc)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            trials = load(storage).get_trials(deepcopy=False)
        except KeyError:
            continue
        mine = [t for t in trials if t.user_attrs.get("worker") == me]
        # "dropped" is written when the objective starts: before it the worker may still be proposing.
        evaluating = [t for t in mine if t.state == TrialState.RUNNING and "dropped" in t.user_attrs]
        if sum(t.state.is_finished() for t in mine) >= 2 and evaluating:
            proc.send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            running = [t for t in load(storage).get_trials(deepcopy=False)
                       if t.user_attrs.get("worker") == me and t.state == TrialState.RUNNING
                       and "dropped" in t.user_attrs]
            if running:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return running[0].number, frozen_at
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the worker never ran a trial")


def _freeze_mid_trial(storage: str, proc: subprocess.Popen) -> int:
    """SIGSTOP ``proc`` while it holds a RUNNING trial (after its first two); that trial's number."""
    me = worker_id(proc)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        mine = [t for t in load(storage).get_trials(deepcopy=False) if t.user_attrs.get("worker") == me]
        if sum(t.state.is_finished() for t in mine) >= 2 and any(t.state == TrialState.RUNNING for t in mine):
            proc.send_signal(signal.SIGSTOP)
            running = [t for t in load(storage).get_trials(deepcopy=False)
                       if t.user_attrs.get("worker") == me and t.state == TrialState.RUNNING]
            if running:
                return running[0].number
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the worker never ran a trial")


def check_retried(study: optuna.Study, lost_number: int, reason_start: str) -> optuna.trial.FrozenTrial:
    """The lost trial is FAIL with ``reason_start...`` as fail_reason; its retry ran the same candidate
    (same mask, same generation) as a fresh attempt. Returns the retry."""
    lost = study.trials[lost_number]
    assert lost.state == TrialState.FAIL
    assert lost.user_attrs["fail_reason"].startswith(reason_start), lost.user_attrs["fail_reason"]
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == lost_number]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.user_attrs["dropped"] == lost.user_attrs["dropped"]
    assert retry.system_attrs[GENERATION] == lost.system_attrs[GENERATION]
    assert "fail_reason" not in retry.user_attrs
    return retry


@pytest.mark.postgres
def test_worker_frozen_past_the_grace_period_drops_its_taken_trial_and_goes_on(deep_checkpoint, pg_url):
    """SIGSTOP a worker mid-trial for longer than the heartbeat grace period (3 x 1 s): the other
    worker fails its trial ("heartbeat stale") and re-queues it. On SIGCONT the frozen worker must
    not crash (optuna's "Cannot tell a FAIL trial"): it drops its result with one warning line and
    goes on with the next trial, and the budget and the stored trials stay right."""
    create(deep_checkpoint, pg_url, 32, 1)
    frozen, other = start_worker(pg_url), start_worker(pg_url)
    try:
        taken = _freeze_mid_trial(pg_url, frozen)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the other worker failed it and queued its retry
            study = load(pg_url)
            if study.trials[taken].state == TrialState.FAIL and any(
                t.system_attrs.get("failed_trial") == taken for t in study.trials
            ):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"trial {taken} of the frozen worker was never failed")
        resumed = datetime.now()
        frozen.send_signal(signal.SIGCONT)
        wait_all([frozen, other])
        err = frozen.stderr.read()
    finally:
        for p in (frozen, other):
            p.kill()
            p.wait()
    study = load(pg_url)
    me = worker_id(frozen)
    check_retried(study, taken, f"heartbeat stale: worker {me} gone since ")
    warnings = [line for line in err.splitlines() if "taken from this worker" in line]
    assert len(warnings) == 1 and f"trial {taken} was taken" in warnings[0], err
    assert "internal error" not in err and "Traceback" not in err, err
    after = [t for t in finished(study) if t.user_attrs["worker"] == me and t.datetime_start > resumed]
    assert after, "the frozen worker did not go on with the next trial"
    check_evolution(study, budget=32, killed=(taken,))


def test_sigkilled_journal_worker_trial_is_failed_and_retried(deep_checkpoint, tmp_path):
    """A journal file has no database heartbeats: the workers renew a lease on their trials
    instead. SIGKILL one of two workers mid-trial: the other fails its trial once the lease is
    older than the grace period, re-queues it, and finishes the budget."""
    storage = str(tmp_path / "study.log")
    create(deep_checkpoint, storage, 24, 1)
    victim, survivor = start_worker(storage), start_worker(storage)
    try:
        killed, frozen_at = _kill_mid_trial(storage, victim)
        wait_all([survivor])
    finally:
        for p in (victim, survivor):
            p.kill()
            p.wait()
    study = load(storage)
    assert LEASE_KEY in study.trials[killed].system_attrs  # its worker renewed the lease before dying
    retry = check_retried(study, killed, f"heartbeat stale: worker {worker_id(victim)} gone since ")
    assert retry.user_attrs["worker"] == worker_id(survivor)
    check_evolution(study, budget=24, killed=(killed,))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_fail_stale_command_fails_a_dead_workers_trial_after_confirmation(deep_checkpoint, tmp_path, capsys,
                                                                          monkeypatch):
    """``optuna-prune fail-stale``: a killed worker's trial is listed, failed with a reason and
    re-queued only once confirmed (a terminal's "y", or --yes), then a fresh worker finishes the
    study. The heartbeat is 60 s, so no worker would fail the trial by itself within the test:
    the worker is known gone because its process no longer exists."""
    storage = str(tmp_path / "study.log")
    create(deep_checkpoint, storage, 12, 60)
    victim = start_worker(storage)
    try:
        killed, _ = _kill_mid_trial(storage, victim)
    finally:
        victim.kill()
        victim.wait()
    capsys.readouterr()
    log = Path(storage).read_bytes()
    command = ["fail-stale", "tiny", "--storage", storage]

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # not a terminal, no --yes: refused
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--yes" in err and "not a terminal" in err, err
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))  # a terminal, answered no
    assert main(command) == 0
    out = capsys.readouterr().out
    assert f"worker {worker_id(victim)} gone: its process no longer exists" in out and "nothing changed" in out
    assert Path(storage).read_bytes() == log  # a refused or declined command writes nothing
    assert load(storage).trials[killed].state == TrialState.RUNNING

    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    assert main(command) == 0
    assert f"failed 1 trials ({killed})" in capsys.readouterr().out
    study = load(storage)
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state == TrialState.WAITING and retry.system_attrs[MASK_KEY] == study.trials[killed].system_attrs[MASK_KEY]

    wait_all([start_worker(storage)])  # a fresh worker runs the retry and finishes the budget
    study = load(storage)
    check_retried(study, killed, f"worker {worker_id(victim)} gone: its process no longer exists")
    check_evolution(study, budget=12, killed=(killed,))
    assert main([*command, "--yes"]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.postgres
def test_restarted_workers_continue_the_evolution(tiny_checkpoint, pg_url):
    create(tiny_checkpoint, pg_url, n_trials=16)
    first = [start_worker(pg_url, "--n-trials", "4") for _ in range(2)]
    wait_all(first)
    study = load(pg_url)
    per_worker = Counter(t.user_attrs["worker"] for t in study.trials)
    assert all(n <= 4 for n in per_worker.values())  # --n-trials caps each worker
    stopped = {t.number for t in finished(study)}
    last_generation = max(t.system_attrs[GENERATION] for t in finished(study))
    assert 4 <= len(stopped) <= 8 and last_generation >= 1

    wait_all([start_worker(pg_url) for _ in range(2)])  # a full stop, then all workers again
    study = load(pg_url)
    check_evolution(study, budget=16)
    new = [t for t in finished(study) if t.number not in stopped]
    assert min(t.system_attrs[GENERATION] for t in new) >= last_generation  # continued, not restarted
    assert max(t.system_attrs[GENERATION] for t in new) > last_generation


@pytest.mark.postgres
def test_storage_load_small(pg_url, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the spawned workers import it too
    from storage_load import run_load

    result = run_load(pg_url, workers=4, seconds=4)
    print(result)
    assert not result["crashes"]
    assert result["errors"] == 0 and result["duplicates"] == 0 and result["running"] == 0
    assert result["complete"] > 0


def test_sqlite_refuses_a_second_process_and_ctrl_c_ends_a_worker(deep_checkpoint, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    create(deep_checkpoint, storage, 400, 1)
    first = start_worker(storage)
    try:
        _wait_running(storage, first)
        with pytest.raises(ConcurrentSQLiteError, match="SQLite is for one process") as info:
            run_worker(storage, "tiny", n_trials=1)
        assert worker_id(first) in str(info.value) and "postgresql://" in str(info.value)
        assert not load(storage).get_trials(states=(TrialState.WAITING,))  # nothing left behind

        # Ctrl-C: the worker stops cleanly, its running trial FAIL, one line, exit code 130.
        assert first.poll() is None, "the worker finished before it could be interrupted"
        first.send_signal(signal.SIGINT)
        code, err = first.wait(timeout=60), first.stderr.read().strip().splitlines()
        assert code == 130 and len(err) == 1 and "interrupted" in err[0], (code, err)
    finally:
        first.kill()
        first.wait()
    study = load(storage)
    # The interrupted candidate is FAIL. (Ctrl-C in the instant between optuna creating a trial and
    # the sampler seeing it leaves an empty RUNNING trial: no mask, ignored by samplers and budget.)
    assert not [t for t in study.get_trials(states=(TrialState.RUNNING,)) if t.params or t.system_attrs]
    # The interrupted process is gone: a new worker is not refused and resumes the study.
    done = len(finished(study))
    run_worker(storage, "tiny", n_trials=2)
    assert len(finished(load(storage))) == done + 2


def _wait_running(storage: str, proc: subprocess.Popen) -> None:
    me = worker_id(proc)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if any(t.user_attrs.get("worker") == me for t in load(storage).get_trials(states=(TrialState.RUNNING,))):
                return
        except KeyError:
            pass
        time.sleep(0.1)
    raise AssertionError("the worker never ran a trial")
