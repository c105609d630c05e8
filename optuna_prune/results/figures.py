"""Plotly figures of a layer-drop study: how each method converged, which layers it drops, and why.

Figures only read a study (its trials and the attrs the search and the evaluation wrote); they never
run anything. :func:`attach_figures` stores them in the study, where optuna-dashboard shows them
beside its own plots, and :mod:`optuna_prune.results.report` puts them on one HTML page.

Every method gets the same colour in every figure. Losses are the study's objective (mean NLL per
token for the perplexity fitness); a multi-objective (per-cluster) study is summarised by the mean
of its objectives.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from optuna_prune.run.budget import FINISHED
from optuna_prune.run.methods import METHODS as REGISTERED
from optuna_prune.run.problem import StudyMismatchError
from optuna_prune.run.summary import best_by_method
from optuna_prune.search import compat
from optuna_prune.search.record import (
    BLOCK_INFLUENCE_ATTR,
    CCDS_ATTR,
    DROPPED_ATTR,
    EVALUATIONS_ATTR,
    METHOD_ATTR,
    study_problem,
    trial_dropped,
    trial_method,
)
from optuna_prune.search.samplers import EvoPSampler, trial_loss, trial_mask
from optuna_prune.search.space import LayerMaskSpace, SubBlockSpace

METHODS = (
    "evop", "sleb", "shortgpt", "random", "tpe", "exhaustive", "levelswitch", "darwin", "selfpruner",
)
"""Known methods, in the order figures list them (others follow alphabetically)."""
GENERATION_KEY = compat.generation_key(EvoPSampler)
GENERATION_FIGURE = frozenset(m.name for m in REGISTERED.values() if m.generations_figure)
"""The methods whose generations the layer-drop figure shows (one method's, so they do not mix)."""
CAPTION_KEY = "caption"
"""``fig.layout.meta[CAPTION_KEY]``: a caption that says what this study's figure shows (the report
prints it under the heading), for figures whose panels depend on the study."""
_PALETTE = qualitative.D3


def method_color(method: str) -> str:
    """One fixed colour per method, the same in every figure and study."""
    index = METHODS.index(method) if method in METHODS else len(METHODS) + sum(map(ord, method))
    return _PALETTE[index % len(_PALETTE)]


def _problem(study: optuna.Study) -> dict[str, Any]:
    problem = study_problem(study)
    if problem is None:
        raise StudyMismatchError(
            f"study {study.study_name!r} has no 'problem' attr: it was not created by optuna-prune"
        )
    return problem


def _space(study: optuna.Study) -> LayerMaskSpace:
    problem = _problem(study)
    space = SubBlockSpace if problem.get("space") == SubBlockSpace.granularity else LayerMaskSpace
    return space(int(problem["num_layers"]), int(problem["num_drop"]))


def _unit_axis(space: LayerMaskSpace) -> dict[str, Any]:
    """x-axis settings for mask units: layer numbers, or each block's param name."""
    if isinstance(space, SubBlockSpace):
        return {"title_text": "attention / MLP block", "tickvals": list(range(space.num_layers)),
                "ticktext": space.param_names}
    return {"title_text": "decoder layer", "dtick": 1 if space.num_layers <= 40 else 5}


def _method(trial: FrozenTrial) -> str:
    return trial_method(trial, "unknown")


def _dropped(trial: FrozenTrial, space: LayerMaskSpace) -> tuple[int, ...] | None:
    """The layers the objective actually dropped (after any repair), else the proposed mask."""
    dropped = trial_dropped(trial)
    return tuple(int(i) for i in dropped) if dropped is not None else trial_mask(trial, space)


def _loss(trial: FrozenTrial) -> float | None:
    """A finished trial's loss: its value, a PRUNED trial's last intermediate value, or the mean of
    a multi-objective trial's values."""
    if trial.values is not None and len(trial.values) > 1:
        return float(np.mean(trial.values))
    found = trial_loss(trial)
    return None if found is None or not math.isfinite(found[0]) else found[0]


def finished_by_method(study: optuna.Study) -> dict[str, list[FrozenTrial]]:
    """COMPLETE and PRUNED trials of each method in the order their results arrived.

    These are the method's evaluations: SLEB's partial greedy steps and candidates stopped early
    cost forward passes too, so they count (FAIL trials were retried and do not).
    """
    grouped: dict[str, list[FrozenTrial]] = {}
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    for t in sorted(trials, key=lambda t: (t.datetime_complete or datetime.max, t.number)):
        grouped.setdefault(_method(t), []).append(t)
    order = [m for m in METHODS if m in grouped] + sorted(set(grouped) - set(METHODS))
    return {m: grouped[m] for m in order}


def _loss_label(study: optuna.Study, perplexity: bool) -> str:
    problem = _problem(study)
    if perplexity:
        return "perplexity on the calibration set"
    mode = problem.get("objective_mode", "mean")
    what = "KL divergence to the dense model" if problem.get("fitness") == "kl" else "NLL per token"
    return {"worst": f"worst-cluster {what}", "clusters": f"mean over clusters of {what}"}.get(
        mode, f"mean {what}"
    )


def _best_so_far_figure(
    study: optuna.Study,
    x_of: Callable[[list[FrozenTrial]], list[float]],
    x_title: str,
    title: str,
    perplexity: bool,
    log_y: bool,
) -> go.Figure:
    if perplexity and _problem(study).get("fitness") == "kl":
        raise ValueError("a perplexity axis needs the perplexity fitness; this study uses fitness 'kl'")
    space = _space(study)
    fig = go.Figure()
    for method, trials in finished_by_method(study).items():
        xs, ys, sizes, text = [], [], [], []
        best = math.inf
        x_all = x_of(trials)
        for t, x in zip(trials, x_all, strict=True):
            loss = _loss(t)
            dropped = _dropped(t, space)
            if t.state != TrialState.COMPLETE or loss is None or dropped is None or len(dropped) != space.num_drop:
                continue
            if loss < best:
                best = loss
                xs.append(x)
                ys.append(math.exp(loss) if perplexity else loss)
                sizes.append(8)
                text.append(f"trial {t.number}<br>dropped {list(dropped)}<br>loss {loss:.4f}")
        if not xs:
            continue
        if x_all[-1] > xs[-1]:  # carry the best on to the method's last evaluation
            xs.append(x_all[-1])
            ys.append(ys[-1])
            sizes.append(0)
            text.append(f"{len(trials)} evaluations")
        fig.add_trace(go.Scatter(
            x=xs, y=ys, name=method, mode="lines+markers", line={"shape": "hv", "color": method_color(method)},
            marker={"size": sizes}, hovertext=text, hoverinfo="text+x+y",
        ))
    fig.update_layout(
        title=f"{title} ({study.study_name})", xaxis_title=x_title, yaxis_title=_loss_label(study, perplexity),
        yaxis_type="log" if log_y else "linear", legend_title="method", height=480,
        template="plotly_white",
    )
    return fig


def fitness_vs_evaluations(study: optuna.Study, perplexity: bool = False, log_y: bool = False) -> go.Figure:
    """Best-so-far loss of each method (one trace each) vs how many candidates it evaluated.

    The x axis counts every finished trial of the method, partial SLEB steps and early-stopped
    candidates included; the curve only uses COMPLETE exact-k trials. ``perplexity`` plots
    exp(loss) instead, ``log_y`` a log axis.
    """
    return _best_so_far_figure(
        study, lambda trials: list(range(1, len(trials) + 1)), "evaluations of the method",
        "Best loss vs evaluations", perplexity, log_y,
    )


def fitness_vs_time(study: optuna.Study, perplexity: bool = False, log_y: bool = False) -> go.Figure:
    """As :func:`fitness_vs_evaluations`, against wall time since the method's first trial started."""

    def seconds(trials: list[FrozenTrial]) -> list[float]:
        start = min(t.datetime_start for t in trials if t.datetime_start is not None)
        return [(t.datetime_complete - start).total_seconds() for t in trials]

    return _best_so_far_figure(
        study, seconds, "wall time since the method's first trial (s)", "Best loss vs time",
        perplexity, log_y,
    )


def _drop_fractions(masks: list[tuple[int, ...]], num_layers: int) -> list[float]:
    counts = np.zeros(num_layers)
    for dropped in masks:
        counts[list(dropped)] += 1
    return (counts / max(len(masks), 1)).tolist()


def layer_drop_heatmap(study: optuna.Study) -> go.Figure:
    """How often each method's COMPLETE trials drop each layer (rows = methods, columns = layers).

    A second panel has one row per EvoP generation (share of its finished members that drop the
    layer), which shows the population converging. Crosses mark each method's best mask.
    """
    space = _space(study)
    layers = list(range(space.num_layers))
    rows: dict[str, list[tuple[int, ...]]] = {}
    generations: dict[int, list[tuple[int, ...]]] = {}
    for method, trials in finished_by_method(study).items():
        for t in trials:
            dropped = _dropped(t, space)
            if dropped is None:
                continue
            if t.state == TrialState.COMPLETE:
                rows.setdefault(method, []).append(dropped)
            if method in GENERATION_FIGURE and GENERATION_KEY in t.system_attrs:
                generations.setdefault(int(t.system_attrs[GENERATION_KEY]), []).append(dropped)
    n_panels = 2 if generations else 1
    fig = make_subplots(
        rows=n_panels, cols=1, shared_xaxes=True, vertical_spacing=0.08,
        row_heights=[max(len(rows), 1), len(generations)][:n_panels],
        subplot_titles=["COMPLETE trials per method", "EvoP generations"][:n_panels],
    )
    hover = "%{y}, layer %{x}: dropped in %{z:.0%} of %{customdata} masks<extra></extra>"
    names = list(rows)
    fig.add_trace(go.Heatmap(
        z=[_drop_fractions(rows[m], space.num_layers) for m in names], x=layers, y=names,
        customdata=[[len(rows[m])] * space.num_layers for m in names], hovertemplate=hover,
        coloraxis="coloraxis", xgap=1, ygap=1,
    ), row=1, col=1)
    best = best_by_method(study)
    marks = [(i, m) for m in names if m in best for i in best[m][DROPPED_ATTR] or []]
    fig.add_trace(go.Scatter(
        x=[i for i, _ in marks], y=[m for _, m in marks], mode="markers", name="best mask",
        marker={"symbol": "x-thin", "size": 12, "line": {"width": 2, "color": "#d62728"}},
        hovertemplate="%{y}: best mask drops layer %{x}<extra></extra>",
    ), row=1, col=1)
    if generations:
        gens = sorted(generations)
        fig.add_trace(go.Heatmap(
            z=[_drop_fractions(generations[g], space.num_layers) for g in gens], x=layers,
            y=[f"gen {g}" for g in gens], customdata=[[len(generations[g])] * space.num_layers for g in gens],
            hovertemplate=hover, coloraxis="coloraxis", xgap=1, ygap=1,
        ), row=2, col=1)
        fig.update_yaxes(autorange="reversed", row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_xaxes(**_unit_axis(space), row=n_panels, col=1)
    fig.update_layout(
        title=f"Which layers each method drops ({space.num_drop} of {space.num_layers}; {study.study_name})",
        coloraxis={"colorscale": "Blues", "cmin": 0, "cmax": 1, "colorbar": {"title": "dropped", "tickformat": ".0%"}},
        height=220 + 34 * (len(rows) + len(generations)), template="plotly_white", margin={"l": 110},
        legend={"orientation": "h", "y": -0.12 if n_panels == 1 else -0.06},
    )
    return fig


def single_drop_losses(study: optuna.Study) -> dict[int, tuple[float, bool]]:
    """Loss of the model with only layer i dropped: {i: (loss, exact)}, from trials that dropped
    exactly one layer (SLEB's first greedy step). Not exact = stopped early, a lower bound."""
    space = _space(study)
    found: dict[int, tuple[float, bool]] = {}
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        dropped = _dropped(t, space)
        loss = trial_loss(t)
        if dropped is None or len(dropped) != 1 or loss is None:
            continue
        layer = dropped[0]
        # Prefer exact losses, then the lower one (a retried step may be stopped early once).
        if layer not in found or (loss[1], -loss[0]) > (found[layer][1], -found[layer][0]):
            found[layer] = loss
    return dict(sorted(found.items()))


def layer_importance(study: optuna.Study) -> go.Figure | None:
    """Per-layer importance: ShortGPT's block influence and the loss with only that layer dropped.

    Either panel appears if the study has its data (block influence from a ShortGPT run or seed;
    single-layer losses from SLEB's first step); None if it has neither.
    """
    space = _space(study)
    influence = study.user_attrs.get(BLOCK_INFLUENCE_ATTR)
    single = single_drop_losses(study)
    panels, captions = [], []
    if influence:
        panels.append("Block influence 1 − cos(h_in, h_out) (ShortGPT drops the lowest)")
        captions.append("ShortGPT's block influence (a layer that barely changes its input is cheap to drop)")
    if single:
        panels.append(f"{_loss_label(study, False)} with only this layer dropped (SLEB's first step)")
        captions.append("the loss with only that layer dropped (SLEB's first greedy step; grey: a lower bound)")
    if not panels:
        return None
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=panels,
                        vertical_spacing=0.14)
    row = 1
    if influence:
        fig.add_trace(go.Bar(
            x=list(range(len(influence))), y=influence, name="block influence",
            marker_color=method_color("shortgpt"), hovertemplate="layer %{x}: %{y:.4f}<extra></extra>",
        ), row=1, col=1)
        row = 2
    if single:
        exact = [v[1] for v in single.values()]
        # Dots, not bars: the losses differ in the last digits, so the axis does not start at zero.
        fig.add_trace(go.Scatter(
            x=list(single), y=[v[0] for v in single.values()], name="loss with one layer dropped",
            mode="markers", marker={"size": 11, "color": [method_color("sleb") if e else "#aaaaaa" for e in exact]},
            hovertext=["exact" if e else "lower bound (stopped early)" for e in exact],
            hovertemplate="layer %{x}: %{y:.4f} (%{hovertext})<extra></extra>",
        ), row=row, col=1)
    axis = _unit_axis(space)
    fig.update_xaxes(range=[-0.5, space.num_layers - 0.5], **{k: v for k, v in axis.items() if k != "title_text"})
    fig.update_xaxes(title_text=axis["title_text"], row=len(panels), col=1)
    caption = " and ".join(captions) + "."
    fig.update_layout(
        title=f"Layer importance ({study.study_name})", showlegend=False,
        height=200 + 260 * len(panels), template="plotly_white",
        meta={CAPTION_KEY: caption[0].upper() + caption[1:]},
    )
    return fig


def ccds_clusters(study: optuna.Study) -> go.Figure | None:
    """The CCDS clusters in the 2-D PCA projection of the chunk embeddings, one trace per cluster;
    hovering shows the chunk nearest the cluster's centre. None without CCDS."""
    ccds = study.user_attrs.get(CCDS_ATTR)
    if not ccds or not ccds.get("coords2d"):
        return None
    coords = np.asarray(ccds["coords2d"], dtype=float)
    labels = np.asarray(ccds["coords_labels"], dtype=int)
    fig = go.Figure()
    for c, size in enumerate(ccds["sizes"]):
        example = ccds["examples"][c] if c < len(ccds["examples"]) else ""
        hover = f"<b>cluster {c}</b> ({size} chunks)<br>" + "<br>".join(textwrap.wrap(example, 80)[:6])
        points = coords[labels == c]
        fig.add_trace(go.Scatter(
            x=points[:, 0], y=points[:, 1], mode="markers", name=f"cluster {c} ({size})",
            marker={"size": 7, "opacity": 0.75, "color": _PALETTE[c % len(_PALETTE)]},
            hovertext=[hover] * len(points), hoverinfo="text",
        ))
    shown = len(coords)
    fig.update_layout(
        title=(f"CCDS: {len(ccds['sizes'])} clusters of {ccds.get('n_chunks', shown)} calibration chunks"
               f" ({shown} shown; PCA of sentence embeddings)"),
        xaxis_title="PC 1", yaxis_title="PC 2", legend_title="cluster (chunks)", height=520,
        template="plotly_white",
    )
    return fig


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def evaluation_rows(study: optuna.Study) -> tuple[list[str], list[list[str]]] | None:
    """Header and formatted rows of the study's "evaluations" attr (dense first, then by trial);
    None if nothing was evaluated. Shared by :func:`results_table` and the HTML report."""
    evaluations: dict[str, dict[str, Any]] = study.user_attrs.get(EVALUATIONS_ATTR) or {}
    if not evaluations:
        return None
    entries = sorted(evaluations.values(), key=lambda e: (e.get("trial") is not None, e.get("trial") or 0))
    datasets = sorted({d for e in entries for d in e.get("perplexity") or {}})
    tasks = sorted({k for e in entries for k in e.get("downstream") or {}})
    header = ["model", "method", "trial", "dropped layers"]
    header += [f"ppl {d}" for d in datasets] + [f"{t} acc %" for t in tasks]
    header += ["mean acc %"] if len(tasks) > 1 else []
    header += ["prefill speedup", "decode speedup", "decode tok/s"]
    rows = []
    for e in entries:
        ppl = e.get("perplexity") or {}
        down = e.get("downstream") or {}
        speed = e.get("speed") or {}
        row = [str(e.get("label", "")), str(e.get(METHOD_ATTR) or "–"), _fmt(e.get("trial"), "{}"),
               " ".join(map(str, e.get(DROPPED_ATTR) or [])) or "none"]
        row += [_fmt(ppl.get(d), "{:.2f}") for d in datasets]
        for task in tasks:
            r = down.get(task)
            acc = "–" if r is None else f"{100 * r['acc']:.1f}"
            if r is not None and r.get("acc_stderr") is not None:
                acc += f" ± {100 * r['acc_stderr']:.1f}"
            row.append(acc)
        if len(tasks) > 1:
            accs = [down[t]["acc"] for t in tasks if t in down]
            row.append(_fmt(100 * float(np.mean(accs)) if len(accs) == len(tasks) else None, "{:.1f}"))
        row += [_fmt(speed.get("prefill_speedup"), "{:.2f}×"), _fmt(speed.get("decode_speedup"), "{:.2f}×"),
                _fmt(speed.get("decode_tokens_per_s"), "{:.1f}")]
        rows.append(row)
    return header, rows


_LINE_PX = 20  # one line of table text, padding included
_TABLE_MARGIN = {"t": 60, "b": 10, "l": 10, "r": 10}


def _wrapped(text: str, width: int) -> str:
    return "<br>".join(textwrap.wrap(text, width) or [""])


def _lines(text: str) -> int:
    return text.count("<br>") + 1


def results_table(study: optuna.Study) -> go.Figure | None:
    """The evaluation results (perplexities, downstream accuracies, speedups) as a plotly table.

    One column per evaluated model and one row per measure: a few models fit a dashboard card, a
    dozen measures as columns do not (their headers were cut). The figure is as tall as its rows.
    """
    found = evaluation_rows(study)
    if found is None:
        return None
    header, rows = found
    columns = [[_wrapped(h, 24) for h in header[1:]]] + [[_wrapped(c, 24) for c in row[1:]] for row in rows]
    heads = ["<b>measure</b>"] + [f"<b>{_wrapped(row[0], 18)}</b>" for row in rows]
    header_px = _LINE_PX * max(map(_lines, heads)) + 8
    row_px = [_LINE_PX * max(_lines(col[i]) for col in columns) + 6 for i in range(len(columns[0]))]
    fig = go.Figure(go.Table(
        columnwidth=[1.3] + [1.0] * len(rows),
        header={"values": heads, "fill_color": "#e8eef7", "align": "left", "height": header_px},
        cells={"values": columns, "align": ["left"] + ["right"] * len(rows), "height": _LINE_PX + 6},
    ))
    fig.update_layout(
        title=f"Evaluation ({study.study_name})", margin=_TABLE_MARGIN,
        height=_TABLE_MARGIN["t"] + _TABLE_MARGIN["b"] + header_px + sum(row_px) + 10,
    )
    return fig


FIGURES: dict[str, Callable[[optuna.Study], go.Figure | None]] = {
    "fitness-vs-evaluations": fitness_vs_evaluations,
    "fitness-vs-time": fitness_vs_time,
    "layer-drop-heatmap": layer_drop_heatmap,
    "layer-importance": layer_importance,
    "ccds-clusters": ccds_clusters,
    "results-table": results_table,
}
"""Every figure by name (its dashboard graph object id and HTML id)."""


def all_figures(study: optuna.Study) -> dict[str, go.Figure]:
    """Every figure the study has data for, by name."""
    made = {name: make(study) for name, make in FIGURES.items()}
    return {name: fig for name, fig in made.items() if fig is not None}


def attach_figures(study: optuna.Study, out_dir: str | Path | None = None) -> dict[str, Path | None]:
    """Save every available figure to the study, where optuna-dashboard shows it, and optionally as
    standalone HTML files in ``out_dir`` (sharing one offline copy of plotly.js there).

    Returns {name: HTML path, or None without ``out_dir``}; re-attaching replaces the old figures.
    """
    # deferred: loads optuna_dashboard only when this runs
    from optuna_dashboard import save_plotly_graph_object

    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Path | None] = {}
    for name, fig in all_figures(study).items():
        save_plotly_graph_object(study, fig, graph_object_id=name)
        saved[name] = None
        if out is not None:
            saved[name] = out / f"{name}.html"
            fig.write_html(saved[name], include_plotlyjs="directory", full_html=True)
    return saved
