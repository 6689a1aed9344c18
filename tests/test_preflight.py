"""Preflight: each failure class named before step 0, and each prediction checked
against what torch really does with the same configuration."""

from __future__ import annotations

import functools
import io
import json

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from torch import nn
from torch.utils.checkpoint import checkpoint

import stabilizer
from stabilizer.cli import main
from stabilizer.config import TrainConfig
from stabilizer.detector.diagnosis import CAUSES
from stabilizer.models.loading import load_model
from stabilizer.models.lora import LoraSettings, apply_lora
from stabilizer.preflight import PreflightError, check_batches, check_checkpointing, preflight
from stabilizer.train import run_preflight


def quiet() -> Console:
    return Console(file=io.StringIO(), record=True, width=200)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-instructblip-t5")


def lora_model(tiny, **settings):
    import copy

    return apply_lora(copy.deepcopy(tiny.model), LoraSettings(**settings), adapter_dtype=None)


def adamw(model, **kw):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **kw)


def levels(report) -> dict[str, str]:
    return {f.cause: f.level for f in report.findings if f.cause}


# -- precision under the optimizer ------------------------------------------------------------


def test_the_classic_fp16_adam_eps_is_an_error_with_the_detectors_cause_and_fix(tiny):
    model = lora_model(tiny)
    model.half()  # the original report: cast after get_peft_model
    report = preflight(
        model, adamw(model, lr=1e-4), allowed=("qformer", "query_tokens", "language_projection")
    )
    [error] = report.errors
    assert error.cause == "fp16-adam-eps" and error.fix == CAUSES["fp16-adam-eps"].fix
    assert "eps=1e-08" in error.message and "lora_A" in error.message
    assert report.dtype_map["qformer"] == "fp16 frozen + fp16 trainable"
    with pytest.raises(PreflightError) as info:
        report.raise_for_errors()
    assert "Fix: Keep the adapters" in str(info.value)


def test_fp16_adam_with_a_representable_eps_warns_of_the_slow_underflow(tiny):
    model = lora_model(tiny)
    model.half()
    report = preflight(model, adamw(model, lr=1e-4, eps=1e-6))
    assert not report.errors
    assert levels(report)["fp16-adam-underflow"] == "warning"


def test_the_fp32_default_has_no_error_and_says_what_it_checked(tiny):
    model = lora_model(tiny)
    report = preflight(
        model, adamw(model, lr=1e-4), allowed=("qformer", "query_tokens", "language_projection")
    )
    assert not report.errors and not report.warnings
    assert {f.check for f in report.findings} >= {"optimizer", "lora"}
    assert report.dtype_map["optimizer state"].startswith("none yet")


def test_gradscaler_with_fp16_trainables_is_predicted_and_torch_agrees():
    layer = nn.Linear(4, 4).half()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    report = preflight(layer, opt, scaler=scaler)
    assert [f.cause for f in report.errors] == ["gradscaler-fp16-grads"]
    assert "Attempting to unscale FP16 gradients" in report.errors[0].message
    # What happens without the preflight: torch refuses at the first unscale.
    scaler.scale(layer(torch.ones(2, 4, dtype=torch.half)).float().sum()).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.step(opt)


@pytest.mark.parametrize(("lr", "lost"), [(1e-5, True), (1e-1, False)])
def test_bf16_updates_below_resolution_are_predicted_and_torch_agrees(lr, lost):
    torch.manual_seed(0)
    layer = nn.Linear(64, 64).bfloat16()
    with torch.no_grad():
        layer.weight.normal_(0, 1.0)
        layer.bias.normal_(0, 1.0)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
    report = preflight(layer, opt)
    assert ("bf16-update-lost" in levels(report)) is lost
    before = layer.weight.detach().clone()
    layer(torch.randn(8, 64, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    opt.step()
    changed = (layer.weight != before).float().mean().item()
    # Adam's first update is ~lr per element: below half an ulp it rounds away.
    assert (changed < 0.05) is lost, changed


def test_an_fp16_qformer_is_a_warning_not_an_error(tiny):
    model = lora_model(tiny)
    for name, p in model.named_parameters():
        if "qformer" in name and not p.requires_grad:
            p.data = p.data.half()
    report = preflight(model, adamw(model, lr=1e-4))
    assert levels(report)["activation-overflow"] == "warning" and not report.errors


# -- LoRA scope ------------------------------------------------------------------------------


def test_lora_on_the_lm_is_an_error_in_train_and_a_warning_around_your_loop(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    lm_only = get_peft_model(copy.deepcopy(tiny.model), LoraConfig(r=2, target_modules=["q"]))
    strict = preflight(lm_only, adamw(lm_only, lr=1e-4), allowed=("qformer",))
    messages = [f.message for f in strict.errors]
    assert any("outside the Q-Former" in m and "language_model" in m for m in messages)
    assert any("Q-Former is frozen" in m for m in messages)
    loose = preflight(lm_only, adamw(lm_only, lr=1e-4))
    assert not loose.errors and any("Q-Former is frozen" in f.message for f in loose.warnings)


# -- gradient checkpointing ------------------------------------------------------------------


class Block(nn.Module):
    """transformers' convention: ``gradient_checkpointing`` and its checkpoint function."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.gradient_checkpointing = True
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=reentrant)

    def forward(self, x):
        return self._gradient_checkpointing_func(self.inner, x)


class Net(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4).requires_grad_(False)  # frozen, like an LM's embeddings
        self.block = Block(reentrant)
        self.head = nn.Linear(4, 1)  # trains outside the checkpointed block

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


@pytest.mark.parametrize("reentrant", [True, False])
def test_reentrant_checkpointing_without_input_grads_is_predicted_and_torch_agrees(reentrant):
    net = Net(reentrant)
    findings = check_checkpointing(net)
    assert bool(findings) is reentrant
    if findings:
        assert "enable_input_require_grads" in findings[0].fix
    with pytest.warns(UserWarning) if reentrant else _nothing():
        net(torch.ones(2, 4)).sum().backward()
    # The prediction: the checkpointed block's trainable weight gets no gradient at all.
    assert (net.block.inner.weight.grad is None) is reentrant


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_an_input_require_grads_hook_clears_the_checkpointing_error():
    net = Net(reentrant=True)
    net._require_grads_hook = object()  # what enable_input_require_grads() leaves
    assert check_checkpointing(net) == []


# -- the first batches -----------------------------------------------------------------------


def test_batches_with_masked_labels_nan_pixels_and_dead_mask_rows():
    good = {
        "pixel_values": torch.zeros(2, 3, 4, 4),
        "labels": torch.tensor([[5, -100], [7, 8]]),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
    }
    assert [f.level for f in check_batches([good])] == ["ok"]
    nan = {**good, "pixel_values": torch.full((2, 3, 4, 4), float("nan"))}
    all_masked = {**good, "labels": torch.full((2, 2), -100)}
    one_masked = {**good, "labels": torch.tensor([[-100, -100], [7, 8]])}
    dead = {**good, "attention_mask": torch.tensor([[1, 1, 0], [0, 0, 0]])}
    found = {f.message.split(":")[0] + f.cause: f.level for f in check_batches([nan])}
    assert found == {"batch 0nonfinite-input": "error"}
    [f] = check_batches([good, all_masked])
    assert (f.level, f.cause, f.message[:7]) == ("error", "all-labels-masked", "batch 1")
    [f] = check_batches([one_masked])
    assert f.level == "warning" and "1 of 2 samples" in f.message
    [f] = check_batches([dead])
    assert f.level == "warning" and f.cause == "masked-softmax-row" and "1 row" in f.message


def test_a_quantized_model_without_bitsandbytes_is_skipped_cleanly():
    pytest.importorskip("transformers")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here: the skip path is not reachable")
    except ImportError:
        pass
    layer = nn.Linear(2, 2)
    layer.is_loaded_in_4bit = True
    [f] = [f for f in preflight(layer).findings if f.check == "quantization"]
    assert f.level == "ok" and "not checked" in f.message


# -- the faces: train, check, watch ----------------------------------------------------------


def test_train_stops_on_a_preflight_error_unless_told_to_warn(tiny, tmp_path):
    model = lora_model(tiny)
    model.half()  # fp16 adapters, but the config does not ask for the classic failure
    cfg = TrainConfig(run_dir=tmp_path)
    with pytest.raises(PreflightError, match="fp16 under AdamW"):
        run_preflight(cfg, model, adamw(model, lr=1e-4), None, [], quiet())
    warn = TrainConfig(run_dir=tmp_path, preflight="warn")
    report = run_preflight(warn, model, adamw(model, lr=1e-4), None, [], quiet())
    assert report.errors  # printed, not raised
    classic = TrainConfig(run_dir=tmp_path, adapter_dtype="fp16")
    console = quiet()
    run_preflight(classic, model, adamw(model, lr=1e-4), None, [], console)
    assert "reproduces it on purpose" in console.export_text()


QUICK = ["--max-train-samples", "16", "--batch-size", "4", "--lora-targets", "attention"]


def test_stabilizer_check_names_the_classic_failure_and_passes_the_default(tmp_path):
    runner = CliRunner()
    classic = runner.invoke(main, ["check", *QUICK, "--adapter-dtype", "fp16"])
    assert classic.exit_code == 1, classic.output
    assert "fp16 under AdamW" in classic.output and "error" in classic.output
    assert "--adapter-dtype fp32" in classic.output  # the fix column
    default = runner.invoke(main, ["check", *QUICK, "--run-dir", str(tmp_path / "r")])
    assert default.exit_code == 0, default.output
    assert "ready to train" in default.output and "qformer fp32 frozen + fp32" in default.output
    assert not (tmp_path / "r").exists()  # check writes nothing


def test_check_help_teaches_the_exit_status():
    result = CliRunner().invoke(main, ["check", "--help"])
    assert result.exit_code == 0 and "Exit status 1" in result.output


def test_watch_preflight_modes_and_the_package_level_check(tiny, tmp_path):
    model = lora_model(tiny)
    model.half()
    opt = adamw(model, lr=1e-4)
    with pytest.raises(stabilizer.PreflightError):
        stabilizer.watch(model, opt, console=quiet(), run_dir=tmp_path / "a").start()
    assert not (tmp_path / "a" / "trace.db").exists()  # stopped before the store opened
    console = quiet()
    with stabilizer.watch(model, opt, console=console, run_dir=tmp_path / "b", preflight="off"):
        pass
    assert "Preflight" not in console.export_text()
    with pytest.raises(Exception, match="preflight must be one of stop, warn, off"):
        stabilizer.watch(model, opt, preflight="maybe")
    report = stabilizer.check(model, opt)
    assert report.causes()[0] == "fp16-adam-eps"
    json.dumps(report.to_dict())  # preflight.json holds exactly this
