"""Post-compression training of a study's chosen mask, saved as a plain checkpoint.

DarwinLM trains the winner of its search longer once the search is done; this is that step for any
study: it reads the study (never a running search), trains the masked model of its recorded config,
measures perplexity before and after, saves the pruned model and records the run on the study.
The training itself (snapshot, loss, AdamW or LoRA) is :mod:`optuna_prune.model.training`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna

from optuna_prune.model.calibration import CHARS_PER_TOKEN, build_calibration, check_source
from optuna_prune.model.ccds import CCDSConfig
from optuna_prune.model.fitness import plain_forward_loss
from optuna_prune.model.layers import save_pruned
from optuna_prune.model.models import load_model
from optuna_prune.model.perplexity import perplexity
from optuna_prune.model.training import MaskTraining, TrainSettings, token_data, training_windows
from optuna_prune.outputs import check_out_folder, output_folder
from optuna_prune.results.export import choose_trial, trial_card
from optuna_prune.run.config import ConfigError
from optuna_prune.run.problem import config_of
from optuna_prune.search.record import DROPPED_ATTR, FINETUNE_ATTR, METHOD_ATTR, trial_dropped


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
    settings = settings or TrainSettings()
    _check_request(tokens, eval_windows, eval_seq_len)
    chosen = choose_trial(study, trial)
    dropped = list(trial_dropped(chosen))
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
        return _perplexities(model, tokenizer, calibration, dropped, held_out, cfg.data_dir, seq_len, eval_windows)

    before = measure()
    with MaskTraining(model, dropped, data, settings, keep=True) as run:
        losses = run.train(len(data))
    after = measure()
    entry: dict[str, Any] = {
        "trial": chosen.number,
        METHOD_ATTR: chosen.user_attrs.get(METHOD_ATTR),
        DROPPED_ATTR: dropped,
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


def _check_request(tokens: int, eval_windows: int, eval_seq_len: int | None) -> None:
    """Refuse, before anything loads, a training or a measurement that cannot run."""
    if tokens < 1:
        raise ConfigError(f"tokens={tokens} must be >= 1; pass --tokens, e.g. 100000")
    if eval_windows < 1 or (eval_seq_len is not None and eval_seq_len < 2):
        raise ConfigError(
            f"held-out perplexity needs eval_windows >= 1 and eval_seq_len >= 2 (got {eval_windows} and "
            f"{eval_seq_len}); pass --eval-windows 1 or more and --eval-seq-len 2 or more"
        )


def _perplexities(
    model: Any, tokenizer: Any, calibration: Any, dropped: Sequence[int], held_out: Sequence[str],
    data_dir: str | None, seq_len: int, windows: int,
) -> dict[str, Any]:
    """The masked model's calibration perplexity and its perplexity on each held-out dataset."""
    return {
        "calibration_perplexity": math.exp(plain_forward_loss(model, calibration, dropped)),
        "perplexity": {
            ds: perplexity(model, tokenizer, ds, data_dir=data_dir, seq_len=seq_len, max_windows=windows,
                           dropped=dropped, max_chars=2 * CHARS_PER_TOKEN * seq_len * windows)
            for ds in held_out
        },
    }
