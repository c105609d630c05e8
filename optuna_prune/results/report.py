"""One self-contained HTML page per study: the problem, each method's best mask, every figure and the
evaluation results.

plotly.js is inlined once (users may be offline), so the page opens anywhere without a server.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import plotly.io as pio
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from optuna_prune.results.figures import CAPTION_KEY, all_figures, evaluation_rows
from optuna_prune.run.summary import best_by_method
from optuna_prune.search.record import (
    DROPPED_ATTR,
    PERPLEXITY_ATTR,
    VERSIONS_ATTR,
    problem_units,
    recorded_space,
    study_problem,
)

_NUMBER = re.compile(r"^-?[\d.]+(e-?\d+)?( ± [\d.]+)?×?$")  # right-aligned cells
# What each figure shows, under its heading (a figure's own caption, CAPTION_KEY in its layout meta, wins).
CAPTIONS = {
    "fitness-vs-evaluations": (
        "Best loss so far of each method against the candidates it evaluated. Every finished trial "
        "counts (SLEB's partial steps and candidates stopped early cost forward passes too); the "
        "curve moves only on complete exact-k masks."
    ),
    "fitness-vs-time": "The same against wall time since each method's first trial.",
    "layer-drop-heatmap": (
        "Share of each method's complete trials that drop a layer (crosses: its best mask); below, "
        "the same per EvoP generation, which shows the population converging."
    ),
    "ccds-clusters": (
        "The calibration corpus clustered by CCDS; hover a point for the chunk nearest its "
        "cluster's centre."
    ),
}
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1300px;
       padding: 0 1.5rem; color: #222; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2.2rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #d7dce3; padding: .3rem .7rem; text-align: left; vertical-align: top; }
th { background: #eef2f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { width: 13rem; }
.caption { color: #555; max-width: 60rem; }
.figure { border: 1px solid #e3e6ea; border-radius: 6px; padding: .3rem; }
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{html.escape(str(c))}</td>' if _is_number(c) else f"<td>{html.escape(str(c))}</td>"
            for c in row
        ) + "</tr>"
        for row in rows
    )
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _is_number(cell: Any) -> bool:
    return isinstance(cell, (int, float)) or bool(_NUMBER.match(str(cell)))


def _problem_section(study: optuna.Study) -> str:
    p = study_problem(study) or {}
    counts = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] += 1
    versions = study.user_attrs.get(VERSIONS_ATTR) or {}
    sha = str(p.get("calibration_sha256") or "")
    unit = recorded_space(p).unit  # what num_drop counts
    units = problem_units(p) if p.get("num_layers") else 0
    rows = [
        ("model", p.get("model", "–")),
        (f"{unit} dropped",
         f"{p.get('num_drop')} of {units} "
         f"(sparsity {100 * float(p.get('sparsity') or 0):.1f}%)"),
        ("calibration", f"{p.get('calibration')}: {p.get('n_samples')} samples × {p.get('seq_len')} tokens"
                        + (f", sha256 {sha[:12]}…" if sha else "")),
        ("CCDS clusters", p.get("ccds_clusters") or "off"),
        ("fitness", f"{p.get('fitness')} (objective {p.get('objective_mode', 'mean')})"),
        ("seed", p.get("seed")),
        ("trials", ", ".join(f"{n} {state}" for state, n in counts.items() if n)),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "–"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<h2>Problem</h2><table class="kv" id="problem">{body}</table>'


def _best_section(study: optuna.Study) -> str:
    best = best_by_method(study)
    if not best:
        note = ("no single best mask: the study has several objectives (per-cluster losses)"
                if len(study.directions) > 1 else "no complete trial yet")
        return f'<h2>Best mask per method</h2><p class="caption">{note}.</p>'
    rows = [
        (m, e["trial"], f"{e['value']:.4f}", f"{e[PERPLEXITY_ATTR]:.2f}" if e.get(PERPLEXITY_ATTR) else "–",
         e["evaluations"], " ".join(map(str, e[DROPPED_ATTR] or [])))
        for m, e in sorted(best.items(), key=lambda kv: kv[1]["value"])
    ]
    header = ("method", "best trial", "loss", "perplexity (calibration)", "evaluations", "dropped layers")
    return "<h2>Best mask per method</h2>" + _table(header, rows, "best-by-method")


def _results_section(study: optuna.Study) -> str:
    found = evaluation_rows(study)
    if found is None:
        return ('<h2>Evaluation</h2><p class="caption" id="results-table">Not evaluated yet: run the '
                "evaluation of the best masks to add perplexities, downstream accuracies and speedups.</p>")
    caption = ('<p class="caption">Held-out perplexity, downstream accuracy (± stderr) and speedup '
               "over the dense model.</p>")
    return "<h2>Evaluation</h2>" + caption + _table(*found, "results-table")


def render_report(study: optuna.Study) -> str:
    """The report page of ``study`` as an HTML string (plotly.js inlined once)."""
    figures = all_figures(study)
    figures.pop("results-table", None)  # shown as an HTML table: copyable, never clipped
    parts = []
    for name, fig in figures.items():
        title = fig.layout.title.text or name
        fig.update_layout(title_text=None, margin_t=60)  # the section heading names it
        div = pio.to_html(
            fig, full_html=False, include_plotlyjs=False, div_id=name,
            config={"responsive": True, "displaylogo": False},
        )
        fig_title = html.escape(title.split(" (")[0])
        text = (fig.layout.meta or {}).get(CAPTION_KEY) or CAPTIONS.get(name)
        caption = f'<p class="caption">{html.escape(text)}</p>' if text else ""
        parts.append(f'<h2>{fig_title}</h2>{caption}<div class="figure">{div}</div>')
    generated = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(study.study_name)}: optuna-prune report</title>"
        f"<style>{_STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<h1>Layer-drop study {html.escape(study.study_name)}</h1>"
        f'<p class="sub">optuna-prune report, generated {generated}</p>'
        + _problem_section(study) + _best_section(study) + _results_section(study)
        + "".join(parts) + "</body></html>\n"
    )


def write_report(study: optuna.Study, out_path: str | Path) -> Path:
    """Write the self-contained HTML report of ``study`` to ``out_path`` and return the path."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(study), encoding="utf-8")
    return out
