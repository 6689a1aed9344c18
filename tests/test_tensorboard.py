"""TensorBoard export of traced runs, read back with TensorBoard's own EventAccumulator.

Real tiny runs (healthy; the classic fp16 failure under the skip policy; a NaN batch on
a check-only step, written live too) and hand-made stores (a second rank, hostile text).
"""

from __future__ import annotations

import html
import math
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from faults import nan_pixels_at
from rich.console import Console
from test_report_plots import make_store

import stabilizer.train as train_module
from stabilizer.config import TrainConfig
from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.errors import ConfigError
from stabilizer.reports.tensorboard import (
    TensorBoardSink,
    export_tensorboard,
    load_summary_writer,
)
from stabilizer.store import TraceStore, store_path
from stabilizer.train import train

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard extra is not installed: pip install 'stabilizer[tensorboard]'",
)
with warnings.catch_warnings():  # its vendored bleach warns about html5lib on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from tensorboard import plugin_util  # noqa: E402  (only importable with the extra)

REPO = Path(__file__).resolve().parents[1]
INSTALL = "pip install 'stabilizer[tensorboard]'"


# ---------------------------------------------------------------------- runs


def traced_run(run_dir: Path, **overrides) -> Path:
    """Four steps of the tiny preset, full statistics on even steps only (0 and 2)."""
    settings = {
        "max_steps": 4,
        "save_every": None,
        "trace": True,
        "trace_every": 2,
        "max_eval_samples": 4,
        **overrides,
    }
    with pytest.MonkeyPatch.context() as mp:
        # The HTML report has its own tests; drawing its PNGs would take most of the time
        # of these runs. (Not raising if it is renamed: the runs only get slower.)
        mp.setattr(train_module, "_write_report", lambda *args: None, raising=False)
        train(TrainConfig.smoke(run_dir, **settings), console=Console(record=True, width=120))
    return run_dir


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    return traced_run(tmp_path_factory.mktemp("healthy") / "run")


@pytest.fixture(scope="module")
def classic_skips(tmp_path_factory) -> Path:
    """fp16 adapters: every step's AdamW update is NaN; skipped 3 times, then stopped."""
    run_dir = tmp_path_factory.mktemp("classic") / "run"
    with pytest.raises(NumericalAnomalyError):
        traced_run(run_dir, adapter_dtype="fp16", on_anomaly="skip", max_anomalies=3, replay=False)
    return run_dir


@pytest.fixture(scope="module")
def nan_batch(tmp_path_factory) -> Path:
    """A NaN pixel in step 1's batch (a check-only step), skipped; events written live."""
    run_dir = tmp_path_factory.mktemp("nan_batch") / "run"
    with pytest.MonkeyPatch.context() as mp:
        nan_pixels_at(mp, 1)
        traced_run(run_dir, on_anomaly="skip", replay=False, tensorboard=True)
    return run_dir


# ---------------------------------------------------------------------- reading events


def read_events(folder: Path):
    """Every event of one TensorBoard run folder (no sampling: size guidance 0 = keep all)."""
    acc = event_accumulator.EventAccumulator(
        str(folder),
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0},
    )
    acc.Reload()
    return acc


def scalar_tags(acc) -> set[str]:
    return set(acc.Tags()["scalars"])


def points(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def steps_of(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def values_of(acc, tag: str) -> np.ndarray:
    return np.array([e.value for e in acc.Scalars(tag)])


def texts(acc, tag: str) -> dict[int, list[str]]:
    """Text summaries of ``tag`` by step, as the Markdown that was written."""
    out: dict[int, list[str]] = {}
    if f"{tag}/text_summary" not in acc.Tags()["tensors"]:
        return out
    for event in acc.Tensors(f"{tag}/text_summary"):
        out.setdefault(event.step, []).append(event.tensor_proto.string_val[0].decode())
    return out


def rendered(markdown: str) -> str:
    """What TensorBoard's text dashboard shows: its own Markdown renderer, tags stripped."""
    safe = plugin_util.markdown_to_safe_html(markdown)
    return html.unescape(re.sub(r"<[^>]+>", "", safe))


def store_columns(run_dir: Path, rank: int = 0) -> dict[str, np.ndarray]:
    with TraceStore.open(store_path(run_dir, rank)) as store:
        return store.steps()


def f32(values) -> np.ndarray:
    # TensorBoard's simple scalars are float32.
    return np.asarray(values, dtype=np.float32)


def group_max(run_dir: Path, stat: str, site: str, layer: int, kind: str):
    """Full steps and the max of ``stat`` over one layer's modules of ``kind``, from the store."""
    with TraceStore.open(run_dir / "trace.db") as store:
        ids = [m.id for m in store.modules() if m.layer == layer and m.kind == kind]
        steps, values = store.module_stat(stat, site)
    return steps.tolist(), np.nanmax(values[:, ids], axis=1)


# ---------------------------------------------------------------------- real runs


def test_healthy_run_curves_equal_the_store_per_step_and_per_layer(healthy, tmp_path):
    out = export_tensorboard(healthy, tmp_path / "tb")
    assert out == tmp_path / "tb"
    assert sorted(p.name for p in out.iterdir()) == ["rank0"]
    acc = read_events(out / "rank0")
    cols = store_columns(healthy)
    steps = cols["step"].tolist()
    assert steps == [0, 1, 2, 3]

    for name in ("loss", "lr", "grad_norm"):
        assert steps_of(acc, f"train/{name}") == steps
        np.testing.assert_array_equal(values_of(acc, f"train/{name}"), f32(cols[name]))
    # Wall time is the store's, not the time of the export.
    assert [e.wall_time for e in acc.Scalars("train/loss")] == cols["wall_time"].tolist()
    for tag in ("train/status_code", "anomaly/count", "anomaly/nonfinite_modules"):
        assert points(acc, tag) == [(s, 0.0) for s in steps], tag

    tags = scalar_tags(acc)
    # One curve per layer group, not one per module: the tiny model has 114 modules.
    absmax = sorted(t for t in tags if t.startswith("activation_absmax/"))
    assert len(absmax) == 13
    assert {"activation_absmax/L0_cross-attn", "activation_absmax/L3_FFN"} <= set(absmax)
    assert {"activation_absmax/embeddings", "activation_absmax/projection"} <= set(absmax)
    for tag in ("activation_rms/L2_self-attn", "gradient_rms/L1_FFN"):
        assert tag in tags
    assert "attention_score_max/L0_cross-attn" in tags
    assert "attention_score_max/L0_FFN" not in tags  # no attention module in an FFN

    # Per-layer curves exist on full steps only, and are the max over the layer's modules.
    full, expected = group_max(healthy, "absmax", "fwd_out", 0, "cross-attn")
    assert full == [0, 2] == steps_of(acc, "activation_absmax/L0_cross-attn")
    np.testing.assert_array_equal(values_of(acc, "activation_absmax/L0_cross-attn"), f32(expected))
    _, expected = group_max(healthy, "rms", "grad_out", 3, "ffn")
    np.testing.assert_array_equal(values_of(acc, "gradient_rms/L3_FFN"), f32(expected))
    _, expected = group_max(healthy, "absmax", "score_max", 0, "cross-attn")
    np.testing.assert_array_equal(
        values_of(acc, "attention_score_max/L0_cross-attn"), f32(expected)
    )

    # LoRA update ratio of layer 0's self-attention adapters: the largest finite one.
    with TraceStore.open(healthy / "trace.db") as store:
        mods = {m.id: m for m in store.modules()}
        ids = [
            p.id
            for p in store.params()
            if "lora_" in p.name
            and mods[p.module_id].layer == 0
            and mods[p.module_id].kind == "self-attn"
        ]
        ratio_steps, ratio = store.param_stat("update_ratio")
    block = np.where(np.isfinite(ratio[:, ids]), ratio[:, ids], np.nan)
    recorded = ~np.isnan(block).all(axis=1)
    assert steps_of(acc, "lora_update_ratio/L0_self-attn") == ratio_steps[recorded].tolist()
    np.testing.assert_array_equal(
        values_of(acc, "lora_update_ratio/L0_self-attn"),
        f32(np.nanmax(block[recorded], axis=1)),
    )
    # A healthy run says nothing.
    assert acc.Tags()["tensors"] == []


def test_classic_fp16_failure_exports_each_anomaly_action_and_status(classic_skips, tmp_path):
    acc = read_events(export_tensorboard(classic_skips, tmp_path / "tb") / "rank0")
    cols = store_columns(classic_skips)
    with TraceStore.open(classic_skips / "trace.db") as store:
        anomalies, actions, modules = store.anomalies(), store.actions(), store.modules()

    assert cols["step"].tolist() == [0, 1, 2, 3]
    # skipped = 1, stopped = 4; one more anomaly per step.
    assert points(acc, "train/status_code") == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 4.0)]
    assert points(acc, "anomaly/count") == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]
    # The optimizer left NaN in the weights while every activation stayed finite.
    assert (values_of(acc, "anomaly/nonfinite_params") > 0).all()
    assert (values_of(acc, "anomaly/nonfinite_modules") == 0).all()

    diagnosis = texts(acc, "anomaly/diagnosis")
    assert sorted(diagnosis) == [a["step"] for a in anomalies] == [0, 1, 2, 3]
    first = anomalies[0]
    shown = rendered(diagnosis[0][0])
    assert "anomaly 1 at step 0, optimizer pass" in shown
    assert f"cause: {first['cause']}" in shown and first["cause"] == "fp16-adam-eps"
    assert f"first offender: {modules[first['module_id']].label}" in shown
    assert f"summary: {first['summary']}" in shown
    assert f"fix: {first['fix']}" in shown and "--adapter-dtype fp32" in shown

    taken = texts(acc, "action/taken")
    assert sorted(taken) == [0, 1, 2, 3]
    for row in actions:
        assert f"{row['action']} at step {row['step']}: {row['detail']}" in rendered(
            taken[row["step"]][0]
        )
    assert "--max-anomalies 3" in rendered(taken[3][0])

    status = {step: rendered(text[0]) for step, text in texts(acc, "train/status").items()}
    assert sorted(status) == [0, 1, 2, 3]
    assert "skipped" in status[0] and "stopped" in status[3]


def test_nan_batch_on_a_check_only_step_marks_that_step_only(nan_batch, tmp_path):
    acc = read_events(export_tensorboard(nan_batch, tmp_path / "tb") / "rank0")
    cols = store_columns(nan_batch)
    assert cols["full"].tolist() == [True, False, True, False]

    loss = dict(points(acc, "train/loss"))
    assert math.isnan(loss[1]) and math.isfinite(loss[0]) and math.isfinite(loss[2])
    assert points(acc, "train/status_code") == [(0, 0.0), (1, 1.0), (2, 0.0), (3, 0.0)]
    assert points(acc, "anomaly/count") == [(0, 0.0), (1, 1.0), (2, 1.0), (3, 1.0)]
    with TraceStore.open(nan_batch / "trace.db") as store:
        marked = store.read_step(1).module_stats  # check-only: rows of failed modules only
    nonfinite = set().union(*(np.flatnonzero(s[:, 3] > 0).tolist() for s in marked.values()))
    counts = dict(points(acc, "anomaly/nonfinite_modules"))
    assert counts == {0: 0.0, 1: float(len(nonfinite)), 2: 0.0, 3: 0.0}
    assert counts[1] > 10
    # No per-layer statistics on the check-only steps 1 and 3.
    assert steps_of(acc, "activation_absmax/L1_FFN") == [0, 2]

    [card] = texts(acc, "anomaly/diagnosis")[1]
    shown = rendered(card)
    assert "input pass" in shown and "cause: nonfinite-input" in shown
    assert "first offender: none named" in shown
    assert list(texts(acc, "train/status")) == [1]
    assert list(texts(acc, "action/taken")) == [1]


def test_events_written_live_during_training_equal_the_export(nan_batch, tmp_path):
    live = read_events(nan_batch / "tensorboard" / "rank0")
    exported = read_events(export_tensorboard(nan_batch, tmp_path / "tb") / "rank0")
    assert scalar_tags(live) == scalar_tags(exported)
    for tag in scalar_tags(live):
        got, want = points(live, tag), points(exported, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_array_equal([v for _, v in got], [v for _, v in want], err_msg=tag)
    for tag in ("anomaly/diagnosis", "action/taken", "train/status"):
        assert texts(live, tag) == texts(exported, tag)


# ---------------------------------------------------------------------- folders


def test_each_rank_store_becomes_its_own_run(healthy, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(healthy / "trace.db", store_path(run_dir, 0))
    make_store(store_path(run_dir, 1), 3).close()  # a hand-made rank 1 with other numbers
    out = export_tensorboard(run_dir)
    assert out == run_dir / "tensorboard"
    assert sorted(p.name for p in out.iterdir()) == ["rank0", "rank1"]

    for rank in (0, 1):
        acc = read_events(out / f"rank{rank}")
        cols = store_columns(run_dir, rank)
        assert steps_of(acc, "train/loss") == cols["step"].tolist()
        np.testing.assert_array_equal(values_of(acc, "train/loss"), f32(cols["loss"]))
    rank1 = scalar_tags(read_events(out / "rank1"))
    assert "activation_absmax/L1_FFN" in rank1 and "activation_absmax/L3_FFN" not in rank1


def test_export_again_replaces_the_previous_export(healthy, tmp_path):
    log_dir = tmp_path / "tb"
    export_tensorboard(healthy, log_dir)
    (log_dir / "rank7").mkdir()  # a rank an earlier export of this folder had
    export_tensorboard(healthy, log_dir)

    assert sorted(p.name for p in log_dir.iterdir()) == ["rank0"]
    assert len(list((log_dir / "rank0").glob("events.out.tfevents.*"))) == 1
    acc = read_events(log_dir / "rank0")
    assert steps_of(acc, "train/loss") == [0, 1, 2, 3]
    assert steps_of(acc, "activation_absmax/L0_FFN") == [0, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"], "staging folder left behind"


def test_a_folder_the_export_did_not_write_is_not_replaced(healthy, tmp_path):
    log_dir = tmp_path / "mine"
    log_dir.mkdir()
    (log_dir / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"notes\.txt.*new or empty folder"):
        export_tensorboard(healthy, log_dir)
    assert (log_dir / "notes.txt").read_text() == "keep me"

    with pytest.raises(ConfigError, match="has no trace store.*--trace"):
        export_tensorboard(tmp_path)


# ---------------------------------------------------------------------- the extra


def test_without_the_extra_the_error_names_the_option_and_the_install(
    healthy, tmp_path, monkeypatch
):
    # None in sys.modules makes ``import`` fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ConfigError) as err:
        export_tensorboard(healthy, tmp_path / "tb", option="stabilizer report --tensorboard")
    message = str(err.value)
    assert message.startswith("stabilizer report --tensorboard writes TensorBoard event files")
    assert message.endswith(f"Install the extra with: {INSTALL}")
    assert not (tmp_path / "tb").exists()

    with pytest.raises(ConfigError, match=r"^--tensorboard writes .*stabilizer\[tensorboard\]"):
        TensorBoardSink(tmp_path / "live", [], [])
    assert not (tmp_path / "live").exists()


def test_without_torch_tensorboard_the_tensorboardx_writer_is_used(monkeypatch, tmp_path):
    # A stand-in tensorboardX whose SummaryWriter is torch's: the same add_scalar/add_text.
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(
        sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=SummaryWriter)
    )
    assert load_summary_writer() is SummaryWriter
    store = make_store(store_path(tmp_path, 0), 2)
    store.close()
    acc = read_events(export_tensorboard(tmp_path) / "rank0")
    assert steps_of(acc, "train/loss") == [0, 1]


def test_importing_the_module_needs_neither_tensorboard_nor_torch():
    code = (
        "import sys\n"
        "for name in ('tensorboard', 'tensorboardX', 'torch'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        "import stabilizer.reports.tensorboard\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------- text


def test_hostile_strings_render_as_given_without_markup(tmp_path):
    store = make_store(store_path(tmp_path, 0), 2)
    hostile = {
        "cause": "**bold** _under_ `tick`",
        "summary": "<script>alert(1)</script> a < b & c > d; [link](http://x.test) | t |",
        "fix": "# heading\n- item\n1. first \\ back",
    }
    store.append_anomaly(
        step=1, pass_="forward", module_id=0, op="aten::mul_ (x*y)", evidence={}, **hostile
    )
    store.append_action(step=1, action="clip", detail="clamp to +-32752.0 <output>")
    store.close()
    acc = read_events(export_tensorboard(tmp_path) / "rank0")

    [card] = texts(acc, "anomaly/diagnosis")[1]
    safe = plugin_util.markdown_to_safe_html(card)
    # Only our own bold label, list and line breaks become markup: no script, link,
    # code span, emphasis, heading or table from the strings themselves.
    assert set(re.findall(r"<(\w+)", safe)) == {"p", "strong", "ul", "li", "br"}
    assert safe.count("<strong>") == 1
    shown = rendered(card)
    for value in (hostile["cause"], hostile["summary"], *hostile["fix"].splitlines()):
        assert value in shown, value
    assert "(op aten::mul_ (x*y))" in shown
    [action] = texts(acc, "action/taken")[1]
    assert "clip at step 1: clamp to +-32752.0 <output>" in rendered(action)


def test_report_command_exports_the_event_files_beside_the_page(healthy, tmp_path):
    from click.testing import CliRunner

    from stabilizer.cli import main

    out = tmp_path / "tb"
    result = CliRunner().invoke(main, ["report", str(healthy), "--tensorboard-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote TensorBoard event files to {out}" in result.output
    acc = read_events(out / "rank0")
    assert steps_of(acc, "train/loss") == store_columns(healthy)["step"].tolist()


def test_tensorboard_without_trace_is_refused_naming_both_options(tmp_path):
    with pytest.raises(ConfigError, match="--tensorboard.*--trace"):
        TrainConfig.smoke(tmp_path / "run", tensorboard=True)
