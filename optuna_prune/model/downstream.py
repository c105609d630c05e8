"""Zero-shot downstream accuracy with lm-eval on a model already in memory (EvoP Table 1).

The model is loaded once and wrapped in lm-eval's ``HFLM(pretrained=model)``; a pruned mask is applied
in place with ``layers.masked``, so dense and pruned variants share one copy of the weights and no task
reloads anything.

Tasks come from one of two places:

* online: lm-eval's built-in tasks by name (``arc_easy``, ``hellaswag``, ...), read from the hub;
* offline, whenever the data dir (argument, else ``$OPTUNA_PRUNE_DATA``) holds the shared-data
  ``eval/`` layout: the YAML twins in ``optuna_prune/model/tasks``, which keep the built-in tasks' names, prompts,
  targets and metrics but read local JSONL files. The path of each file is only known at run time, so a
  small YAML that includes the shipped definition and sets ``dataset_kwargs.data_files`` is written to a
  temporary folder and loaded with ``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna_prune.model.calibration import DATA_ENV
from optuna_prune.model.layers import masked

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
TASKS_DIR = Path(__file__).parent / "tasks"
# Offline task -> its data file under the data dir (the shared-data `eval/` layout).
OFFLINE_FILES = {
    "arc_easy": "eval/arc/ARC-Easy-test.jsonl",
    "arc_challenge": "eval/arc/ARC-Challenge-test.jsonl",
    "hellaswag": "eval/hellaswag/hellaswag_validation.jsonl",
    "piqa": "eval/piqa/piqa_validation.jsonl",
    "winogrande": "eval/winogrande/dev.jsonl",
}


class DownstreamError(ValueError):
    """A downstream task cannot be found or run; the message names the task and the fix."""


def offline_root(data_dir: str | Path | None = None) -> Path | None:
    """The data dir whose ``eval/`` folder the offline tasks read, or None to use lm-eval's built-ins."""
    root = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    if root is None or not (Path(root).expanduser() / "eval").is_dir():
        return None
    return Path(root).expanduser().resolve()


def check_tasks(tasks: Sequence[str], limit: int | None = None, data_dir: str | Path | None = None) -> None:
    """DownstreamError for what can be refused before a model loads: ``limit`` below 1, or offline
    (a data dir with ``eval/``) a task without an offline definition or data file."""
    if limit is not None and limit < 1:
        raise DownstreamError(f"limit {limit} must be >= 1 (items per task); omit --limit to score every item")
    root = offline_root(data_dir)
    if root is None or not tasks:
        return
    unknown = [t for t in tasks if t not in OFFLINE_FILES]
    if unknown:
        raise DownstreamError(
            f"no offline definition of tasks {unknown}; offline tasks are {', '.join(OFFLINE_FILES)} "
            "(leave --data-dir and $OPTUNA_PRUNE_DATA unset to use lm-eval's built-in tasks online)"
        )
    for task in tasks:
        data = root / OFFLINE_FILES[task]
        if not data.is_file():
            raise DownstreamError(f"offline task {task} needs {data}, which does not exist; restore it or drop {task} from --tasks")


@contextmanager
def task_manager(tasks: Sequence[str], data_dir: str | Path | None = None) -> Iterator[Any]:
    """An lm-eval TaskManager that knows ``tasks``: the offline twins if a data dir has ``eval/``."""
    # deferred: loads lm_eval only when this runs
    from lm_eval.tasks import TaskManager

    root = offline_root(data_dir)
    if root is None:
        yield TaskManager()
        return
    check_tasks(tasks, data_dir=root)
    with tempfile.TemporaryDirectory(prefix="optuna-prune-tasks-") as tmp:
        for task in tasks:
            data = root / OFFLINE_FILES[task]
            (Path(tmp) / f"{task}.yaml").write_text(
                f"include: {(TASKS_DIR / f'{task}.yaml').as_posix()!r}\n"
                f"dataset_kwargs:\n  data_files:\n    test: {data.as_posix()!r}\n",
                encoding="utf-8",
            )
        yield TaskManager(include_path=tmp, include_defaults=False)


def _metrics(results: dict[str, Any], task: str, limit: int | None) -> dict[str, Any]:
    row = results.get(task, {})

    def get(name: str) -> float | None:
        value = row.get(f"{name},none")
        return float(value) if isinstance(value, (int, float)) else None

    return {
        "acc": get("acc"),
        "acc_stderr": get("acc_stderr"),
        "acc_norm": get("acc_norm"),
        "acc_norm_stderr": get("acc_norm_stderr"),
        "limit": limit,
    }


def downstream(
    model: PreTrainedModel,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    dropped: Sequence[int] = (),
    batch_size: int = 1,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Zero-shot lm-eval accuracy of ``model`` without the ``dropped`` layers, per task.

    Returns ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "limit"}}`` (acc_norm None
    for tasks without it, e.g. winogrande). ``limit`` scores only the first N items of each task.
    ``progress`` shows lm-eval's bar of the requests scored, with the time left.
    """
    # deferred: loads lm_eval only when this runs
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise DownstreamError("no downstream tasks given; pass e.g. --tasks arc_easy,piqa")
    if limit is not None and limit < 1:
        raise DownstreamError(f"limit {limit} must be >= 1 (items per task)")
    tasks = list(dict.fromkeys(tasks))
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # lm-eval logs every request batch and warns about live models
    try:
        with task_manager(tasks, data_dir) as manager, masked(model, dropped) if dropped else nullcontext():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            for request_type in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                setattr(lm, request_type, partial(getattr(lm, request_type), disable_tqdm=not progress))
            try:
                out = simple_evaluate(
                    model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False
                )
            except KeyError as exc:
                raise DownstreamError(f"unknown lm-eval task: {exc}") from None
            except (ConnectionError, OSError) as exc:
                raise DownstreamError(
                    f"cannot load the data of tasks {tasks} from the hub ({type(exc).__name__}); offline, "
                    f"pass --data-dir with the eval/ layout of ../shared/data"
                ) from None
    finally:
        quiet.setLevel(level)
    return {task: _metrics(out["results"], task, limit) for task in tasks}
