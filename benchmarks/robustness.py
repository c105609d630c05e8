"""Robustness across calibration draws: does a method land in the best held-out group on *every* draw?

A calibration draw is a different set of windows of the same corpus, of the same size (default
8 x 256 tokens of C4's calibration half; the draw's number is the calibration and search seed). On each
draw, with the same data and the same wall-time budget (SLEB's own wall time on that draw; a method's
preparation, such as CCDS's embedding and clustering, counts against it), it runs:
SLEB as published (random windows), SLEB on CCDS-chosen windows, ShortGPT (``--baselines`` picks
which of the last two), and the methods under test (default: ``default``, what ``optuna-prune search``
does with its defaults). Every final mask is scored on held-out text:
WikiText-2 test and the C4 evaluation half, ``--windows`` windows of 512 tokens each (the shared data
README's convention); a mask's held-out score is the geometric mean of the two perplexities. The
held-out text never steers a search (it is the test set).

Per sparsity it prints a per-draw table, then for each method

    mean ratio to SLEB: X          (mean over draws of its held-out score / SLEB's mean)
    worst-draw ratio to SLEB: Y    (its worst draw / SLEB's worst draw)

The JSON (``--out``, default ``benchmarks/results/robustness.json``) holds every mask and number and is
rewritten after each method of a draw, so a run cut short keeps what it finished. ``--resume`` reuses the
rows it already has (SLEB's recorded wall time stays the budget), so a later run adds a method to a
finished one. The ratio lines compare a method with SLEB on the draws both have; a method whose time ran
out before it scored any mask of k layers gets a "no mask" row, counted on its own line. ``--time-factor``
gives the methods under test that many times SLEB's wall time (each row records its ``budget_seconds``).

``evop+mf`` is EvoP with multi-fidelity selection on random windows (the default search before CCDS and
the validation split were). ``evop+mf+val`` adds a validation split (``validation_samples = 2``): it
searches on the draw's first 6 windows and its final mask is the one of its 5 best distinct masks with
the lowest loss on the last 2 (calibration windows, not held-out text); its ``calibration_ppl`` is on the
6 search windows. ``evop+mf+ccds+val`` is the same on CCDS-chosen windows (those ``sleb+ccds`` searches):
what ``optuna-prune search`` did by default with 8 windows on 2026-12-04. ``sleb+mf>evop+ccds+val``
runs SLEB ranking each greedy step's candidates in stages on those windows, then EvoP seeded with its
mask for the rest of the budget; the validation pick chooses among both. ``sleb+mf>evop+ccds`` is the
same on all 8 CCDS windows, no split; ``default`` is what the package does now: the same in one run,
SLEB ranking each step's candidates on a lower bound of their loss on 2 windows, then 4 (one per
cluster), before scoring the better quarter on all (before 2026-12-06: exact losses on 4 windows).

Usage (measured on an idle 2-core machine, 2026-12-04: SLEB's search takes about 8 minutes at 30%, so
a draw takes about 27 minutes with one method under test, plus about 9 for each further one):
    python benchmarks/robustness.py --sparsities 0.3 --draws 5
    python benchmarks/robustness.py --sparsities 0.2 0.4 --draws 3
    python benchmarks/robustness.py --sparsities 0.2 0.4 --draws 3 --baselines sleb   # SLEB and ours only
    python benchmarks/robustness.py --sparsities 0.3 --draws 5 --methods evop+mf evop+mf+val --resume
    python benchmarks/robustness.py --sparsities 0.2 --draws 3 --baselines sleb --time-factor 1.3 --resume
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from search_quality import METHODS, run_method

from optuna_prune.model.models import load_model
from optuna_prune.model.perplexity import cross_domain
from optuna_prune.run.config import SearchConfig

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ("wikitext2", "c4")
# Robustness-only entries; every label of search_quality.METHODS works too.
PHASES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    **METHODS,
    "sleb+ccds": [("sleb", {"ccds": True})],
    # The default search with a validation split: the last 2 of the draw's windows are held out of it, and
    # the final mask is the one of the 5 best distinct masks with the lowest loss on them (final_pick.py).
    "evop+mf+val": [("evop", {"validation_samples": 2, "pick_top": 5})],
    # The same on CCDS-chosen windows (EvoP's calibration sampling), the windows sleb+ccds searches.
    "evop+mf+ccds+val": [("evop", {"ccds": True, "validation_samples": 2, "pick_top": 5})],
    # EvoP on all the draw's CCDS windows, no validation split (as sleb+ccds searches them).
    "evop+mf+ccds": [("evop", {"ccds": True})],
    # SLEB ranking each greedy step's candidates in stages on all the draw's CCDS windows, then EvoP seeded
    # with its mask for the rest of the budget: sleb+ccds's search, in about half its time.
    "sleb+mf>evop+ccds": [
        ("sleb", {"ccds": True, "fidelity": [1, 2]}),
        ("evop", {"ccds": True, "seed_with": ["sleb"]}),
    ],
    # SLEB ranking each greedy step's candidates in stages (about half SLEB's time) on those windows, then
    # EvoP seeded with its mask for the rest of the budget; the pick sees SLEB's mask and EvoP's best.
    "sleb+mf>evop+ccds+val": [
        ("sleb", {"ccds": True, "validation_samples": 2, "pick_top": 5, "fidelity": [1, 2]}),
        ("evop", {"ccds": True, "validation_samples": 2, "pick_top": 5, "seed_with": ["sleb"]}),
    ],
}
# What `optuna-prune search` does with its defaults (auto_calibration): today sleb+mf>evop+ccds in one run.
PHASES["default"] = [("evop", {"ccds_clusters": None, "validation_samples": None, "seed_with": None})]
BASELINES = ("sleb", "sleb+ccds", "shortgpt")


def held_out_score(ppl: dict[str, float]) -> float:
    """Geometric mean of the held-out perplexities: one number per mask, no dataset dominates."""
    return math.exp(statistics.fmean(math.log(ppl[d]) for d in HELD_OUT))


def summarise(rows: list[dict[str, Any]], sparsity: float, methods: list[str]) -> list[str]:
    """The per-draw table and the two ratio lines per method, for one sparsity."""
    group = [r for r in rows if r["sparsity"] == sparsity]
    draws = sorted({r["draw"] for r in group})
    by = {(r["draw"], r["method"]): r for r in group}
    lines = [
        f"## {sparsity:.0%} sparsity, {len(draws)} draw(s)", "",
        "| draw | method | dropped | calibration ppl | WikiText-2 | C4 | held-out (geo) | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for draw in draws:
        for m in methods:
            if (r := by.get((draw, m))) is None:
                continue
            if r["held_out"] is None:
                lines.append(f"| {draw} | {m} | no mask of k layers in its time | - | - | - | - | {r['seconds']:.0f} |")
            else:
                lines.append(
                    f"| {draw} | {m} | {' '.join(map(str, r['dropped']))} | {r['calibration_ppl']:.2f} | "
                    f"{r['wikitext2_ppl']:.2f} | {r['c4_ppl']:.2f} | {r['held_out']:.2f} | {r['seconds']:.0f} |"
                )
    lines.append("")
    for m in methods[1:]:
        ran = [d for d in draws if (d, m) in by and (d, "sleb") in by]
        paired = [d for d in ran if by[(d, m)]["held_out"] is not None]
        missed = len(ran) - len(paired)
        if missed:
            lines.append(f"{m}: no mask of k layers in SLEB's time on {missed} of {len(ran)} draws")
        if not paired:
            continue
        ours = [by[(d, m)]["held_out"] for d in paired]
        sleb = [by[(d, "sleb")]["held_out"] for d in paired]
        of = f" ({len(paired)} of {len(draws)} draws)" if len(paired) < len(draws) else ""
        lines.append(f"{m}: mean ratio to SLEB: {statistics.fmean(ours) / statistics.fmean(sleb):.3f}{of}")
        lines.append(f"{m}: worst-draw ratio to SLEB: {max(ours) / max(sleb):.3f}{of}")
    return lines


RESUME_KEYS = ("n_samples", "seq_len", "ccds_clusters", "windows", "data_dir")
"""Settings a resumed run must share with the rows it reuses (the same draws, held-out windows)."""


def resumed(out: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The record ``--resume`` continues (None: no ``out`` yet), after checking it used the same settings."""
    if not out.is_file():
        return None
    earlier = json.loads(out.read_text())
    for key in RESUME_KEYS:
        if earlier["args"].get(key) != getattr(args, key):
            raise SystemExit(f"--resume: {out} was made with --{key.replace('_', '-')} {earlier['args'].get(key)}, "
                             f"not {getattr(args, key)}; pass the same setting or another --out")
    return earlier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3])
    parser.add_argument("--draws", type=int, default=5, help="calibration draws (seeds 0 .. draws-1)")
    parser.add_argument("--first-draw", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["default"], choices=[m for m in PHASES if m not in BASELINES],
                        help="methods under test; SLEB, SLEB on CCDS windows and ShortGPT always run")
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ccds-clusters", type=int, default=4, help="clusters for sleb+ccds (and ccds methods)")
    parser.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=BASELINES,
                        help="baselines to run beside SLEB, which always runs (default: all)")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens per dataset")
    parser.add_argument("--storage", default="sqlite:///runs/robustness.db")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    parser.add_argument("--time-factor", type=float, default=1.0,
                        help="the methods under test get this many times SLEB's wall time (default 1: the same time)")
    parser.add_argument("--resume", action="store_true", help="reuse the rows --out has for a (sparsity, draw, "
                        "method), SLEB's wall time included as the budget, and run only the rest (e.g. a method "
                        "added to a finished run); --out keeps every row")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    methods = list(dict.fromkeys(["sleb", *args.baselines, *args.methods]))  # SLEB's time is the budget
    Path("runs").mkdir(exist_ok=True)
    out = Path(args.out)
    earlier = resumed(out, args) if args.resume else None

    model, tokenizer = load_model("smollm2-135m", device="cpu")
    cache: dict[tuple[int, ...], dict[str, float]] = {}
    done: dict[tuple[float, int, str], dict[str, Any]] = {}
    for r in earlier["rows"] if earlier else []:  # measured on the same held-out windows (resumed checks)
        done[(r["sparsity"], r["draw"], r["method"])] = r
        if r["dropped"] is not None:
            cache[tuple(r["dropped"])] = {d: r[f"{d}_ppl"] for d in HELD_OUT}

    def held_out(dropped: tuple[int, ...]) -> dict[str, float]:
        if dropped not in cache:
            table = cross_domain(model, tokenizer, {"m": dropped}, datasets=HELD_OUT, data_dir=args.data_dir,
                                 seq_len=512, max_windows=args.windows, max_chars=300_000)
            cache[dropped] = table["m"]
        return cache[dropped]

    out.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
        "cores": os.cpu_count(), "load_at_start": os.getloadavg(), "args": vars(args),
        "dense": earlier["dense"] if earlier else held_out(()), "rows": list(done.values()),
    }
    if earlier:
        record["earlier_runs"] = [*earlier.get("earlier_runs", []), {k: earlier.get(k) for k in ("started", "args")}]
    shown = list(dict.fromkeys([*methods, *(r["method"] for r in record["rows"])]))
    for sparsity in args.sparsities:
        for draw in range(args.first_draw, args.first_draw + args.draws):
            base = SearchConfig(
                model="smollm2-135m", sparsity=sparsity, calibration="c4", data_dir=args.data_dir,
                n_samples=args.n_samples, seq_len=args.seq_len, seed=draw, storage=args.storage,
                study=f"rb-{sparsity}-draw{draw}-{datetime.now():%m%d%H%M%S}",
                ccds_clusters=0, validation_samples=0, seed_with=[],  # SLEB as published; each label turns its own on
            )
            budget = None
            # SLEB first (its time is the budget), then the methods under test, then the slower baselines.
            for label in sorted(methods, key=lambda m: (m != "sleb", m in BASELINES)):
                if (reused := done.get((sparsity, draw, label))) is not None:
                    budget = reused["seconds"] if label == "sleb" else budget
                    continue
                phases = [
                    (sampler, {**changes, "ccds_clusters": args.ccds_clusters} if changes.pop("ccds", False) else changes)
                    for sampler, changes in ((s, dict(c)) for s, c in PHASES[label])
                ]
                timeout = None if label in BASELINES else budget * args.time_factor
                r = run_method(base, label, timeout, phases=phases)
                if label == "sleb":
                    budget = r["seconds"]
                ppl = {d: None for d in HELD_OUT} if r["dropped"] is None else held_out(tuple(r["dropped"]))
                row = {
                    "sparsity": sparsity, "draw": draw, "method": label, "dropped": r["dropped"],
                    "loss": r["loss"], "calibration_ppl": r["calibration_ppl"], "evaluations": r["evaluations"],
                    "seconds": r["seconds"], "phase_seconds": r["phase_seconds"], "search_seconds": r["search_seconds"],
                    "budget_seconds": timeout,
                    "validation_loss": r["validation_loss"],
                    **{f"{d}_ppl": v for d, v in ppl.items()},
                    "held_out": None if r["dropped"] is None else held_out_score(ppl),
                    "load": os.getloadavg()[0],
                }
                record["rows"].append(row)
                found = ("no mask of k layers in its time" if row["held_out"] is None else
                         f"calib {row['calibration_ppl']:.2f} held-out {row['held_out']:.2f}")
                print(f"{sparsity:.0%} draw {draw} {label}: {found} in {row['seconds']:.0f} s", flush=True)
                record["summary"] = {
                    f"{s}": summarise(record["rows"], s, shown)
                    for s in dict.fromkeys(r["sparsity"] for r in record["rows"])
                }
                out.write_text(json.dumps(record, indent=2))  # after every method: a cut-short run keeps it
        print("\n".join(summarise(record["rows"], sparsity, shown)), flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
