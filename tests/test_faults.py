"""Bad input anywhere gives one line naming the problem and leaves no study behind; a candidate
that blows up (NaN loss, out of memory) is recorded FAIL with its reason and never bred from."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import transformers as tf
from optuna.trial import TrialState

from optuna_prune.cli import main
from optuna_prune.config import SearchConfig, load_config
from optuna_prune.fitness import PerplexityFitness
from optuna_prune.samplers import PARENTS_KEY, EvoPSampler
from optuna_prune.space import LayerMaskSpace
from optuna_prune.study import method_trials, open_storage, run_search
from optuna_prune.worker import create_study

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
