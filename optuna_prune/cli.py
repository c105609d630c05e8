"""``optuna-prune``: a thin shell over the Python API; every command parses flags and calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import shlex
import socket
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from optuna_prune.outputs import OutputError, check_out_file, check_writable_folder
from optuna_prune.run.config import (
    DEFAULT_STORAGE,
    PICK_BY,
    ConfigError,
    SearchConfig,
    from_dict,
    known_keys,
    load_config,
)
from optuna_prune.run.final_pick import final_pick
from optuna_prune.run.methods import METHODS, SPACES, option_help, option_types, seeders
from optuna_prune.run.summary import best_by_method, running_by_method
from optuna_prune.search import compat
from optuna_prune.search.record import CONFIG_ATTR, study_problem, trial_worker
from optuna_prune.search.space import SpaceError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
STORAGE_HELP = f"sqlite:///file.db, postgresql://user@host/db or a .log journal (default {DEFAULT_STORAGE})"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise ConfigError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the top parser: point at the subcommand's help
            command = getattr(parsed, "command", None)
            self.prog = f"{self.prog} {command}" if command else self.prog
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, turned into one line on stderr."""
    # deferred: loads safetensors, sqlalchemy, torch, transformers only when this runs
    from optuna_prune.model.calibration import CalibrationError
    from optuna_prune.model.devices import DeviceError
    from optuna_prune.model.downstream import DownstreamError
    from optuna_prune.model.layers import UnsupportedModelError
    from optuna_prune.model.models import ModelNotFoundError
    from optuna_prune.model.training import TrainingError
    from optuna_prune.results.export import TrialChoiceError
    from optuna_prune.run.problem import StudyMismatchError
    from optuna_prune.run.storage import StorageError

    return (
        ConfigError, CalibrationError, UnsupportedModelError, ModelNotFoundError, SpaceError,
        StorageError, StudyMismatchError, KeyError, FileNotFoundError, TrialChoiceError, DownstreamError,
        DeviceError, OutputError, TrainingError, OSError,
    )


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="study config TOML (see studies/); flags override it")
    p.add_argument("--model", help="short name (smollm2-135m), local folder, .gguf file or hub id")
    p.add_argument("--sparsity", type=float, help="fraction of decoder layers to drop, e.g. 0.2 (rounded to "
                   "whole layers: the search says how many it drops)")
    p.add_argument("--drop", type=int, help="number of decoder layers (sub-blocks with --space sublayers) to drop, "
                   "exactly (instead of --sparsity)")
    p.add_argument("--sampler", choices=tuple(METHODS), help="search method (default evop): " + "; ".join(
        f"{m.name}: {m.help}" for m in METHODS.values()))
    p.add_argument("--fitness", choices=("perplexity", "kl"))
    p.add_argument("--calibration", help="wikitext2, c4, ptb, pydoc, or a .txt/.jsonl/.parquet file or folder")
    p.add_argument("--data-dir", help="offline copies of wikitext2/c4 (layout of ../shared/data)")
    p.add_argument("--n-samples", type=int, help="calibration samples (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sample (default 2048)")
    p.add_argument("--validation-samples", type=int, help="of the --n-samples windows, hold this many out of the "
                   "search and pick the final mask among the best ones by its loss on them (default: 2 of 8 or more "
                   "random windows, i.e. with --ccds-clusters 0, else 0; 0: off)")
    p.add_argument("--pick-top", type=int, help="with --validation-samples: distinct best masks scored on them (5)")
    p.add_argument("--ccds-clusters", type=int, help="EvoP CCDS: draw the windows from K clusters of the corpus (default: 4 "
                   "when the search keeps 4 or more windows, else 0; 0: off, random windows)")
    p.add_argument("--objective-mode", choices=("mean", "worst", "clusters"))
    p.add_argument("--seed", type=int)
    p.add_argument("--n-trials", type=int, help="this method's evaluation budget in the study")
    p.add_argument("--timeout", type=float, help="end this run after this many seconds, preparation (model, calibration, CCDS) and the validation pick included (> 0; default: no limit)")
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument("--study", help="study name (default: derived from model, k and calibration)")
    _add_option_flags(p)
    p.add_argument("--seed-with", help=f"comma list: masks of {', '.join(seeders())} seeded into the search's first "
                   "generation; SLEB runs first in the study if it has no SLEB result, ranking in stages (default: "
                   "sleb for evop on CCDS windows, else none; '' for none)")
    p.add_argument("--space", choices=tuple(SPACES), help="; ".join(
        f"{s.name} ({', '.join(m.name for m in METHODS.values() if s.name in m.spaces)}): {s.help}"
        for s in SPACES.values()))
    p.add_argument("--rate-resolution", type=int, help="rates in steps of 1/N of a layer's MLP width (16)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--cache-mb", type=int, help="hidden-state prefix cache budget (MiB)")
    p.add_argument("--heartbeat", type=int, help="seconds between worker heartbeats (stale after 3x)")
    p.add_argument("--new-study", action="store_true", help="start a new study instead of resuming")
    p.add_argument("--no-progress", action="store_true")


def _add_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per method option (``population`` -> ``--population``), its help from the methods that have it."""
    for key, type_name in option_types().items():
        flag = "--" + key.replace("_", "-")
        if type_name.startswith("bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=option_help(key))
        else:
            kind = int if type_name.startswith("int") else float if type_name.startswith("float") else str
            p.add_argument(flag, type=kind, help=option_help(key))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optuna-prune", description="Search which decoder layers of an LLM to drop.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("search", help="run or resume a layer-drop search")
    _add_search_flags(p)

    p = sub.add_parser("create", help="create a study from a config without running trials (then start workers)")
    _add_search_flags(p)

    p = sub.add_parser("worker", help="join a study as one more worker (e.g. one per GPU) and evaluate candidates")
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument("--study", required=True, help="name of a study made by create or search")
    p.add_argument("--n-trials", type=int, help="at most this many trials in this worker, a seed run's included (default: until the budget)")
    p.add_argument("--device", help="this worker's device, e.g. cuda:1 (default: the study's config)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("studies", help="list the studies in a storage with their best values")
    p.add_argument("--storage", help=STORAGE_HELP)

    p = sub.add_parser("show", help="best masks of a study and a table per method")
    p.add_argument("study")
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("report", help="write a study's HTML report and attach its figures to the study")
    p.add_argument("study")
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument("--out", help="report file (default: STUDY-report.html)")
    p.add_argument("--figures-dir", help="also write each figure as a standalone HTML file here")

    p = sub.add_parser("export", help="save a trial's pruned model as a plain Hugging Face checkpoint")
    p.add_argument("study")
    p.add_argument("--storage", help=STORAGE_HELP)
    _add_trial_flags(p)
    p.add_argument("--out", required=True, help="folder to write the checkpoint to (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file or folder")
    p.add_argument("--device", default="cpu", help="where to load the model for pruning (default cpu)")

    p = sub.add_parser("evaluate", help="perplexity, downstream accuracy and speed: dense vs chosen trial(s)")
    p.add_argument("study")
    p.add_argument("--storage", help=STORAGE_HELP)
    _add_trial_flags(p, per_method=True)
    p.add_argument("--datasets", default="wikitext2,c4", help="comma list for perplexity ('' for none)")
    p.add_argument("--tasks", help="comma list of lm-eval tasks ('' for none; default: arc_easy, arc_challenge, "
                   "hellaswag, piqa, winogrande)")
    p.add_argument("--limit", type=int, metavar="N", help="downstream tasks only: score the first N items of each task "
                   "(default: every item). Perplexity is bounded by --max-windows and --max-chars")
    p.add_argument("--quick", action="store_true", help="a first look in minutes: perplexity on 16 windows of "
                   "512 tokens per dataset, the first 100 items of each task, 3 speed repeats; explicit flags win")
    p.add_argument("--data-dir", help="offline data (layout of ../shared/data): corpora and eval/ tasks")
    p.add_argument("--seq-len", type=int, help="perplexity window length in tokens (default 2048)")
    p.add_argument("--max-windows", type=int, help="perplexity on at most N windows (default: the whole split)")
    p.add_argument("--max-chars", type=int, help="perplexity on the first N characters of each corpus")
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the study's config)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--recompute", action="store_true", help="ignore results already stored in the study")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("finetune", help="train a trial's pruned model longer (DarwinLM post-compression training) and save it")
    p.add_argument("study")
    p.add_argument("--storage", help=STORAGE_HELP)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="trial number")
    which.add_argument("--best", action="store_true", help="the best complete trial of the study")
    p.add_argument("--tokens", type=int, required=True, help="training tokens (calibration corpus, not its samples)")
    p.add_argument("--out", required=True, help="folder of the trained pruned checkpoint (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file or folder")
    p.add_argument("--loss", choices=("kl", "lm"), default="kl", help="distil the dense model (kl) or LM loss")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lora", type=int, default=0, help="LoRA rank, merged before saving (0: train the kept layers)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per optimiser step")
    p.add_argument("--eval", help="comma list of held-out perplexity datasets (default: the calibration corpus)")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out perplexity windows")
    p.add_argument("--eval-seq-len", type=int, help="tokens per held-out window (default: the search's seq_len)")
    p.add_argument("--device")

    p = sub.add_parser("fail-stale", help="fail the RUNNING trials whose worker is gone (killed, or its "
                       "heartbeat stale) and re-queue their candidates, after a confirmation")
    p.add_argument("study")
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument("--yes", action="store_true", help="fail them without asking (needed without a terminal)")

    p = sub.add_parser("dashboard", help="start optuna-dashboard on the storage")
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    return parser


def _add_trial_flags(p: argparse.ArgumentParser, per_method: bool = False) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, help="trial number (default: the best trial)")
    which.add_argument("--best", action="store_true", help="the best complete trial (default)")
    if per_method:
        which.add_argument("--per-method", action="store_true", help="the best trial of each method")
    p.add_argument("--by", choices=PICK_BY, default="validation", help="what --best means: the final pick by validation "
                   "loss of a search with --validation-samples (default; else the best by search loss), or "
                   "calibration: the best by search loss")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def search_config(args: argparse.Namespace) -> SearchConfig:
    """Merge a TOML config (if any) with the flags that were given."""
    flags: dict[str, Any] = {
        name: getattr(args, name)
        for name in known_keys()
        if getattr(args, name, None) is not None
    }
    if args.config:
        return load_config(args.config, **flags)
    return from_dict(flags, origin="command line")


def cmd_search(args: argparse.Namespace) -> None:
    # deferred: loads sqlalchemy only when this runs
    from optuna_prune.run.study import run_search

    cfg = search_config(args)
    storage = cfg.storage or DEFAULT_STORAGE
    study = run_search(
        cfg, new_study=args.new_study, progress=not args.no_progress,
        on_study=lambda s: print(f"study {s.study_name!r} in {storage}", file=sys.stderr),
    )
    _print_best(study)
    print()
    print("\n".join(next_steps(study.study_name, storage)))


def next_steps(study: str, storage: str) -> list[str]:
    """Where a study is stored and the commands that read it, ready to paste (after a search)."""
    where = storage
    if storage.startswith("sqlite:///"):
        where = f"{storage} ({Path(storage.removeprefix('sqlite:///')).expanduser().resolve()})"
    flags = f"{shlex.quote(study)} --storage {shlex.quote(storage)}"
    return [
        f"study {study!r} is stored in {where}. Next:",
        f"  optuna-prune show {flags}",
        f"  optuna-prune export {flags} --best --out pruned/{study}",
        f"  optuna-prune evaluate {flags} --per-method --quick",
    ]


def cmd_create(args: argparse.Namespace) -> None:
    # deferred: loads sqlalchemy only when this runs
    from optuna_prune.run.worker import create_study

    study = create_study(search_config(args), new_study=args.new_study)
    storage = args.storage or study.user_attrs[CONFIG_ATTR].get("storage") or DEFAULT_STORAGE
    print(f"study {study.study_name!r} is ready; start workers with: "
          f"optuna-prune worker --storage {storage} --study {study.study_name}")


def cmd_worker(args: argparse.Namespace) -> None:
    # deferred: loads sqlalchemy only when this runs
    from optuna_prune.run.worker import run_worker

    study = run_worker(args.storage, args.study, n_trials=args.n_trials, device=args.device,
                       progress=not args.no_progress)
    _print_best(study)


def cmd_studies(args: argparse.Namespace) -> None:
    # deferred: loads sqlalchemy only when this runs
    from optuna_prune.run.storage import open_storage

    storage = open_storage(args.storage, create=False)
    rows = []
    for s in optuna.get_all_study_summaries(storage):
        problem = study_problem(s) or {}
        best = s.best_trial.values if s.best_trial is not None else None
        rows.append((s.study_name, s.n_trials, problem.get("model", "-"),
                     f"{problem.get('num_drop', '-')}/{problem.get('num_layers', '-')}",
                     "-" if best is None else ", ".join(f"{v:.4f}" for v in best)))
    _table(("study", "trials", "model", "dropped", "best"), rows)


def cmd_show(args: argparse.Namespace) -> None:
    # deferred: loads sqlalchemy only when this runs
    from optuna_prune.run.problem import load_existing_study

    study = load_existing_study(args.study, args.storage)
    if args.json:
        print(json.dumps({"study": study.study_name, "problem": study_problem(study),
                          "best_by_method": best_by_method(study), "final_pick": final_pick(study)}, indent=2))
        return
    problem = study_problem(study) or {}
    print(f"study {study.study_name}: {problem.get('model')} drop {problem.get('num_drop')} of "
          f"{problem.get('num_layers')} layers, calibration {problem.get('calibration')}, "
          f"fitness {problem.get('fitness')}")
    _print_best(study)


def cmd_report(args: argparse.Namespace) -> None:
    # deferred: loads plotly, sqlalchemy only when this runs
    from optuna_prune.results.figures import attach_figures
    from optuna_prune.results.report import write_report
    from optuna_prune.run.problem import load_existing_study

    study = load_existing_study(args.study, args.storage)
    out = args.out or f"{study.study_name}-report.html"
    check_out_file(out, "--out" if args.out else "report file")
    if args.figures_dir is not None:
        check_writable_folder(Path(args.figures_dir).expanduser(), f"--figures-dir {args.figures_dir}")
    path = write_report(study, out)
    attach_figures(study, args.figures_dir)
    print(path)


def cmd_export(args: argparse.Namespace) -> None:
    # deferred: loads sqlalchemy only when this runs
    from optuna_prune.results.export import export_trial
    from optuna_prune.run.problem import load_existing_study

    study = load_existing_study(args.study, args.storage)
    print(export_trial(study, args.trial, args.out, device=args.device, overwrite=args.overwrite, by=args.by))


def cmd_evaluate(args: argparse.Namespace) -> None:
    # deferred: loads plotly, sqlalchemy, torch, transformers only when this runs
    from optuna_prune.model.downstream import DEFAULT_TASKS
    from optuna_prune.results.evaluation import (
        PER_METHOD,
        QUICK_LIMIT,
        EvalSettings,
        evaluate_study,
    )
    from optuna_prune.results.figures import evaluation_rows
    from optuna_prune.run.problem import load_existing_study

    study = load_existing_study(args.study, args.storage)
    base = EvalSettings.quick() if args.quick else EvalSettings()
    given = {k: getattr(args, k) for k in ("seq_len", "max_windows", "max_chars") if getattr(args, k) is not None}
    limit = args.limit if args.limit is not None or not args.quick else QUICK_LIMIT
    evaluate_study(
        study, trial=args.trial, methods=PER_METHOD if args.per_method else None,
        datasets=_csv(args.datasets), tasks=DEFAULT_TASKS if args.tasks is None else _csv(args.tasks), limit=limit, data_dir=args.data_dir,
        speed=not args.no_speed, out_json=args.out, device=args.device, batch_size=args.batch_size,
        settings=dataclasses.replace(base, **given), recompute=args.recompute, progress=not args.no_progress,
        by=args.by,
    )
    _table(*evaluation_rows(study))


def cmd_finetune(args: argparse.Namespace) -> None:
    # deferred: loads safetensors, sqlalchemy, torch, transformers only when this runs
    from optuna_prune.model.training import TrainSettings
    from optuna_prune.results.finetune import finetune_trial
    from optuna_prune.run.problem import load_existing_study

    study = load_existing_study(args.study, args.storage)
    settings = TrainSettings(loss=args.loss, lr=args.lr, lora=args.lora, batch_size=args.batch_size)
    entry = finetune_trial(
        study, None if args.best else args.trial, tokens=args.tokens, out_dir=args.out, settings=settings,
        datasets=args.eval.split(",") if args.eval else None, eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len, device=args.device, overwrite=args.overwrite,
    )
    before, after = entry["before"], entry["after"]
    rows = [("calibration", f"{before['calibration_perplexity']:.2f}", f"{after['calibration_perplexity']:.2f}")]
    rows += [(ds, f"{before['perplexity'][ds]:.2f}", f"{after['perplexity'][ds]:.2f}") for ds in after["perplexity"]]
    print(f"trial {entry['trial']} (dropped {entry['dropped']}) trained on {entry['tokens']} tokens -> {args.out}")
    _table(("perplexity", "before", "after"), rows)


def cmd_fail_stale(args: argparse.Namespace) -> None:
    # deferred: loads sqlalchemy only when this runs
    from optuna_prune.run.heartbeat import MAX_RETRY
    from optuna_prune.run.problem import load_existing_study
    from optuna_prune.run.storage import fail_gone_trials, gone_trials

    if not args.yes and not sys.stdin.isatty():
        raise ConfigError("fail-stale asks before it fails trials, and stdin is not a terminal: "
                          "pass --yes to fail them without asking")
    study = load_existing_study(args.study, args.storage)
    gone = gone_trials(study)
    if not gone:
        print(f"no RUNNING trial of study {study.study_name!r} has a gone worker; nothing to do")
        return
    _table(("trial", "worker", "why"), [(t.number, trial_worker(t) or "-", why) for t, why in gone])
    if not args.yes:
        try:
            answer = input(f"Fail these {len(gone)} trials and re-queue their candidates? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing changed")
            return
    failed = fail_gone_trials(study, gone)
    late = f"; {len(gone) - len(failed)} finished meanwhile and were left alone" if len(failed) < len(gone) else ""
    print(f"failed {len(failed)} trials ({', '.join(str(t.number) for t in failed) or 'none'}); their candidates "
          f"are queued again for the workers (each at most {MAX_RETRY} times){late}")


def cmd_dashboard(args: argparse.Namespace) -> None:
    # deferred: loads optuna_dashboard only when this runs
    from optuna_dashboard import run_server

    # deferred: loads sqlalchemy only when this runs
    from optuna_prune.run.problem import name_metrics
    from optuna_prune.run.storage import open_storage

    check_listen_address(args.host, args.port)
    storage = open_storage(args.storage, create=False)  # before announcing a URL that would not answer
    for summary in optuna.get_all_study_summaries(storage):  # studies made before objectives had names
        name_metrics(optuna.load_study(study_name=summary.study_name, storage=storage))
    print(f"optuna-dashboard on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    run_server(storage, host=args.host, port=args.port)


def check_listen_address(host: str, port: int) -> None:
    """ConfigError unless a server can listen on ``host``:``port`` (tried: bound, then released)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range; pass --port 1 to 65535, e.g. 8080")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError, ValueError) as exc:
        raise ConfigError(
            f"cannot resolve --host {host!r} ({getattr(exc, 'strerror', None) or exc}); pass a name or address "
            "of this machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the dashboard's server does
        try:
            probe.bind(address)
        except OSError as exc:
            fixes = {
                errno.EADDRINUSE: f"port {port} on {host} is in use; pass another --port, e.g. {port % 65535 + 1}",
                errno.EADDRNOTAVAIL: f"--host {host} is not an address of this machine; pass 127.0.0.1 or 0.0.0.0",
                errno.EACCES: f"port {port} needs more privileges; pass --port 1024 or above, e.g. 8080",
            }
            raise ConfigError(fixes.get(exc.errno, f"cannot listen on {host}:{port} ({exc.strerror}); pass another --host or --port")) from None


def _print_best(study: Any) -> None:
    rows = [
        (m, e["trial"], f"{e['value']:.4f}", f"{e['perplexity']:.2f}" if e.get("perplexity") else "-",
         e["evaluations"], " ".join(map(str, e["dropped"] or [])))
        for m, e in sorted(best_by_method(study).items(), key=lambda kv: kv[1]["value"])
    ]
    _table(("method", "trial", "loss", "ppl", "evals", "dropped layers"), rows)
    running = running_by_method(study)
    if running:
        print("running, not counted in evals: " + ", ".join(f"{n} {m}" for m, n in sorted(running.items()))
              + " (a killed search's trial is failed when the study is next opened)")
    _print_final_pick(study)


def _print_final_pick(study: Any) -> None:
    """The masks a validation split scored, the best by search loss first, and which one was picked."""
    pick = final_pick(study)
    if pick is None:
        return
    print(f"\nfinal pick: trial {pick['trial']} ({pick['method']}), chosen by validation loss on "
          f"{pick['validation_samples']} held-out calibration windows among the top {len(pick['candidates'])} "
          "masks by search loss (export/evaluate --best use it; --by calibration: the first row)")
    rows = [
        (", ".join(([] if c["trial"] != pick["trial"] else ["final pick"]) + ([] if i else ["best by calibration"])),
         c["method"], c["trial"], f"{c['search_loss']:.4f}", f"{c['validation_loss']:.4f}",
         " ".join(map(str, c["dropped"])))
        for i, c in enumerate(pick["candidates"])
    ]
    _table(("", "method", "trial", "search loss", "validation loss", "dropped layers"), rows)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _quiet_libraries() -> None:
    """Keep stderr for our progress bars and one-line errors, not per-tensor loading bars."""
    # deferred: loads transformers only when this runs
    import transformers

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar shows each trial
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    trial_log = logging.getLogger(compat.OPTIMIZE_LOGGER)
    if not any(isinstance(f, _TrialFailureLines) for f in trial_log.filters):
        trial_log.addFilter(_TrialFailureLines())


class _StderrLines(logging.Handler):
    """``optuna-prune: message`` on the stderr of the moment (a test's captured one, too)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"optuna-prune: {record.getMessage()}", file=sys.stderr)
        except Exception:
            self.handleError(record)


class _TrialFailureLines(logging.Filter):
    """One line per failed trial, no traceback (its reason is the trial's fail_reason); none for
    Ctrl-C, which the CLI reports itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        # deferred: loads sqlalchemy only when this runs
        from optuna_prune.run.storage import interrupted

        # Ctrl-C inside a storage call can reach optuna as another error raised while it unwound.
        if record.exc_info and interrupted(record.exc_info[1]):
            return False
        record.exc_info = None
        return not record.getMessage().endswith("failed with value None.")


COMMANDS = {"search": cmd_search, "create": cmd_create, "worker": cmd_worker, "studies": cmd_studies,
            "show": cmd_show, "report": cmd_report, "finetune": cmd_finetune, "export": cmd_export, "evaluate": cmd_evaluate,
            "fail-stale": cmd_fail_stale, "dashboard": cmd_dashboard}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    plan = logging.getLogger("optuna_prune.plan")  # what a search is about to do, shown by the CLI only
    lines = _StderrLines()
    propagate = plan.propagate
    try:
        args = parser.parse_args(argv)
        _quiet_libraries()
        plan.addHandler(lines)
        plan.setLevel(logging.INFO)
        plan.propagate = False
        COMMANDS[args.command](args)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except BaseException as exc:
        # deferred: loads sqlalchemy only when this runs
        from optuna_prune.run.storage import interrupted

        if interrupted(exc):  # Ctrl-C, or an error optuna raised while Ctrl-C unwound it
            print("optuna-prune: interrupted; finished trials are stored, re-run the same command to resume",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        if debug or not isinstance(exc, Exception):
            raise
        known = isinstance(exc, _user_errors())
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror and exc.filename:
            message = f"{exc.filename}: {exc.strerror}; check the path and its permissions"
        prefix = "error" if known else f"internal error ({type(exc).__name__}; --debug shows the traceback)"
        print(f"optuna-prune: {prefix}: {message}", file=sys.stderr)
        return EXIT_USAGE if known else 1
    finally:
        plan.removeHandler(lines)
        plan.propagate = propagate
    return 0


if __name__ == "__main__":
    sys.exit(main())
