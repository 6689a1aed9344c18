"""pytest plugin: fail a test at the first NaN/Inf a model produces.

Loaded in every pytest run of the environment through the ``pytest11`` entry
point, and inert unless enabled: nothing here imports torch until a test is
guarded. Enable it with

- ``pytest --nan-guard`` (or ini ``nan_guard = true``) for every test,
- ``@pytest.mark.nan_guard`` for one test,
- the ``nan_guard`` fixture for one model: ``nan_guard(model)`` guards that model
  for the rest of the test;

and opt a test out with ``@pytest.mark.allow_nan``.

A guarded test fails, naming the first module whose inputs were finite and
whose output was not (forward), the first module whose gradient w.r.t. its
output was finite and w.r.t. its input was not (backward), or the parameter an
optimizer step made non-finite (optimizer). ``--nan-guard-ops`` also watches
every aten op, so NaN made by functional code outside modules is caught.

Every check syncs the host with the device (``torch.isfinite(t).all()``): that
is fine in a test, and is why this is a test tool, not a training-loop one.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path

import pytest

GOLDEN_DEFAULT = ".nan_guard_golden.json"
_GUARD = pytest.StashKey["object"]()
_GOLDEN_NEW = pytest.StashKey[dict]()


class NanGuardWarning(UserWarning):
    """An activation came close to the largest value of ``--nan-guard-warn-dtype``."""


# --------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nan-guard", "stabilizer: fail tests at the first NaN/Inf")
    group.addoption(
        "--nan-guard",
        action="store_true",
        default=None,
        help="Guard every test: fail at the first non-finite value in forward, backward "
        "or an optimizer step (also ini 'nan_guard = true').",
    )
    group.addoption(
        "--nan-guard-ops",
        action="store_true",
        default=False,
        help="Also watch every aten op (a TorchDispatchMode), to catch NaN/+Inf made "
        "outside modules; -inf-only outputs (masks) are ignored. Slow.",
    )
    group.addoption(
        "--nan-guard-what",
        choices=("nan", "nan+inf"),
        default="nan+inf",
        help="What counts as non-finite (default: nan+inf).",
    )
    group.addoption(
        "--nan-guard-ignore",
        action="append",
        default=[],
        metavar="REGEX",
        help="Module paths to ignore (full match; repeatable or comma-separated).",
    )
    group.addoption(
        "--nan-guard-warn-dtype",
        default=None,
        metavar="DTYPE",
        help="Warn (NanGuardWarning) when an activation passes half of DTYPE's largest "
        "value, e.g. float16 (32752).",
    )
    group.addoption(
        "--nan-guard-record",
        action="store_true",
        default=False,
        help="Record per-layer output statistics (abs-max, RMS) of guarded tests into the "
        "golden file; later --nan-guard runs fail when they drift.",
    )
    group.addoption(
        "--nan-guard-golden",
        default=None,
        metavar="PATH",
        help=f"Golden statistics file (default: {GOLDEN_DEFAULT} in rootdir).",
    )
    group.addoption(
        "--nan-guard-rtol",
        type=float,
        default=0.1,
        help="Relative tolerance for golden statistics (default 0.1).",
    )
    parser.addini("nan_guard", "Guard every test against NaN/Inf.", type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nan_guard: fail this test at the first NaN/Inf (stabilizer plugin)"
    )
    config.addinivalue_line("markers", "allow_nan: turn the stabilizer NaN guard off for this test")


def _settings(config: pytest.Config) -> dict:
    ignore = [p for opt in config.getoption("nan_guard_ignore") for p in opt.split(",") if p]
    for pattern in ignore:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise pytest.UsageError(f"--nan-guard-ignore '{pattern}': {exc}") from exc
    warn_dtype = config.getoption("nan_guard_warn_dtype")
    if warn_dtype not in (None, "float16", "bfloat16", "float32"):
        raise pytest.UsageError(
            f"--nan-guard-warn-dtype '{warn_dtype}': use float16, bfloat16 or float32"
        )
    golden = config.getoption("nan_guard_golden")
    golden = (
        Path(config.invocation_params.dir, golden)
        if golden
        else Path(config.rootpath, GOLDEN_DEFAULT)
    )
    return {
        "ops": config.getoption("nan_guard_ops"),
        "nan_only": config.getoption("nan_guard_what") == "nan",
        "ignore": re.compile("|".join(f"(?:{p})" for p in ignore)) if ignore else None,
        "warn_dtype": warn_dtype,
        "record": config.getoption("nan_guard_record"),
        "golden": golden,
        "rtol": config.getoption("nan_guard_rtol"),
    }


def _enabled_for(item: pytest.Item) -> bool:
    if item.get_closest_marker("allow_nan") is not None:
        return False
    config = item.config
    return bool(
        config.getoption("nan_guard")
        or config.getini("nan_guard")
        or config.getoption("nan_guard_record")
        or item.get_closest_marker("nan_guard") is not None
    )


# --------------------------------------------------------------------------- hooks


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    guard = None
    if _enabled_for(item):
        guard = _new_guard(item)
        guard.install(None)
    try:
        result = yield
    except BaseException as exc:
        guard = item.stash.get(_GUARD, None)
        message = guard.finish() if guard is not None else None
        if message:
            # The guard's report names the cause; the test's own error is a symptom.
            raise pytest.fail.Exception(message, pytrace=False) from exc
        raise
    guard = item.stash.get(_GUARD, None)
    message = guard.finish() if guard is not None else None
    if message:
        pytest.fail(message, pytrace=False)
    return result


@pytest.fixture
def nan_guard(request: pytest.FixtureRequest):
    """``nan_guard(model)``: fail the test at the first NaN/Inf ``model`` produces.

    Guards ``model``'s modules, their gradients and (after each optimizer step)
    its parameters for the rest of the test. Off under ``@pytest.mark.allow_nan``.
    """
    item = request.node

    def attach(model):
        if item.get_closest_marker("allow_nan") is not None:
            return model
        guard = item.stash.get(_GUARD, None)
        if guard is None:
            guard = _new_guard(item)
            guard.install(model)
        else:
            guard.add_scope(model)
        return model

    yield attach
    guard = item.stash.get(_GUARD, None)
    if guard is not None:
        guard.uninstall()


def pytest_sessionfinish(session: pytest.Session) -> None:
    new = session.config.stash.get(_GOLDEN_NEW, None)
    if not new:
        return
    path = _settings(session.config)["golden"]
    data = _read_golden(path)
    data.setdefault("tests", {}).update(new)
    data["version"] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)  # atomic: a crashed run never leaves half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_golden(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise pytest.UsageError(f"nan-guard golden file {path} is unreadable: {exc}") from exc


def _new_guard(item: pytest.Item):
    config = item.config
    settings = _settings(config)
    golden = None
    if not settings["record"] and settings["golden"].exists():
        golden = _read_golden(settings["golden"]).get("tests", {}).get(item.nodeid)
    guard = _Guard(item.nodeid, settings, golden)
    item.stash[_GUARD] = guard
    if settings["record"]:
        guard.on_stats = lambda stats: config.stash.setdefault(_GOLDEN_NEW, {}).__setitem__(
            item.nodeid, stats
        )
    return guard


# --------------------------------------------------------------------------- the guard


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class _Guard:
    """Per-test state: global module/optimizer hooks, checks, first failure."""

    def __init__(self, nodeid: str, settings: dict, golden: dict | None) -> None:
        self.nodeid = nodeid
        self.s = settings
        self.golden = golden
        self.collect_stats = settings["record"] or golden is not None
        self.on_stats = None
        self.failure: str | None = None
        self.handles: list = []
        self.names: dict[int, tuple[str, object]] = {}  # id(module) -> (path, module)
        self.param_names: dict[int, str] = {}
        self.scope: set[int] | None = None  # module ids, None: every module
        self.scope_params: set[int] | None = None
        self.calls: dict[int, int] = {}
        self.pending: dict[int, list] = {}
        self.stats: dict[str, list[float]] = {}  # path -> [sum absmax, sum rms, n]
        self.warned: set[str] = set()
        self.ignored_bad = 0  # event counter when an ignored module last went non-finite
        self.events = 0
        self.grads_finite = True
        self.params_before: set[int] = set()
        self.grad_out_ok: dict[tuple[int, int], bool] = {}
        self.watch = None
        self.installed = False

    # ---- setup
    def install(self, model) -> None:
        import torch
        import torch.optim.optimizer as optim_hooks
        from torch.nn.modules import module as module_hooks

        self.torch = torch
        if model is not None:
            self.scope, self.scope_params = set(), set()
            self.add_scope(model)
        self.handles += [
            module_hooks.register_module_forward_pre_hook(self._pre),
            module_hooks.register_module_forward_hook(self._post),
            optim_hooks.register_optimizer_step_pre_hook(self._opt_pre),
            optim_hooks.register_optimizer_step_post_hook(self._opt_post),
        ]
        if self.s["ops"]:
            from stabilizer.detector.replay import OpWatch

            self.watch = OpWatch()
            self.watch.active = True
            self.watch.__enter__()
        self.installed = True

    def add_scope(self, model) -> None:
        self._register(model)
        if self.scope is not None:
            self.scope.update(id(m) for m in model.modules())
            self.scope_params.update(id(p) for p in model.parameters())

    def uninstall(self) -> None:
        if not self.installed:
            return
        self.installed = False
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.watch is not None:
            self.watch.__exit__(None, None, None)

    def _register(self, root) -> None:
        root_name = type(root).__name__
        for name, module in root.named_modules():
            self.names.setdefault(id(module), (name or root_name, module))
        for name, param in root.named_parameters():
            self.param_names.setdefault(id(param), name)

    def _path(self, module) -> str:
        entry = self.names.get(id(module))
        if entry is None:
            self._register(module)  # the outermost module called first names its children
            entry = self.names[id(module)]
        return entry[0]

    # ---- checks
    def _bad(self, t) -> bool:
        # One host sync per tensor: acceptable in tests, and skipped after the first failure.
        if self.s["nan_only"]:
            return bool(self.torch.isnan(t).any())
        return not bool(self.torch.isfinite(t).all())

    def _floats(self, value) -> list:
        from torch.utils._pytree import tree_flatten

        flat, _ = tree_flatten(value)
        return [
            t
            for t in flat
            if isinstance(t, self.torch.Tensor) and t.is_floating_point() and t.numel()
        ]

    def _active(self, module) -> bool:
        if self.failure is not None or not self.installed:
            return False
        if self.scope is not None and id(module) not in self.scope:
            return False
        # Activation checkpointing re-runs forwards inside backward: not new calls.
        return self.torch._C._current_graph_task_id() == -1

    def _pre(self, module, args):
        if not self._active(module):
            return None
        self.events += 1
        self._path(module)  # outer modules are called first: they name their children
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1
        tensors = self._floats(args)
        ok = not any(self._bad(t) for t in tensors)
        info = {"ok": ok, "event": self.events, "call": self.calls[id(module)], "inputs": []}
        if ok:
            # Described now: an in-place op inside the module could change them later.
            with self.torch.no_grad():
                for t in tensors[:3]:
                    d = t.detach()
                    info["inputs"].append(
                        (
                            list(t.shape),
                            str(t.dtype).replace("torch.", ""),
                            float(d.abs().max()),
                            float(d.float().mean()),
                        )
                    )
        self.pending.setdefault(id(module), []).append(info)
        return None

    def _post(self, module, args, output):
        stack = self.pending.get(id(module))
        if not stack or not self._active(module):
            if stack:
                stack.pop()
            return None
        info = stack.pop()
        path = self._path(module)
        outputs = self._floats(output)
        ignored = self.s["ignore"] is not None and self.s["ignore"].fullmatch(path)
        bad = [t for t in outputs if self._bad(t)]
        if bad and ignored:
            self.ignored_bad = self.events
        elif bad and info["ok"] and self.ignored_bad < info["event"]:
            self.failure = self._forward_message(module, path, info, bad[0])
            return None
        if bad or ignored:
            return None
        if self.collect_stats or self.s["warn_dtype"]:
            self._measure(path, outputs[0] if outputs else None)
        for t in outputs:
            if t.requires_grad:
                t.register_hook(self._grad_out_hook(module, path, info["call"]))
        for t in self._floats(args):
            if t.requires_grad:
                t.register_hook(self._grad_in_hook(module, path, info["call"]))
        return None

    def _measure(self, path, t) -> None:
        if t is None:
            return
        with self.torch.no_grad():
            d = t.detach().double()
            absmax, rms = float(d.abs().max()), float(d.square().mean().sqrt())
        if self.collect_stats:
            acc = self.stats.setdefault(path, [0.0, 0.0, 0])
            acc[0] += absmax
            acc[1] += rms
            acc[2] += 1
        dtype = self.s["warn_dtype"]
        if dtype and path not in self.warned:
            limit = self.torch.finfo(getattr(self.torch, dtype)).max
            if absmax > limit / 2:
                self.warned.add(path)
                warnings.warn(
                    NanGuardWarning(
                        f"nan-guard: {self.nodeid}: module '{path}' output abs-max "
                        f"{_fmt(absmax)} is past half the {dtype} limit ({_fmt(limit)})"
                    ),
                    stacklevel=2,
                )

    def _grad_out_hook(self, module, path, call):
        def hook(grad):
            key = (id(module), call)
            if self.failure is None and self.installed:
                self.grad_out_ok[key] = self.grad_out_ok.get(key, True) and not self._bad(grad)
            return None

        return hook

    def _grad_in_hook(self, module, path, call):
        def hook(grad):
            if self.failure is not None or not self.installed:
                return None
            out_ok = self.grad_out_ok.get((id(module), call), True)
            if out_ok and self._bad(grad):
                self.failure = self._backward_message(module, path, call, grad)
            return None

        return hook

    def _opt_pre(self, optimizer, args, kwargs):
        if self.failure is not None or not self.installed:
            return
        self.grads_finite = True
        self.params_before = set()
        for _, p in self._opt_params(optimizer):
            if self._bad(p):
                self.params_before.add(id(p))
            if p.grad is not None and self._bad(p.grad):
                self.grads_finite = False

    def _opt_post(self, optimizer, args, kwargs):
        if self.failure is not None or not self.installed:
            return
        before = self.params_before
        for name, p in self._opt_params(optimizer):
            if id(p) not in before and self._bad(p):
                self.failure = self._optimizer_message(optimizer, name, p)
                return

    def _opt_params(self, optimizer):
        i = 0
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                i += 1
                if self.scope_params is not None and id(p) not in self.scope_params:
                    continue
                name = self.param_names.get(id(p), f"param {i} (group {g})")
                yield name, p

    # ---- messages
    def _counts(self, t) -> str:
        d = t.detach()
        nan = int(self.torch.isnan(d).sum())
        inf = int(self.torch.isinf(d).sum())
        return f"{nan} NaN, {inf} Inf of {d.numel()}"

    def _where(self, module, path, call) -> str:
        return f"module '{path}' ({type(module).__name__}), call {call} of that module"

    def _op_line(self) -> list[str]:
        if self.watch is not None and self.watch.first is not None:
            f = self.watch.first
            return [
                f"  first op: {f['op']} ({f['overload']}), inputs {f['input shapes']} "
                f"{', '.join(f['dtypes'])}"
            ]
        return []

    def _forward_message(self, module, path, info, out) -> str:
        dtype = str(out.dtype).replace("torch.", "")
        lines = [
            f"nan-guard: {self.nodeid}: non-finite output in forward of "
            + self._where(module, path, info["call"]),
        ]
        for shape, idt, absmax, mean in info["inputs"]:
            lines.append(
                f"  input (finite): shape {shape} {idt}, abs-max {_fmt(absmax)}, mean {_fmt(mean)}"
            )
        lines.append(f"  output: shape {list(out.shape)} {dtype}, {self._counts(out)}")
        lines += self._op_line()
        bad_params = [
            n
            for n, p in module.named_parameters(recurse=False)
            if p.is_floating_point() and self._bad(p)
        ]
        has_inf = bool(self.torch.isinf(out).any())
        if bad_params:
            cause = (
                f"the module's own parameters are non-finite ({', '.join(bad_params)}): "
                "they were broken before this call (bad init, load or optimizer step)"
            )
        elif has_inf and out.dtype == self.torch.float16:
            cause = (
                "float16 overflow: a value passed 65504, the float16 maximum; compute this "
                "module in float32/bfloat16 or scale its inputs down"
            )
        elif has_inf:
            cause = f"overflow: a value passed the {dtype} maximum"
        else:
            cause = "invalid math on finite inputs (log/sqrt of a negative number, 0/0, inf-inf)"
            if self.watch is None:
                cause += "; --nan-guard-ops names the op"
        lines.append(f"  likely cause: {cause}")
        return "\n".join(lines)

    def _backward_message(self, module, path, call, grad) -> str:
        dtype = str(grad.dtype).replace("torch.", "")
        lines = [
            f"nan-guard: {self.nodeid}: non-finite gradient in backward of "
            + self._where(module, path, call),
            "  gradient w.r.t. output: finite",
            f"  gradient w.r.t. input: shape {list(grad.shape)} {dtype}, {self._counts(grad)}",
        ]
        lines += self._op_line()
        cause = (
            "gradient overflow or an invalid derivative in this module's backward "
            "(a custom autograd Function, sqrt/log/pow at 0)"
        )
        if grad.dtype == self.torch.float16:
            cause += "; in float16, use a loss scaler (torch.amp.GradScaler)"
        lines.append(f"  likely cause: {cause}")
        return "\n".join(lines)

    def _optimizer_message(self, optimizer, name, p) -> str:
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        hyper = ", ".join(f"{k}={group[k]}" for k in ("lr", "eps") if k in group)
        dtype = str(p.dtype).replace("torch.", "")
        lines = [
            f"nan-guard: {self.nodeid}: non-finite parameter after optimizer step of "
            f"{type(optimizer).__name__} ({hyper})",
            f"  parameter '{name}': shape {list(p.shape)} {dtype}, {self._counts(p)}",
        ]
        if not self.grads_finite:
            cause = "non-finite gradients reached the optimizer"
        else:
            lr = group.get("lr")
            eps = group.get("eps")
            if isinstance(lr, float) and not math.isfinite(lr):
                cause = f"the step made finite parameters non-finite from finite gradients: lr={lr}"
            elif p.dtype == self.torch.float16 and eps is not None:
                cause = (
                    f"the step made finite parameters non-finite from finite gradients: "
                    f"float16 optimizer state with eps={eps} (underflows to 0 in float16, "
                    "so a zero gradient gives 0/0); keep master weights in float32"
                )
            else:
                cause = (
                    "the step made finite parameters non-finite from finite gradients "
                    "(learning rate too large, or eps too small for the dtype)"
                )
        lines.append(
            f"  gradients before the step: {'finite' if self.grads_finite else 'NOT finite'}"
        )
        lines.append(f"  likely cause: {cause}")
        return "\n".join(lines)

    # ---- end of test
    def finish(self) -> str | None:
        self.uninstall()
        if self.failure is None and self.watch is not None and self.watch.first is not None:
            f = self.watch.first
            self.failure = (
                f"nan-guard: {self.nodeid}: non-finite output of op {f['op']} ({f['overload']}) "
                f"outside any guarded module\n  inputs (finite): {f['input shapes']} "
                f"{', '.join(f['dtypes'])}\n  likely cause: invalid math or overflow in "
                "functional code"
            )
        if self.failure is not None:
            return self.failure
        summary = {path: {"absmax": a / n, "rms": r / n} for path, (a, r, n) in self.stats.items()}
        if self.s["record"] and self.on_stats is not None and summary:
            self.on_stats(summary)
            return None
        if self.golden:
            return self._drift(summary)
        return None

    def _drift(self, now: dict) -> str | None:
        rtol = self.s["rtol"]
        lines = []
        for path, recorded in self.golden.items():
            if path not in now:
                lines.append(f"  layer '{path}': recorded but not called in this run")
                continue
            for stat, old in recorded.items():
                new = now[path].get(stat)
                if new is None:
                    continue
                if not abs(new - old) <= rtol * abs(old) + 1e-12:
                    rel = abs(new - old) / abs(old) if old else math.inf
                    lines.append(
                        f"  layer '{path}' {stat}: recorded {_fmt(old)}, now {_fmt(new)} "
                        f"({rel:.1%} > rtol {rtol:g})"
                    )
        if not lines:
            return None
        return "\n".join(
            [
                f"nan-guard: {self.nodeid}: statistics drifted from the golden file "
                f"{self.s['golden']}"
            ]
            + lines
        )
