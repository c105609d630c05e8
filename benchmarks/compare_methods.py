"""EvoP vs SLEB vs ShortGPT vs random on SmolLM2-135M with equal evaluation budgets (the README table).

For each sparsity, SLEB runs first; its number of evaluations is the budget given to EvoP and random
search (ShortGPT needs one). All methods share one study per sparsity, as a user would run them. Each
method's best mask is then scored on held-out text: WikiText-2 test and the C4 evaluation half,
16 windows of 512 tokens from the first 300,000 characters (the shared data README's convention).

Usage: python benchmarks/compare_methods.py [--sparsities 0.2 0.3] [--storage sqlite:///runs/compare.db]
Prints a markdown table and writes it (and the raw numbers) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import optuna

from optuna_prune.model.models import load_model
from optuna_prune.model.perplexity import cross_domain
from optuna_prune.run.config import SearchConfig
from optuna_prune.run.study import run_search
from optuna_prune.run.summary import best_by_method

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--methods", nargs="+", default=["sleb", "shortgpt", "evop", "random"])
    parser.add_argument("--population", type=int, default=20)
    parser.add_argument("--storage", default="sqlite:///runs/compare_methods.db")
    parser.add_argument("--out", default="runs/compare_methods.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    base = SearchConfig(
        model="smollm2-135m", sparsity=0.2, calibration="c4", data_dir=args.data_dir, n_samples=4,
        seq_len=256, population=args.population, storage=args.storage,
        ccds_clusters=0, validation_samples=0, seed_with=[],  # random windows, as measured
    )
    rows = []
    for sparsity in args.sparsities:
        budget = None
        seconds: dict[str, float] = {}
        study = None
        for method in args.methods:
            n_trials = None if method in ("sleb", "shortgpt") else budget
            start = time.perf_counter()
            study = run_search(base.replace(sparsity=sparsity, sampler=method, n_trials=n_trials), progress=False)
            seconds[method] = time.perf_counter() - start
            if method == "sleb":
                budget = best_by_method(study)["sleb"]["evaluations"]
        best = best_by_method(study)
        model, tokenizer = load_model("smollm2-135m", device="cpu")
        held_out = cross_domain(
            model, tokenizer, {"dense": (), **{m: best[m]["dropped"] for m in args.methods}},
            datasets=("wikitext2", "c4"), data_dir=args.data_dir, seq_len=512, max_windows=16,
            max_chars=300_000,
        )
        rows.append({"sparsity": sparsity, "study": study.study_name, "dense": held_out["dense"]})
        for m in args.methods:
            rows.append({
                "sparsity": sparsity, "method": m, "dropped": best[m]["dropped"],
                "calibration_ppl": math.exp(best[m]["value"]), "evaluations": best[m]["evaluations"],
                "seconds": seconds[m], **{f"{d}_ppl": v for d, v in held_out[m].items()},
            })

    lines = [
        "| sparsity | method | calibration ppl | WikiText-2 ppl | C4 ppl | evaluations | wall time (s) | dropped layers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "method" not in r:
            lines.append(f"| {r['sparsity']:.0%} | dense | - | {r['dense']['wikitext2']:.2f} | {r['dense']['c4']:.2f} | - | - | - |")
            continue
        lines.append(
            f"| {r['sparsity']:.0%} | {r['method']} | {r['calibration_ppl']:.2f} | {r['wikitext2_ppl']:.2f} | "
            f"{r['c4_ppl']:.2f} | {r['evaluations']} | {r['seconds']:.0f} | {' '.join(map(str, r['dropped']))} |"
        )
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "table": table}, indent=2))


if __name__ == "__main__":
    main()
