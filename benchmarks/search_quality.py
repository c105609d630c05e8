"""Search quality at equal wall time: which method finds the best mask fastest, on the real SmolLM2-135M.

For each sparsity and seed, SLEB greedy runs first (C4 calibration windows, perplexity fitness); the
wall time it took (preparation included) becomes every other method's time budget (``timeout``, which
counts its preparation too; ``--budget-factor`` scales it): EvoP scoring every candidate on all samples, EvoP with multi-fidelity selection (the
default), the EvoPress-style level-switch sampler (also multi-fidelity), random exact-k search, and
ShortGPT (one evaluation);
``--methods`` adds ``evop+mf+seed`` and ``levelswitch+seed``, whose generation 0 holds ShortGPT's mask
(free: block influence comes from the dense pass the fitness makes anyway), ``sleb+mf`` (SLEB whose
candidates are ranked within their greedy step after 1 and 2 samples, only the best scored on all),
``sleb+mf>levelswitch`` (that, then level-switch search from its mask for the rest of the budget),
and ``levelswitch@blocks`` and ``evop+mf@blocks``, which drop attention and MLP blocks separately
(``--space sublayers``: the same sparsity of 2L blocks).
Every method runs through ``run_search`` in a study of its own, exactly as a user would run it, with
the same calibration set (the seed picks the windows, so SLEB reruns per seed). All methods share
one fitness, perplexity, so calibration losses are on one axis (levelswitch's usual KL fitness
would not be comparable).

Per method it reports: best calibration perplexity, held-out WikiText-2 and C4 perplexity of the
best mask (``--windows`` windows of 512 tokens from the first 300,000 characters, the shared data
README's convention), evaluations and layer forwards used, wall time, and the time from the start
of the run until its best-so-far loss first reached SLEB's final loss, also as a ratio to SLEB's own
time (below 1: faster than SLEB). Run it on an idle machine: the clock is the budget.

Usage:
    python benchmarks/search_quality.py --sparsities 0.2 0.3 0.4 --seeds 0 1
Prints a markdown table; writes JSON and a plotly figure (best-so-far perplexity against time) to
``--out`` (default ``runs/search_quality.json`` and ``.html``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState
from plotly.subplots import make_subplots

from optuna_prune.model.calibration import forget_clusters
from optuna_prune.model.layers import SubBlocks, find_layer_stack, sub_block_names
from optuna_prune.model.models import load_model
from optuna_prune.model.perplexity import cross_domain
from optuna_prune.results.figures import method_color
from optuna_prune.run.config import SearchConfig
from optuna_prune.run.final_pick import final_pick
from optuna_prune.run.study import run_search
from optuna_prune.run.summary import best_by_method
from optuna_prune.search.samplers import sleb_result

ROOT = Path(__file__).resolve().parents[1]
# label -> phases (sampler, config changes), run one after another in one study within the budget;
# "evop" scores every candidate on all samples, "+mf" (the default for evop and levelswitch) ranks
# candidates in stages and stops the losers.
METHODS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "sleb": [("sleb", {})],
    "shortgpt": [("shortgpt", {})],
    "evop": [("evop", {"fidelity": []})],
    "evop+mf": [("evop", {})],
    "levelswitch": [("levelswitch", {})],
    "random": [("random", {})],
    # ShortGPT's mask comes free with the dense pass: as a seed in generation 0 (--seed-with shortgpt).
    "evop+mf+seed": [("evop", {"seed_with": ["shortgpt"]})],
    "levelswitch+seed": [("levelswitch", {"seed_with": ["shortgpt"]})],
    "sleb+mf": [("sleb", {"fidelity": [1, 2]})],
    "sleb+mf>levelswitch": [("sleb", {"fidelity": [1, 2]}), ("levelswitch", {"seed_with": ["sleb"]})],
    # "@blocks": the same sparsity of the 2L attention and MLP blocks (--space sublayers), e.g. 12 of 60
    # blocks where the layer methods drop 6 of 30 layers; the table's weights column says what each removes.
    "levelswitch@blocks": [("levelswitch", {"space": "sublayers"})],
    "evop+mf@blocks": [("evop", {"space": "sublayers"})],
}


def run_method(
    base: SearchConfig, label: str, timeout: float | None,
    phases: list[tuple[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Run one method in its own study; its trajectory of best-so-far loss against seconds since start.

    ``phases`` defaults to ``METHODS[label]``; other benchmarks pass their own. ``timeout`` is the
    method's whole wall time, its preparation (calibration windows, CCDS) included, as SLEB's ``seconds``.
    """
    forget_clusters()  # each method pays its own CCDS preparation, as a process of its own would
    started = {"wall": datetime.now(), "clock": time.perf_counter()}
    search_start: dict[str, float] = {}
    study: optuna.Study | None = None
    phase_seconds: list[float] = []
    for sampler, changes in phases or METHODS[label]:
        left = None if timeout is None else timeout - (time.perf_counter() - started["clock"])
        unseeded = "sleb" in (changes.get("seed_with") or ()) and (study is None or sleb_result(study) is None)
        if (left is not None and left <= 0) or unseeded:
            break  # out of time, or the SLEB phase did not finish
        cfg = base.replace(
            sampler=sampler, study=f"{base.study}-{label}", timeout=left,
            n_trials=10**6 if left is not None else None, **changes,
        )
        study = run_search(cfg, progress=False, on_study=lambda s: search_start.setdefault("t", time.perf_counter()))
        phase_seconds.append(time.perf_counter() - started["clock"] - sum(phase_seconds))
    seconds = time.perf_counter() - started["clock"]
    bests = best_by_method(study)
    if not bests:  # the time ran out before any mask of k layers was scored
        return {"method": label, "dropped": None, "loss": None, "calibration_ppl": None,
                "evaluations": len(study.get_trials(deepcopy=False)), "seconds": seconds,
                "phase_seconds": phase_seconds, "search_seconds": time.perf_counter() - search_start["t"],
                "curve": [], "validation_loss": None}
    best = min(bests.values(), key=lambda entry: entry["value"])
    pick = final_pick(study)
    if pick is not None:  # a validation split: the study's final mask, the one export --best ships
        best = {"dropped": pick["dropped"], "value": pick["search_loss"]}
    best["evaluations"] = len(study.get_trials(deepcopy=False))
    done = sorted(
        (t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
        key=lambda t: t.datetime_complete,
    )
    curve, best_so_far = [], math.inf
    for t in done:
        if t.value < best_so_far:
            best_so_far = t.value
            curve.append(((t.datetime_complete - started["wall"]).total_seconds(), t.value))
    forwards = sum(t.user_attrs.get("layer_forwards", 0) for t in study.get_trials(deepcopy=False))
    return {
        "method": label, "space": study.user_attrs["problem"].get("space", "layers"),
        "dropped": best["dropped"], "loss": best["value"],
        "calibration_ppl": math.exp(best["value"]), "evaluations": best["evaluations"],
        "layer_forwards": forwards, "seconds": seconds, "phase_seconds": phase_seconds,
        "search_seconds": time.perf_counter() - search_start["t"], "curve": curve,
        "validation_loss": None if pick is None else pick["validation_loss"],
    }


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Seconds until the best-so-far loss was first at or below ``target`` (None: never)."""
    return next((t for t, v in curve if v <= target + 1e-9), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=["sleb", "shortgpt", "evop", "evop+mf", "levelswitch", "random"],
                        choices=list(METHODS))
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens per dataset")
    parser.add_argument("--budget-factor", type=float, default=1.0,
                        help="each method's budget in multiples of SLEB's time (above 1: does a longer search beat SLEB?)")
    parser.add_argument("--storage", default="sqlite:///runs/search_quality.db")
    parser.add_argument("--out", default="runs/search_quality.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.methods[0] != "sleb":
        parser.error("--methods must start with sleb: its search time is everyone's budget")

    model, tokenizer = load_model("smollm2-135m", device="cpu")
    held_out_cache: dict[tuple[str, tuple[int, ...]], dict[str, float]] = {}

    def held_out(masks: list[tuple[str, tuple[int, ...]]]) -> None:
        """Held-out perplexity of (space, dropped) masks not measured yet."""
        todo = {f"{space} {m}": (space, m) for space, m in masks if (space, m) not in held_out_cache}
        if todo:
            views = {k: SubBlocks(m) if space == "sublayers" else m for k, (space, m) in todo.items()}
            table = cross_domain(model, tokenizer, views, datasets=("wikitext2", "c4"), data_dir=args.data_dir,
                                 seq_len=512, max_windows=args.windows, max_chars=300_000)
            held_out_cache.update({key: table[k] for k, key in todo.items()})

    held_out([("layers", ())])
    rows: list[dict[str, Any]] = []
    for sparsity in args.sparsities:
        for seed in args.seeds:
            base = SearchConfig(
                model="smollm2-135m", sparsity=sparsity, calibration="c4", data_dir=args.data_dir,
                n_samples=args.n_samples, seq_len=args.seq_len, seed=seed, storage=args.storage,
                study=f"sq-{sparsity}-seed{seed}-{datetime.now():%m%d%H%M%S}",
                ccds_clusters=0, validation_samples=0, seed_with=[],  # SLEB's random windows, no split: one loss axis
            )
            results = [run_method(base, "sleb", None)]
            budget = args.budget_factor * results[0]["seconds"]
            for label in args.methods[1:]:
                results.append(run_method(base, label, None if label == "shortgpt" else budget))
                print(f"{sparsity:.0%} seed {seed} {label}: ppl {results[-1]['calibration_ppl']:.2f} "
                      f"in {results[-1]['seconds']:.0f} s", flush=True)
            held_out([(r["space"], tuple(r["dropped"])) for r in results])
            target, sleb_time = results[0]["loss"], time_to_reach(results[0]["curve"], results[0]["loss"])
            for r in results:
                reach = time_to_reach(r["curve"], target)
                rows.append({
                    "sparsity": sparsity, "seed": seed, **r, "reach_sleb_seconds": reach,
                    "reach_ratio": None if reach is None else reach / sleb_time,
                    "weights_removed": weights_removed(model, r["space"], r["dropped"]),
                    **{f"{d}_ppl": v for d, v in held_out_cache[(r["space"], tuple(r["dropped"]))].items()},
                })

    dense = held_out_cache[("layers", ())]
    table = render_table(rows, args.methods, dense)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dense": dense, "rows": rows, "table": table}, indent=2))
    figure(rows, args.sparsities).write_html(out.with_suffix(".html"), include_plotlyjs=True)
    print(f"wrote {out} and {out.with_suffix('.html')}")


def weights_removed(model: Any, space: str, dropped: list[int]) -> float:
    """Share of the decoder layers' weights a mask removes (whole layers) or zeroes (single blocks)."""
    layers = find_layer_stack(model).layers
    total = sum(p.numel() for layer in layers for p in layer.parameters())
    if space != "sublayers":
        return sum(p.numel() for i in dropped for p in layers[i].parameters()) / total
    gone = 0
    for unit in dropped:
        layer = layers[unit // 2]
        gone += sum(p.numel() for p in layer.get_submodule(sub_block_names(layer)[unit % 2]).parameters())
    return gone / total


def render_table(rows: list[dict[str, Any]], methods: list[str], dense: dict[str, float]) -> str:
    """One line per sparsity and method: means over seeds; reach counts the seeds that got there."""
    lines = [
        f"dense: WikiText-2 {dense['wikitext2']:.2f}, C4 {dense['c4']:.2f}",
        "",
        "| sparsity | method | calibration ppl | WikiText-2 ppl | C4 ppl | evaluations | layer forwards | "
        "wall time (s) | reached SLEB's loss | time to reach (s) | ratio to SLEB | decoder weights removed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sparsity in dict.fromkeys(r["sparsity"] for r in rows):
        for method in methods:
            group = [r for r in rows if r["sparsity"] == sparsity and r["method"] == method]
            reached = [r for r in group if r["reach_sleb_seconds"] is not None]

            def mean(key: str, of: list[dict[str, Any]] = group) -> float:
                return statistics.fmean(r[key] for r in of)

            reach = f"{mean('reach_sleb_seconds', reached):.0f}" if reached else "-"
            ratio = f"{mean('reach_ratio', reached):.2f}" if reached else "-"
            lines.append(
                f"| {sparsity:.0%} | {method} | {mean('calibration_ppl'):.2f} | {mean('wikitext2_ppl'):.2f} | "
                f"{mean('c4_ppl'):.2f} | {mean('evaluations'):.0f} | {mean('layer_forwards'):.0f} | "
                f"{mean('seconds'):.0f} | {len(reached)}/{len(group)} | {reach} | {ratio} | "
                f"{mean('weights_removed'):.1%} |"
            )
    return "\n".join(lines)


def figure(rows: list[dict[str, Any]], sparsities: list[float]) -> go.Figure:
    """Best-so-far calibration perplexity against wall time, one panel per sparsity, a line per run."""
    fig = make_subplots(rows=1, cols=len(sparsities), subplot_titles=[f"{s:.0%} sparsity" for s in sparsities])
    shown: set[str] = set()
    for col, sparsity in enumerate(sparsities, start=1):
        for r in (r for r in rows if r["sparsity"] == sparsity and r["curve"]):
            xs, ys = zip(*r["curve"], strict=True)
            fig.add_trace(go.Scatter(
                x=[*xs, r["seconds"]], y=[math.exp(y) for y in (*ys, ys[-1])], mode="lines+markers",
                line_shape="hv", name=r["method"], legendgroup=r["method"], showlegend=r["method"] not in shown,
                line={"color": method_color(r["method"].split("+")[0])},
                line_dash="dot" if "+" in r["method"] else "solid",
                hovertext=f"seed {r['seed']}",
            ), row=1, col=col)
            shown.add(r["method"])
        fig.update_xaxes(title_text="wall time (s)", row=1, col=col)
        fig.update_yaxes(title_text="best calibration perplexity", type="log", row=1, col=col)
    fig.update_layout(title="Search quality at equal wall time (SmolLM2-135M)", template="plotly_white")
    return fig


if __name__ == "__main__":
    main()
