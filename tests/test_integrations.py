"""The transformers Trainer callback: a real Trainer on CPU, a tiny model, faults planted
at a known optimizer step, and what the user sees (the error, the store, the report)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate.optimizer import AcceleratedOptimizer
from rich.console import Console
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.optimization import get_linear_schedule_with_warmup

from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.errors import ConfigError
from stabilizer.integrations import StabilizerCallback
from stabilizer.preflight import PreflightError
from stabilizer.probes.tracer import Tracer
from stabilizer.store import TraceStore

LR = 0.05


class TinyRegressor(nn.Module):
    """``x (8) -> Linear -> tanh -> Linear -> tanh -> head``; returns ``{"loss", "logits"}``
    like a Hugging Face model. Probed modules (no Q-Former: every module but the root):
    encoder, encoder.0, encoder.1 (the parameter-less Tanh), encoder.2, head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x))).squeeze(-1)

    def forward(self, x, labels=None):
        pred = self.predict(x)
        loss = None if labels is None else F.mse_loss(pred, labels)
        return {"loss": loss, "logits": pred}


class ShareLossRegressor(TinyRegressor):
    """Takes ``**kwargs``, so Trainer passes ``num_items_in_batch`` and each micro-batch
    loss is a share of the step's (summed over items, divided by the step's count)."""

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        pred = self.predict(x)
        loss = ((pred - labels) ** 2).sum() / num_items_in_batch
        return {"loss": loss, "logits": pred}


class Points(torch.utils.data.Dataset):
    """``n`` fixed samples ``{"x": (8,), "labels": float}``; ``drop`` leaves some out."""

    def __init__(self, n: int = 24, drop: range | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, 8, generator=g)
        y = torch.sin(x.sum(-1))
        keep = [i for i in range(n) if drop is None or i not in drop]
        self.x, self.y = x[keep], y[keep]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class NaNAt(TrainerCallback):
    """Writes NaN into the output of module ``name`` in every forward of optimizer step
    ``step`` (``state.global_step``): the step is known before its first micro-batch."""

    def __init__(self, model: nn.Module, name: str, step: int) -> None:
        self.step = step
        self.current = -1
        self.handle = model.get_submodule(name).register_forward_hook(self._hook)

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = state.global_step

    def _hook(self, module, args, output):
        if self.current == self.step and module.training:
            output = output.clone()
            output[0, 0] = math.nan
            return output
        return None


def quiet() -> Console:
    return Console(record=True, width=120, force_terminal=False)


def make_trainer(
    tmp_path, model, callbacks, *, steps=6, data=None, optimizers=None, eval_data=None, **args
):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=LR,
        lr_scheduler_type="linear",
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        train_sampling_strategy="sequential",  # batch k is samples 4k..4k+3
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(
        model=model,
        args=TrainingArguments(**{**defaults, **args}),
        train_dataset=data if data is not None else Points(),
        eval_dataset=eval_data,
        callbacks=callbacks,
        optimizers=optimizers or (None, None),
    )


def own_schedule(model: nn.Module, total_steps: int = 6):
    """AdamW with a linear decay over ``total_steps`` whatever max_steps the run has."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    return optimizer, get_linear_schedule_with_warmup(optimizer, 0, total_steps)


def logged(trainer: Trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "step" in entry]


def stabilizer_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_healthy_run_records_every_step_and_writes_the_report(tmp_path, monkeypatch):
    # The tracer's optimizer hooks must land on the torch optimizer accelerate wraps:
    # record which optimizer calls them.
    stepped_by = []
    real_after = Tracer._after_opt_step

    def spy(self, optimizer, args, kwargs):
        if optimizer is not None:  # None: measured by end_step, not by the optimizer
            stepped_by.append(type(optimizer))
        return real_after(self, optimizer, args, kwargs)

    monkeypatch.setattr(Tracer, "_after_opt_step", spy)
    # Probes are attached only inside optimizer steps: evaluation forwards are not traced.
    traced_forwards = []
    real_input_hook = Tracer._input_hook

    def count_forwards(self, module, args, kwargs):
        traced_forwards.append(module.training)
        return real_input_hook(self, module, args, kwargs)

    monkeypatch.setattr(Tracer, "_input_hook", count_forwards)
    model = TinyRegressor()
    console = quiet()
    trainer = make_trainer(
        tmp_path,
        model,
        [StabilizerCallback(console=console)],
        eval_strategy="steps",
        eval_steps=3,
        eval_data=Points(8),
        per_device_eval_batch_size=4,
    )
    trainer.train()

    assert len(logged(trainer, "eval_loss")) == 2  # two evaluations of two batches ran
    assert traced_forwards == [True] * 6

    run_dir = tmp_path / "out" / "stabilizer"
    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    assert stepped_by == [torch.optim.AdamW] * 6
    with TraceStore.open(run_dir / "trace.db") as store:
        steps = store.steps()
        assert steps["step"].tolist() == [0, 1, 2, 3, 4, 5]
        assert set(steps["status"]) == {"ok"} and steps["full"].all()
        # The loss is Trainer's own per-step loss; the lr the rate each step used.
        assert steps["loss"].tolist() == pytest.approx(logged(trainer, "loss"), rel=1e-5)
        assert steps["lr"].tolist() == pytest.approx(logged(trainer, "learning_rate"))
        # The grad norm is measured after Trainer's clip to max_grad_norm (1.0).
        clipped = [min(norm, 1.0) for norm in logged(trainer, "grad_norm")]
        assert steps["grad_norm"].tolist() == pytest.approx(clipped, rel=1e-4)
        names = [m.name for m in store.modules()]
        assert names == ["encoder", "encoder.0", "encoder.1", "encoder.2", "head"]
        _, absmax = store.module_stat("absmax", "fwd_out")
        assert absmax.shape == (6, 5) and (absmax > 0).all()
        _, grad_rms = store.module_stat("rms", "grad_out")
        assert (grad_rms > 0).all()
        _, param_grads = store.param_stat("grad_norm")
        _, ratios = store.param_stat("update_ratio")
        assert param_grads.shape == (6, 6) and (param_grads > 0).all()
        assert (ratios[:, [0, 2, 4]] > 0).all()  # the weight matrices moved every step
        meta = store.meta()
        assert meta["source"] == "transformers.Trainer" and meta["model_class"] == "TinyRegressor"
        assert meta["config"]["on_anomaly"] == "skip" and meta["config"]["precision"] == "fp32"
        assert meta["training_args"]["max_steps"] == 6 and meta["completed"] is True
        assert store.anomalies() == []
    assert (run_dir / "report.html").is_file()
    page = (run_dir / "report.html").read_text()
    assert "TinyRegressor" in page
    # Titled after the Trainer's output folder, not the "stabilizer" folder inside it.
    assert "<title>stabilizer report: out</title>" in page
    assert "tracing 5 modules and 6 trainable tensors" in console.export_text()
    # Every hook is gone with the run.
    assert stabilizer_hooks(model) == 0
    assert not trainer.optimizer.optimizer._optimizer_step_post_hooks


def test_nan_with_raise_stops_train_naming_module_and_step(tmp_path):
    model = TinyRegressor()
    fault = NaNAt(model, "encoder.2", step=2)
    console = quiet()
    trainer = make_trainer(
        tmp_path, model, [fault, StabilizerCallback(on_anomaly="raise", console=console)]
    )
    with pytest.raises(NumericalAnomalyError) as caught:
        trainer.train()

    message = str(caught.value)
    assert "training stopped at step 2" in message
    assert "NaN/Inf at step 2, forward pass in encoder.2" in message
    assert "module: encoder.2" in message and "fix:" in message
    assert caught.value.anomaly.module_path == "encoder.2"
    # Replayed from the forwards Trainer made: the fp32 copy (the fault's hook comes with
    # it) is non-finite too. (No op: the fault copies a NaN in, born in no op's output.)
    assert caught.value.anomaly.evidence["same step in fp32"].startswith("non-finite too")
    assert "replay" not in caught.value.anomaly.evidence
    run_dir = tmp_path / "out" / "stabilizer"
    with TraceStore.open(run_dir / "trace.db") as store:
        assert store.steps()["status"].tolist() == ["ok", "ok", "stopped"]
        (anomaly,) = store.anomalies()
        assert anomaly["step"] == 2 and anomaly["pass"] == "forward"
        assert store.modules()[anomaly["module_id"]].name == "encoder.2"
        assert [a["action"] for a in store.actions()] == ["raise"]
    # Stopped runs are reported too, and leave no hook behind (only the fault's own).
    assert (run_dir / "report.html").is_file()
    assert "report written to" in console.export_text()
    fault.handle.remove()
    assert stabilizer_hooks(model) == 0


def test_nan_with_skip_undoes_the_step_and_holds_the_schedule(tmp_path):
    # The faulty run: NaN in encoder.2 during step 3 (samples 12..15).
    model = TinyRegressor()
    callback = StabilizerCallback(console=quiet(), run_dir=tmp_path / "faulty", report=False)
    trainer = make_trainer(
        tmp_path,
        model,
        [NaNAt(model, "encoder.2", step=3), callback],
        optimizers=own_schedule(model),
    )
    trainer.train()

    # The reference: the same run without samples 12..15, one step fewer, same schedule.
    reference = TinyRegressor()
    ref_callback = StabilizerCallback(console=quiet(), run_dir=tmp_path / "ref", report=False)
    ref_trainer = make_trainer(
        tmp_path,
        reference,
        [ref_callback],
        steps=5,
        data=Points(drop=range(12, 16)),
        optimizers=own_schedule(reference),
    )
    ref_trainer.train()

    with TraceStore.open(tmp_path / "faulty" / "trace.db") as store:
        steps = store.steps()
        (anomaly,) = store.anomalies()
    with TraceStore.open(tmp_path / "ref" / "trace.db") as store:
        ref_lr = store.steps()["lr"].tolist()
    assert steps["status"].tolist() == ["ok", "ok", "ok", "skipped", "ok", "ok"]
    assert anomaly["step"] == 3 and anomaly["pass"] == "forward"
    assert callback.summary.skipped_steps == [3]
    # The schedule did not advance on step 3: step 4 ran at step 3's rate.
    assert steps["lr"].tolist() == pytest.approx(ref_lr[:4] + ref_lr[3:])
    assert trainer.lr_scheduler.last_epoch == ref_trainer.lr_scheduler.last_epoch == 5
    # Weights and optimizer state are as if batch 3 had never been seen.
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.isfinite(param).all(), name
        torch.testing.assert_close(param, ref, msg=name)
    assert "step 3 skipped" in callback.console.export_text()


@pytest.mark.parametrize("judge_late", ["off", "on"])
def test_nan_with_warn_goes_on_and_says_so_every_step(tmp_path, judge_late):
    # Judged late (each step at the end of the next, the last at train end): the same rows.
    model = TinyRegressor()
    callback = StabilizerCallback(
        on_anomaly="warn", judge_late=judge_late, console=quiet(), report=False
    )
    trainer = make_trainer(tmp_path, model, [NaNAt(model, "encoder.2", step=4), callback])
    trainer.train()

    with TraceStore.open(tmp_path / "out" / "stabilizer" / "trace.db") as store:
        assert store.steps()["status"].tolist() == ["ok"] * 4 + ["anomaly"] * 2
        assert [a["step"] for a in store.actions()] == [4, 5]
        causes = [a["cause"] for a in store.anomalies()]
    # Step 5 is blamed on the weights step 4 made NaN, not on the module that shows it.
    assert causes == ["forward-math", "weights-already-nonfinite"]
    assert not torch.isfinite(model.head.weight).all()  # warn applies the update
    assert "update applied anyway" in callback.console.export_text()


@pytest.mark.parametrize("model_class", [TinyRegressor, ShareLossRegressor])
def test_gradient_accumulation_records_one_row_per_optimizer_step(tmp_path, model_class):
    counted = []
    real_begin = Tracer.begin_step

    def spy(self, step, **kwargs):
        counted.append(step)
        return real_begin(self, step, **kwargs)

    model = model_class()
    callback = StabilizerCallback(console=quiet(), report=False)
    trainer = make_trainer(tmp_path, model, [callback], steps=3, gradient_accumulation_steps=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Tracer, "begin_step", spy)
        trainer.train()

    assert counted == [0, 1, 2]
    with TraceStore.open(tmp_path / "out" / "stabilizer" / "trace.db") as store:
        steps = store.steps()
    assert steps["step"].tolist() == [0, 1, 2]
    # Mean of the micro-batch losses, or their sum when each is a share (num_items_in_batch).
    assert steps["loss"].tolist() == pytest.approx(logged(trainer, "loss"), rel=1e-5)


def test_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    def run(resume=None):
        callback = StabilizerCallback(console=quiet(), report=False)
        trainer = make_trainer(
            tmp_path, TinyRegressor(), [callback], save_strategy="steps", save_steps=2
        )
        trainer.train(resume_from_checkpoint=resume)
        with TraceStore.open(tmp_path / "out" / "stabilizer" / "trace.db") as store:
            return store.steps(), store.meta()["completed"]

    straight, _ = run()
    resumed, completed = run(resume=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed["step"].tolist() == [0, 1, 2, 3, 4, 5] and completed is True
    assert resumed["loss"].tolist() == pytest.approx(straight["loss"].tolist(), rel=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"on_anomaly": "explode"},
            "--on-anomaly must be one of raise, skip, clip, rollback, warn",
        ),
        ({"trace_every": 0}, "--trace-every must be positive, got 0"),
        ({"on_warning": "loud"}, "--on-warning must be one of warn, raise, got 'loud'"),
        ({"max_anomalies": -1}, "--max-anomalies must be positive, got -1"),
        ({"probe": "encoder.(2"}, "probe 'encoder.(2' is not a valid regular expression"),
    ],
)
def test_bad_option_is_a_config_error_naming_it(options, message):
    with pytest.raises(ConfigError, match="StabilizerCallback: ") as caught:
        StabilizerCallback(**options)
    assert message in str(caught.value)


def test_probe_matching_no_module_stops_before_the_first_step(tmp_path):
    model = TinyRegressor()
    trainer = make_trainer(
        tmp_path, model, [StabilizerCallback(probe=r"decoder\..*", console=quiet())]
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"--probe 'decoder\\\.\.\*' matches no module"):
        trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_repair_under_trainer_stops_where_no_mechanical_fix_exists(tmp_path):
    # A NaN written into a module's output from finite inputs (math, not precision):
    # there is nothing to repair, so the run stops with the card instead of skipping.
    model = TinyRegressor()
    callback = StabilizerCallback(on_anomaly="repair", console=quiet(), report=False)
    trainer = make_trainer(tmp_path, model, [NaNAt(model, "encoder.2", step=2), callback])
    with pytest.raises(NumericalAnomalyError, match="no mechanical repair for forward-math"):
        trainer.train()
    assert callback.summary.repairs == [] and callback.summary.anomalies[0].step == 2


def test_preflight_stops_fp16_weights_under_adamw_before_the_first_step(tmp_path):
    model = TinyRegressor().half()  # trainable fp16 tensors, AdamW's default eps 1e-8
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    before = [p.detach().clone() for p in model.parameters()]
    callback = StabilizerCallback(console=quiet(), report=False)
    trainer = make_trainer(tmp_path, model, [callback], optimizers=(optimizer, None))
    with pytest.raises(PreflightError, match="fp16 under AdamW with eps=1e-08"):
        trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert callback.preflight_report.causes() == ["fp16-adam-eps"]


def test_loss_computed_outside_the_model_is_refused_with_the_reason(tmp_path):
    model = TinyRegressor()
    callback = StabilizerCallback(console=quiet(), report=False)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Points(),
        callbacks=[callback],
        # Trainer pops the labels and computes the loss itself: the model returns none.
        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: F.mse_loss(
            outputs["logits"], labels
        ),
    )
    with pytest.raises(ConfigError, match="TinyRegressor returned no loss in training"):
        trainer.train()
    assert callback.session is None and stabilizer_hooks(model) == 0
