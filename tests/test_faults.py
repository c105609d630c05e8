"""Bad input anywhere gives one line naming the problem and leaves no study behind; a candidate
that blows up (NaN loss, out of memory) is recorded FAIL with its reason and never bred from."""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna
import pytest
import torch
import transformers as tf
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from optuna_prune.cli import main
from optuna_prune.model.fitness import PerplexityFitness
from optuna_prune.run.budget import method_trials
from optuna_prune.run.config import SearchConfig, load_config
from optuna_prune.run.storage import fail_gone_trials, gone_trials, open_storage
from optuna_prune.run.study import run_search
from optuna_prune.run.worker import create_study
from optuna_prune.search.record import LEASE_KEY, PARENTS_KEY
from optuna_prune.search.samplers import EvoPSampler
from optuna_prune.search.samplers.base import MaskSampler
from optuna_prune.search.space import LayerMaskSpace

pytestmark = pytest.mark.filterwarnings("ignore")

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~30x faster on one thread than on two oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "broken.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("Café, naïve, Straße. ".encode("latin-1") * 50)
    (d / "bad.toml").write_text("sparsity = [oops\n")
    (d / "unknown.toml").write_text("sparsity = 0.2\nlayers_to_drop = 3\n")
    return d


def one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("optuna-prune: error:"), err
    return err


def no_study(storage_file: Path) -> bool:
    return not storage_file.exists() or not optuna.get_all_study_summaries(open_storage(f"sqlite:///{storage_file}"))


@pytest.mark.parametrize("command", ["search", "create"])
@pytest.mark.parametrize(
    "args, message",
    [
        (["--drop", "8"], "keep at least 1"),  # k >= L (8 layers)
        (["--drop", "20"], "keep at least 1"),
        (["--sparsity", "0"], "sparsity"),
        (["--sparsity", "1"], "sparsity"),
        (["--sparsity", "1.5"], "sparsity"),
        (["--sparsity", "0.2", "--drop", "1"], "exactly one"),
        (["--drop", "1", "--storage", "notaurl://x:y@/"], "storage"),
        (["--drop", "1", "--storage", "::not a url::"], "malformed"),
        (["--drop", "1", "--storage", UNREACHABLE], "cannot open storage"),
        (["--drop", "1", "--model", "./no/such/model"], "no/such/model"),
        (["--drop", "1", "--model", "{bad}/broken.gguf"], "broken.gguf"),
        (["--drop", "1", "--calibration", "/no/such.txt"], "such.txt"),
        (["--drop", "1", "--calibration", "{bad}/empty.txt"], "empty"),
        (["--drop", "1", "--calibration", "{bad}/latin1.txt"], "UTF-8"),
        (["--drop", "1", "--sampler", "annealing"], "sampler"),
        (["--drop", "1", "--n-samples", "0"], "n_samples"),
        (["--drop", "1", "--heartbeat", "0"], "heartbeat"),
        (["--drop", "1", "--seed-with", "magic"], "seed_with"),
        (["--config", "{bad}/bad.toml"], "not valid TOML"),
        (["--config", "{bad}/unknown.toml"], "layers_to_drop"),
        (["--config", "{bad}/missing.toml"], "not found"),
        (["--drop", "1", "--nonsense"], "--nonsense"),
    ],
)
def test_bad_input_gives_one_line_error(tiny_checkpoint, tmp_path, bad_files, capsys, command, args, message):
    db = tmp_path / "s.db"
    base = [command, "--model", str(tiny_checkpoint), "--calibration", "pydoc", "--n-samples", "1",
            "--seq-len", "16", "--storage", f"sqlite:///{db}", "--no-progress"]
    err = one_line_error(capsys, main(base + [a.format(bad=bad_files) for a in args]))
    assert message in err
    assert no_study(db)  # never a half-written study


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "studies").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_study_configs_pass_validation(path: Path) -> None:
    """The ready configs in studies/ go through the same checks as a user's file (keys, ranges, sampler x space)."""
    assert load_config(path).model  # a ConfigError here names the bad key or value


def test_unknown_study_for_worker_and_show(tiny_checkpoint, tmp_path, capsys):
    db = tmp_path / "s.db"
    storage = f"sqlite:///{db}"
    run_search(SearchConfig(model=str(tiny_checkpoint), drop=2, calibration="pydoc", n_samples=1, seq_len=16,
                            n_trials=2, storage=storage, study="real"), progress=False)
    for argv in (["worker", "--study", "nope", "--storage", storage], ["show", "nope", "--storage", storage]):
        err = one_line_error(capsys, main(argv))
        assert "no study 'nope'" in err and "real" in err  # names what the storage holds
    assert [s.study_name for s in optuna.get_all_study_summaries(open_storage(storage))] == ["real"]
    assert "n_trials 0" in one_line_error(capsys, main(["worker", "--study", "real", "--storage", storage,
                                                         "--n-trials", "0"]))
    assert "cannot open storage" in one_line_error(capsys, main(["worker", "--study", "x", "--storage", UNREACHABLE]))
    assert "--study" in one_line_error(capsys, main(["worker", "--storage", storage]))


# --- candidates that blow up ---------------------------------------------------------------

POPULATION = 4
GENERATION = f"{EvoPSampler.__name__}:generation"
PARENT_CACHE = f"{EvoPSampler.__name__}:parent:"


@pytest.fixture(scope="module")
def overflow_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """8 layers whose MLP biases add +M, -M, +M (M near float32 max) to one channel in layers 3-5.

    The dense model is finite, but a mask that drops layer 4 and keeps 3 and 5 overflows to inf,
    and the next RMSNorm turns it into NaN: a real non-finite loss from real weights.
    """
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_checkpoint)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, mlp_bias=True,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.bias.zero_()
            if i in (3, 4, 5):
                layer.mlp.down_proj.bias[0] = 3e38 if i != 4 else -3e38
    out = tmp_path_factory.mktemp("overflow-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def search_config(checkpoint: Path, tmp_path: Path, n_trials: int = 16) -> SearchConfig:
    return SearchConfig(model=str(checkpoint), drop=3, calibration="pydoc", n_samples=2, seq_len=32,
                        population=POPULATION, n_trials=n_trials, seed=0, storage=f"sqlite:///{tmp_path / 's.db'}",
                        study="faults")


def run_with_enqueued(cfg: SearchConfig, bad: tuple[int, ...]) -> optuna.Study:
    """Create the study, queue the bad candidate first, and run the search."""
    study = create_study(cfg)
    study.enqueue_trial(LayerMaskSpace(8, 3).to_params(bad))
    return run_search(cfg, progress=False)


def assert_failures_isolated(study: optuna.Study, reason: str) -> list[optuna.trial.FrozenTrial]:
    """Failed candidates carry their reason, the search went on, and no failure became a parent."""
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed and all(reason in t.user_attrs["fail_reason"] for t in failed)
    after = [t for t in study.trials if t.number > failed[0].number and t.state == TrialState.COMPLETE]
    assert len(after) >= 8  # the search continued
    finished = method_trials(study, "evop", (TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) + len(failed) == len(study.trials)
    failed_ids = {t._trial_id for t in failed}
    failed_numbers = {t.number for t in failed}
    generations = max(t.system_attrs[GENERATION] for t in finished)
    assert generations >= 2
    for g in range(1, generations + 1):
        assert not failed_ids & set(study._storage.get_study_system_attrs(study._study_id)[f"{PARENT_CACHE}{g}"])
    assert not any(failed_numbers & set(t.system_attrs.get(PARENTS_KEY, ())) for t in study.trials)
    return failed


def test_nan_candidates_fail_with_reason_and_are_never_parents(overflow_checkpoint, tmp_path):
    cfg = search_config(overflow_checkpoint, tmp_path, n_trials=20)
    study = run_with_enqueued(cfg, (0, 1, 4))
    failed = assert_failures_isolated(study, "NonFiniteLossError")
    assert study.trials[0] in failed and study.trials[0].user_attrs["dropped"] == [0, 1, 4]
    for t in failed:  # exactly the masks that overflow fail
        dropped = set(t.user_attrs["dropped"])
        assert 4 in dropped and not dropped & {3, 5}
    for t in method_trials(study, "evop", (TrialState.COMPLETE,)):
        dropped = set(t.user_attrs["dropped"])
        assert not (4 in dropped and not dropped & {3, 5})


def test_out_of_memory_candidate_fails_and_the_search_goes_on(tiny_checkpoint, tmp_path, monkeypatch):
    bad = (0, 1, 2)
    iter_samples = PerplexityFitness.iter_samples

    def samples_or_oom(self, dropped):  # noqa: ANN001, ANN202
        # iter_samples is the one path every scoring mode takes (plain, early-stopped, staged).
        if tuple(dropped) == bad:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        yield from iter_samples(self, dropped)

    monkeypatch.setattr(PerplexityFitness, "iter_samples", samples_or_oom)
    study = run_with_enqueued(search_config(tiny_checkpoint, tmp_path), bad)
    failed = assert_failures_isolated(study, "OutOfMemoryError: CUDA out of memory")
    assert failed[0].number == 0 and all(t.user_attrs["dropped"] == list(bad) for t in failed)


# --- trials of dead workers ----------------------------------------------------------------------

STALE = re.compile(r"heartbeat stale: worker elsewhere:4242 gone since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
                   r"\(no heartbeat for \d+ s, grace period 3 s\)")


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_stale_heartbeat_fails_the_trial_with_a_reason_and_retries_it_without(tmp_path, kind):
    """A trial whose heartbeat (journal: lease) is older than the grace period is failed with a
    fail_reason naming its worker and last heartbeat, and re-queued as a fresh attempt: same params,
    no fail_reason, no inherited lease (which would make the retry stale as soon as it is picked up)."""
    url = f"sqlite:///{tmp_path / 's.db'}" if kind == "sqlite" else str(tmp_path / "s.log")
    study = optuna.create_study(study_name="s", storage=open_storage(url, heartbeat=1))
    trial = study.ask({"x": FloatDistribution(0, 1)})
    study._storage.set_trial_user_attr(trial._trial_id, "worker", "elsewhere:4242")
    study._storage.record_heartbeat(trial._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.RUNNING and not gone_trials(study)  # fresh
    time.sleep(4.5)  # past the grace period of 3 heartbeats (SQLite keeps whole seconds)
    assert [(t.number, STALE.fullmatch(why) is not None) for t, why in gone_trials(study)] == [(0, True)]
    optuna.storages.fail_stale_trials(study)  # what every worker runs before each trial and while it waits
    lost, retry = study.trials
    assert lost.state == TrialState.FAIL and STALE.fullmatch(lost.user_attrs["fail_reason"]), lost.user_attrs
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == 0
    assert not {"fail_reason", "worker"} & set(retry.user_attrs) and LEASE_KEY not in retry.system_attrs
    assert retry.params == lost.params
    assert study.ask().number == 1  # the retry, RUNNING again: not stale before its first heartbeat
    optuna.storages.fail_stale_trials(study)
    assert study.trials[1].state == TrialState.RUNNING and len(study.trials) == 2
    assert not fail_gone_trials(study)  # nothing of a gone worker is left


def _take_running_trial(storage: str, study_name: str) -> int:
    """What another worker does to this one's trial once its heartbeat is stale: fail it with a
    reason and re-queue it. Returns the trial's number."""
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    reason = "heartbeat stale: worker elsewhere:4242 gone since 2026-01-01 00:00:00 (no heartbeat for 9 s, grace period 3 s)"
    assert [t.number for t in fail_gone_trials(study, [(running, reason)])] == [running.number]
    return running.number


@pytest.mark.parametrize("where", ["objective", "sampler"])
def test_a_trial_taken_from_a_frozen_worker_is_dropped_and_the_search_goes_on(tiny_checkpoint, tmp_path, monkeypatch,
                                                                              caplog, where):
    """In-process twin of the SIGSTOP test in test_workers.py: the third trial is failed and re-queued
    by "another worker" while this one evaluates it (or while its sampler proposes it). The next
    write to it raises UpdateFinishedTrialError; the search drops it with one warning, goes on,
    and meets its budget exactly."""
    cfg = search_config(tiny_checkpoint, tmp_path, n_trials=8)
    taken: list[int] = []

    def take_third(calls=[0]):  # noqa: B006, ANN001, ANN202
        calls[0] += 1
        if calls[0] == 3:
            taken.append(_take_running_trial(cfg.storage, cfg.study))

    if where == "objective":
        iter_samples = PerplexityFitness.iter_samples

        def samples(self, dropped):  # noqa: ANN001, ANN202
            take_third()
            yield from iter_samples(self, dropped)

        monkeypatch.setattr(PerplexityFitness, "iter_samples", samples)
    else:
        claim = MaskSampler._claim

        def claim_after(self, study, trial, seed):  # noqa: ANN001, ANN202
            take_third()
            return claim(self, study, trial, seed)

        monkeypatch.setattr(MaskSampler, "_claim", claim_after)
    with caplog.at_level("WARNING", logger="optuna_prune.run.study"):
        study = run_search(cfg, progress=False)
    (number,) = taken
    warned = [r.getMessage() for r in caplog.records if "taken from this worker" in r.getMessage()]
    assert len(warned) == 1 and f"trial {number} was taken" in warned[0] and "elsewhere:4242" in warned[0]
    lost = study.trials[number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_reason"].startswith("heartbeat stale")
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and "fail_reason" not in retry.user_attrs
    if where == "objective":  # it had its mask: the retry scores the same one
        assert retry.user_attrs["dropped"] == lost.user_attrs["dropped"]
    assert len(method_trials(study, "evop", (TrialState.COMPLETE, TrialState.PRUNED))) == 8
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_ctrl_c_unwound_into_another_error_prints_one_line(tiny_checkpoint, tmp_path, monkeypatch, capfd):
    """Ctrl-C inside a storage call can reach optuna as another error raised while it unwound (the
    SIGINT test in test_workers.py saw it under load). The CLI still says "interrupted" in one line,
    with no "Trial N failed" line after the plan's lines, and exits 130."""
    iter_samples = PerplexityFitness.iter_samples

    def samples(self, dropped, calls=[0]):  # noqa: B006, ANN001, ANN202
        calls[0] += 1
        if calls[0] == 3:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("the storage call was cut short") from None
        yield from iter_samples(self, dropped)

    monkeypatch.setattr(PerplexityFitness, "iter_samples", samples)
    cfg = search_config(tiny_checkpoint, tmp_path)
    args = ["search", "--model", cfg.model, "--drop", "3", "--calibration", "pydoc", "--n-samples", "2",
            "--seq-len", "32", "--population", "4", "--n-trials", "8", "--storage", cfg.storage, "--no-progress"]
    capfd.readouterr()
    assert main(args) == 130
    err = capfd.readouterr().err.strip().splitlines()
    assert "interrupted" in err[-1] and not [line for line in err if "failed" in line], err
