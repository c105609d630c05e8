"""DarwinLM: training-aware selection of a layer mask, and the post-compression training of the winner.

DarwinLM (Tang et al., 2025) observes that the mask that scores best right after pruning is not
always the one that scores best once trained, so it judges candidates after a short fine-tune.
Its selection is staged: many offspring train on a few tokens and are scored on few tokens, the
survivors train on (and are scored on) more. Here that is

* :class:`DarwinObjective`, the glue: a :class:`~optuna_prune.objective.MaskObjective` whose staged
  scoring trains the candidate before each stage (continuing the same fine-tune), scores it on the
  stage's calibration samples, reports the loss at ``step = stage`` and asks the pruner; the
  trained weights are put back whatever happens;
* :class:`~optuna_prune.samplers.darwin.DarwinSampler` and its pruner, the search side;
* :func:`finetune_trial`, the longer training of a chosen mask, saved as a plain checkpoint.

The training itself (snapshot, loss, AdamW or LoRA) is :mod:`optuna_prune.training`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import optuna
import torch

from optuna_prune.config import ConfigError
from optuna_prune.fitness import FitnessResult, SampleLoss
from optuna_prune.objective import MaskObjective
from optuna_prune.training import (
    MaskTraining,
    ParamSnapshot,
    TokenData,
    TrainSettings,
    token_data,
    training_windows,
)

FINETUNE_ATTR = "finetune"
"""Study user attr: ``{"trial-<N>": entry}`` of post-compression trainings (see finetune_trial)."""
STAGES_ATTR = "darwin"
"""Trial user attr: per stage, the training tokens so far, samples scored, loss and training loss."""


@dataclass(frozen=True)
class Stage:
    """One selection stage: train on ``train_windows`` more windows, then score ``samples`` samples."""

    train_windows: int
    samples: int


def stage_schedule(
    train_tokens: Sequence[int], seq_len: int, n_samples: int, samples: Sequence[int] = ()
) -> tuple[Stage, ...]:
    """Stages from token budgets (rounded up to whole windows of ``seq_len``).

    ``samples`` gives the calibration samples scored after each stage but the last (the last
    scores all ``n_samples``); by default they double up to all of them (e.g. 1, 2, 4).
    """
    n = len(train_tokens)
    if n < 1 or any(t < 0 for t in train_tokens):
        raise ValueError(f"train_tokens {list(train_tokens)} must be one or more counts >= 0")
    if samples:
        if len(samples) != n - 1:
            raise ValueError(
                f"{len(samples)} stage sample counts for {n} training stages: give one per stage "
                f"but the last ({n - 1})"
            )
        counts = [int(s) for s in samples] + [n_samples]
    else:
        counts = [max(1, math.ceil(n_samples / 2 ** (n - 1 - s))) for s in range(n)]
    if any(c < 1 for c in counts) or any(b < a for a, b in pairwise(counts)) or counts[-1] > n_samples:
        raise ValueError(f"stage sample counts {counts} must be non-decreasing in 1..{n_samples}")
    return tuple(Stage(math.ceil(t / seq_len), c) for t, c in zip(train_tokens, counts, strict=True))


@dataclass(kw_only=True)
class DarwinObjective(MaskObjective):
    """Scores a mask after training it, stage by stage (DarwinLM's training-aware selection).

    For stage ``s`` of ``schedule`` the candidate trains on the next windows of ``training`` (the
    optimiser state carries over from the previous stage), is scored on the first
    ``schedule[s].samples`` rows of ``scoring`` with the fitness's loss (NLL for "perplexity", KL
    to the dense model for "kl"), reports that mean at ``step = s`` and stops if the study's
    pruner says so. The last stage scores every sample and may stop exactly once the candidate
    cannot beat the sampler's ``STOP_ABOVE_KEY``; its loss is the trial's value. The cached
    dense-prefix scoring of the fitness does not apply to trained weights, so stages run the
    whole masked model. The kept layers get their snapshot values back when the trial ends.

    Args:
        training: Training windows (with the dense targets for the "kl" loss), shared by every
            candidate in the same order.
        scoring: The calibration samples (with the dense targets for the "kl" fitness).
        schedule: The stages; every stage ranks the candidate (``stages`` is set from it).
        settings: The fine-tune's loss, optimiser and LoRA rank.
        snapshot: The untrained decoder layers (default: taken from the fitness's model, unless
            LoRA, which leaves them alone, is used).
    """

    training: TokenData
    scoring: TokenData
    schedule: Sequence[Stage]
    settings: TrainSettings = field(default_factory=TrainSettings)
    snapshot: ParamSnapshot | None = None

    def __post_init__(self) -> None:
        if not self.schedule:
            raise ValueError("a training-aware objective needs at least one stage")
        if self.schedule[-1].samples != len(self.scoring):
            raise ValueError(f"the last stage must score all {len(self.scoring)} calibration samples")
        need = sum(s.train_windows for s in self.schedule)
        if need > len(self.training):
            raise ValueError(f"the schedule trains on {need} windows but only {len(self.training)} exist")
        if self.mode != "mean":
            raise ValueError(f"training-aware selection ranks one loss; objective mode {self.mode!r} is unsupported")
        self.stages = tuple(s.samples for s in self.schedule)  # non-empty: MaskObjective scores in stages
        if self.snapshot is None and not self.settings.lora:  # LoRA leaves the weights alone
            self.snapshot = ParamSnapshot(self.fitness.model)
        self._loss = "kl" if self.fitness.name == "kl" else "lm"

    def _evaluate_in_stages(
        self, trial: optuna.Trial, dropped: tuple[int, ...], stop_above: float | None
    ) -> tuple[FitnessResult, str | None]:
        tokens_per_sample = self.scoring.seq_len - 1
        total_tokens = len(self.scoring) * tokens_per_sample
        record: list[dict[str, Any]] = []
        why: str | None = None
        value, sums = math.nan, []
        with MaskTraining(self.fitness.model, dropped, self.training, self.settings, self.snapshot) as run:
            for s, stage in enumerate(self.schedule):
                last = s == len(self.schedule) - 1
                steps = run.train(stage.train_windows)
                sums = run.score(self.scoring, stage.samples, self._loss, stop_above if last else None)
                stopped = len(sums) < stage.samples
                # A stopped candidate's value is a lower bound of its full mean (as the fitness does).
                value = sum(sums) / (total_tokens if stopped or last else len(sums) * tokens_per_sample)
                record.append({
                    "stage": s, "train_tokens": run.cursor * self.training.seq_len,
                    "samples": len(sums), "loss": value,
                    "train_loss": [steps[0], steps[-1]] if steps else [],
                })
                trial.set_user_attr(STAGES_ATTR, record)
                trial.report(value, step=s)
                if stopped:
                    why = f"cannot beat {stop_above:.4f}"
                elif not last and trial.should_prune():
                    why = f"outranked in its generation after stage {s}"
                if why is not None:
                    break
            forwards = (self.fitness.num_layers - len(dropped)) * (run.cursor + sum(r["samples"] for r in record))
        result = FitnessResult(
            dropped=dropped, value=value,
            samples=tuple(SampleLoss(i, v, tokens_per_sample) for i, v in enumerate(sums)),
            complete=why is None, layer_forwards=forwards, total_tokens=total_tokens,
        )
        return result, why


def darwin_training_windows(cfg: Any, calibration: Any, tokenizer: Any) -> torch.Tensor:
    """The training text a darwin search needs: ``sum(cfg.train_tokens)`` tokens of the calibration
    corpus apart from the calibration samples, in windows of ``cfg.seq_len`` (CalibrationError
    when the corpus is too short: raised before a study is created)."""
    schedule = stage_schedule(cfg.train_tokens, cfg.seq_len, calibration.n_samples, cfg.fidelity)
    n_windows = sum(s.train_windows for s in schedule)
    return training_windows(
        tokenizer, cfg.calibration, n_windows * cfg.seq_len, cfg.seq_len, cfg.data_dir,
        exclude=calibration.input_ids,
    )


def make_darwin_objective(cfg: Any, fitness: Any, space: Any, tokenizer: Any,
                          windows: torch.Tensor | None = None) -> DarwinObjective:
    """The training-aware objective a search config asks for (``sampler = "darwin"``).

    Training text: ``windows`` from :func:`darwin_training_windows`, made here if not given.
    """
    calibration = fitness.calibration
    schedule = stage_schedule(cfg.train_tokens, cfg.seq_len, calibration.n_samples, cfg.fidelity)
    settings = TrainSettings(
        loss=cfg.train_loss, lr=cfg.lr, batch_size=cfg.batch_size, lora=cfg.lora, seed=cfg.seed
    )
    if windows is None:
        windows = darwin_training_windows(cfg, calibration, tokenizer)
    dense = None
    if fitness.name == "kl":  # reuse the fitness's dense pass: its last-layer outputs
        dense = torch.cat([h[-1].cpu() for h in fitness.dense_hidden_states()])
    return DarwinObjective(
        fitness=fitness, space=space, method=cfg.sampler, cluster_ids=calibration.cluster_ids,
        mode=cfg.objective_mode, invalid=cfg.invalid_masks,
        training=token_data(fitness.model, windows, settings.loss, cfg.batch_size),
        scoring=TokenData(calibration.input_ids, dense), schedule=schedule, settings=settings,
    )


def finetune_trial(
    study: optuna.Study,
    trial: int | str | None = None,
    *,
    tokens: int,
    out_dir: str | Path,
    settings: TrainSettings | None = None,
    datasets: Sequence[str] | None = None,
    eval_seq_len: int | None = None,
    eval_windows: int = 16,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Post-compression training of a trial's mask (default: the best trial), saved as a checkpoint.

    The model of the study's config trains on ``tokens`` tokens of the calibration corpus apart
    from the calibration samples, masked in place; the trained pruned model is saved to
    ``out_dir`` with ``layers.save_pruned`` (plain ``AutoModelForCausalLM.from_pretrained``).
    Before and after training it measures the calibration perplexity and the held-out perplexity
    (``perplexity.perplexity``) on ``datasets`` (default: the calibration corpus's evaluation
    split), ``eval_windows`` windows of ``eval_seq_len`` tokens (default: the search's seq_len).
    ``settings`` default: ``TrainSettings()`` (KL distillation, AdamW at 1e-5, no LoRA). An existing
    file or non-empty folder ``out_dir`` is refused (before loading) unless ``overwrite``.
    Optuna does not let a finished trial's user attrs change, so the entry is stored in the study
    user attr ``"finetune"`` under ``"trial-<N>"``, and returned.
    """
    from optuna_prune.calibration import CHARS_PER_TOKEN, build_calibration, check_source
    from optuna_prune.ccds import CCDSConfig
    from optuna_prune.export import choose_trial, trial_card
    from optuna_prune.fitness import plain_forward_loss
    from optuna_prune.layers import save_pruned
    from optuna_prune.models import load_model
    from optuna_prune.outputs import check_out_folder, output_folder
    from optuna_prune.perplexity import perplexity
    from optuna_prune.study import config_of

    settings = settings or TrainSettings()
    if tokens < 1:
        raise ConfigError(f"tokens={tokens} must be >= 1; pass --tokens, e.g. 100000")
    if eval_windows < 1 or (eval_seq_len is not None and eval_seq_len < 2):
        raise ConfigError(
            f"held-out perplexity needs eval_windows >= 1 and eval_seq_len >= 2 (got {eval_windows} and "
            f"{eval_seq_len}); pass --eval-windows 1 or more and --eval-seq-len 2 or more"
        )
    chosen = choose_trial(study, trial)
    dropped = list(chosen.user_attrs["dropped"])
    cfg = config_of(study)
    for dataset in datasets or ():
        check_source(dataset, "held-out dataset")
    check_out_folder(out_dir, overwrite)  # before the model loads
    start = time.perf_counter()
    model, tokenizer = load_model(cfg.model, device=device or cfg.device, dtype=cfg.dtype)
    calibration = build_calibration(
        tokenizer, cfg.calibration, n_samples=cfg.n_samples, seq_len=cfg.seq_len, seed=cfg.seed,
        data_dir=cfg.data_dir, ccds=CCDSConfig(n_clusters=cfg.ccds_clusters) if cfg.ccds_clusters else None,
    )
    windows = training_windows(
        tokenizer, cfg.calibration, tokens, cfg.seq_len, cfg.data_dir, exclude=calibration.input_ids
    )
    data = token_data(model, windows, settings.loss, settings.batch_size)
    seq_len = eval_seq_len or cfg.seq_len
    held_out = list(datasets) if datasets else [cfg.calibration]

    def measure() -> dict[str, Any]:
        return {
            "calibration_perplexity": math.exp(plain_forward_loss(model, calibration, dropped)),
            "perplexity": {
                ds: perplexity(model, tokenizer, ds, data_dir=cfg.data_dir, seq_len=seq_len,
                               max_windows=eval_windows, dropped=dropped,
                               max_chars=2 * CHARS_PER_TOKEN * seq_len * eval_windows)
                for ds in held_out
            },
        }

    before = measure()
    with MaskTraining(model, dropped, data, settings, keep=True) as run:
        losses = run.train(len(data))
    after = measure()
    entry: dict[str, Any] = {
        "trial": chosen.number,
        "method": chosen.user_attrs.get("method"),
        "dropped": dropped,
        "tokens": len(data) * data.seq_len,
        "settings": asdict(settings),
        "out_dir": str(Path(out_dir).resolve()),
        "before": before,
        "after": after,
        "train_loss": {"first": losses[0], "last": losses[-1], "steps": len(losses)},
        "eval": {"seq_len": seq_len, "windows": eval_windows},
    }
    card = {
        **trial_card(study, chosen),
        "post-compression training": f"{entry['tokens']} tokens, {settings.loss} loss, lr {settings.lr}"
        + (f", LoRA rank {settings.lora} (merged)" if settings.lora else ""),
        **{f"{ds} perplexity (trained)": round(v, 4) for ds, v in after["perplexity"].items()},
    }
    with output_folder(out_dir, overwrite) as tmp:  # written whole or not at all
        save_pruned(model, dropped, tmp, tokenizer, card)
    entry["seconds"] = round(time.perf_counter() - start, 2)
    stored = dict(study.user_attrs.get(FINETUNE_ATTR) or {})
    stored[f"trial-{chosen.number}"] = entry
    study.set_user_attr(FINETUNE_ATTR, stored)
    return entry
