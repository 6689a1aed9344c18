"""The trace store: round trips with NaN/Inf, array readers, crash safety, errors, resume."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from stabilizer.errors import StabilizerError
from stabilizer.probes.schema import PARAM_STATS, SITES, TENSOR_STATS
from stabilizer.store import (
    ModuleInfo,
    ParamInfo,
    StepData,
    StoreError,
    TraceStore,
)

N_MODULES, N_PARAMS = 5, 4
NAN, INF = float("nan"), float("inf")
REPO = Path(__file__).resolve().parents[1]


def make_modules(n: int = N_MODULES) -> list[ModuleInfo]:
    return [
        ModuleInfo(
            id=i,
            name=f"base_model.model.qformer.encoder.layer.{i}.crossattention.attention.key",
            label=f"Q-Former layer {i} cross-attention key",
            kind="cross-attn" if i % 2 else "ffn",
            layer=i if i < n - 1 else None,
            component="qformer",
            is_attention=i % 2 == 1,
        )
        for i in range(n)
    ]


def make_params(n: int = N_PARAMS) -> list[ParamInfo]:
    return [
        ParamInfo(i, f"p.{i}.lora_A", f"param {i}", i if i < n - 1 else None, 64 * (i + 1), "fp32")
        for i in range(n)
    ]


def make_step(step: int, *, full: bool = True, seed: int | None = None) -> StepData:
    """A step where module 0 never fires, module 1 holds NaN/Inf, the rest are random."""
    rng = np.random.default_rng(step if seed is None else seed)
    data = StepData(step=step, loss=float(rng.random()), lr=1e-4, grad_norm=0.5, full=full)
    if not full:
        return data
    for k, site in enumerate(SITES):
        stats = rng.normal(size=(N_MODULES, len(TENSOR_STATS)))
        order = np.arange(N_MODULES) + k * N_MODULES
        stats[0], order[0] = NAN, -1
        stats[1, 0], stats[1, 1], stats[1, 2] = INF, NAN, -INF
        data.module_stats[site], data.fire_order[site] = stats, order
    data.score_max = np.array([NAN, INF, NAN, 7.5, NAN])
    data.param_stats = rng.normal(size=(N_PARAMS, len(PARAM_STATS)))
    data.param_stats[2, 1] = NAN
    data.param_stats[3, 0] = INF
    return data


@pytest.fixture
def store(tmp_path: Path):
    st = TraceStore.create(tmp_path / "trace.db", meta={"config": {"lr": 1e-4}})
    st.register_modules(make_modules())
    st.register_params(make_params())
    yield st
    st.close()


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaN == NaN here


# ---------------------------------------------------------------- round trips


def test_round_trip_every_table(store: TraceStore) -> None:
    written = [make_step(0), make_step(1, full=False), make_step(2)]
    written[1].loss, written[1].grad_norm, written[1].status = NAN, INF, "skipped"
    written[2].extra = {"scale": np.float32(2.0), "tokens": np.arange(3)}
    for data in written:
        store.append_step(data)
    aid = store.append_anomaly(
        step=1,
        pass_="backward",
        module_id=3,
        op="softmax",
        cause="overflow",
        summary="grad hit Inf",
        fix="lower lr",
        evidence={"absmax": INF, "nan": NAN, "count": np.int64(4)},
    )
    store.append_anomaly(
        step=2, pass_="loss", module_id=None, op=None, cause="c", summary="s", fix="f", evidence={}
    )
    store.append_action(step=1, action="skip", detail="non-finite grad")
    store.set_meta(finished=True)
    store.close()

    with TraceStore.open(store.path) as ro:
        meta = ro.meta()
        assert meta["config"] == {"lr": 1e-4} and meta["schema_version"] == 1
        assert meta["finished"] is True and meta["tensor_stats"] == list(TENSOR_STATS)
        assert meta["sites"] == [*SITES, "score_max"] and meta["param_stats"] == list(PARAM_STATS)
        assert ro.modules() == make_modules() and ro.params() == make_params()

        cols = ro.steps()
        assert_same(cols["step"], [0, 1, 2])
        assert_same(cols["loss"], [written[0].loss, NAN, written[2].loss])
        assert_same(cols["grad_norm"], [0.5, INF, 0.5])
        assert_same(cols["full"], [True, False, True])
        assert list(cols["status"]) == ["ok", "skipped", "ok"]
        assert cols["extra"][2] == {"scale": 2.0, "tokens": [0, 1, 2]}
        assert np.all(np.isfinite(cols["wall_time"]))

        for data in written:
            back = ro.read_step(data.step)
            assert back.status == data.status and back.full == data.full
            assert_same(back.loss, data.loss)
            assert set(back.module_stats) == set(data.module_stats)
            for site in data.module_stats:
                assert_same(back.module_stats[site], data.module_stats[site])
                assert_same(back.fire_order[site], data.fire_order[site])
            for name in ("score_max", "param_stats"):
                want, got = getattr(data, name), getattr(back, name)
                assert (want is None and got is None) or np.array_equal(want, got, equal_nan=True)

        anomalies = ro.anomalies()
        assert [a["id"] for a in anomalies] == [aid, aid + 1]
        first = anomalies[0]
        assert (first["step"], first["pass"], first["module_id"], first["op"]) == (
            1,
            "backward",
            3,
            "softmax",
        )
        assert first["evidence"]["absmax"] == INF and math.isnan(first["evidence"]["nan"])
        assert first["evidence"]["count"] == 4
        assert anomalies[1]["module_id"] is None and anomalies[1]["op"] is None
        (action,) = ro.actions()
        assert (action["step"], action["action"], action["detail"]) == (
            1,
            "skip",
            "non-finite grad",
        )


def test_nan_is_null_and_inf_is_real_in_plain_sql(store: TraceStore) -> None:
    store.append_step(make_step(0))
    rows = dict(
        store._conn.execute(
            "SELECT site, typeof(absmax) || ',' || typeof(rms) || ',' || absmax FROM module_stats"
            " WHERE step = 0 AND module_id = 1"
        ).fetchall()
    )
    assert rows["fwd_in"] == "real,null,Inf"
    assert rows["score_max"] == "real,null,Inf"


def test_unfired_sites_store_no_rows(store: TraceStore) -> None:
    store.append_step(make_step(0))
    store.append_step(make_step(1, full=False))
    count = store._conn.execute("SELECT COUNT(*) FROM module_stats").fetchone()[0]
    # 4 of 5 modules fired at each site, 2 modules have a score; the sparse step adds none.
    assert count == len(SITES) * (N_MODULES - 1) + 2
    assert store._conn.execute("SELECT COUNT(*) FROM param_stats").fetchone()[0] == N_PARAMS


# ---------------------------------------------------------------- array readers


def test_module_stat_shapes_and_nan_fill(store: TraceStore) -> None:
    for step in range(6):
        store.append_step(make_step(step, full=step % 2 == 0))
    steps, absmax = store.module_stat("absmax", "fwd_out")
    assert_same(steps, [0, 2, 4])
    assert absmax.shape == (3, N_MODULES)
    assert np.isnan(absmax[:, 0]).all()  # module 0 never fired
    assert np.isposinf(absmax[:, 1]).all()
    assert_same(absmax[1], make_step(2).module_stats["fwd_out"][:, 0])

    steps, rms = store.module_stat("rms", "grad_in", full_only=False)
    assert_same(steps, range(6))
    assert np.isnan(rms[1::2]).all() and np.isfinite(rms[::2, 2:]).all()

    _, order = store.module_stat("fire_order", "grad_out")
    assert_same(order[0], [NAN, 11, 12, 13, 14])

    _, scores = store.module_stat("absmax", "score_max")
    assert_same(scores[0], [NAN, INF, NAN, 7.5, NAN])

    steps, grads = store.param_stat("grad_norm")
    assert_same(steps, range(6)) and grads.shape == (6, N_PARAMS)
    assert np.isnan(grads[1]).all() and np.isnan(grads[0, 2])
    assert_same(grads[4], make_step(4).param_stats[:, 1])


def test_readers_on_an_empty_store(store: TraceStore) -> None:
    steps, values = store.module_stat("mean", "fwd_in")
    assert steps.shape == (0,) and values.shape == (0, N_MODULES)
    assert store.steps()["loss"].shape == (0,)
    assert store.param_stat("update_ratio")[1].shape == (0, N_PARAMS)
    assert store.anomalies() == [] and store.actions() == []


@pytest.mark.parametrize(
    ("stat", "site"), [("rms", "score_max"), ("absmax", "nowhere"), ("median", "fwd_in")]
)
def test_module_stat_rejects_unknown_names(store: TraceStore, stat: str, site: str) -> None:
    with pytest.raises(StoreError):
        store.module_stat(stat, site)


# ---------------------------------------------------------------- write validation


def test_append_step_validates_shapes_status_and_duplicates(store: TraceStore) -> None:
    bad = make_step(0)
    bad.module_stats["fwd_in"] = bad.module_stats["fwd_in"][:3]
    with pytest.raises(StoreError, match=r"fwd_in"):
        store.append_step(bad)
    with pytest.raises(StoreError, match="status"):
        store.append_step(StepData(0, 1.0, 1e-4, 1.0, status="exploded"))
    no_order = make_step(0)
    del no_order.fire_order["grad_in"]
    with pytest.raises(StoreError, match="fire_order"):
        store.append_step(no_order)
    assert store.steps()["step"].size == 0  # failed steps left nothing behind

    store.append_step(make_step(0))
    with pytest.raises(StoreError, match="already recorded"):
        store.append_step(make_step(0))
    store.append_step(make_step(0, full=False), replace=True)
    assert store._conn.execute("SELECT COUNT(*) FROM module_stats").fetchone()[0] == 0


def test_register_checks_ids(store: TraceStore) -> None:
    store.register_modules(make_modules())  # identical re-registration (resume) is fine
    with pytest.raises(StoreError, match="model changed"):
        store.register_modules([ModuleInfo(0, "other", "x", "ffn", None, "qformer", False)])
    with pytest.raises(StoreError, match=r"0\.\.n-1"):
        store.register_params([ParamInfo(9, "gap", "gap", None, 1, "fp32")])
    assert len(store.params()) == N_PARAMS  # the failed registration was rolled back


def test_anomaly_pass_and_action_are_checked(store: TraceStore) -> None:
    with pytest.raises(StoreError, match="pass"):
        store.append_anomaly(
            step=0, pass_="sideways", module_id=None, op=None, cause="", summary="", fix="",
            evidence={},
        )  # fmt: skip
    with pytest.raises(StoreError, match="action"):
        store.append_action(step=0, action="panic", detail="")


# ---------------------------------------------------------------- opening and errors


def test_open_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "trace.db"
    with pytest.raises(StoreError, match="nope") as info:
        TraceStore.open(path)
    assert isinstance(info.value, StabilizerError) and str(path) in str(info.value)


def test_open_garbage_and_foreign_sqlite_name_path(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a stabilizer trace store") as info:
        TraceStore.open(garbage)
    assert str(garbage) in str(info.value)

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(StoreError, match="not a stabilizer trace store") as info:
        TraceStore.open(foreign)
    assert str(foreign) in str(info.value)
    with pytest.raises(StoreError):
        TraceStore.create(foreign, meta={}, append=True)


def test_open_is_read_only(store: TraceStore) -> None:
    with TraceStore.open(store.path) as ro, pytest.raises(StoreError, match="read-only"):
        ro.append_step(make_step(0))


def test_create_refuses_overwrite_then_overwrites_or_appends(store: TraceStore) -> None:
    store.append_step(make_step(0))
    store.close()
    with pytest.raises(StoreError, match="already exists") as info:
        TraceStore.create(store.path, meta={})
    assert str(store.path) in str(info.value)
    with pytest.raises(StoreError, match="reserved"):
        TraceStore.create(store.path, meta={"schema_version": 2}, overwrite=True)

    with TraceStore.create(store.path, meta={"resumed": True}, append=True) as again:
        created = again.meta()["created"]
        assert again.steps()["step"].tolist() == [0] and again.meta()["resumed"] is True
        again.append_step(make_step(1))
    with TraceStore.create(store.path, meta={"fresh": 1}, overwrite=True) as fresh:
        assert fresh.steps()["step"].size == 0 and fresh.modules() == []
        assert "config" not in fresh.meta() and fresh.meta()["created"] >= created


def test_delete_steps_after(store: TraceStore) -> None:
    for step in range(5):
        store.append_step(make_step(step))
        store.append_action(step=step, action="warn", detail=str(step))
    store.append_anomaly(
        step=4, pass_="forward", module_id=1, op=None, cause="c", summary="s", fix="f",
        evidence={},
    )  # fmt: skip
    store.delete_steps_after(2, keep_events=True)
    assert len(store.actions()) == 5 and len(store.anomalies()) == 1
    store.delete_steps_after(1)
    assert store.steps()["step"].tolist() == [0, 1]
    assert [a["step"] for a in store.actions()] == [0, 1] and store.anomalies() == []
    for table in ("module_stats", "param_stats"):
        top = store._conn.execute(f"SELECT MAX(step) FROM {table}").fetchone()[0]
        assert top == 1
    store.append_step(make_step(2))  # the resumed run writes step 2 again


# ---------------------------------------------------------------- concurrency and crashes


def test_reader_sees_commits_while_writer_runs(store: TraceStore) -> None:
    store.append_step(make_step(0))
    with TraceStore.open(store.path) as ro:
        assert ro.steps()["step"].tolist() == [0]
        store.append_step(make_step(1))
        aid = store.append_anomaly(
            step=1, pass_="forward", module_id=2, op="matmul", cause="overflow", summary="s",
            fix="f", evidence={"absmax": INF},
        )  # fmt: skip
        store.append_action(step=1, action="rollback", detail="to step 0")
        # Visible to a second connection before the writer closes: committed immediately.
        assert ro.steps()["step"].tolist() == [0, 1]
        assert [a["id"] for a in ro.anomalies()] == [aid]
        assert [a["action"] for a in ro.actions()] == ["rollback"]
        assert ro.module_stat("absmax", "fwd_in")[1].shape == (2, N_MODULES)


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_store import make_modules, make_params, make_step
    from stabilizer.store import TraceStore

    store = TraceStore.create(Path(sys.argv[1]), meta={"child": True})
    store.register_modules(make_modules())
    store.register_params(make_params())
    for step in range(1_000_000):  # bounded: a runaway child still ends
        store.append_step(make_step(step, seed=0))
        if step % 5 == 0:
            store.append_anomaly(step=step, pass_="forward", module_id=1, op=None,
                                 cause="c", summary="s", fix="f", evidence={"step": step})
        print(step, flush=True)
    """
)


def test_sigkill_mid_run_keeps_every_committed_step(tmp_path: Path) -> None:
    path = tmp_path / "trace.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    reported = -1
    try:
        assert child.stdout is not None
        while reported < 20:
            line = child.stdout.readline()
            assert line, f"child exited early with {child.wait()}"
            reported = int(line)
        os.kill(child.pid, signal.SIGKILL)
        rest = child.stdout.read().split()  # lines printed between our read and the kill
        reported = max([reported, *map(int, rest)])
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert Path(f"{path}-wal").exists()  # the reader must recover from the WAL itself

    with TraceStore.open(path) as ro:
        steps = ro.steps()["step"]
        assert steps.size >= reported + 1
        assert_same(steps, np.arange(steps.size))  # a contiguous prefix, no torn step
        anomaly_steps = [a["step"] for a in ro.anomalies()]
        assert anomaly_steps[: reported // 5 + 1] == list(range(0, reported + 1, 5))
        _, absmax = ro.module_stat("absmax", "fwd_out")
        assert np.isnan(absmax[:, 0]).all() and np.isposinf(absmax[:, 1]).all()
        assert ro.read_step(int(steps[-1])).param_stats.shape == (N_PARAMS, len(PARAM_STATS))

    # Resume after the crash: continue from an earlier checkpoint step.
    with TraceStore.create(path, meta={}, append=True) as again:
        again.delete_steps_after(10)
        again.append_step(make_step(11))
        assert again.steps()["step"].tolist() == list(range(12))


def test_store_imports_without_torch() -> None:
    # Reports read the store on machines without torch: importing it must not load torch.
    code = "import sys, stabilizer.store; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.stdout.strip() == "False", "importing stabilizer.store loaded torch"
