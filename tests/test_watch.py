"""``stabilizer.watch`` around loops stabilizer did not write: one ``with`` line each.

Every fault is planted at a known optimizer step and must be named with that step,
its pass, its module and its cause; the healthy loops must stay silent. The loops
are written the way users write them (plain PyTorch, AMP with a GradScaler, a custom
forward of InstructBLIP's parts, a loss computed outside the model).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from faults import NaNBackward
from rich.console import Console
from torch import nn

import stabilizer
from stabilizer.detector.diagnosis import CAUSES
from stabilizer.detector.session import TraceSession
from stabilizer.errors import ConfigError
from stabilizer.models.loading import load_model
from stabilizer.models.lora import LoraSettings, apply_lora
from stabilizer.preflight import PreflightError
from stabilizer.probes.tracer import Tracer
from stabilizer.store import TraceStore


def quiet() -> Console:
    return Console(file=None, quiet=True)


class Fault(nn.Module):
    """Identity until ``arm(kind)``: then ``log`` of a negative (NaN from finite inputs)
    or a x1e6 gain (an fp16 overflow) on every call. Owns no parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.kind: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "log":
            return torch.log(x - x.abs().max() - 1.0)
        if self.kind == "gain":
            return x * 1e6
        if self.kind == "exp":
            return torch.exp(x * 1e3)  # +Inf in fp32; the next Linear makes inf-inf = NaN
        return x


class Regressor(nn.Module):
    """``x (8) -> Linear -> tanh -> fault -> Linear``; returns ``{"loss", "logits"}`` when
    called with ``labels`` (like a Hugging Face model), the prediction otherwise."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(8, 16)
        self.fault = Fault()
        self.head = nn.Linear(16, 1)

    def forward(self, x, labels=None):
        pred = self.head(self.fault(torch.tanh(self.encoder(x)))).squeeze(-1)
        if labels is None:
            return pred
        return {"loss": F.mse_loss(pred.float(), labels), "logits": pred}


def batches(n: int = 4, size: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(size, 8, generator=g)
        out.append({"x": x, "labels": torch.sin(x.sum(-1))})
    return out


def plain_loop(model, optimizer, data, *, fault_at=None, kind="log", **options):
    """The user's loop, wrapped in the one line; returns the Watch."""
    with stabilizer.watch(model, optimizer, console=quiet(), **options) as watch:
        for step, batch in enumerate(data):
            model.fault.kind = kind if step == fault_at else None
            loss = model(**batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return watch


# -- plain PyTorch --------------------------------------------------------------------------


def test_a_healthy_plain_loop_is_silent_and_writes_the_store_and_report(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = plain_loop(model, opt, batches(), run_dir=tmp_path / "run")
    assert watch.anomalies == [] and watch.warnings == []
    assert watch.steps == 4
    store = TraceStore.open(tmp_path / "run" / "trace.db")
    steps = store.steps()
    assert steps["step"].tolist() == [0, 1, 2, 3]
    assert all(math.isfinite(v) for v in steps["loss"])  # the loss came from the output
    assert store.meta()["completed"] is True
    store.close()
    assert watch.report_path == tmp_path / "run" / "report.html"
    assert watch.report_path.is_file()


def test_invalid_math_in_a_plain_loop_names_step_pass_module_cause_and_op(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(stabilizer.NumericalAnomalyError) as info:
        plain_loop(model, opt, batches(), fault_at=2, run_dir=tmp_path / "run")
    a = info.value.anomaly
    assert (a.step, a.pass_, a.module_path, a.cause) == (2, "forward", "fault", "forward-math")
    assert a.op == "log"  # the replay re-ran the step from the recorded call
    assert "non-finite too" in a.evidence["same step in fp32"]  # math, not precision
    assert "fault" in a.card() and "fix:" in a.card()
    # The loop stopped in step 2: the update of step 2 was never judged good.
    assert (tmp_path / "run" / "report.html").is_file()


def test_an_fp32_overflow_then_inf_minus_inf_is_an_overflow_not_invalid_math(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(stabilizer.NumericalAnomalyError) as info:
        plain_loop(model, opt, batches(), fault_at=1, kind="exp", run_dir=tmp_path / "run")
    a = info.value.anomaly
    assert (a.step, a.pass_, a.module_path, a.cause) == (1, "forward", "fault", "float-overflow")
    assert a.op == "exp"
    assert "not invalid math" in a.summary


def test_a_nan_in_the_batch_is_the_input_pass(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(3)
    data[1]["x"][0, 0] = math.nan
    with pytest.raises(stabilizer.NumericalAnomalyError) as info:
        plain_loop(model, opt, data, run_dir=tmp_path / "run")
    a = info.value.anomaly
    assert (a.step, a.pass_, a.cause) == (1, "input", "nonfinite-input")
    assert a.evidence["non-finite inputs"] == ["x"]


def test_a_huge_learning_rate_without_a_scaler_warns_and_names_no_gradscaler(tmp_path):
    model = Regressor()
    opt = torch.optim.SGD(model.parameters(), lr=1e4)
    watch = plain_loop(model, opt, batches(2), run_dir=tmp_path / "run", on_anomaly="warn")
    first = watch.warnings[0]
    assert (first.step, first.pass_, first.cause) == (0, "optimizer", "update-too-large")
    assert "with no GradScaler in this loop" in first.summary
    # A warning does not stop a raise run: only on_warning="raise" does.
    model2 = Regressor()
    opt2 = torch.optim.SGD(model2.parameters(), lr=1e4)
    with pytest.raises(stabilizer.NumericalAnomalyError) as info:
        plain_loop(model2, opt2, batches(2), run_dir=tmp_path / "run2", on_warning="raise")
    assert info.value.anomaly.cause == "update-too-large" and info.value.anomaly.warning


def test_the_nan_names_the_warning_that_predicted_it(tmp_path):
    model = Regressor()
    opt = torch.optim.SGD(model.parameters(), lr=1e4)  # diverges, then overflows
    with pytest.raises(stabilizer.NumericalAnomalyError) as info:
        plain_loop(model, opt, batches(30), run_dir=tmp_path / "run")
    a = info.value.anomaly
    assert a.step > 0 and not a.warning
    # The loss overflowed after the weights grew by orders of magnitude: divergence.
    assert (a.pass_, a.cause) == ("loss", "divergence-overflow")
    assert "the warning of step 0 (update-too-large" in a.evidence["predicted by"]
    assert f"{a.step} step(s) ahead" in a.evidence["predicted by"]


def test_skip_undoes_the_update_in_the_users_loop_and_training_goes_on(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen = {}

    def fault_at_2(step):
        model.fault.kind = "log" if step == 2 else None
        if step == 2:
            seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    with stabilizer.watch(
        model, opt, console=quiet(), run_dir=tmp_path / "run", on_anomaly="skip"
    ) as watch:
        for step, batch in enumerate(batches(4)):
            fault_at_2(step)
            model(**batch)["loss"].backward()
            opt.step()
            if step == 2:
                seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
    assert watch.skipped_steps == [2]
    for name, value in seen["before"].items():
        assert torch.equal(seen["after"][name], value), name  # the NaN update was undone
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert watch.steps == 4


def test_rollback_without_a_scheduler_lowers_the_optimizers_lr(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    watch = plain_loop(
        model, opt, batches(4), fault_at=1, run_dir=tmp_path / "run", on_anomaly="rollback"
    )
    assert len(watch.anomalies) == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_accumulation_is_one_step_per_optimizer_step_and_eval_is_not_a_step(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(6)
    with stabilizer.watch(model, opt, console=quiet(), run_dir=tmp_path / "run") as watch:
        for i in range(0, 6, 2):
            for batch in data[i : i + 2]:
                (model(**batch)["loss"] / 2).backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                model(data[0]["x"])  # evaluation inside the loop
    assert watch.steps == 3 and watch.anomalies == []
    store = TraceStore.open(tmp_path / "run" / "trace.db")
    assert store.steps()["step"].tolist() == [0, 1, 2]
    store.close()


# -- AMP with a GradScaler ------------------------------------------------------------------


def amp_loop(model, optimizer, data, *, fault_at=None, misuse=False, init_scale=2.0**16, **options):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    with stabilizer.watch(model, optimizer, scaler=scaler, console=quiet(), **options) as watch:
        for step, batch in enumerate(data):
            model.fault.kind = "gain" if step == fault_at else None
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(**batch)["loss"]
            scaler.scale(loss).backward()
            if misuse:
                optimizer.step()  # the bug: scaled gradients applied
            else:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    return watch


def test_a_healthy_amp_loop_with_correct_gradscaler_use_is_silent(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = amp_loop(model, opt, batches(3), run_dir=tmp_path / "run")
    assert watch.anomalies == [] and watch.warnings == [] and watch.steps == 3


def test_fp16_overflow_under_autocast_is_an_activation_overflow_of_that_module(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(stabilizer.NumericalAnomalyError) as info:
        amp_loop(model, opt, batches(4), fault_at=1, run_dir=tmp_path / "run")
    a = info.value.anomaly
    # The compute dtype came from autocast, seen by the hooks: not "invalid math".
    assert (a.step, a.pass_, a.module_path, a.cause) == (
        1,
        "forward",
        "fault",
        "activation-overflow",
    )
    assert "float16" in a.summary


def test_optimizer_step_instead_of_scaler_step_is_named_gradscaler_misuse(tmp_path):
    model = Regressor()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with pytest.raises(stabilizer.NumericalAnomalyError) as info:
        amp_loop(model, opt, batches(3), misuse=True, run_dir=tmp_path / "run", on_warning="raise")
    a = info.value.anomaly
    # x65536 overflowed the fp16 backward; the inf gradients were then applied.
    assert (a.step, a.pass_, a.cause, a.warning) == (0, "backward", "gradscaler-misuse", False)
    assert "x65536" in a.summary and "scaler.step(optimizer)" in a.fix
    assert "overflowed in the scaled backward" in a.summary
    assert a.evidence["first non-finite"].startswith("NaN/Inf at step 0, backward pass")
    # A smaller scale stays finite: the scaled update is applied, a warning names it.
    model = Regressor()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with pytest.raises(stabilizer.NumericalAnomalyError) as info:
        amp_loop(
            model,
            opt,
            batches(3),
            misuse=True,
            init_scale=2.0**10,
            run_dir=tmp_path / "small",
            on_warning="raise",
        )
    a = info.value.anomaly
    assert (a.step, a.pass_, a.cause, a.warning) == (0, "optimizer", "gradscaler-misuse", True)
    assert "x1024" in a.summary
    # The same loop used correctly says nothing of the kind.
    model = Regressor()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    watch = amp_loop(model, opt, batches(3), run_dir=tmp_path / "ok", on_warning="raise")
    assert watch.warnings == [] and watch.anomalies == []


def overflowing_scaler_loop(console, **options):
    """AMP whose GradScaler starts at a scale that overflows the fp16 backward: the
    scaler skips its steps (no optimizer step runs), which are not anomalies."""
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    with stabilizer.watch(model, opt, scaler=scaler, console=console, **options) as watch:
        for batch in batches(3):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(**batch)["loss"]
            scaler.scale(loss * 1e4).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    return watch


def test_a_step_the_gradscaler_skips_is_said_and_does_not_stop_the_run(tmp_path):
    console = Console(record=True, width=200)
    watch = overflowing_scaler_loop(console, run_dir=tmp_path / "run")
    assert watch.anomalies == []
    assert "GradScaler skipped step 0" in console.export_text()
    assert watch.steps == 3


# -- a custom forward of InstructBLIP's parts (the original report) -------------------------------


def seed_forward(model, batch):
    """vision tower -> Q-Former -> language_projection -> T5 called with inputs_embeds."""
    inner = model.base_model.model
    images = inner.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    queries = inner.query_tokens.expand(images.shape[0], -1, -1)
    n = queries.shape[1]
    mask = torch.ones(images.shape[0], n + batch["qformer_ids"].shape[1], dtype=torch.long)
    hidden = inner.qformer(
        input_ids=batch["qformer_ids"],
        attention_mask=mask,
        query_embeds=queries,
        encoder_hidden_states=images,
    ).last_hidden_state[:, :n]
    features = inner.language_projection(hidden)
    text = inner.language_model.get_input_embeddings()(batch["input_ids"])
    embeds = torch.cat([features, text.to(features.dtype)], dim=1)
    attention = torch.cat([torch.ones(embeds.shape[0], n, dtype=torch.long), batch["mask"]], 1)
    return inner.language_model(
        inputs_embeds=embeds, attention_mask=attention, labels=batch["labels"]
    ).loss


def seed_batch(model, rows: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    cfg = model.base_model.model.config
    size = cfg.vision_config.image_size
    return {
        "pixel_values": torch.randn(rows, 3, size, size, generator=g),
        "qformer_ids": torch.randint(5, 50, (rows, 6), generator=g),
        "input_ids": torch.randint(5, 50, (rows, 7), generator=g),
        "mask": torch.ones(rows, 7, dtype=torch.long),
        "labels": torch.randint(5, 50, (rows, 3), generator=g),
    }


def test_the_seeds_custom_forward_with_fp16_adapters_is_the_classic_fp16_adam_eps(tmp_path):
    loaded = load_model("tiny-instructblip-t5")
    model = apply_lora(loaded.model, LoraSettings(), adapter_dtype=None)
    model.half()  # the original report: cast after get_peft_model, adapters now fp16
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = seed_batch(model)
    batch["pixel_values"] = batch["pixel_values"].half()
    # By default the preflight stops this loop before step 0, naming the same cause...
    with pytest.raises(PreflightError) as stopped:
        stabilizer.watch(model, opt, console=quiet(), run_dir=tmp_path / "stopped").start()
    assert stopped.value.report.causes() == ["fp16-adam-eps", "activation-overflow"]
    assert "lora_A" in str(stopped.value) and "preflight='warn'" in str(stopped.value)
    # ...and with preflight="warn" it trains on, so the detector shows it happen.
    with (
        pytest.raises(stabilizer.NumericalAnomalyError) as info,
        stabilizer.watch(
            model, opt, console=quiet(), run_dir=tmp_path / "run", preflight="warn"
        ) as watch,
    ):
        for _ in range(3):
            loss = seed_forward(model, batch)  # the root model is never called
            loss.backward()
            opt.step()
            opt.zero_grad()
    a = info.value.anomaly
    assert (a.step, a.pass_, a.cause) == (0, "optimizer", "fp16-adam-eps")
    assert watch.preflight_report.errors[0].fix == CAUSES[a.cause].fix  # one fix, both places
    assert a.evidence["predicted by"] == (
        "the preflight, before step 0 (fp16-adam-eps), 1 step(s) ahead"
    )
    assert "lora_A" in a.module_path and a.module_path.startswith("base_model.model.qformer")
    assert "eps=1e-08 rounds to 0" in a.summary  # Adam's eps came from the optimizer
    # Replayed from the gradients the optimizer stepped on (no forward to re-run).
    assert a.op is not None and "updating" in a.evidence["exact op"]
    assert a.evidence["same step in fp32"].startswith("finite")


# -- any model: a user's masked attention-pooling head ------------------------------------------


class AttentionPool(nn.Module):
    """Owns no weights: scores each position against the mean, masks padding with -inf."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = (hidden * hidden.mean(1, keepdim=True)).sum(-1)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return (weights.unsqueeze(-1) * hidden).sum(1)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.encoder = nn.Linear(8, 8)
        self.pool = AttentionPool()
        self.head = nn.Linear(8, 3)

    def forward(self, ids, mask, labels=None):
        logits = self.head(self.pool(torch.tanh(self.encoder(self.embed(ids))), mask))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def classifier_batches(empty_row_at: int | None) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    out = []
    for step in range(3):
        mask = torch.ones(4, 5, dtype=torch.bool)
        mask[:, 3:] = False
        if step == empty_row_at:
            mask[1] = False  # an all-padding sample: nothing to attend to
        out.append(
            {
                "ids": torch.randint(0, 20, (4, 5), generator=g),
                "mask": mask,
                "labels": torch.randint(0, 3, (4,), generator=g),
            }
        )
    return out


def test_a_fully_masked_row_in_a_users_pooling_head_is_its_own_cause(tmp_path):
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with (
        pytest.raises(stabilizer.NumericalAnomalyError) as info,
        stabilizer.watch(model, opt, console=quiet(), run_dir=tmp_path / "run"),
    ):
        for batch in classifier_batches(empty_row_at=1):
            model(**batch)["loss"].backward()
            opt.step()
            opt.zero_grad()
    a = info.value.anomaly
    # The parameter-less head is probed (no Q-Former: every module is).
    assert (a.step, a.pass_, a.module_path, a.cause) == (1, "forward", "pool", "masked-softmax-row")
    assert a.op == "_softmax" and "1 fully masked row" in a.summary
    assert "finfo(dtype).min" in a.fix


def test_with_the_loss_outside_the_model_the_forward_is_still_replayed(tmp_path):
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with (
        pytest.raises(stabilizer.NumericalAnomalyError) as info,
        stabilizer.watch(model, opt, console=quiet(), run_dir=tmp_path / "run") as watch,
    ):
        for batch in classifier_batches(empty_row_at=1):
            logits = model(batch["ids"], batch["mask"])["logits"]
            watch.loss(F.cross_entropy(logits, batch["labels"])).backward()
            opt.step()
            opt.zero_grad()
    a = info.value.anomaly
    assert (a.step, a.module_path, a.cause, a.op) == (1, "pool", "masked-softmax-row", "_softmax")


def test_the_same_classifier_with_a_valid_position_in_every_row_is_silent(tmp_path):
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with stabilizer.watch(model, opt, console=quiet(), run_dir=tmp_path / "run") as watch:
        for batch in classifier_batches(empty_row_at=None):
            model(**batch)["loss"].backward()
            opt.step()
            opt.zero_grad()
    assert watch.anomalies == [] and watch.warnings == []


# -- a loss computed outside the model ------------------------------------------------------------


def test_a_loss_outside_the_model_over_masked_labels_is_all_labels_masked(tmp_path):
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = classifier_batches(empty_row_at=None)
    data[2]["labels"] = torch.full((4,), -100)  # every label of step 2 masked
    with (
        pytest.raises(stabilizer.NumericalAnomalyError) as info,
        stabilizer.watch(model, opt, console=quiet(), run_dir=tmp_path / "run") as watch,
    ):
        for batch in data:
            logits = model(batch["ids"], batch["mask"])["logits"]
            loss = watch.loss(F.cross_entropy(logits, batch["labels"]), labels=batch["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad()
    a = info.value.anomaly
    assert (a.step, a.pass_, a.cause) == (2, "loss", "all-labels-masked")
    assert a.evidence["label tokens in batch"] == 0


def test_the_root_returning_a_nan_loss_is_not_a_forward_anomaly(tmp_path):
    """A peft-style wrapper whose child returns the loss first in its output."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Classifier()

        def forward(self, **kwargs):
            return self.model(**kwargs)

    model = Wrapper()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = classifier_batches(empty_row_at=None)
    data[1]["labels"] = torch.full((4,), -100)
    with (
        pytest.raises(stabilizer.NumericalAnomalyError) as info,
        stabilizer.watch(model, opt, console=quiet(), run_dir=tmp_path / "run"),
    ):
        for batch in data:
            model(**batch)["loss"].backward()
            opt.step()
            opt.zero_grad()
    a = info.value.anomaly
    assert (a.step, a.pass_, a.cause) == (1, "loss", "all-labels-masked")


# -- the tracer under id reuse --------------------------------------------------------------------


class Shift(nn.Module):
    """``x + bias``: an add saves neither input for backward, so nothing keeps ``x``."""

    def __init__(self, bad: bool = False) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(8))
        self.bad = bad

    def forward(self, x):
        y = x + self.bias
        return NaNBackward.apply(y) if self.bad else y


class Chain(nn.Module):
    """Six ``Shift`` layers, each called on a fresh temporary (``h * 2``, which autograd
    does not keep): it dies right after the call, and CPython may hand its id to a
    later temporary within the same step."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Shift(bad=i == bad) for i in range(6))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x * 2)
        return x


def test_a_nan_gradient_is_credited_to_its_module_when_tensor_ids_are_reused(monkeypatch):
    import stabilizer.probes.tracer as tracer_module

    # Whether CPython reuses an id depends on its allocator; make every tensor share one
    # id, the limit of reuse, so the test does not depend on luck.
    monkeypatch.setattr(tracer_module, "id", lambda obj: 7, raising=False)
    model = Chain(bad=4)
    x = torch.randn(2, 8, requires_grad=True)
    with Tracer(model, pattern=r"layers\.\d") as tracer:
        tracer.begin_step(0, full=True)
        loss = model(x).sum()
        loss.backward()
        record = tracer.end_step(loss=loss)
    names = [m.name for m in tracer.modules]
    bad_in = [names[i] for i in record.nonfinite_sites()["grad_in"]]
    # layers.4's backward made the NaN: its input gradient is the first non-finite one,
    # and layers.5, after it, got and passed on finite gradients.
    assert bad_in[0] == "layers.4"
    assert record.finite["grad_in"][names.index("layers.5")]
    assert record.order["grad_in"][names.index("layers.5")] == 0  # and was measured first


# -- the API a user meets ----------------------------------------------------------------------------


def test_bad_arguments_fail_naming_the_argument(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="optimizer must be a torch.optim.Optimizer"):
        stabilizer.watch(model, "adam")
    with pytest.raises(ConfigError, match="on_anomaly must be one of"):
        stabilizer.watch(model, opt, on_anomaly="explode")
    with pytest.raises(ConfigError, match="trace_every must be positive"):
        stabilizer.watch(model, opt, trace_every=0)
    frozen = torch.optim.SGD([nn.Parameter(torch.ones(1), requires_grad=False)], lr=1)
    with pytest.raises(ConfigError, match="holds no tensor that requires grad"):
        stabilizer.watch(model, frozen, run_dir=tmp_path).start()


def test_hooks_are_removed_after_the_block_and_outputs_are_unchanged(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = batches(1)[0]["x"]
    before = model(x)
    plain_loop(model, opt, [], run_dir=tmp_path / "run")
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] + [
        len(opt._optimizer_step_pre_hooks),
        len(opt._optimizer_step_post_hooks),
    ]
    assert sum(hooks) == 0
    assert torch.equal(model(x), before)


def test_trace_session_needs_only_model_and_optimizer_and_takes_a_torch_dtype(tmp_path):
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8)
    session = TraceSession(
        model=model, optimizer=opt, run_dir=tmp_path, compute_dtype=torch.float16
    )
    assert session.detector.context.compute_dtype == "float16"
    assert session.settings.adam_eps == 1e-8  # read from the optimizer
    assert len(session.before.params) == 4
    session.close()
    with pytest.raises(ConfigError, match="compute_dtype"):
        TraceSession(model=model, optimizer=opt, run_dir=tmp_path, compute_dtype="int8")


def test_watch_and_the_error_are_importable_from_the_top_level():
    import stabilizer.watcher  # noqa: F401  (a submodule must not shadow the function)

    assert callable(stabilizer.watch)
    from stabilizer.detector.policy import NumericalAnomalyError

    assert stabilizer.NumericalAnomalyError is NumericalAnomalyError


def test_probes_detector_and_the_watch_never_import_the_training_loop():
    import subprocess
    import sys

    code = (
        "import sys, stabilizer, stabilizer.watcher, stabilizer.detector.session, "
        "stabilizer.detector.replay, stabilizer.probes.tracer; "
        "print('stabilizer.train' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
