"""Figures and the HTML report read what a search writes, show every method, and render in a browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial
from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

from optuna_prune.cli import main
from optuna_prune.model.ccds import CCDSConfig, Clusters
from optuna_prune.results import figures
from optuna_prune.results.report import write_report
from optuna_prune.run.config import SearchConfig
from optuna_prune.run.problem import StudyMismatchError
from optuna_prune.run.storage import open_storage
from optuna_prune.run.study import run_search
from optuna_prune.run.summary import summarise
from optuna_prune.search.record import METHOD_KEY, STEP_KEY
from optuna_prune.search.space import LayerMaskSpace

pytestmark = pytest.mark.filterwarnings("ignore")

L, K = 6, 2
SPACE = LayerMaskSpace(L, K)
SLEB_STEP0 = {1: 3.10, 2: 3.30, 3: 3.05, 4: 3.50}  # layer -> loss; layer 4 was stopped early
SLEB_FINAL = {(1, 3): 3.40, (2, 3): 3.60, (3, 4): 3.45}
EVOP = {0: [(1, 2), (2, 4), (3, 4), (1, 3)], 1: [(1, 3), (3, 4), (1, 4)]}  # generation -> masks
EVOP_LOSS = {(1, 2): 3.9, (2, 4): 3.7, (3, 4): 3.45, (1, 3): 3.40, (1, 4): 3.38}
FIGURE_NAMES = ["fitness-vs-evaluations", "fitness-vs-time", "layer-drop-heatmap", "layer-importance",
                "ccds-clusters", "results-table"]


def _add(study: optuna.Study, method: str, dropped: tuple[int, ...], loss: float, *, pruned: bool = False,
         stopped_early: bool = False, system: dict | None = None) -> None:
    """A trial with the attrs MaskObjective and the samplers write."""
    user = {"method": method, "dropped": list(dropped), "n_dropped": len(dropped),
            "stopped_early": stopped_early, "perplexity": math.exp(loss)}
    params = SPACE.to_params(dropped) if len(dropped) == K else {}
    study.add_trial(create_trial(
        state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=None if pruned else loss,
        params=params, distributions={n: SPACE.distributions()[n] for n in params},
        user_attrs=user, system_attrs={METHOD_KEY: method, **(system or {})},
        intermediate_values={2: loss} if pruned else None,
    ))


def _ccds_summary() -> dict:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [20, 12, 8])
    coords = rng.normal(size=(40, 2)) + labels[:, None] * 3.0
    clusters = Clusters(
        chunks=[f"chunk {i}" for i in range(40)], labels=labels, sizes=[20, 12, 8],
        examples=["Python functions return values. " * 6, "The match ended in a draw.", "Rain is likely."],
        coords2d=coords, centers=np.zeros((3, 4)), config=CCDSConfig(n_clusters=3), seed=0,
    )
    return clusters.to_dict()


def _evaluations() -> dict:
    down = {"arc_easy": {"acc": 0.60, "acc_stderr": 0.02, "acc_norm": 0.55, "acc_norm_stderr": 0.02, "limit": 100},
            "piqa": {"acc": 0.65, "acc_stderr": 0.02, "acc_norm": None, "acc_norm_stderr": None, "limit": 100}}
    speed = {"prefill_ms": 10.0, "decode_tokens_per_s": 50.0, "prefill_speedup": 1.0, "decode_speedup": 1.0,
             "device": "cpu"}
    return {
        "dense": {"label": "dense", "method": None, "trial": None, "dropped": [],
                  "perplexity": {"wikitext2": 24.5, "c4": 30.1}, "downstream": down, "speed": speed},
        "trial-14": {"label": "evop best", "method": "evop", "trial": 14, "dropped": [1, 4],
                     "perplexity": {"wikitext2": 35.2}, "downstream": {"arc_easy": {"acc": 0.52, "acc_stderr": 0.02}},
                     "speed": {**speed, "prefill_speedup": 1.5, "decode_speedup": 1.45}},
    }


@pytest.fixture(scope="module")
def synthetic_study(tmp_path_factory) -> tuple[optuna.Study, str]:
    """A study with every attr the pipeline writes (SLEB, ShortGPT, EvoP, random; CCDS; evaluations)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('syn') / 'syn.db'}"
    study = optuna.create_study(study_name="syn", storage=open_storage(url))
    study.set_user_attr("problem", {
        "model": "tiny", "num_layers": L, "num_drop": K, "sparsity": K / L, "calibration": "wikitext2",
        "calibration_sha256": "ab" * 32, "n_samples": 4, "seq_len": 64, "ccds_clusters": 3,
        "fitness": "perplexity", "objective_mode": "mean", "seed": 0,
    })
    study.set_user_attr("ccds", _ccds_summary())
    study.set_user_attr("block_influence", [0.30, 0.05, 0.08, 0.04, 0.06, 0.40])
    study.set_user_attr("evaluations", _evaluations())
    for layer, loss in SLEB_STEP0.items():
        _add(study, "sleb", (layer,), loss, pruned=True, stopped_early=layer == 4, system={STEP_KEY: 0})
    for dropped, loss in SLEB_FINAL.items():
        _add(study, "sleb", dropped, loss, system={STEP_KEY: 1})
    _add(study, "shortgpt", (1, 3), 3.40)
    for generation, masks in EVOP.items():
        for dropped in masks:
            _add(study, "evop", dropped, EVOP_LOSS[dropped], system={"EvoPSampler:generation": generation})
    _add(study, "evop", (2, 3), 3.9, pruned=True, stopped_early=True, system={"EvoPSampler:generation": 1})
    for dropped, loss in [((2, 5), 5.0), ((1, 4), 3.38), ((0, 2), 6.0)]:
        _add(study, "random", dropped, loss)
    summarise(study)
    return study, url


def test_fitness_curves_count_every_evaluation_and_track_the_best(synthetic_study):
    study, _ = synthetic_study
    fig = figures.fitness_vs_evaluations(study)
    curves = {t.name: t for t in fig.data}
    assert list(curves) == ["evop", "sleb", "shortgpt", "random"]
    sleb = curves["sleb"]
    # SLEB's 4 partial (PRUNED) steps count as evaluations; the curve starts at its first complete mask.
    assert sleb.x[0] == 5 and sleb.x[-1] == 7
    assert sleb.y[-1] == pytest.approx(min(SLEB_FINAL.values()))
    evop = curves["evop"]
    assert evop.x[-1] == 8  # 7 complete + 1 stopped early
    assert list(evop.y) == sorted(evop.y, reverse=True) and evop.y[-1] == pytest.approx(3.38)
    assert curves["shortgpt"].x == (1,)

    ppl = figures.fitness_vs_evaluations(study, perplexity=True, log_y=True)
    assert ppl.data[0].y[-1] == pytest.approx(math.exp(3.38)) and ppl.layout.yaxis.type == "log"
    times = figures.fitness_vs_time(study)
    assert [t.name for t in times.data] == list(curves)
    assert all(t.x[0] >= 0 and list(t.x) == sorted(t.x) for t in times.data)


def test_heatmap_rows_are_methods_and_generations(synthetic_study):
    study, _ = synthetic_study
    fig = figures.layer_drop_heatmap(study)
    methods, best, generations = fig.data
    assert list(methods.y) == ["evop", "sleb", "shortgpt", "random"]
    z = np.asarray(methods.z)
    assert z.shape == (4, L)
    assert z[2].tolist() == [0, 1, 0, 1, 0, 0]  # ShortGPT's one mask
    assert z.sum(axis=1) == pytest.approx([K] * 4)  # each complete mask drops exactly K layers
    assert list(generations.y) == ["gen 0", "gen 1"]
    assert np.asarray(generations.z)[1, 3] == pytest.approx(3 / 4)  # 3 of gen 1's 4 members drop layer 3
    marked = sorted(zip(best.y, best.x, strict=True))
    assert ("evop", 1) in marked and ("evop", 4) in marked and len(marked) == 2 * 4


def test_layer_importance_ccds_and_results_table(synthetic_study):
    study, _ = synthetic_study
    influence, single = figures.layer_importance(study).data
    assert list(influence.y) == study.user_attrs["block_influence"]
    assert list(single.x) == [1, 2, 3, 4] and list(single.y) == list(SLEB_STEP0.values())
    assert single.marker.color[3] != single.marker.color[0]  # the stopped-early one is a lower bound

    ccds = figures.ccds_clusters(study)
    assert [t.name for t in ccds.data] == ["cluster 0 (20)", "cluster 1 (12)", "cluster 2 (8)"]
    assert sum(len(t.x) for t in ccds.data) == 40
    assert "Python functions" in ccds.data[0].hovertext[0]

    table = figures.results_table(study).data[0]
    header = [h.replace("<b>", "").replace("</b>", "") for h in table.header.values]
    assert header == ["measure", "dense", "evop best"]  # a column per model, a row per measure
    measures, *models = ([c.replace("<br>", " ") for c in column] for column in table.cells.values)
    assert measures[:3] == ["method", "trial", "dropped layers"]
    assert {"ppl c4", "ppl wikitext2", "arc_easy acc %", "piqa acc %", "mean acc %", "decode speedup"} <= set(measures)
    rows = {m: [column[i] for column in models] for i, m in enumerate(measures)}
    assert rows["ppl c4"] == ["30.10", "–"] and rows["decode speedup"] == ["1.00×", "1.45×"]
    assert rows["mean acc %"] == ["62.5", "–"]  # the pruned model lacks piqa: no mean
    assert rows["dropped layers"] == ["none", "1 4"]


def test_results_table_is_tall_enough_for_its_header_and_every_row(synthetic_study):
    """The dashboard draws a table figure at its layout height: rows below it are cut off."""
    study, _ = synthetic_study
    fig = figures.results_table(study)
    table = fig.data[0]
    lines = [max(column[i].count("<br>") + 1 for column in table.cells.values)
             for i in range(len(table.cells.values[0]))]
    header_lines = max(h.count("<br>") + 1 for h in table.header.values)
    assert table.header.height >= 18 * header_lines
    needed = table.header.height + sum(max(table.cells.height, 18 * n) for n in lines)
    assert fig.layout.height - fig.layout.margin.t - fig.layout.margin.b >= needed
    assert all(len(line) <= 24 for column in table.cells.values for cell in column for line in cell.split("<br>"))


def test_importance_caption_names_only_the_panels_the_study_has(synthetic_study, tmp_path):
    """An EvoP study seeded with ShortGPT has block influence but no SLEB step: one panel, and a
    caption that promises no single-layer losses."""
    study, _ = synthetic_study
    both = figures.layer_importance(study)
    assert "SLEB" in both.layout.meta["caption"] and "block influence" in both.layout.meta["caption"]

    evop = optuna.create_study(storage=f"sqlite:///{tmp_path / 'e.db'}", study_name="evop-only")
    evop.set_user_attr("problem", study.user_attrs["problem"])
    evop.set_user_attr("block_influence", study.user_attrs["block_influence"])
    for dropped, loss in EVOP_LOSS.items():
        _add(evop, "evop", dropped, loss)
    fig = figures.layer_importance(evop)
    assert len(fig.data) == 1 and [a.text for a in fig.layout.annotations] == [
        "Block influence 1 − cos(h_in, h_out) (ShortGPT drops the lowest)"]
    caption = fig.layout.meta["caption"]
    assert caption.startswith("ShortGPT's block influence") and "SLEB" not in caption and "dropped" not in caption
    page = write_report(evop, tmp_path / "evop.html").read_text()
    assert caption.replace("'", "&#x27;") in page and "first greedy step" not in page


def test_missing_parts_are_left_out_not_errors(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'x.db'}", directions=["minimize"] * 2)
    with pytest.raises(StudyMismatchError, match="not created by optuna-prune"):
        figures.fitness_vs_evaluations(study)
    study.set_user_attr("problem", {"num_layers": L, "num_drop": K, "fitness": "kl", "objective_mode": "clusters"})
    study.add_trial(create_trial(values=[1.0, 3.0], user_attrs={"method": "evop", "dropped": [1, 2]}))
    fig = figures.fitness_vs_evaluations(study)
    assert fig.data[0].y == (2.0,) and "mean over clusters" in fig.layout.yaxis.title.text
    with pytest.raises(ValueError, match="perplexity fitness"):
        figures.fitness_vs_evaluations(study, perplexity=True)
    assert set(figures.all_figures(study)) == {"fitness-vs-evaluations", "fitness-vs-time", "layer-drop-heatmap"}
    html = write_report(study, tmp_path / "r.html").read_text()
    assert "no single best mask" in html and "Not evaluated yet" in html


def test_cli_report_writes_page_and_attaches_figures(synthetic_study, tmp_path, capsys):
    study, url = synthetic_study
    out, figs = tmp_path / "out" / "report.html", tmp_path / "figs"
    assert main(["report", "syn", "--storage", url, "--out", str(out), "--figures-dir", str(figs)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    for name in FIGURE_NAMES[:-1]:
        assert f'id="{name}"' in page
    assert 'id="results-table"' in page and 'id="best-by-method"' in page and "evop best" in page
    assert page.count("plotly.js v") == 1 and "<script src=" not in page  # inlined once: works offline

    # The dashboard reads them from the study's system attrs, as a fresh process would.
    storage = open_storage(url)
    attrs = storage.get_study_system_attrs(storage.get_study_id_from_name("syn"))
    stored = get_plotly_graph_objects(attrs)
    assert set(stored) == set(FIGURE_NAMES)
    assert [t["name"] for t in json.loads(stored["fitness-vs-evaluations"])["data"]] == [
        "evop", "sleb", "shortgpt", "random"]
    assert sorted(p.name for p in figs.iterdir()) == sorted([f"{n}.html" for n in FIGURE_NAMES] + ["plotly.min.js"])
    assert main(["report", "nope", "--storage", url]) == 2


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    pytest.skip("no chromium: install Debian's (apt-get install -y chromium) to test that the report renders")


def test_report_renders_in_headless_chromium(synthetic_study, tmp_path):
    browser = _chromium()
    study, _ = synthetic_study
    page = write_report(study, tmp_path / "report.html")
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--virtual-time-budget=10000"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    # Plotly's script built each figure's SVG: the page's JS ran, offline.
    for name in FIGURE_NAMES[:-1]:
        div = re.search(rf'<div id="{name}"[^>]*class="plotly-graph-div[^"]*js-plotly-plot', dom)
        assert div, f"figure {name} was not drawn"
    assert dom.count('class="main-svg"') >= 2 * len(FIGURE_NAMES[:-1])
    shot = tmp_path / "report.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    data = shot.read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (width, height) == (1400, 3000)
    assert len(data) > 100_000  # a blank page of this size is a few kB; drawn figures are not


def test_report_of_a_real_tiny_search(tiny_checkpoint, tmp_path):
    """SLEB, then EvoP seeded with SLEB's and ShortGPT's masks, on a tiny random Llama: the figures
    read the attrs a real search writes."""
    base = dict(model=str(tiny_checkpoint), drop=2, calibration="pydoc", n_samples=2, seq_len=32,
                population=4, seed=0, storage=f"sqlite:///{tmp_path / 's.db'}", study="tiny", heartbeat=1)
    run_search(SearchConfig(**base, sampler="sleb"), progress=False)
    study = run_search(SearchConfig(**base, sampler="evop", n_trials=6, seed_with=["sleb", "shortgpt"]),
                       progress=False)

    evaluations = figures.fitness_vs_evaluations(study)
    assert [t.name for t in evaluations.data] == ["evop", "sleb"]
    sleb_trials = figures.finished_by_method(study)["sleb"]
    assert next(t for t in evaluations.data if t.name == "sleb").x[-1] == len(sleb_trials)
    heatmap = figures.layer_drop_heatmap(study)
    assert np.asarray(heatmap.data[0].z).shape == (2, 8)
    assert len(heatmap.data) == 3  # methods, best masks, EvoP generations
    importance = figures.layer_importance(study).data
    assert len(importance[0].y) == 8  # block influence, computed to seed EvoP with ShortGPT's mask
    assert set(importance[1].x) == set(figures.single_drop_losses(study)) and len(importance[1].x) >= 6
    assert figures.ccds_clusters(study) is None and figures.results_table(study) is None
    page = write_report(study, tmp_path / "tiny.html").read_text()
    assert all(f'id="{n}"' in page for n in FIGURE_NAMES[:4])
