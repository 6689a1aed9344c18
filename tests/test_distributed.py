"""``stabilizer train`` under torchrun: 2 CPU ranks over gloo, real processes.

Each test starts ``python -m torch.distributed.run --standalone --nproc_per_node 2``
on tests/ddp_worker.py, which is the real command line plus an optional NaN planted
on one rank (see that file).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import quiet

from stabilizer.config import TrainConfig
from stabilizer.distributed import RankVerdict, StepAgreement
from stabilizer.store import TraceStore, rank_store_paths
from stabilizer.train import train

WORKER = Path(__file__).with_name("ddp_worker.py")
FAULT_MODULE = "base_model.model.qformer.encoder.layer.1.intermediate_query.dense"
TINY_RUN = [
    "--max-steps", "6", "--max-train-samples", "64", "--max-eval-samples", "8",
    "--eval-batch-size", "8", "--save-every", "3", "--log-every", "2",
    "--warmup-steps", "2", "--lr", "1e-3", "--real-images-only",
    "--lora-targets", "attention", "--rank", "4", "--device", "cpu", "--trace",
]  # fmt: skip


def torchrun(run_dir: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent.parent), env.get("PYTHONPATH", "")])
    if fault:
        env["STABILIZER_TEST_FAULT"] = fault
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), "train", "--run-dir", str(run_dir), *TINY_RUN, *args,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def final_weights(run_dir: Path, step: int = 6) -> dict:
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors")


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def healthy_ddp(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A healthy 6-step run on 2 ranks with checkpoints at steps 3 and 6."""
    ddp_dir = tmp_path_factory.mktemp("healthy") / "ddp"
    return ddp_dir, torchrun(ddp_dir, "--batch-size", "4")


def test_two_ranks_train_the_same_adapters_as_one_process_with_the_global_batch(
    tmp_path, healthy_ddp
):
    ddp_dir, proc = healthy_ddp
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on each of 2 ranks" in proc.stdout

    single = TrainConfig.smoke(
        tmp_path / "single",
        max_steps=6,
        batch_size=8,
        save_every=3,
        device="cpu",
        trace=True,
        max_train_samples=64,
    )
    train(single, console=quiet())

    ddp, one = final_weights(ddp_dir), final_weights(tmp_path / "single")
    assert ddp.keys() == one.keys()
    for name in one:
        assert (ddp[name] - one[name]).abs().max().item() < 1e-6, name
    # The logged loss is the mean over ranks: the loss of the whole global batch.
    assert train_losses(ddp_dir) == pytest.approx(train_losses(tmp_path / "single"), rel=1e-5)
    # Checkpoints are written once (rank 0), each rank has its own store.
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == [
        "step-00000003",
        "step-00000006",
    ]
    stores = rank_store_paths(ddp_dir)
    assert [rank for rank, _ in stores] == [0, 1]
    for rank, path in stores:
        with TraceStore.open(path) as store:
            assert store.meta()["rank"] == rank
            assert store.meta()["world_size"] == 2
            assert list(store.steps()["status"]) == ["ok"] * 6
    assert (ddp_dir / "report.html").is_file()


def test_resume_under_torchrun_continues_exactly_and_replaces_the_later_steps(
    tmp_path, healthy_ddp
):
    full, _ = healthy_ddp
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000006")  # as if killed after step 5
    (cut / "eval.json").unlink()
    proc = torchrun(cut, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "step-00000003 at step 3" in proc.stdout
    resumed, uninterrupted = final_weights(cut), final_weights(full)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    for _, path in rank_store_paths(cut):
        with TraceStore.open(path) as store:
            assert list(store.steps()["step"]) == [0, 1, 2, 3, 4, 5]


def test_nan_on_one_rank_is_skipped_by_both_ranks_and_blamed_on_that_rank(tmp_path):
    run_dir = tmp_path / "ddp"
    proc = torchrun(
        run_dir,
        "--batch-size", "4", "--on-anomaly", "skip", "--no-replay",
        fault=f"1:3:{FAULT_MODULE}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Rank 1 prints its own diagnosis; rank 0 says where the NaN came from.
    assert "anomaly 1 on rank 1" in proc.stdout
    assert "rank 1 went non-finite first (forward pass" in proc.stdout

    rows = {}
    for rank, path in rank_store_paths(run_dir):
        with TraceStore.open(path) as store:
            status = list(store.steps()["status"])
            assert status == ["ok", "ok", "ok", "skipped", "ok", "ok"], (rank, status)
            assert [(a["step"], a["action"]) for a in store.actions()] == [(3, "skip")]
            (rows[rank],) = store.anomalies()
    origin, other = rows[1], rows[0]
    assert (origin["step"], origin["pass"], origin["cause"]) == (3, "forward", "forward-math")
    assert origin["evidence"]["module_path"] == FAULT_MODULE
    assert origin["evidence"]["first non-finite on rank(s)"] == [1]
    assert origin["evidence"]["ranks with non-finite values"] == [0, 1]
    assert (other["step"], other["cause"]) == (3, "other-rank")
    assert "rank 1 went non-finite first" in other["summary"]
    assert "trace.rank1.db" in other["fix"]
    assert other["evidence"]["rank"] == 0
    # The skipped update was undone on every replica: the adapters stayed finite.
    weights = final_weights(run_dir)
    assert all(math.isfinite(t.abs().max().item()) for t in weights.values())

    # The report merges the ranks: a rank table, every rank's card (the origin first),
    # a per-rank plot and the ranks on which each module went non-finite.
    page = (run_dir / "report.html").read_text()
    ranks = page[page.index('<section id="ranks">') : page.index('<section id="diagnosis">')]
    assert "<td>1</td><td><code>trace.rank1.db</code></td>" in ranks
    assert "born here" in ranks and "received" in ranks
    born, received = (
        page.index("rank 1: NaN/Inf at step 3"),
        page.index("rank 0: NaN/Inf at step 3"),
    )
    assert born < received
    assert (run_dir / "report" / "ranks.png").is_file()
    assert "non-finite on ranks" in page


def test_judging_late_under_torchrun_agrees_on_every_step_and_the_last_at_the_end(tmp_path):
    # warn, each step judged at the end of the next: the ranks still agree step by step
    # (the collective moves a step later), and the last step is judged after the loop.
    run_dir = tmp_path / "ddp"
    proc = torchrun(
        run_dir,
        "--batch-size", "4", "--on-anomaly", "warn", "--judge-late", "on", "--no-replay",
        fault=f"1:3:{FAULT_MODULE}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "each step judged at the end of the next" in proc.stdout
    first = {}
    for rank, path in rank_store_paths(run_dir):
        with TraceStore.open(path) as store:
            status = list(store.steps()["status"])
            # The update of step 3 was applied (warn): its NaN weights make 4 and 5 bad too.
            assert status == ["ok", "ok", "ok", "anomaly", "anomaly", "anomaly"], (rank, status)
            first[rank] = store.anomalies()[0]
    assert (first[1]["step"], first[1]["cause"]) == (3, "forward-math")
    assert first[1]["evidence"]["module_path"] == FAULT_MODULE
    assert (first[0]["step"], first[0]["cause"]) == (3, "other-rank")


def test_raise_stops_every_rank_in_the_same_step(tmp_path):
    run_dir = tmp_path / "ddp"
    proc = torchrun(run_dir, "--batch-size", "4", "--no-replay", fault=f"1:2:{FAULT_MODULE}")
    assert proc.returncode != 0
    # torchrun ends the job when the first rank exits, so only one closing line is sure
    # to be printed; the stores say what every rank did.
    assert "stopped: NaN/Inf at step 2 (" in proc.stderr
    causes = {}
    for rank, path in rank_store_paths(run_dir):
        with TraceStore.open(path) as store:
            assert list(store.steps()["status"]) == ["ok", "ok", "stopped"]
            assert [(a["step"], a["action"]) for a in store.actions()] == [(2, "raise")]
            causes[rank] = [a["cause"] for a in store.anomalies()]
    assert causes == {0: ["other-rank"], 1: ["forward-math"]}
    assert (run_dir / "report.html").is_file()  # written when stopped, too


def test_an_error_on_rank_0_stops_the_other_ranks_instead_of_hanging(tmp_path):
    run_dir = tmp_path / "ddp"
    (run_dir).mkdir()
    (run_dir / "config.json").write_text("{}")  # the folder already holds a run
    proc = torchrun(run_dir, "--batch-size", "4")
    assert proc.returncode != 0
    assert "holds a run that stopped before its first checkpoint" in proc.stderr
    assert "rank 0 failed to prepare the run folder" in proc.stderr


def test_the_origin_is_the_rank_whose_pass_failed_first():
    agreement = StepAgreement(
        (
            RankVerdict(0, True, pass_index=3),  # backward: received through all-reduce
            RankVerdict(1, True, pass_index=1),  # forward: born here
            RankVerdict(2, False),
            RankVerdict(3, True, pass_index=1),
        )
    )
    assert agreement.anomalous
    assert agreement.anomalous_ranks == [0, 1, 3]
    assert agreement.origin_ranks == [1, 3]
    assert StepAgreement((RankVerdict(0, False), RankVerdict(1, False))).origin_ranks == []


def test_trainer_callback_under_torchrun_agrees_on_the_skip_and_names_the_rank(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent.parent), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER.with_name("trainer_ddp_worker.py")), str(tmp_path), "1", "2",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "stabilizer"
    causes = {}
    for rank, path in rank_store_paths(run_dir):
        with TraceStore.open(path) as store:
            assert store.meta()["world_size"] == 2
            assert list(store.steps()["status"]) == ["ok", "ok", "skipped", "ok", "ok"]
            assert [(a["step"], a["action"]) for a in store.actions()] == [(2, "skip")]
            causes[rank] = [(a["cause"], a["evidence"]["module_path"]) for a in store.anomalies()]
    assert causes == {0: [("other-rank", None)], 1: [("forward-math", "encoder.2")]}
    assert '<section id="ranks">' in (run_dir / "report.html").read_text()
