"""Judging each step one step late (``judge_late``): the same diagnosis, a step later.

A step judged late has its readings copied to the host while the next step runs,
so no step ends in a host-device sync. What must not change is what the user is
told: every fault below is run twice, judged in its own step and judged late, and
both runs must name the same step, pass, module, cause and exact op (the replay runs
from the held step's own pre-step state, batch and gradients, not the next step's),
and write the same rows to the store. What does change is when: a late run says it
one step later, and the last step's verdict comes at close.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_watch import (
    Classifier,
    Regressor,
    batches,
    classifier_batches,
    overflowing_scaler_loop,
    quiet,
    seed_batch,
    seed_forward,
)

import stabilizer
from stabilizer.cli import main
from stabilizer.config import TraceSettings, judges_late
from stabilizer.errors import ConfigError
from stabilizer.models.loading import load_model
from stabilizer.models.lora import LoraSettings, apply_lora
from stabilizer.store import TraceStore


class FaultyRegressor(Regressor):
    """test_watch's Regressor with its fault armed by an argument of the call, so that
    the replay (which re-runs the step's recorded calls, a step later when judging
    late) meets the fault the step met."""

    def forward(self, x, labels=None, fault=False):
        self.fault.kind = "log" if fault else None
        return super().forward(x, labels)


def regressor_loop(run_dir, judge_late, *, faults=(2,), steps=4, after_step=None, **options):
    """The plain loop of test_watch, with a NaN-making fault at the steps in ``faults``.
    ``after_step(step, watch)`` runs right after each optimizer step."""
    model = FaultyRegressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options = {"on_anomaly": "warn", **options}
    with stabilizer.watch(
        model, opt, console=quiet(), run_dir=run_dir, judge_late=judge_late, **options
    ) as watch:
        for step, batch in enumerate(batches(steps)):
            model(**batch, fault=step in faults)["loss"].backward()
            opt.step()
            opt.zero_grad()
            if after_step is not None:
                after_step(step, watch)
    return watch


def seed_loop(run_dir, judge_late):
    """The classic failure (fp16 adapters under AdamW, eps 1e-8) in a custom forward
    that never calls the root model: the optimizer pass can only be replayed from the
    gradients the step stepped on, which the next step's backward has replaced."""
    loaded = load_model("tiny-instructblip-t5")
    model = apply_lora(loaded.model, LoraSettings(), adapter_dtype=None)
    model.half()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = seed_batch(model)
    batch["pixel_values"] = batch["pixel_values"].half()
    with stabilizer.watch(
        model,
        opt,
        console=quiet(),
        run_dir=run_dir,
        preflight="warn",
        on_anomaly="warn",
        judge_late=judge_late,
    ) as watch:
        for _ in range(3):
            seed_forward(model, batch).backward()
            opt.step()
            opt.zero_grad()
    return watch


def outside_loss_loop(run_dir, judge_late):
    """A loss computed outside the model over a fully masked row at step 1."""
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with stabilizer.watch(
        model, opt, console=quiet(), run_dir=run_dir, on_anomaly="warn", judge_late=judge_late
    ) as watch:
        for batch in classifier_batches(empty_row_at=1):
            logits = model(batch["ids"], batch["mask"])["logits"]
            watch.loss(F.cross_entropy(logits, batch["labels"])).backward()
            opt.step()
            opt.zero_grad()
    return watch


def amp_skip_loop(run_dir, judge_late):
    """Steps the GradScaler skips (said out loud, not anomalies): such a step ends at
    the next forward, not at an optimizer step."""
    from rich.console import Console

    console = Console(record=True, width=200)
    watch = overflowing_scaler_loop(
        console, run_dir=run_dir, on_anomaly="warn", judge_late=judge_late
    )
    assert "GradScaler skipped step 0" in console.export_text()
    return watch


def what_the_user_is_told(watch) -> list[tuple]:
    return [
        (a.step, a.pass_, a.module_path, a.cause, a.op, a.evidence.get("exact op"), a.warning)
        for a in watch.anomalies + watch.warnings
    ]


def completed_run_steps(run_dir) -> list[tuple]:
    store = TraceStore.open(run_dir / "trace.db")
    try:
        steps = store.steps()
        rows = list(zip(steps["step"].tolist(), steps["status"].tolist(), strict=True))
        assert store.meta()["completed"] is True
    finally:
        store.close()
    return rows


@pytest.mark.parametrize(
    "loop",
    [regressor_loop, seed_loop, outside_loss_loop, amp_skip_loop],
    ids=["forward", "optimizer", "loss", "gradscaler-skip"],
)
def test_a_step_judged_late_is_diagnosed_exactly_as_one_judged_in_its_step(tmp_path, loop):
    now = loop(tmp_path / "now", "off")
    late = loop(tmp_path / "late", "on")
    assert now.anomalies or loop is amp_skip_loop, "the fault must be found at all"
    assert what_the_user_is_told(late) == what_the_user_is_told(now)
    # The replay of the late run re-ran the held step, so its fp32 verdict is the same.
    assert [a.evidence.get("same step in fp32") for a in late.anomalies] == [
        a.evidence.get("same step in fp32") for a in now.anomalies
    ]
    assert completed_run_steps(tmp_path / "late") == completed_run_steps(tmp_path / "now")


def test_the_optimizer_pass_replay_of_a_late_step_uses_that_steps_gradients(tmp_path):
    late = seed_loop(tmp_path / "late", "on")
    first = late.anomalies[0]
    assert (first.step, first.pass_, first.cause) == (0, "optimizer", "fp16-adam-eps")
    assert first.op is not None and "updating" in first.evidence["exact op"]
    assert first.evidence["same step in fp32"].startswith("finite")


def test_a_late_run_says_it_one_step_later_and_the_last_step_at_close(tmp_path):
    seen: dict[int, list[int]] = {}

    def after_step(step, watch):
        seen[step] = [a.step for a in watch.anomalies]

    late = regressor_loop(tmp_path / "late", "on", faults=(1, 3), after_step=after_step)
    # Step 1's fault is judged when step 2 ends; step 3's, the last, when the watch closes.
    assert seen[1] == [] and seen[2] == [1] and seen[3][-1] == 2
    assert [a.step for a in late.anomalies] == [1, 2, 3]
    now = regressor_loop(tmp_path / "now", "off", faults=(1, 3), after_step=after_step)
    assert seen[1] == [1]  # judged in its own step
    assert [a.step for a in now.anomalies] == [1, 2, 3]


def test_too_many_anomalies_stop_a_late_run_at_the_same_step_and_keep_the_next(tmp_path):
    def stopped(judge_late):
        run = tmp_path / judge_late
        with pytest.raises(stabilizer.NumericalAnomalyError) as info:
            regressor_loop(run, judge_late, faults=(1,), steps=5, max_anomalies=1)
        return info.value.anomaly, stored_steps(run)

    now_anomaly, now_rows = stopped("off")
    late_anomaly, late_rows = stopped("on")
    assert (late_anomaly.step, late_anomaly.cause) == (now_anomaly.step, now_anomaly.cause)
    assert now_rows[-1] == (now_anomaly.step, "stopped")
    # The late run had begun the next step when it stopped: that step is kept too.
    assert late_rows[: len(now_rows)] == now_rows
    assert late_rows[len(now_rows)][0] == now_anomaly.step + 1


def stored_steps(run_dir) -> list[tuple]:
    store = TraceStore.open(run_dir / "trace.db")
    try:
        steps = store.steps()
        return list(zip(steps["step"].tolist(), steps["status"].tolist(), strict=True))
    finally:
        store.close()


def test_a_crash_after_a_faulty_step_still_judges_and_stores_it(tmp_path):
    class Crash(RuntimeError):
        pass

    def after_step(step, watch):
        if step == 2:
            raise Crash("the user's loop failed after step 2")

    with pytest.raises(Crash):  # the user's error, not replaced by the held verdict
        regressor_loop(tmp_path / "run", "on", faults=(2,), after_step=after_step)
    rows = stored_steps(tmp_path / "run")
    assert rows == [(0, "ok"), (1, "ok"), (2, "anomaly")]


def test_judge_late_is_refused_with_a_policy_that_acts_within_the_step():
    for options in ({"on_anomaly": "raise"}, {"on_anomaly": "skip"}, {"on_warning": "raise"}):
        with pytest.raises(ConfigError, match="--judge-late on needs --on-anomaly warn"):
            TraceSettings(judge_late="on", **{"on_anomaly": "warn", **options})
    with pytest.raises(ConfigError, match="--judge-late must be one of auto, on, off"):
        TraceSettings(judge_late="later")
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="stabilizer.watch: judge_late"):
        stabilizer.watch(model, opt, judge_late="on")  # on_anomaly="raise" by default


def test_auto_judges_late_only_where_it_saves_a_sync():
    warn = TraceSettings(on_anomaly="warn")
    assert judges_late(warn, torch.device("cuda", 0))
    assert not judges_late(warn, torch.device("cpu"))  # already on the host: no sync to save
    assert not judges_late(TraceSettings(), torch.device("cuda", 0))  # raise stops in-step
    assert judges_late(TraceSettings(on_anomaly="warn", judge_late="on"), torch.device("cpu"))
    assert not judges_late(
        TraceSettings(on_anomaly="warn", judge_late="off"), torch.device("cuda", 0)
    )


def test_the_cli_refuses_judge_late_with_raise_naming_the_options(tmp_path):
    result = CliRunner().invoke(
        main, ["train", "--trace", "--judge-late", "on", "--run-dir", str(tmp_path / "r")]
    )
    assert result.exit_code != 0
    assert "--judge-late on needs --on-anomaly warn" in result.output
    assert "--judge-late" in CliRunner().invoke(main, ["train", "--help"]).output


def test_stabilizer_train_judging_late_names_the_classic_failure_and_its_op(tmp_path):
    """Our own loop (recorded batches, replayed with their forward): the classic fp16
    Adam failure under --on-anomaly warn, judged in its step and judged late."""
    from test_train import quick_config

    from stabilizer.train import train

    def run(judge_late):
        cfg = quick_config(
            tmp_path / judge_late,
            adapter_dtype="fp16",
            preflight="warn",
            trace=True,
            on_anomaly="warn",
            judge_late=judge_late,
            max_steps=2,
            save_every=None,
            max_eval_samples=4,
        )
        console = quiet()
        result = train(cfg, console=console)
        return result.trace, stored_steps(cfg.run_dir)

    now, now_rows = run("off")
    late, late_rows = run("on")
    first = late.anomalies[0]
    assert (first.step, first.pass_, first.cause, first.op) == (
        0,
        "optimizer",
        "fp16-adam-eps",
        "addcdiv_",
    )
    assert [(a.step, a.pass_, a.cause, a.op) for a in late.anomalies] == [
        (a.step, a.pass_, a.cause, a.op) for a in now.anomalies
    ]
    assert late_rows == now_rows == [(0, "anomaly"), (1, "anomaly")]


def test_on_the_cpu_the_readings_are_read_where_they_are():
    from stabilizer.probes.hostcopy import HostCopies

    flat = torch.tensor([1.0, float("nan"), 3.0])
    copy = HostCopies().start(flat)
    assert copy.done()  # nothing in flight on a CPU
    values = copy.wait()
    assert values.tolist()[0] == 1.0 and values.tolist()[2] == 3.0 and values[1] != values[1]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_on_a_gpu_a_step_judged_late_ends_without_a_host_sync(tmp_path):
    """The sync counter on the step's own thread (forward, optimizer, judge): judged in
    its step, the readings' copy to the host is the step's one sync; judged late, none."""
    from stabilizer.probes.opcount import OpCounter

    def syncs(judge_late: str) -> int:
        model = Regressor().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        counter = OpCounter(opt)  # before the watch: its hooks come first
        data = [{k: v.cuda() for k, v in b.items()} for b in batches(3)]
        with stabilizer.watch(
            model,
            opt,
            console=quiet(),
            run_dir=tmp_path / judge_late,
            on_anomaly="warn",
            judge_late=judge_late,
            replay=False,
            preflight="off",
        ):
            for step, batch in enumerate(data):
                if step == 2:
                    counter.__enter__()
                model(**batch)["loss"].backward()
                opt.step()
                if step == 2:
                    counter.__exit__(None, None, None)
                opt.zero_grad()
        counter.remove()
        return sum(counter.syncs.values())

    assert syncs("off") == 1
    assert syncs("on") == 0


@cuda
def test_on_a_gpu_the_copy_to_the_host_is_started_and_read_later():
    from stabilizer.probes.hostcopy import HostCopies

    copies = HostCopies()
    flat = torch.arange(5, dtype=torch.float32, device="cuda")
    first = copies.start(flat)
    assert first.wait().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    second = copies.start(flat * 2)  # reuses the buffer the first gave back
    assert second.wait().tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert first.wait().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # its own copy, kept
