"""``optuna-prune``: a thin shell over the Python API; every command parses flags and calls one function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from optuna_prune.config import SAMPLERS, ConfigError, SearchConfig, from_dict, load_config

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise ConfigError(f"{message} (see optuna-prune {self.prog.split()[-1]} --help)")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, turned into one line on stderr."""
    from optuna_prune.calibration import CalibrationError
    from optuna_prune.layers import UnsupportedModelError
    from optuna_prune.models import ModelNotFoundError
    from optuna_prune.space import SpaceError
    from optuna_prune.study import StorageError, StudyMismatchError

    return (
        ConfigError, CalibrationError, UnsupportedModelError, ModelNotFoundError, SpaceError,
        StorageError, StudyMismatchError, KeyError, FileNotFoundError,
    )


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="study config TOML (see studies/); flags override it")
    p.add_argument("--model", help="short name (smollm2-135m), local folder, .gguf file or hub id")
    p.add_argument("--sparsity", type=float, help="fraction of decoder layers to drop, e.g. 0.2")
    p.add_argument("--drop", type=int, help="number of decoder layers to drop (instead of --sparsity)")
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--fitness", choices=("perplexity", "kl"))
    p.add_argument("--calibration", help="wikitext2, c4, ptb, pydoc, or a .txt/.jsonl/.parquet file or folder")
    p.add_argument("--data-dir", help="offline copies of wikitext2/c4 (layout of ../shared/data)")
    p.add_argument("--n-samples", type=int, help="calibration samples (default 5)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sample (default 2048)")
    p.add_argument("--ccds-clusters", type=int, help="EvoP CCDS: cluster the corpus into K clusters (0: off)")
    p.add_argument("--objective-mode", choices=("mean", "worst", "clusters"))
    p.add_argument("--seed", type=int)
    p.add_argument("--n-trials", type=int, help="this method's evaluation budget in the study")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--storage", help="sqlite:///file.db (default optuna_prune.db), postgresql://..., or a .log journal")
    p.add_argument("--study", help="study name (default: derived from model, k and calibration)")
    p.add_argument("--population", type=int, help="EvoP population size")
    p.add_argument("--seed-with", help="comma list: sleb,shortgpt masks seeded into EvoP's generation 0")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--cache-mb", type=int, help="hidden-state prefix cache budget (MiB)")
    p.add_argument("--heartbeat", type=int, help="seconds between worker heartbeats (stale after 3x)")
    p.add_argument("--new-study", action="store_true", help="start a new study instead of resuming")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optuna-prune", description="Search which decoder layers of an LLM to drop.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("search", help="run or resume a layer-drop search")
    _add_search_flags(p)

    p = sub.add_parser("studies", help="list the studies in a storage with their best values")
    p.add_argument("--storage")

    p = sub.add_parser("show", help="best masks of a study and a table per method")
    p.add_argument("study")
    p.add_argument("--storage")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("dashboard", help="start optuna-dashboard on the storage")
    p.add_argument("--storage")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    return parser


def search_config(args: argparse.Namespace) -> SearchConfig:
    """Merge a TOML config (if any) with the flags that were given."""
    flags: dict[str, Any] = {
        name: getattr(args, name)
        for name in SearchConfig.__dataclass_fields__
        if getattr(args, name, None) is not None
    }
    if args.config:
        return load_config(args.config, **flags)
    return from_dict(flags, origin="command line")


def cmd_search(args: argparse.Namespace) -> None:
    from optuna_prune.study import run_search

    cfg = search_config(args)
    study = run_search(
        cfg, new_study=args.new_study, progress=not args.no_progress,
        on_study=lambda s: print(f"study {s.study_name!r} in {cfg.storage or 'sqlite:///optuna_prune.db'}", file=sys.stderr),
    )
    _print_best(study)


def cmd_studies(args: argparse.Namespace) -> None:
    import optuna

    from optuna_prune.study import open_storage

    storage = open_storage(args.storage)
    rows = []
    for s in optuna.get_all_study_summaries(storage):
        problem = s.user_attrs.get("problem", {})
        best = s.best_trial.values if s.best_trial is not None else None
        rows.append((s.study_name, s.n_trials, problem.get("model", "-"),
                     f"{problem.get('num_drop', '-')}/{problem.get('num_layers', '-')}",
                     "-" if best is None else ", ".join(f"{v:.4f}" for v in best)))
    _table(("study", "trials", "model", "dropped", "best"), rows)


def cmd_show(args: argparse.Namespace) -> None:
    from optuna_prune.study import load_existing_study

    study = load_existing_study(args.study, args.storage)
    if args.json:
        from optuna_prune.study import best_by_method

        print(json.dumps({"study": study.study_name, "problem": study.user_attrs.get("problem"),
                          "best_by_method": best_by_method(study)}, indent=2))
        return
    problem = study.user_attrs.get("problem", {})
    print(f"study {study.study_name}: {problem.get('model')} drop {problem.get('num_drop')} of "
          f"{problem.get('num_layers')} layers, calibration {problem.get('calibration')}, "
          f"fitness {problem.get('fitness')}")
    _print_best(study)


def cmd_dashboard(args: argparse.Namespace) -> None:
    from optuna_dashboard import run_server

    from optuna_prune.study import open_storage

    print(f"optuna-dashboard on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    run_server(open_storage(args.storage), host=args.host, port=args.port)


def _print_best(study: Any) -> None:
    from optuna_prune.study import best_by_method

    rows = [
        (m, e["trial"], f"{e['value']:.4f}", f"{e['perplexity']:.2f}" if e.get("perplexity") else "-",
         e["evaluations"], " ".join(map(str, e["dropped"] or [])))
        for m, e in sorted(best_by_method(study).items(), key=lambda kv: kv[1]["value"])
    ]
    _table(("method", "trial", "loss", "ppl", "evals", "dropped layers"), rows)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _quiet_libraries() -> None:
    """Keep stderr for our progress bars and one-line errors, not per-tensor loading bars."""
    import warnings

    import optuna
    import transformers

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar shows each trial
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


COMMANDS = {"search": cmd_search, "studies": cmd_studies, "show": cmd_show, "dashboard": cmd_dashboard}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        _quiet_libraries()
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("optuna-prune: interrupted; finished trials are stored, re-run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except Exception as exc:
        if debug:
            raise
        known = isinstance(exc, _user_errors())
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        prefix = "error" if known else f"internal error ({type(exc).__name__}; --debug shows the traceback)"
        print(f"optuna-prune: {prefix}: {message}", file=sys.stderr)
        return EXIT_USAGE if known else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
