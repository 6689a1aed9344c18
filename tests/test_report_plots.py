"""Report figures from real traced runs and hand-made stores: files, grouping, highlights."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from stabilizer.config import TrainConfig
from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.probes.schema import PARAM_STATS, TENSOR_STATS
from stabilizer.reports.plots import (
    MAX_COLUMNS,
    TraceView,
    first_offender,
    group_label,
    hard_anomalies,
    heatmap_data,
    lora_heatmap_data,
    make_figures,
    module_order,
    row_groups,
    short_label,
    step_columns,
)
from stabilizer.store import ModuleInfo, ParamInfo, StepData, TraceStore
from stabilizer.train import train

ALL_FIGURES = {
    "training-curves",
    "heatmap-fwd_out-absmax",
    "heatmap-fwd_out-rms",
    "heatmap-grad_out-rms",
    "layer-norms",
    "lora-update-ratio",
}
HEATMAPS = {n for n in ALL_FIGURES if n.startswith("heatmap-")}
NAN = float("nan")


def traced_run(root, name: str, **overrides):
    """Train the tiny preset with --trace into root/name; return the run folder."""
    settings = {"max_steps": 6, "save_every": None, "trace": True, **overrides}
    cfg = TrainConfig.smoke(root / name, **settings)
    train(cfg, console=Console(record=True, width=120))
    return cfg.run_dir


def plot_run(run_dir, out_dir):
    """Yield (figures, view, out_dir) with the store open (the view reads lazily)."""
    with TraceStore.open(run_dir / "trace.db") as store:
        yield make_figures(store, out_dir), TraceView(store), out_dir


def check_pngs(figures, out_dir) -> set[str]:
    """Every figure is a readable PNG of sensible size in out_dir; names are unique."""
    names = [f.name for f in figures]
    assert len(names) == len(set(names)), names
    for fig in figures:
        assert fig.path == out_dir / f"{fig.name}.png"
        assert fig.path.is_file()
        assert fig.title and fig.caption
        with Image.open(fig.path) as img:
            assert img.format == "PNG"
            width, height = img.size
            img.verify()
        assert 600 <= width <= 3000 and 300 <= height <= 3000, (fig.name, img.size)
    assert not list(out_dir.glob(".*tmp*")), "temporary files left behind"
    return set(names)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    root = tmp_path_factory.mktemp("healthy")
    run_dir = traced_run(root, "run")
    yield from plot_run(run_dir, root / "figs")


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    root = tmp_path_factory.mktemp("classic")
    with pytest.raises(NumericalAnomalyError):
        traced_run(root, "run", adapter_dtype="fp16")
    yield from plot_run(root / "run", root / "figs")


@pytest.fixture(scope="module")
def skipping(tmp_path_factory):
    root = tmp_path_factory.mktemp("skips")
    with pytest.raises(NumericalAnomalyError):
        traced_run(
            root, "run", adapter_dtype="fp16", on_anomaly="skip", max_anomalies=3, replay=False
        )
    yield from plot_run(root / "run", root / "figs")


# ---------------------------------------------------------------------- hand-made stores


def make_modules() -> list[ModuleInfo]:
    """Layers 1 and 0 of a small Q-Former registered out of display order, plus extras."""
    spec = [
        ("qformer.encoder.layer.1.output_query.dense", "ffn", 1, False),
        ("qformer.encoder.layer.1.attention.attention", "self-attn", 1, True),
        ("language_projection", "projection", None, False),
        ("qformer.encoder.layer.0.crossattention.attention", "cross-attn", 0, True),
        (
            "qformer.encoder.layer.0.crossattention.attention.key.lora_A.default",
            "cross-attn",
            0,
            False,
        ),
        ("qformer.encoder.layer.0.attention.attention", "self-attn", 0, True),
        ("qformer.encoder.layer.0.attention.attention.query.lora_B.default", "self-attn", 0, False),
        ("vision_model", "component", None, False),
        ("qformer.embeddings.layernorm", "embeddings", None, False),
        ("qformer.encoder.layer.0.output_query.dense", "ffn", 0, False),
    ]
    return [
        ModuleInfo(i, f"base_model.model.{name}",
                   name if layer is None else f"Q-Former layer {layer} {name}", kind, layer,
                   "qformer", attn)
        for i, (name, kind, layer, attn) in enumerate(spec)
    ]  # fmt: skip


def make_params(modules: list[ModuleInfo]) -> list[ParamInfo]:
    lora = [m for m in modules if "lora_" in m.name]
    return [ParamInfo(0, "base_model.model.query_tokens", "query tokens", None, 64, "float32")] + [
        ParamInfo(i + 1, f"{m.name}.weight", f"{m.label} .weight", m.id, 64, "float32")
        for i, m in enumerate(lora)
    ]


def step_data(step: int, n_mod: int, n_par: int, rng, *, full=True, bad=()) -> StepData:
    """Random positive stats; (module, site) pairs in ``bad`` get NaN/Inf counts."""
    data = StepData(step=step, loss=float(rng.random()) + 1, lr=1e-4, grad_norm=1.0, full=full)
    if not full:
        return data
    order = np.arange(n_mod)
    for site in ("fwd_out", "grad_out"):
        stats = np.abs(rng.lognormal(0, 2, (n_mod, len(TENSOR_STATS))))
        stats[:, 3:5] = 0  # nan, inf counts
        for mid, bad_site in bad:
            if bad_site == site:
                stats[mid, 3] = 5
        data.module_stats[site] = stats
        data.fire_order[site] = order
    data.score_max = np.where(order % 3 == 0, rng.normal(3, 1, n_mod), NAN)
    data.param_stats = np.abs(rng.lognormal(-6, 1, (n_par, len(PARAM_STATS))))
    data.param_stats[:, 3:5] = 0
    return data


def make_store(
    path, n_steps: int, *, full=lambda s: True, bad=None, precision="fp32", status=None, loss=None
):
    """A store written by hand; returns it open for writing (the caller closes it)."""
    modules = make_modules()
    params = make_params(modules)
    store = TraceStore.create(path, meta={"config": {"precision": precision}})
    store.register_modules(modules)
    store.register_params(params)
    rng = np.random.default_rng(0)
    for s in range(n_steps):
        data = step_data(
            s, len(modules), len(params), rng, full=full(s), bad=(bad or {}).get(s, ())
        )
        data.status = (status or {}).get(s, "ok")
        data.loss = (loss or {}).get(s, data.loss)
        store.append_step(data)
    return store


# ---------------------------------------------------------------------- real runs


def test_healthy_run_draws_every_figure(healthy):
    figures, view, out_dir = healthy
    assert check_pngs(figures, out_dir) == ALL_FIGURES
    assert figures[0].name == "training-curves"
    assert view.hard_anomalies == []
    hd = heatmap_data(view, "absmax", "fwd_out")
    assert hd.highlight_rows == [] and len(hd.anomaly_x) == 0
    assert hd.values.shape == (len(view.modules), 6)
    assert sorted(hd.row_ids.tolist()) == list(range(len(view.modules)))
    # grouped labels for the tiny model's 114 modules: one per (layer, kind)
    labels = [g[0] for g in hd.groups]
    assert labels[0] == "embeddings" and "L0 cross-attn" in labels and "L3 FFN" in labels
    assert len(labels) == len(set(labels)), "a group is split"


def test_classic_failure_highlights_the_first_offender(classic):
    figures, view, out_dir = classic
    names = check_pngs(figures, out_dir)
    assert names >= HEATMAPS and "training-curves" in names
    offender = first_offender(view.anomalies)
    assert offender is not None and offender["step"] == 0
    assert "LoRA A" in view.modules[offender["module_id"]].label
    for stat, site in (("absmax", "fwd_out"), ("rms", "grad_out")):
        hd = heatmap_data(view, stat, site)
        assert len(hd.highlight_rows) == 1
        assert hd.row_ids[hd.highlight_rows[0]] == offender["module_id"]
        assert hd.highlight_label == view.modules[offender["module_id"]].label
        assert hd.anomaly_steps.tolist() == [0] and hd.anomaly_x.tolist() == [0.0]
    caption = next(f.caption for f in figures if f.name == "heatmap-fwd_out-absmax")
    assert "first offender" in caption
    # the adapters' weights went NaN at the optimizer step: magenta in the LoRA heatmap
    lora = lora_heatmap_data(view)
    assert lora.nonfinite.all()
    assert [lora.row_ids[r] for r in lora.highlight_rows] == [
        p.id for p in view.params if p.module_id == offender["module_id"]
    ]


def test_run_with_skipped_steps_marks_them(skipping):
    figures, view, out_dir = skipping
    assert check_pngs(figures, out_dir) == ALL_FIGURES
    assert view.steps["status"].tolist() == ["skipped"] * 3 + ["stopped"]
    hd = heatmap_data(view, "rms", "fwd_out")
    assert hd.anomaly_steps.tolist() == [0, 1, 2, 3]
    assert hd.anomaly_x.tolist() == [0.0, 1.0, 2.0, 3.0]
    caption = next(f.caption for f in figures if f.name == "training-curves")
    assert "3 skipped" in caption and "1 stopped" in caption


# ---------------------------------------------------------------------- hand-made stores


def test_store_of_a_run_killed_after_two_steps_still_plots(tmp_path):
    store = make_store(tmp_path / "trace.db", 2)  # writer still open: the run is "alive"
    try:
        with TraceStore.open(tmp_path / "trace.db") as reader:
            figures = make_figures(reader, tmp_path / "figs")
    finally:
        store.close()
    names = check_pngs(figures, tmp_path / "figs")
    assert {"training-curves", "layer-norms", "lora-update-ratio"} | HEATMAPS == names


def test_store_without_full_steps_skips_heatmaps(tmp_path):
    make_store(tmp_path / "trace.db", 5, full=lambda s: False).close()
    with TraceStore.open(tmp_path / "trace.db") as store:
        figures = make_figures(store, tmp_path / "figs")
        assert heatmap_data(TraceView(store), "absmax", "fwd_out") is None
    names = check_pngs(figures, tmp_path / "figs")
    assert "training-curves" in names
    assert not names & HEATMAPS and "layer-norms" not in names


def test_empty_store_gives_no_figures(tmp_path):
    store = TraceStore.create(tmp_path / "trace.db", meta={"config": {}})
    store.close()
    with TraceStore.open(tmp_path / "trace.db") as store:
        assert make_figures(store, tmp_path / "figs") == []


def test_nonfinite_cells_anomaly_columns_and_warnings(tmp_path):
    # steps 0..9, full every other step; module 3 holds NaN at step 4 (full), a non-full
    # anomaly at step 7, and an early warning at step 2 that must not be marked.
    store = make_store(
        tmp_path / "trace.db", 10, full=lambda s: s % 2 == 0, bad={4: [(3, "fwd_out")]},
        precision="fp16", status={4: "rolled_back", 7: "skipped"}, loss={7: NAN},
    )  # fmt: skip
    common = dict(pass_="forward", op=None, summary="s", fix="f")
    store.append_anomaly(
        step=2, module_id=0, cause="near-limit", evidence={"warning": True}, **common
    )
    store.append_anomaly(
        step=4, module_id=3, cause="overflow", evidence={"warning": False}, **common
    )
    store.append_anomaly(step=7, module_id=None, cause="loss", evidence={}, **common)
    store.close()
    with TraceStore.open(tmp_path / "trace.db") as reader:
        view = TraceView(reader)
        figures = make_figures(reader, tmp_path / "figs")
        assert check_pngs(figures, tmp_path / "figs") == ALL_FIGURES
        assert [a["step"] for a in hard_anomalies(view.anomalies)] == [4, 7]
        assert first_offender(view.anomalies)["module_id"] == 3
        assert view.precision_note() == "fp16"
        hd = heatmap_data(view, "absmax", "fwd_out")
        assert hd.col_first.tolist() == [0, 2, 4, 6, 8]
        row = int(np.flatnonzero(hd.row_ids == 3)[0])
        assert hd.highlight_rows == [row]
        assert np.argwhere(hd.nonfinite).tolist() == [[row, 2]]  # step 4 is column 2
        assert hd.anomaly_steps.tolist() == [4, 7]
        assert hd.anomaly_x.tolist() == [2.0, 3.5]  # step 7 sits between columns 6 and 8
        assert not heatmap_data(view, "rms", "grad_out").nonfinite.any()
    curves = next(f.caption for f in figures if f.name == "training-curves")
    assert "1 rolled back" in curves and "1 skipped" in curves
    assert "Non-finite: 1 loss" in curves  # the NaN loss is drawn, not dropped


def test_module_order_groups_by_layer_then_kind():
    modules = make_modules()
    order = module_order(modules)
    assert sorted(order) == list(range(len(modules)))
    shown = [modules[i] for i in order]
    assert [group_label(m) for m in shown] == [
        "embeddings",
        "L0 self-attn",
        "L0 self-attn",
        "L0 cross-attn",
        "L0 cross-attn",
        "L0 FFN",
        "L1 self-attn",
        "L1 FFN",
        "projection",
        "components",
    ]
    # inside a group the model's own (registration) order is kept
    assert [m.id for m in shown[1:3]] == [5, 6]
    groups = row_groups([group_label(m) for m in shown])
    assert groups[1] == ("L0 self-attn", 1, 3) and groups[-1] == ("components", 9, 10)
    assert short_label("Q-Former layer 3 cross-attention key (LoRA B) .weight") == (
        "L3 cross-attention key (LoRA B)"
    )


def test_step_columns_places_steps_between_and_beyond_columns():
    first, last = np.array([0, 10, 20]), np.array([5, 15, 25])
    assert step_columns(first, last, [0, 3, 12, 7, 25, 30]).tolist() == [
        0.0,
        0.0,
        1.0,
        0.5,
        2.0,
        2.5,
    ]
    assert step_columns(np.array([5]), np.array([5]), [2]).tolist() == [-0.5]


@pytest.mark.slow
def test_large_synthetic_store_plots(tmp_path):
    """2,000 steps x 400 modules (random values, a NaN streak, anomalies) within seconds."""
    n_steps, n_mod, n_par = 2000, 400, 96
    kinds = ("self-attn", "cross-attn", "ffn")
    modules = [
        ModuleInfo(i, f"qformer.encoder.layer.{i // 33}.m{i}", f"Q-Former layer {i // 33} m{i}",
                   kinds[i % 3], i // 33, "qformer", i % 11 == 0)
        for i in range(n_mod)
    ]  # fmt: skip
    params = [
        ParamInfo(i, f"layer.{i}.lora_{'AB'[i % 2]}.weight", f"p{i}", i * 4, 64, "float32")
        for i in range(n_par)
    ]
    rng = np.random.default_rng(1)
    with TraceStore.create(tmp_path / "trace.db", meta={"config": {"precision": "fp16"}}) as st:
        st.register_modules(modules)
        st.register_params(params)
        for s in range(n_steps):
            bad = [(m, "fwd_out") for m in range(200, 260)] if s >= 1900 else []
            st.append_step(step_data(s, n_mod, n_par, rng, bad=bad))
        st.append_anomaly(step=1900, pass_="forward", module_id=200, op=None, cause="overflow",
                          summary="s", fix="f", evidence={})  # fmt: skip
    started = time.perf_counter()
    with TraceStore.open(tmp_path / "trace.db") as store:
        figures = make_figures(store, tmp_path / "figs")
        hd = heatmap_data(TraceView(store), "absmax", "fwd_out")
    print(f"plotted {n_steps} steps x {n_mod} modules in {time.perf_counter() - started:.1f}s")
    assert check_pngs(figures, tmp_path / "figs") == ALL_FIGURES
    assert hd.values.shape[1] <= MAX_COLUMNS and hd.steps_per_column == 4
    assert hd.nonfinite[:, -25:].any(axis=1).sum() == 60 and not hd.nonfinite[:, :475].any()
    assert hd.row_ids[hd.highlight_rows[0]] == 200
