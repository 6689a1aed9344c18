"""The nan-guard pytest plugin, exercised in real pytest runs (pytester)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch  # noqa: F401
import torch._dynamo  # noqa: F401

# Imported here, before pytester snapshots sys.modules: an in-process inner run
# that imported them first would unload them, and torch cannot be imported twice.

pytest_plugins = ["pytester"]

# Helpers the inner test files import: tiny models that go non-finite on demand.
MODELS = """
import os
import torch  # noqa: F401
from torch import nn


class LogShift(nn.Module):
    def forward(self, x):
        return torch.log(x - 10)  # NaN for x < 10


class Net(nn.Module):
    def __init__(self, bad=False):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = LogShift() if bad else nn.Tanh()
        self.fc2 = nn.Linear(8, 2)
        seeded(self)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class BadBackward(nn.Module):
    def forward(self, x):
        return NanGrad.apply(x)


def seeded(model):
    # A local generator, not torch.manual_seed: that imports torch._dynamo, which
    # pytester would unload after the inner run and fail to import twice.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def batch():
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
"""


@pytest.fixture
def run(pytester):
    pytester.makepyfile(models=MODELS)

    def run(source, *args):
        pytester.makepyfile(test_inner="import pytest, torch\nfrom models import *\n" + source)
        return pytester.runpytest("-p", "no:randomly", *args)

    return run


NAN_FORWARD = """
def test_forward_nan():
    Net(bad=True)(batch()).sum()
"""


def test_clean_tests_pass(run):
    result = run(
        """
def test_clean():
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    model(batch()).sum().backward()
    opt.step()
""",
        "--nan-guard",
    )
    result.assert_outcomes(passed=1)


def test_forward_nan_names_module_and_cause(run):
    result = run(NAN_FORWARD, "--nan-guard")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*nan-guard: non-finite output in forward of "
            "module 'act' (LogShift), call 1 of that module",
            "*input (finite): shape [[]3, 8[]] float32, abs-max *, mean *",
            "*output: shape [[]3, 8[]] float32, 24 NaN, 0 Inf of 24",
            "*likely cause: invalid math on finite inputs*",
        ]
    )
    # The first offender only: not fc2 or Net, whose inputs were already NaN.
    assert "module 'fc2'" not in result.stdout.str()


def test_nan_weight_names_parameters(run):
    result = run(
        """
def test_w():
    model = Net()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    model(batch())
""",
        "--nan-guard",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*forward of module 'fc2' (Linear)*", "*own parameters are non-finite (weight)*"]
    )


def test_fp16_overflow_cause(run):
    result = run(
        """
def test_overflow():
    lin = torch.nn.Linear(2, 2).half()
    with torch.no_grad():
        lin.weight.fill_(60000.0)
    lin(torch.full((1, 2), 2.0, dtype=torch.float16))
""",
        "--nan-guard",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*module 'Linear' (Linear)*", "*float16 overflow*65504*"])


def test_backward_nan(run):
    result = run(
        """
def test_backward():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), BadBackward(), torch.nn.Linear(4, 1))
    model(batch()).sum().backward()
""",
        "--nan-guard",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*non-finite gradient in backward of module '1' (BadBackward), call 1*",
            "*gradient w.r.t. output: finite",
            "*likely cause: gradient overflow or an invalid derivative*",
        ]
    )


def test_gradient_checkpointing_sees_the_same_forward_with_the_guard(run):
    """Non-reentrant checkpointing compares what the forward saved with what the
    recompute saves; a check that saved tensors for backward (isfinite on a tensor
    that requires grad) made them differ. The guard's checks are invisible to autograd."""
    result = run(
        """
from torch.utils.checkpoint import checkpoint

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))

def test_checkpointed():
    block, head = seeded(Block()), torch.nn.Linear(4, 1)
    x = batch().requires_grad_()
    h = checkpoint(block, x, use_reentrant=False)
    head(h).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

def test_checkpointed_nan_backward_is_still_named():
    block = seeded(Block())
    x = batch().requires_grad_()
    h = checkpoint(lambda t: BadBackward()(block(t)), x, use_reentrant=False)
    h.sum().backward()
""",
        "--nan-guard",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*non-finite gradient in backward of module*(BadBackward)*"])
    assert "CheckpointError" not in result.stdout.str()


def test_optimizer_nan(run):
    result = run(
        """
def test_step():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=float("inf"))
    model(batch()).sum().backward()
    opt.step()
""",
        "--nan-guard",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*non-finite parameter after optimizer step of SGD (lr=inf)",
            "*parameter 'weight': shape [[]1, 4[]] float32*",
            "*gradients before the step: finite",
            "*likely cause: the step made finite parameters non-finite*lr=inf",
        ]
    )


def test_fp16_adam_eps(run):
    result = run(
        """
def test_adam():
    model = torch.nn.Linear(4, 1).half()
    opt = torch.optim.AdamW(model.parameters(), eps=1e-8)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
""",
        "--nan-guard",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*optimizer step of AdamW*", "*float16 optimizer state*eps*"])


def test_disabled_by_default_and_opt_out(run):
    run(NAN_FORWARD).assert_outcomes(passed=1)
    result = run("@pytest.mark.allow_nan" + NAN_FORWARD, "--nan-guard")
    result.assert_outcomes(passed=1)


def test_marker_and_ini(run, pytester):
    result = run("@pytest.mark.nan_guard" + NAN_FORWARD + NAN_FORWARD.replace("nan()", "nan2()"))
    result.assert_outcomes(failed=1, passed=1)
    pytester.makeini("[pytest]\nnan_guard = true\n")
    run(NAN_FORWARD).assert_outcomes(failed=1)


def test_fixture_scopes_to_one_model(run):
    result = run(
        """
def test_scoped(nan_guard):
    guarded = nan_guard(Net())
    Net(bad=True)(batch())   # not guarded: passes
    guarded(batch())
    bad = nan_guard(Net(bad=True))
    bad(batch())
"""
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*forward of module 'act' (LogShift)*"])


def test_ignore_pattern(run):
    result = run(NAN_FORWARD, "--nan-guard", "--nan-guard-ignore", "fc9,act")
    result.assert_outcomes(passed=1)


def test_what_nan_only(run):
    source = """
def test_inf():
    lin = torch.nn.Linear(2, 2).half()
    with torch.no_grad():
        lin.weight.fill_(60000.0)
    lin(torch.full((1, 2), 2.0, dtype=torch.float16))  # +inf only
"""
    run(source, "--nan-guard", "--nan-guard-what", "nan").assert_outcomes(passed=1)
    run(source, "--nan-guard").assert_outcomes(failed=1)


def test_ops_mode_catches_functional_code(pytester):
    # Separate processes: a dispatch mode is process-wide state. (A flaky failure here
    # once came from OpWatch judging torch.empty, whose uninitialised memory can hold
    # NaN bits; ops without floating inputs are no longer judged.)
    pytester.makepyfile(models=MODELS)

    def run(source, *args):
        pytester.makepyfile(test_inner="import pytest, torch\nfrom models import *\n" + source)
        return pytester.runpytest_subprocess("-p", "no:randomly", *args)

    source = """
def test_functional():
    x = batch()
    y = torch.sqrt(x - 5)          # outside any module
    torch.full((2,), float("-inf"))  # a mask: ignored
"""
    run(source, "--nan-guard").assert_outcomes(passed=1)
    result = run(source, "--nan-guard", "--nan-guard-ops")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*non-finite output of op sqrt*outside any guarded module"])
    # Inside a module, the module report also names the op.
    result = run(NAN_FORWARD, "--nan-guard", "--nan-guard-ops")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*module 'act' (LogShift)*", "*first op: log (aten.log.default)*"])


def test_warn_dtype(run):
    result = run(
        """
def test_big():
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.fill_(20000.0)
    lin(torch.ones(1, 2))
""",
        "--nan-guard",
        "--nan-guard-warn-dtype",
        "float16",
    )
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*NanGuardWarning*past half the float16 limit*"])


def test_golden_record_then_drift(run, pytester, monkeypatch):
    source = """
import os
def test_golden():
    model = Net()
    with torch.no_grad():
        model.fc2.weight.mul_(float(os.environ.get("SCALE", "1")))
    model(batch())
"""
    run(source, "--nan-guard-record").assert_outcomes(passed=1)
    golden = json.loads((pytester.path / ".nan_guard_golden.json").read_text())
    stats = golden["tests"]["test_inner.py::test_golden"]
    assert set(stats) == {"Net", "fc1", "act", "fc2"} and set(stats["fc2"]) == {"absmax", "rms"}

    run(source, "--nan-guard").assert_outcomes(passed=1)
    monkeypatch.setenv("SCALE", "2")
    result = run(source, "--nan-guard")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "nan-guard: statistics drifted from the golden file*",
            "*layer 'fc2' absmax: recorded *, now * (*% > rtol 0.1)",
        ]
    )
    assert "layer 'fc1'" not in result.stdout.str()
    run(source, "--nan-guard", "--nan-guard-rtol", "5").assert_outcomes(passed=1)


def test_no_torch_at_startup_when_disabled(pytester):
    pytester.makepyfile(
        """
import sys
def test_light():
    assert "stabilizer.pytest_plugin" in sys.modules
    assert "torch" not in sys.modules
"""
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=1)


# ===================================================== false failures on suites we did not write


def sections(result, *names: str) -> list[str]:
    """Each named test's failure section of the report."""
    out = result.stdout.str()
    found = []
    for name in names:
        start = out.index(f" {name} ___")
        end = min(
            [
                i
                for i in (out.find(" ___", start + len(name) + 5), out.find("short test summary"))
                if i > 0
            ]
        )
        found.append(out[start:end])
    return found


def test_a_skip_after_a_nan_stays_a_skip(run):
    result = run(
        """
def test_skips():
    Net(bad=True)(batch())
    pytest.skip("this backend is not supported")

@pytest.mark.xfail(reason="known")
def test_xfails():
    Net(bad=True)(batch())
    raise AssertionError("known bug")

def test_errors():
    Net(bad=True)(batch())
    raise ValueError("a symptom of the NaN")
""",
        "--nan-guard",
    )
    # The skip and the xfail keep their verdicts; an error after a NaN is the guard's.
    result.assert_outcomes(skipped=1, xfailed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_errors*", "*forward of module 'act' (LogShift)*"])


def test_parameters_in_a_parameter_dict_are_the_modules_own(run):
    result = run(
        """
class DictLoRA(torch.nn.Module):
    \"\"\"A LoRA layer that keeps its adapters in ParameterDicts, as peft-style code does.\"\"\"

    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(4, 4)
        self.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.ones(2, 4))})
        self.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.ones(4, 2))})

    def forward(self, x):
        return self.base(x) + x @ self.lora_A["default"].T @ self.lora_B["default"].T

def test_dict_lora():
    layer = DictLoRA()
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = float("nan")
    layer(batch())
""",
        "--nan-guard",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*forward of module 'DictLoRA'*", "*own parameters are non-finite (lora_B.default)*"]
    )


def test_failure_location_points_at_the_test_not_the_plugin(run, pytester):
    source = """
def helper():
    return Net(bad=True)


def test_located():
    model = helper()
    x = batch()
    model(x)  # the forward that makes the NaN: line 11 of the test file
    assert True
"""
    result = run(source, "--nan-guard", "--tb=line", f"--junitxml={pytester.path / 'j.xml'}")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "pytest_plugin.py" not in out
    # --tb=line: file:line: the headline, without the node id pytest already printed.
    result.stdout.fnmatch_lines(
        ["*test_inner.py:11: nan-guard: non-finite output in forward of module 'act'*"]
    )
    xml = (pytester.path / "j.xml").read_text()
    assert "test_inner.py::test_located" not in xml.split("<failure")[1].split(">")[0]
    assert xml.count("likely cause") == 1  # the full text once, the message attr a headline
    assert 'message="nan-guard: non-finite output in forward of module' in xml


def test_an_overflow_that_turns_into_nan_is_called_an_overflow(run):
    result = run(
        """
class ScaleThenMask(torch.nn.Module):
    def forward(self, x):
        h = x * 1000.0          # overflows float16: +-inf
        return h * (h - h)       # inf * (inf - inf) = NaN, the output holds no Inf

def test_overflow_chain():
    ScaleThenMask()(torch.full((2, 4), 100.0, dtype=torch.float16))

def test_invalid():
    Net(bad=True)(batch())
""",
        "--nan-guard",
    )
    result.assert_outcomes(failed=2)
    chain, invalid = sections(result, "test_overflow_chain", "test_invalid")
    assert "likely cause: overflow inside the module" in chain and "finite in float64" in chain
    assert "invalid math" not in chain
    assert "likely cause: invalid math" in invalid


def test_a_documented_per_test_way_to_allow_a_known_overflow(run):
    conv = """
def make_conv():
    conv = torch.nn.Conv1d(1, 1, 3).half()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    return conv

{marker}
def test_conv_does_not_raise():
    make_conv()(torch.arange(0, 30000, 1000, dtype=torch.float16).view(1, 1, -1))
"""
    failed = run(conv.format(marker=""), "--nan-guard")
    failed.assert_outcomes(failed=1)
    # The failure says how to allow it.
    failed.stdout.fnmatch_lines(
        ['*to allow it: @pytest.mark.allow_nan(modules="Conv1d", reason="...")*']
    )
    allowed = '@pytest.mark.allow_nan(modules="Conv1d", reason="fp16 overflow is expected")'
    run(conv.format(marker=allowed), "--nan-guard").assert_outcomes(passed=1)
    run(conv.format(marker=""), "--nan-guard", "--nan-guard-ignore", "Conv1d").assert_outcomes(
        passed=1
    )
    # Allowing one module type does not turn the guard off for the rest of the test.
    still = conv.format(marker=allowed).replace(
        "make_conv()(", "Net(bad=True)(batch()); make_conv()("
    )
    run(still, "--nan-guard").assert_outcomes(failed=1)
    bad = run(conv.format(marker='@pytest.mark.allow_nan(modules="(")'), "--nan-guard")
    bad.stdout.fnmatch_lines(["*allow_nan(modules=...) '(':*"])


# --nan-guard-ops: a dispatch mode is process-wide state, so these run in a subprocess.
OPS_CASES = """
import pytest, torch
from models import *


class NaNBackwardMasked(torch.autograd.Function):
    \"\"\"A backward that makes a NaN (0/0) and masks it before returning.\"\"\"

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        ratio = g * 0 / (g * 0)                  # NaN everywhere, short-lived
        return torch.where(torch.isnan(ratio), g * 2, ratio)


class MaskedLog(torch.nn.Module):
    def forward(self, x):
        return torch.where(x > 0, torch.log(x), torch.zeros_like(x))  # log(-1) masked


class Adapter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(NaNBackwardMasked.apply(x))


def test_meta_device():
    lin = torch.nn.Linear(4, 4, device="meta")
    out = lin(torch.empty(2, 4, device="meta"))
    assert out.shape == (2, 4) and out.device.type == "meta"


def test_sparse_tensors():
    i = torch.tensor([[0, 1, 2], [2, 0, 1]])
    s = torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0, 3.0]), (3, 3))
    dense = torch.sparse.mm(s, torch.ones(3, 2))
    assert (s * 2 + s).coalesce().values().sum() == 18 and dense.shape == (3, 2)
    lin = torch.nn.Linear(3, 3)
    lin(s.to_dense()).sum().backward()


def test_uninitialised_memory_is_not_judged():
    x = batch()
    buf = torch.empty_like(x)              # any bits, NaN included
    buf[:, :2] = x[:, :2]                  # written in part only
    strided = x.new_empty_strided((3, 4), (4, 1))
    strided.fill_(1.0)                     # fully written: judged from here on
    assert torch.isfinite(strided * 2).all()
    out = torch.empty(3, 4)
    torch.mul(x, 2, out=out)
    assert torch.isfinite(out).all()


def test_masked_nan_inside_a_module_forward():
    MaskedLog()(torch.tensor([[-1.0, 2.0], [3.0, -4.0]])).sum()


def test_masked_nan_inside_an_adapters_backward():
    model = torch.nn.Sequential(Adapter(), torch.nn.Linear(4, 1))
    model(batch()).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
"""

NAN_FILL = """
import pytest, torch
from torch.utils._python_dispatch import TorchDispatchMode

UNINIT = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided"}


class NaNForUninitialised(TorchDispatchMode):
    \"\"\"Makes every uninitialised tensor hold NaN bits: the worst an allocator can do.\"\"\"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name.rpartition("::")[2] in UNINIT and out.is_floating_point():
            if out.device.type != "meta":
                out.fill_(float("nan"))
        return out


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    # Entered before the guard's op watch, so the watch sees the NaN bits.
    with NaNForUninitialised():
        return (yield)
"""


def test_ops_mode_has_no_false_failures_on_meta_sparse_uninitialised_and_masked_nan(pytester):
    pytester.makepyfile(models=MODELS, test_ops=OPS_CASES)
    pytester.makeconftest(NAN_FILL)
    for args in (["--nan-guard"], ["--nan-guard", "--nan-guard-ops"]):
        result = pytester.runpytest_subprocess("-p", "no:randomly", *args)
        result.assert_outcomes(passed=5)
        assert "nan-guard" not in result.stdout.str()


def test_ops_mode_still_names_a_nan_that_leaves_the_module(pytester):
    pytester.makepyfile(models=MODELS)
    pytester.makepyfile(
        test_leak="""
import torch
from models import *

class LogLeak(torch.nn.Module):
    def forward(self, x):
        return torch.log(x).clamp(max=5.0)   # log(-1): the NaN reaches the output

def test_leak():
    LogLeak()(torch.tensor([[1.0, -1.0]]))
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--nan-guard", "--nan-guard-ops")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*forward of module 'LogLeak' (LogLeak)*", "*first op: log (aten.log.default)*"]
    )


SUITE = Path(__file__).parent / "guarded_suite" / "suite_models.py"

CANARY = """
import torch

class ShiftedLog(torch.nn.Module):
    def forward(self, x):
        return torch.log(x - 10)  # NaN from finite inputs

def test_canary_nan_is_still_caught():
    torch.nn.Sequential(torch.nn.Linear(2, 2), ShiftedLog())(torch.ones(1, 2))
"""


@pytest.mark.parametrize(
    "guard", [["--nan-guard"], ["--nan-guard", "--nan-guard-ops"]], ids=["guard", "ops"]
)
def test_realistic_model_suite_has_no_false_failures(pytester, guard):
    """tests/guarded_suite: tiny transformers/peft model tests (LoRA training with and
    without gradient checkpointing, SDPA vs eager, fp16/bf16, generate with padding,
    meta device, sparse gradients, ParameterDict adapters, uninitialised buffers, a
    skip). They pass without the guard, and must pass the same way with it."""
    pytester.makepyfile(test_suite=SUITE.read_text(), test_zcanary=CANARY)
    plain = pytester.runpytest_subprocess("-p", "no:randomly", "-k", "not canary")
    plain.assert_outcomes(passed=18, skipped=1)
    guarded = pytester.runpytest_subprocess("-p", "no:randomly", *guard)
    # The same outcomes, and the guard is live: the canary's NaN is caught.
    guarded.assert_outcomes(passed=18, skipped=1, failed=1)
    guarded.stdout.fnmatch_lines(["FAILED test_zcanary.py::test_canary_nan_is_still_caught*"])


def test_a_guarded_pass_does_not_drive_pythons_garbage_collector(run):
    """A guarded pass keeps its calls and gradient hooks alive until it is judged;
    under Python's default threshold they set off young collections every step, and
    every few dozen steps a full one over the whole test process. While a test is
    guarded the first threshold is raised; it is put back afterwards, and a threshold
    the test sets itself is kept."""
    result = run(
        """
import gc

from torch import nn


def deep():
    layers = []
    for _ in range(60):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    return nn.Sequential(*layers)


def young_collections(steps=5):
    model = deep()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 16)
    counts = []
    gc.callbacks.append(lambda phase, info: phase == "start" and counts.append(info))
    try:
        for _ in range(steps):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
    finally:
        gc.callbacks.pop()
    return len(counts)


def test_guarded():
    print("YOUNG_GUARDED", young_collections(), "THRESHOLD", gc.get_threshold()[0])


@pytest.mark.allow_nan
def test_unguarded():
    assert gc.get_threshold()[0] == 700
    print("YOUNG_UNGUARDED", young_collections())


def test_sets_its_own():
    gc.set_threshold(5_000, 10, 10)


@pytest.mark.allow_nan
def test_after():
    assert gc.get_threshold()[0] == 5_000
    gc.set_threshold(700, 10, 10)
""",
        "--nan-guard",
        "-s",
    )
    result.assert_outcomes(passed=4)
    out = result.stdout.str()
    guarded = int(out.split("YOUNG_GUARDED ")[1].split()[0])
    unguarded = int(out.split("YOUNG_UNGUARDED ")[1].split()[0])
    # The same five steps: unguarded they allocate little; guarded, with the default
    # threshold, they would set off one young collection every few hundred objects.
    assert guarded <= 1, out
    assert unguarded <= 2, out
    assert "THRESHOLD 10000" in out
