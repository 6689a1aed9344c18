"""pytest plugin: fail a test at the first NaN/Inf a model produces.

Loaded in every pytest run of the environment through the ``pytest11`` entry
point, and inert unless enabled: nothing here imports torch until a test is
guarded. Enable it with

- ``pytest --nan-guard`` (or ini ``nan_guard = true``) for every test,
- ``@pytest.mark.nan_guard`` for one test,
- the ``nan_guard`` fixture for one model: ``nan_guard(model)`` guards that model
  for the rest of the test;

and opt a test out with ``@pytest.mark.allow_nan(reason="...")``, or only some of
its modules with ``@pytest.mark.allow_nan(modules="REGEX", reason="...")`` (a full
match on module paths or class names, as ``--nan-guard-ignore``).

A guarded test fails, naming the first module whose inputs were finite and
whose output was not (forward), the first module whose gradient w.r.t. its
output was finite and w.r.t. its input was not (backward), or the parameter an
optimizer step made non-finite (optimizer). ``--nan-guard-ops`` also watches
every aten op, so NaN made by functional code outside modules is caught.

Checks cost no host sync per tensor. Hooks note the tensors they see (no
kernel); at the end of each outermost forward, each backward and around each
optimizer step, everything noted is reduced by one multi-tensor op and read once
(:mod:`stabilizer.probes.batched`, the tracing core's reducer). The first failure
is then found in the order the hooks fired, and only its details (input abs-max
and mean, NaN/Inf counts, the module's parameters) are computed. A large pass is
reduced in pieces of a small share of the last forward's bytes, and each piece is
read and judged (in firing order) when it is reduced, so a call's tensors, kept
to describe a failure, are let go then: a guarded pass holds about one piece of
them, not all (on a GPU, one host read per piece). The checks run
under ``no_grad``: nothing is saved for backward, so activation checkpointing
sees the same forward with or without the guard.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import re
import sys
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
        help="Modules to ignore: a regex matched in full against each module's path "
        "(encoder.layer.0.conv) or class name (Conv2d); repeatable or comma-separated.",
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
    config.addinivalue_line(
        "markers",
        "allow_nan(reason=None, modules=None): turn the stabilizer NaN guard off for this "
        "test, or with modules=REGEX only for the modules whose path or class name matches",
    )


def _compile(patterns: list[str], where: str) -> re.Pattern | None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise pytest.UsageError(f"{where} '{pattern}': {exc}") from exc
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def _settings(config: pytest.Config, item: pytest.Item | None = None) -> dict:
    ignore = [p for opt in config.getoption("nan_guard_ignore") for p in opt.split(",") if p]
    _compile(ignore, "--nan-guard-ignore")
    allowed = _allowed_modules(item) if item is not None else []
    where = f"{item.nodeid}: @pytest.mark.allow_nan(modules=...)" if item is not None else ""
    _compile(allowed, where)
    ignore = ignore + allowed
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
        "ignore": _compile(ignore, "--nan-guard-ignore"),
        "warn_dtype": warn_dtype,
        "record": config.getoption("nan_guard_record"),
        "golden": golden,
        "rtol": config.getoption("nan_guard_rtol"),
    }


def _allowed_modules(item: pytest.Item) -> list[str]:
    """The module patterns of the test's ``allow_nan(modules=...)`` markers."""
    patterns = []
    for marker in item.iter_markers("allow_nan"):
        modules = marker.kwargs.get("modules")
        if isinstance(modules, str):
            patterns += [p for p in modules.split(",") if p]
        elif modules is not None:
            patterns += [str(p) for p in modules]
    return patterns


def _allows_all(item: pytest.Item) -> bool:
    """``@pytest.mark.allow_nan`` without ``modules=``: the guard is off for this test."""
    return any("modules" not in m.kwargs for m in item.iter_markers("allow_nan"))


def _enabled_for(item: pytest.Item) -> bool:
    if _allows_all(item):
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
        if message and _is_error(exc):
            # The guard's report names the cause; the test's own error is a symptom.
            guard.reported = message
            raise pytest.fail.Exception(message, pytrace=False) from exc
        raise  # a skip, xfail, exit or interrupt is the test's verdict, not an error
    guard = item.stash.get(_GUARD, None)
    message = guard.finish() if guard is not None else None
    if message:
        guard.reported = message
        pytest.fail(message, pytrace=False)
    return result


def _is_error(exc: BaseException) -> bool:
    """An error or a failure: what a NaN may have caused. ``pytest.skip``/``xfail``,
    ``pytest.exit``, KeyboardInterrupt and SystemExit keep their meaning."""
    if isinstance(exc, pytest.xfail.Exception):
        return False
    return isinstance(exc, (Exception, pytest.fail.Exception))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Point a guard failure's one-line form (``--tb=line``, the short summary, junit's
    ``message``) at the test's line that ran the failing pass, with the headline only."""
    report = yield
    guard = item.stash.get(_GUARD, None)
    if call.when != "call" or not report.failed or guard is None or not guard.reported:
        return report
    path, line = guard.location or _definition(item)
    crash = getattr(report.longrepr, "reprcrash", None)
    headline = guard.reported.splitlines()[0]
    if crash is not None:
        crash.path, crash.lineno, crash.message = path, line, headline
    else:
        try:
            from _pytest._code.code import ReprFileLocation
        except ImportError:  # a pytest without it: keep pytest's own location
            return report
        report.longrepr.reprcrash = ReprFileLocation(path, line, headline)
    return report


def _definition(item: pytest.Item) -> tuple[str, int]:
    path, line0, _ = item.reportinfo()
    return str(Path(item.config.rootpath, path) if not Path(path).is_absolute() else path), (
        (line0 or 0) + 1
    )


@pytest.fixture
def nan_guard(request: pytest.FixtureRequest):
    """``nan_guard(model)``: fail the test at the first NaN/Inf ``model`` produces.

    Guards ``model``'s modules, their gradients and (after each optimizer step)
    its parameters for the rest of the test. Off under ``@pytest.mark.allow_nan``.
    """
    item = request.node

    def attach(model):
        if _allows_all(item):
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
    settings = _settings(config, item)
    golden = None
    if not settings["record"] and settings["golden"].exists():
        golden = _read_golden(settings["golden"]).get("tests", {}).get(item.nodeid)
    guard = _Guard(item.nodeid, settings, golden, test_file=str(item.path))
    item.stash[_GUARD] = guard
    if settings["record"]:
        guard.on_stats = lambda stats: config.stash.setdefault(_GOLDEN_NEW, {}).__setitem__(
            item.nodeid, stats
        )
    return guard


# --------------------------------------------------------------------------- the guard


def _fmt(x: float) -> str:
    return f"{x:.4g}"


_GUARD_GC_THRESHOLD = 10_000  # young-generation threshold while a test is guarded


class _Event:
    """One call of a module (forward) or one gradient (backward), as its hooks saw it."""

    __slots__ = (
        "module",
        "path",
        "call",
        "number",
        "args",
        "inputs",
        "in_slots",
        "outputs",
        "out_slots",
    )

    def __init__(self, module, call: int, number: int, args, inputs: list, in_slots: list) -> None:
        self.module, self.call, self.number = module, call, number
        self.args = args  # to re-run a failing call in float64 (overflow or invalid math?)
        self.path = ""
        self.inputs, self.in_slots = inputs, in_slots
        self.outputs: list = []
        self.out_slots: list[int] = []


class _Guard:
    """Per-test state: global module/optimizer hooks, deferred checks, first failure."""

    def __init__(
        self, nodeid: str, settings: dict, golden: dict | None, test_file: str | None = None
    ) -> None:
        self.nodeid = nodeid
        self.test_file = test_file
        self.location: tuple[str, int] | None = None  # the test's line that ran the failure
        self.reported: str | None = None  # the message that went into the test's report
        self.quiet = False  # the guard's own work (a float64 re-run) is not watched
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
        self.pending: dict[int, list[_Event]] = {}  # module id -> its open calls
        self.open_calls = 0
        self.reducer = None  # made at install (needs torch)
        self.done: list[_Event] = []  # forward calls in the order they returned
        self.grad_events: list[tuple[str, object, str, int, int, object]] = []
        self.in_backward = False
        self.fwd_bad: set[tuple[int, int]] = set()  # (module id, call) with non-finite output
        self.grad_hooks = None  # made at install (needs torch)
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
        import numpy
        import torch
        import torch.optim.optimizer as optim_hooks
        from torch.nn.modules import module as module_hooks

        from stabilizer.probes.batched import PassReducer, measurable
        from stabilizer.probes.gradhooks import SharedGradHooks

        self.torch = torch
        self.np = numpy
        self._measurable = measurable
        # One hook per tensor however many module calls it passes through (a layer's
        # output is its container's output and the next layer's input).
        self.grad_hooks = SharedGradHooks(self._on_grad)
        # Budgeted by the last forward's bytes, as in tracing (a small share held).
        self._new_reducer = lambda: PassReducer(full=False, forward_bytes=self.forward_bytes)
        self.forward_bytes = None
        self.reducer = self._new_reducer()
        self.flushes_judged = 0  # the reducer's flushes whose settled calls are judged
        self.host_readings = (None, 0, [])  # (reducer, chunks read, their host rows)
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

            self.watch = OpWatch(context=self._op_context)
            self.watch.active = True
            self.watch.__enter__()
        self._raise_gc_threshold()
        self.installed = True

    def _raise_gc_threshold(self) -> None:
        # A guarded pass keeps a few thousand small objects alive until it is judged
        # (its calls, its gradient hooks). Under the default threshold (700) they set
        # off Python's young collections every step, survive them, and every few dozen
        # steps a full collection walks the test process's whole heap (0.2 s with
        # transformers loaded). A higher first threshold lets them die young; nothing
        # is collected differently, only later, and it is put back when the test ends
        # (unless the test set its own).
        first, *rest = gc.get_threshold()
        self._gc_threshold = None
        if 0 < first < _GUARD_GC_THRESHOLD:
            self._gc_threshold = (first, *rest)
            gc.set_threshold(_GUARD_GC_THRESHOLD, *rest)

    def _restore_gc_threshold(self) -> None:
        saved, self._gc_threshold = self._gc_threshold, None
        if saved is not None and gc.get_threshold()[0] == _GUARD_GC_THRESHOLD:
            gc.set_threshold(*saved)

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
        self._restore_gc_threshold()
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
        # Eager, with a host sync: used only to describe a failure already found.
        if self.s["nan_only"]:
            return bool(self.torch.isnan(t).any())
        return not bool(self.torch.isfinite(t).all())

    def _bad_reading(self, value: float) -> bool:
        # A norm (L1, or L2 re-checked on a CPU): NaN when the tensor holds NaN, Inf
        # when it holds +/-Inf and no NaN.
        return math.isnan(value) if self.s["nan_only"] else not math.isfinite(value)

    def _floats(self, value) -> list:
        torch = self.torch
        # The common cases without pytree (a tensor, a tuple of tensors): hooks run for
        # every module call of every test, so this is most of the plugin's own cost.
        if isinstance(value, torch.Tensor):
            flat = [value]
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            flat = value
        else:
            from torch.utils._pytree import tree_flatten

            flat, _ = tree_flatten(value)
        return [
            t
            for t in flat
            if isinstance(t, self.torch.Tensor)
            and t.is_floating_point()
            and self._measurable(t)
            and t.numel()
        ]

    def _active(self, module) -> bool:
        if self.failure is not None or not self.installed or self.quiet:
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
        if self.open_calls == 0:
            # A new outermost forward: hooks registered so far keep their owners; the
            # map only avoids a second hook on one tensor within a forward.
            self.grad_hooks.forget()
        tensors = self._floats(args)
        # A module that overwrites its input (ReLU(inplace=True)) is read at once.
        now = getattr(module, "inplace", False) is True
        slots = [self.reducer.note(t, now=now) for t in tensors]
        event = _Event(module, self.calls[id(module)], self.events, args, tensors, slots)
        self.pending.setdefault(id(module), []).append(event)
        self.open_calls += 1
        return None

    def _post(self, module, args, output):
        stack = self.pending.get(id(module))
        if not stack:
            return None
        event = stack.pop()
        self.open_calls -= 1
        if not self._active(module):
            return None
        event.path = self._path(module)
        event.outputs = self._floats(output)
        event.out_slots = [self.reducer.note(t) for t in event.outputs]
        self.done.append(event)
        if not self._ignored(module, event.path):
            # Owners of str and int only: Python stops tracking such tuples, so the
            # thousands a pass makes do not drive its garbage collector (the module
            # and its path are found again by id when the gradient comes).
            key = id(module)
            for t in event.outputs:
                if t.requires_grad:
                    self._watch_grad(t, ("out", key, event.call))
            for t in event.inputs:
                if t.requires_grad:
                    self._watch_grad(t, ("in", key, event.call))
        if self.open_calls == 0:
            self._judge()  # the outermost forward returned: judge it as a whole
        elif self.reducer.flushes != self.flushes_judged:
            self._judge_settled()  # a budget flush: judge the calls it settled
        return None

    def _ignored(self, module, path: str) -> bool:
        pattern = self.s["ignore"]
        if pattern is None:
            return False
        return bool(pattern.fullmatch(path) or pattern.fullmatch(type(module).__name__))

    @contextlib.contextmanager
    def _unwatched(self):
        """The guard's own reductions and messages: no op watch, no module hooks."""
        active = self.watch.active if self.watch is not None else None
        quiet, self.quiet = self.quiet, True
        if self.watch is not None:
            self.watch.active = False
        try:
            yield
        finally:
            self.quiet = quiet
            if self.watch is not None:
                self.watch.active = active

    def _fail(self, message: str) -> None:
        self.failure = message
        self.location = self.location or self._test_line()

    def _test_line(self) -> tuple[str, int] | None:
        """The innermost frame of the test's file on the stack now: the line of the test
        that ran the failing forward, backward or step (None from another thread)."""
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename == self.test_file:
                return frame.f_code.co_filename, frame.f_lineno
            frame = frame.f_back
        return None

    def _op_context(self) -> dict:
        """Where the op watch's first non-finite op ran: in a module's forward, in a
        backward, or outside both (functional code in the test itself)."""
        if self.torch._C._current_graph_task_id() != -1:
            where = "backward"
        elif self.open_calls > 0:
            where = "module"
        else:
            where = "outside"
        return {"where": where, "location": self._test_line()}

    def _watch_grad(self, tensor, owner: tuple) -> None:
        self.grad_hooks.watch(tensor, owner)  # the hook lives and dies with the tensor

    def _on_grad(self, grad, owners: list[tuple]) -> None:
        if self.failure is None and self.installed and self._measurable(grad):
            if not self.in_backward:
                self._open_backward()
            slot = self.reducer.note(grad)
            names = self.names
            for side, key, call in owners:
                path, module = names[key]
                self.grad_events.append((side, module, path, call, slot, grad))
            if self.reducer.flushes != self.flushes_judged:
                self._judge_settled_grads()  # a budget flush: judge what it settled

    def _open_backward(self) -> None:
        # The forward is complete: judge it, then judge this backward when autograd
        # finishes it (queue_callback runs at the end of the current backward).
        self._judge()
        if self.reducer is not None:
            self.reducer.budget_by(self.forward_bytes)
        self.in_backward = True
        self.grad_out_ok = {}  # per backward: its gradients may be judged in batches

        def end_of_backward() -> None:
            self.in_backward = False
            self._judge()

        self.torch.autograd.Variable._execution_engine.queue_callback(end_of_backward)

    def _judge(self) -> None:
        """Reduce what was noted since the last judgement (one op, one host read) and
        find the first failure in the order the hooks fired."""
        if self.reducer is None:
            return
        with self._unwatched():
            self._judge_pass()
        if self.failure is None and self.watch is not None:
            first = self.watch.first
            if first is not None and first.get("where") != "outside":
                # A non-finite op inside a module or a backward that no module boundary
                # showed: the model masked it (its NaN never left). Not a failure; the
                # op line of a later failure must be that failure's own first op.
                self.watch.first = None

    def _judge_settled(self) -> None:
        """Judge, in order, the returned calls of a running forward whose readings a
        budget flush has settled, and let their tensors go: a call keeps its inputs,
        outputs and arguments (to describe a failure) only until it is judged, so a
        guarded forward holds about one budget of them, not every call's."""
        ready = self._settled(self.done, lambda e: max(e.in_slots + e.out_slots, default=-1))
        events, self.done = self.done[:ready], self.done[ready:]
        self._judge_now(self._judge_forward, events)

    def _judge_settled_grads(self) -> None:
        """As :meth:`_judge_settled`, for a running backward's gradients: each is held
        (to describe a failure) only until a flush has settled and judged it."""
        ready = self._settled(self.grad_events, lambda g: g[4])
        grads, self.grad_events = self.grad_events[:ready], self.grad_events[ready:]
        self._judge_now(self._judge_grads, grads)

    def _settled(self, queue: list, last_slot) -> int:
        """How many leading entries of ``queue`` have every reading settled (a flush
        reduces all that is pending, so they are a prefix in firing order)."""
        self.flushes_judged = self.reducer.flushes
        settled = self.reducer.settled
        ready = 0
        for entry in queue:
            if last_slot(entry) >= settled:
                break
            ready += 1
        return ready

    def _judge_now(self, judge, entries: list) -> None:
        if entries and self.failure is None:
            with self._unwatched():
                chunks, row_of = self.reducer.readings()
                judge(entries, self._bad_slot(self.reducer, chunks, row_of))

    def _bad_slot(self, reducer, chunks, row_of):
        # Each chunk goes to the host once: a pass judged in pieces reads only the
        # chunks its last flush added (on a GPU, one read per piece).
        owner, read, parts = self.host_readings
        if owner is not reducer:
            read, parts = 0, []
        if len(chunks) > read:
            parts = parts + [self._read(chunks[read:])]
        self.host_readings = (reducer, len(chunks), parts)
        values = self.np.concatenate(parts) if parts else self._read([])

        def bad(slot: int) -> bool:
            row = row_of[slot]  # None: changed in place before the reduction (unknown)
            return row is not None and self._bad_reading(float(values[row]))

        return bad

    def _judge_pass(self) -> None:
        reducer = self.reducer
        done, self.done = self.done, []
        grads, self.grad_events = self.grad_events, []
        if done and not grads and reducer.noted_bytes:
            # A forward: its bytes budget the passes after it (a small share of them
            # held); the first forward of a test has the reducer's fixed budget.
            self.forward_bytes = reducer.noted_bytes
        self.reducer = self._new_reducer()
        self.flushes_judged = 0
        if self.failure is not None or not (done or grads):
            return
        chunks, row_of, _ = reducer.finish()
        bad = self._bad_slot(reducer, chunks, row_of)  # the last read of this pass
        self.host_readings = (None, 0, [])  # the pass is over: its reducer is let go
        if not self._judge_forward(done, bad):
            self._judge_grads(grads, bad)

    def _judge_grads(self, grads: list, bad) -> bool:
        """Judge gradients in the order they came (a module's gradient w.r.t. its output
        comes before the one w.r.t. its input); True at a failure."""
        grad_out_ok = self.grad_out_ok  # kept across the batches of one backward
        for side, module, path, call, slot, grad in grads:
            key = (id(module), call)
            if key in self.fwd_bad:
                continue  # its forward was already non-finite
            if side == "out":
                grad_out_ok[key] = grad_out_ok.get(key, True) and not bad(slot)
            elif grad_out_ok.get(key, True) and bad(slot):
                self._fail(self._backward_message(module, path, call, grad))
                return True
        return False

    def _judge_forward(self, done: list, bad) -> bool:
        """Judge returned forward calls in the order they returned; True at a failure."""
        for event in done:
            ignored = self._ignored(event.module, event.path)
            out_bad = [t for t, s in zip(event.outputs, event.out_slots, strict=True) if bad(s)]
            if out_bad:
                self.fwd_bad.add((id(event.module), event.call))
            inputs_ok = not any(bad(slot) for slot in event.in_slots)
            if out_bad and ignored:
                self.ignored_bad = event.number
            elif out_bad and inputs_ok and self.ignored_bad < event.number:
                self._fail(self._forward_message(event, out_bad[0]))
                return True
            if out_bad or ignored:
                continue
            if (self.collect_stats or self.s["warn_dtype"]) and event.outputs:
                self._measure(event.path, event.outputs[0])
        return False

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

    def _read(self, chunks: list):
        """The reducer's readings on the host, in row order (one copy, no cat for one)."""
        if not chunks:
            return self.torch.zeros(0).numpy()
        flat = chunks[0] if len(chunks) == 1 else self.torch.cat([c.to("cpu") for c in chunks])
        return flat.cpu().numpy()

    def _flags(self, tensors: list) -> list[bool]:
        """Per tensor, whether it is non-finite: the reducer's one norm per dtype, one read."""
        reducer = self._new_reducer()
        slots = [
            reducer.note(t) if t is not None and self._measurable(t) else None for t in tensors
        ]
        chunks, row_of, _ = reducer.finish()
        values = self._read(chunks).tolist()
        return [
            s is not None and row_of[s] is not None and self._bad_reading(values[row_of[s]])
            for s in slots
        ]

    def _opt_pre(self, optimizer, args, kwargs):
        self._judge()  # gradients and forwards first: they come before this step
        if self.failure is not None or not self.installed:
            return
        with self._unwatched():
            params = [p for _, p in self._opt_params(optimizer)]
            weights_bad = self._flags(params)
            self.params_before = {id(p) for p, b in zip(params, weights_bad, strict=True) if b}
            self.grads_finite = not any(self._flags([p.grad for p in params]))

    def _opt_post(self, optimizer, args, kwargs):
        if self.failure is not None or not self.installed:
            return
        with self._unwatched():
            before = self.params_before
            named = list(self._opt_params(optimizer))
            for (name, p), b in zip(named, self._flags([p for _, p in named]), strict=True):
                if b and id(p) not in before:
                    self._fail(self._optimizer_message(optimizer, name, p))
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

    def _forward_message(self, event: _Event, out) -> str:
        module, path = event.module, event.path
        dtype = str(out.dtype).replace("torch.", "")
        lines = [
            "nan-guard: non-finite output in forward of " + self._where(module, path, event.call),
        ]
        with self.torch.no_grad():
            for t in event.inputs[:3]:
                idt = str(t.dtype).replace("torch.", "")
                absmax, mean = float(t.abs().max()), float(t.float().mean())
                lines.append(
                    f"  input (finite): shape {list(t.shape)} {idt}, abs-max {_fmt(absmax)}, "
                    f"mean {_fmt(mean)}"
                )
        lines.append(f"  output: shape {list(out.shape)} {dtype}, {self._counts(out)}")
        lines += self._op_line()
        bad_params = [
            n for n, p in _own_parameters(module) if p.is_floating_point() and self._bad(p)
        ]
        has_inf = bool(self.torch.isinf(out).any())
        has_nan = bool(self.torch.isnan(out).any())
        then_nan = " (and the NaN after it is its consequence: inf-inf, inf*0)" if has_nan else ""
        first = self.watch.first if self.watch is not None else None
        if bad_params:
            cause = (
                f"the module's own parameters are non-finite ({', '.join(bad_params)}): "
                "they were broken before this call (bad init, load or optimizer step)"
            )
        elif has_inf and out.dtype == self.torch.float16:
            cause = (
                f"float16 overflow: a value passed 65504, the float16 maximum{then_nan}; "
                "compute this module in float32/bfloat16 or scale its inputs down"
            )
        elif has_inf:
            cause = f"overflow: a value passed the {dtype} maximum{then_nan}"
        elif (first is not None and first.get("kind") == "overflow") or (
            self._finite_in_float64(event) is True
        ):
            # NaN only, yet an overflow: an Inf inside the module that inf-inf or inf*0
            # turned into NaN before the output (finite when recomputed in float64).
            cause = (
                f"overflow inside the module: a value passed the {dtype} maximum and "
                "inf-inf / inf*0 turned it into NaN before the output (the same call is "
                "finite in float64); compute this module in float32 or scale its inputs down"
            )
        else:
            cause = "invalid math on finite inputs (log/sqrt of a negative number, 0/0)"
            if self.watch is None:
                cause += "; --nan-guard-ops names the op"
        lines.append(f"  likely cause: {cause}")
        lines.append(self._how_to_allow(module, path))
        return "\n".join(lines)

    def _finite_in_float64(self, event: _Event) -> bool | None:
        """Re-run the failing call on a float64 copy of the module (no hooks, no grad):
        True if it is finite there (a precision problem), False if not, None if it
        cannot be re-run (keyword arguments unseen, a module too large or uncopyable)."""
        torch = self.torch
        module = event.module
        if sum(p.numel() for p in module.parameters()) > 50_000_000:
            return None
        try:
            with self._unwatched(), torch.no_grad():
                twin = copy.deepcopy(module).double()
                args = _as_float64(event.args, torch)
                out = self._floats(twin(*args))
        except Exception:  # the re-run is a hint; the failure is reported either way
            return None
        return bool(out) and all(bool(torch.isfinite(t).all()) for t in out)

    def _how_to_allow(self, module, path: str) -> str:
        kind = type(module).__name__
        by_path = f' (or modules="{path}")' if path != kind else ""
        return (
            f'  to allow it: @pytest.mark.allow_nan(modules="{kind}", reason="...") on the '
            f"test{by_path}, --nan-guard-ignore {kind} for the run, or "
            '@pytest.mark.allow_nan(reason="...") to turn the guard off for this test'
        )

    def _backward_message(self, module, path, call, grad) -> str:
        dtype = str(grad.dtype).replace("torch.", "")
        lines = [
            "nan-guard: non-finite gradient in backward of " + self._where(module, path, call),
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
        lines.append(self._how_to_allow(module, path))
        return "\n".join(lines)

    def _optimizer_message(self, optimizer, name, p) -> str:
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        hyper = ", ".join(f"{k}={group[k]}" for k in ("lr", "eps") if k in group)
        dtype = str(p.dtype).replace("torch.", "")
        lines = [
            f"nan-guard: non-finite parameter after optimizer step of "
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
        if self.installed:
            self._judge()  # what the test's last pass left unjudged
        self.uninstall()
        first = self.watch.first if self.watch is not None else None
        if self.failure is None and first is not None and first.get("where") == "outside":
            f = first
            self.location = f.get("location")
            self.failure = (
                f"nan-guard: non-finite output of op {f['op']} ({f['overload']}) "
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
            [f"nan-guard: statistics drifted from the golden file {self.s['golden']}"] + lines
        )


def _own_parameters(module):
    """A module's own parameters: its direct ones and those it keeps in a ParameterDict
    or ParameterList (containers it reads itself, as LoRA implementations do)."""
    from torch import nn

    yield from module.named_parameters(recurse=False)
    for name, child in module.named_children():
        if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
            for sub, param in child.named_parameters():
                yield f"{name}.{sub}", param


def _as_float64(args, torch):
    from torch.utils._pytree import tree_map

    def up(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().double()
        return value

    return tree_map(up, args)
