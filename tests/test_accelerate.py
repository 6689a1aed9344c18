"""``stabilizer.watch`` on what ``accelerate.Accelerator.prepare`` returns.

The loops are accelerate's own idiom: ``prepare``, ``accelerator.accumulate(model)``,
``accelerator.backward(loss)``, mixed precision set on the Accelerator. The fault is
the one tests/test_watch.py plants in a plain loop (``log`` of a negative in the
module ``fault``), and it must be named the same way: step, pass, module and cause.
The two-process run starts ``accelerate launch --cpu --num_processes 2`` on a
script written into tmp_path and reads the per-rank trace stores it leaves.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from test_watch import Regressor, batches, quiet

import stabilizer
from stabilizer.store import TraceStore, rank_store_paths

ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps its state in process-wide singletons: each test gets its own
    (an Accelerator with another mixed_precision or accumulation would clash)."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerated_loop(data, *, fault_at=None, accumulation=1, mixed_precision="no", **options):
    """The user's accelerate loop wrapped in the one line; returns ``(watch, optimizer,
    the compute dtype the detector judged each micro-batch's step in)``.

    ``fault_at`` counts optimizer steps: the fault is armed in every micro-batch of
    that step."""
    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=accumulation, mixed_precision=mixed_precision
    )
    model = Regressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    judged_in = []
    with stabilizer.watch(model, optimizer, console=quiet(), **options) as watch:
        for micro, batch in enumerate(data):
            inner.fault.kind = "log" if micro // accumulation == fault_at else None
            with accelerator.accumulate(model):
                loss = model(**batch)["loss"]
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            judged_in.append(watch.session.detector.context.compute_dtype)
    return watch, optimizer, judged_in


def test_prepare_returns_wrappers_that_watch_sees_through():
    accelerator = Accelerator(cpu=True)
    model = Regressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
    assert type(prepared_optimizer).__name__ == "AcceleratedOptimizer"
    watch = stabilizer.watch(prepared_model, prepared_optimizer, console=quiet())
    assert watch.model is model and watch.optimizer is optimizer
    assert watch.scaler is None  # no GradScaler on CPU, none under bf16


def test_invalid_math_under_accelerate_names_step_pass_module_and_cause(tmp_path):
    with pytest.raises(stabilizer.NumericalAnomalyError) as info:
        accelerated_loop(batches(4), fault_at=2, run_dir=tmp_path / "run")
    a = info.value.anomaly
    assert (a.step, a.pass_, a.module_path, a.cause) == (2, "forward", "fault", "forward-math")
    assert a.op == "log"  # replayed from the recorded call of the prepared model
    with TraceStore.open(tmp_path / "run" / "trace.db") as store:
        assert list(store.steps()["status"]) == ["ok", "ok", "stopped"]
        (row,) = store.anomalies()
    assert (row["step"], row["pass"], row["cause"]) == (2, "forward", "forward-math")
    assert row["evidence"]["module_path"] == "fault"


def test_accumulate_counts_one_step_per_real_optimizer_step(tmp_path):
    watch, optimizer, _ = accelerated_loop(batches(6), accumulation=2, run_dir=tmp_path / "run")
    assert watch.anomalies == [] and watch.warnings == []
    # Six micro-batches, two per update: AcceleratedOptimizer.step() ran the inner
    # step three times and was a no-op on the three calls in between.
    assert watch.steps == 3
    assert optimizer.optimizer.state_dict()["state"][0]["step"].item() == 3
    with TraceStore.open(tmp_path / "run" / "trace.db") as store:
        steps = store.steps()
        assert steps["step"].tolist() == [0, 1, 2]
        assert list(steps["status"]) == ["ok"] * 3
        assert all(math.isfinite(v) for v in steps["loss"])


def test_a_fault_in_the_second_optimizer_step_under_accumulate_is_that_step(tmp_path):
    with pytest.raises(stabilizer.NumericalAnomalyError) as info:
        accelerated_loop(batches(6), fault_at=1, accumulation=2, run_dir=tmp_path / "run")
    a = info.value.anomaly
    assert (a.step, a.pass_, a.module_path, a.cause) == (1, "forward", "fault", "forward-math")


def test_bf16_mixed_precision_set_by_accelerate_stays_healthy(tmp_path):
    watch, _, judged_in = accelerated_loop(
        batches(4), mixed_precision="bf16", run_dir=tmp_path / "run"
    )
    assert watch.anomalies == [] and watch.warnings == []
    assert watch.steps == 4
    with TraceStore.open(tmp_path / "run" / "trace.db") as store:
        assert list(store.steps()["status"]) == ["ok"] * 4
    # accelerate wraps the forward in autocast: every step was judged as bf16 compute.
    assert judged_in == ["bfloat16"] * 4


# -- accelerate launch: two CPU processes over gloo -------------------------------------------

TRAIN_SCRIPT = """
import sys

import torch
from accelerate import Accelerator
from test_watch import Regressor, batches

import stabilizer

run_dir, fault_rank, fault_step, accumulation = sys.argv[1], *map(int, sys.argv[2:5])
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
model = Regressor()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model, optimizer = accelerator.prepare(model, optimizer)
print(f"rank {accelerator.process_index}: {type(model).__name__}", flush=True)
inner = accelerator.unwrap_model(model)
with stabilizer.watch(model, optimizer, run_dir=run_dir) as watch:
    for micro, batch in enumerate(batches(4 * accumulation)):
        here = accelerator.process_index == fault_rank and micro // accumulation == fault_step
        inner.fault.kind = "log" if here else None
        with accelerator.accumulate(model):
            loss = model(**batch)["loss"]
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
"""


def accelerate_launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` on 2 CPU processes, no config file read or needed.

    ``--cpu`` alone starts one process (accelerate's simple launcher runs several only
    through mpirun): ``--multi_gpu`` starts them through torchrun, and the script's
    ``Accelerator(cpu=True)`` makes that a gloo group on CPU (MULTI_CPU)."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tests = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
    env["HF_HOME"] = str(tmp_path / "hf")  # no user default_config.yaml is picked up
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(script), *args,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_accelerate_launch_names_the_fault_on_the_rank_where_it_happened(tmp_path):
    run_dir = tmp_path / "run"
    proc = accelerate_launch(tmp_path, str(run_dir), "1", "2", "2")  # rank 1, step 2, accum 2
    assert proc.returncode != 0  # on_anomaly="raise": every rank stops in step 2
    out = proc.stdout + proc.stderr
    assert "rank 0: DistributedDataParallel" in out and "rank 1: DistributedDataParallel" in out
    anomalies, statuses = {}, {}
    for rank, path in rank_store_paths(run_dir):
        with TraceStore.open(path) as store:
            assert (store.meta()["rank"], store.meta()["world_size"]) == (rank, 2)
            statuses[rank] = list(store.steps()["status"])
            anomalies[rank] = [
                (a["step"], a["pass"], a["cause"], a["evidence"]["module_path"], a["op"])
                for a in store.anomalies()
            ]
    assert statuses == {0: ["ok", "ok", "stopped"], 1: ["ok", "ok", "stopped"]}, out
    # Born in rank 1's forward; rank 0 received it through DDP's gradient all-reduce.
    # The origin rank replayed its step through the DDP wrapper's inner module.
    assert anomalies[1] == [(2, "forward", "forward-math", "fault", "log")], out
    assert [(step, cause) for step, _, cause, *_ in anomalies[0]] == [(2, "other-rank")], out
    assert "anomaly 1 on rank 1" in out  # the watch speaks on stderr
    assert "rank 1 went non-finite first (forward pass, first in fault)" in out
    assert (run_dir / "report.html").is_file()  # rank 0 merged both stores


def test_a_healthy_accelerate_launch_run_completes_on_both_ranks(tmp_path):
    run_dir = tmp_path / "run"
    proc = accelerate_launch(tmp_path, str(run_dir), "-1", "0", "2")  # no fault, accum 2
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for _, path in rank_store_paths(run_dir):
        with TraceStore.open(path) as store:
            assert list(store.steps()["status"]) == ["ok"] * 4  # 8 micro-batches, 4 updates
            assert store.anomalies() == [] and store.meta()["completed"] is True
    assert [rank for rank, _ in rank_store_paths(run_dir)] == [0, 1]
    assert (run_dir / "report.html").is_file()


def test_rollback_lowers_the_rate_of_an_accelerated_scheduler(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    inner = accelerator.unwrap_model(model)
    with stabilizer.watch(
        model,
        optimizer,
        scheduler=scheduler,
        console=quiet(),
        run_dir=tmp_path / "run",
        on_anomaly="rollback",
    ) as watch:
        for step, batch in enumerate(batches(4)):
            inner.fault.kind = "log" if step == 2 else None
            loss = model(**batch)["loss"]
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    assert [a.cause for a in watch.anomalies] == ["forward-math"]
    # The torch scheduler inside accelerate's wrapper: its peak rate halved with the rest.
    assert scheduler.scheduler.base_lrs == [pytest.approx(5e-3)]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
