"""DarwinLM's training-aware selection, the objective side: candidates train before they are scored.

DarwinLM (Tang et al., 2025) observes that the mask that scores best right after pruning is not
always the one that scores best once trained, so it judges candidates after a short fine-tune.
Its selection is staged: many offspring train on a few tokens and are scored on few tokens, the
survivors train on (and are scored on) more. :class:`DarwinObjective` is the glue: a
:class:`~optuna_prune.run.objective.MaskObjective` whose staged scoring trains the candidate before
each stage (continuing the same fine-tune), scores it on the stage's calibration samples, reports
the loss at ``step = stage`` and asks the pruner; the trained weights are put back whatever happens.

The search side (sampler, survivor schedule, :func:`~optuna_prune.search.samplers.darwin.stage_schedule`)
is :mod:`optuna_prune.search.samplers.darwin`; the training itself (snapshot, loss, AdamW or LoRA)
:mod:`optuna_prune.model.training`; the longer training of a chosen mask :mod:`optuna_prune.results.finetune`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from optuna_prune.model.fitness import FitnessResult, SampleLoss
from optuna_prune.model.training import (
    MaskTraining,
    ParamSnapshot,
    TokenData,
    TrainSettings,
    token_data,
    training_windows,
)
from optuna_prune.run.objective import MaskObjective
from optuna_prune.search.record import DARWIN_STAGES_ATTR
from optuna_prune.search.samplers.darwin import Stage, stage_schedule


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
                trial.set_user_attr(DARWIN_STAGES_ATTR, record)
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
