"""Replay one anomalous step: op by op to name the exact aten op, and again in fp32.

On the first anomaly the session still holds what the step started from (the
trainable weights and optimizer state from before the update, the RNG state) and
a :class:`RecordedStep`: what the model was called with, under which autocast,
and how the loss went into backward. The step is run again from there:

1. under :class:`OpWatch`, a ``TorchDispatchMode`` that reports the first aten op
   whose floating-point inputs were finite (masks' -inf allowed) and whose output
   was NaN/+Inf, counted only inside the offending module (forward), in backward,
   or inside the optimizer step, according to the pass that failed;
2. on an fp32 copy of the model and optimizer state: finite there means a
   precision problem, non-finite a math problem.

An optimizer-pass anomaly needs no forward at all: the gradients the optimizer
stepped on are still there, so only the update is re-run. That is what makes
the replay work around a loop stabilizer did not write (a custom forward that
never calls the root module has no recorded call to re-run).

The replay re-runs one step; it never imports the training loop. The caller
(``stabilizer train``) may pass a ``write_bundle`` callable to save a repro
bundle. The training state (weights, optimizer state, gradients, RNG) is put
back exactly as it was, so replaying changes nothing in the run.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from stabilizer.detector.diagnosis import Anomaly

BUNDLE_FILE = "bundle.json"
BATCH_FILE = "batch.safetensors"
_SOFTMAX_OPS = ("_softmax", "softmax", "_log_softmax", "log_softmax", "_safe_softmax")


class ReplayUnavailable(Exception):
    """The step cannot be re-run; the message says why (it goes into the card)."""


def _float_tensors(values) -> list[torch.Tensor]:
    flat, _ = tree_flatten(values)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


# Ops whose result is uninitialised memory, and in-place ops that overwrite all of theirs.
_UNINITIALISING = frozenset(
    {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided"}
    | {"empty_permuted", "resize_", "resize_as_"}
)
_OVERWRITING = frozenset(
    {"fill_", "zero_", "copy_", "normal_", "uniform_", "random_", "bernoulli_"}
    | {"exponential_", "geometric_", "cauchy_", "log_normal_"}
)


def _judgeable(t: torch.Tensor) -> bool:
    # Meta tensors have no values, sparse ones no dense view: neither can be judged.
    return bool(t.numel()) and t.device.type != "meta" and t.layout == torch.strided


def _inputs_ok(tensors: list[torch.Tensor]) -> bool:
    """No NaN and no +Inf: a -inf is a mask (``masked_fill(-inf)``), a legitimate input.

    Deliberate host syncs: the replay is the expensive path, run once per run.
    """
    for t in tensors:
        if not _judgeable(t):
            continue
        if bool(torch.isnan(t).any()) or bool((t == math.inf).any()):
            return False
    return True


def _scalars_ok(values) -> bool:
    flat, _ = tree_flatten(values)
    return all(math.isfinite(v) for v in flat if isinstance(v, float))


def _emergent(tensors: list[torch.Tensor]) -> str | None:
    """``"nan"`` or ``"overflow"`` (+Inf and no NaN) for non-finite values that are not
    a masking idiom (masks, T5's log(0) in relative-position buckets, make only -inf)."""
    overflow = False
    for t in tensors:
        if not _judgeable(t):
            continue
        if bool(torch.isnan(t).any()):
            return "nan"
        overflow = overflow or bool((t == math.inf).any())
    return "overflow" if overflow else None


def _masked_rows(func, args) -> int:
    """Rows of a softmax input that are -inf everywhere (their softmax is 0/0)."""
    if func.overloadpacket.__name__ not in _SOFTMAX_OPS or not args:
        return 0
    x = args[0]
    dim = args[1] if len(args) > 1 and isinstance(args[1], int) else -1
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not _judgeable(x):
        return 0
    return int(torch.isneginf(x).all(dim=dim).sum())


class OpWatch(TorchDispatchMode):
    """Records the first aten op that turns finite inputs into NaN/+Inf while ``active``.

    ``first`` holds the op, its overload, input shapes and dtypes, ``kind``
    ("nan" or "overflow": +Inf first, as in an overflow that a later inf*0 turns
    into NaN), ``masked_rows`` for a softmax over fully masked rows, and
    ``tensor``: the parameter an in-place op updated (optimizer steps). ``context``,
    when given, is called once for that op and its dict merged into ``first`` (the
    pytest plugin records where the op ran).

    Uninitialised memory is never judged: the outputs of ``empty``, ``empty_like``,
    ``new_empty(_strided)`` and the like may hold any bits, NaN included, and so may an
    op that reads them (an op that overwrites all of such a tensor, ``fill_``,
    ``copy_``, ``zero_``, a random fill or an ``out=`` op, makes it initialised).
    """

    def __init__(self, names: dict[int, str] | None = None, context=None) -> None:
        super().__init__()
        self.active = False
        self.first: dict | None = None
        self.names = names or {}  # data_ptr -> parameter name, to say what an op updated
        self.context = context
        # Storages holding uninitialised memory: data_ptr -> weak reference to it.
        self._uninitialised: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        watch = self.active and self.first is None
        name = func._schema.name.rpartition("::")[2]
        if watch and name in _UNINITIALISING:
            out = func(*args, **kwargs)
            for t in _float_tensors(out) or _float_tensors(args[:1]):
                self._mark_uninitialised(t)
            return out
        inputs = _float_tensors((args, kwargs)) if watch else []
        garbage = bool(self._uninitialised) and any(self._is_uninitialised(t) for t in inputs)
        # Only ops that turn finite *inputs* into NaN/Inf count: factories have none,
        # and torch.empty & co. return uninitialised memory that may hold NaN bits.
        # A NaN/Inf passed in as a number (torch.where(m, x, nan)) is an input, too.
        inputs_ok = (
            bool(inputs) and not garbage and _inputs_ok(inputs) and _scalars_ok((args, kwargs))
        )
        out = func(*args, **kwargs)
        if garbage:
            self._written(func, name, args, kwargs)
        if watch and inputs_ok:
            outputs = _float_tensors(out)
            if not outputs and func._schema.name.endswith("_"):
                outputs = _float_tensors(args[:1])  # in-place op: the result is args[0]
            kind = _emergent(outputs)
            if kind is not None:
                self.first = {
                    "op": str(func.overloadpacket.__name__),
                    "overload": str(func),
                    "kind": kind,
                    "input shapes": [list(t.shape) for t in inputs][:4],
                    "dtypes": sorted({str(t.dtype) for t in inputs}),
                }
                rows = _masked_rows(func, args)
                if rows:
                    self.first["masked_rows"] = rows
                target = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if target is not None and target.data_ptr() in self.names:
                    self.first["tensor"] = self.names[target.data_ptr()]
                if self.context is not None:
                    self.first.update(self.context())
        return out

    def _storage_key(self, t: torch.Tensor) -> int | None:
        if not _judgeable(t):
            return None
        return t.untyped_storage().data_ptr()

    def _mark_uninitialised(self, t: torch.Tensor) -> None:
        key = self._storage_key(t)
        if key is None:
            return
        if len(self._uninitialised) >= 1024:  # forget the freed ones (weak references)
            self._uninitialised = {k: r for k, r in self._uninitialised.items() if r() is not None}
        self._uninitialised[key] = weakref.ref(t.untyped_storage())

    def _is_uninitialised(self, t: torch.Tensor) -> bool:
        key = self._storage_key(t)
        if key is None or key not in self._uninitialised:
            return False
        if self._uninitialised[key]() is None:  # freed: the address was reused
            del self._uninitialised[key]
            return False
        return True

    def _written(self, func, name: str, args, kwargs) -> None:
        """An op on uninitialised memory that overwrites all of it makes it initialised."""
        targets = []
        if name in _OVERWRITING and args and isinstance(args[0], torch.Tensor):
            targets = [args[0]]
        elif func._schema.overload_name.startswith("out") and isinstance(
            kwargs.get("out"), torch.Tensor
        ):
            targets = [kwargs["out"]]
        for t in targets:
            key = self._storage_key(t)
            whole = t.numel() * t.element_size() == t.untyped_storage().nbytes()
            if key is not None and whole and t.is_contiguous():
                self._uninitialised.pop(key, None)


def loss_of(output) -> torch.Tensor | None:
    """The loss in a model's output: ``output.loss`` / ``output["loss"]``, a bare scalar
    tensor, or the first element of a tuple when it is a scalar; None otherwise."""
    if isinstance(output, Mapping):  # dicts and transformers' ModelOutput
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        loss = getattr(output, "loss", output)
    if isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.numel() == 1:
        return loss
    return None


def scale_of(scaler) -> torch.Tensor | float:
    """The scale a GradScaler's ``scale()`` multiplies by now (a copy: ``update()``
    changes it in place), without a host sync."""
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # created lazily by the first scale()
        return float(scaler._init_scale)
    return scale.detach().clone()


@dataclass
class RecordedStep:
    """What re-running one optimizer step needs, as the loop ran it.

    ``calls``: one ``(args, kwargs)`` per forward of the root module (a micro-batch
    each), the tensors as they were passed. ``autocast``: ``(device_type, dtype)`` the
    forwards ran under, None without autocast. Each micro-batch's loss went into
    backward divided by ``loss_divisor`` and multiplied by ``grad_scale`` (the
    GradScaler's scale, None without one); ``unscaled``: the loop unscaled the
    gradients before the optimizer step (a correct GradScaler loop does). ``why_not``
    says why a step has no calls (e.g. a custom forward that never called the root),
    ``forward_only`` why its calls can re-run the forward but not the backward.
    """

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    autocast: tuple[str, torch.dtype] | None = None
    loss_divisor: float = 1.0
    grad_scale: torch.Tensor | float | None = None
    unscaled: bool = True
    why_not: str | None = None
    forward_only: str | None = None  # why backward cannot be re-run (the loss is elsewhere)

    @classmethod
    def from_batches(
        cls,
        micro_batches,
        *,
        autocast_dtype: torch.dtype | None,
        grad_scale: torch.Tensor | float | None,
    ) -> RecordedStep:
        """Our loop's step: ``model(**batch)`` per micro-batch, the loss divided by their count."""
        device = micro_batches[0]["input_ids"].device.type if micro_batches else "cpu"
        return cls(
            calls=[((), dict(b)) for b in micro_batches],
            autocast=(device, autocast_dtype) if autocast_dtype is not None else None,
            loss_divisor=float(len(micro_batches)),
            grad_scale=grad_scale,
        )

    def batches(self) -> list[dict[str, torch.Tensor]]:
        """The calls' tensor keyword arguments (what a repro bundle saves)."""
        return [
            {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            for _, kwargs in self.calls
        ]


@dataclass
class ReplayResult:
    op: dict | None
    fp32_finite: bool | None
    bundle: Path | None


def _autocast_of(recorded: RecordedStep, fp32: bool, device_type: str):
    if recorded.autocast is None or fp32:
        # Explicitly off: the replay may run inside the user's own autocast region.
        return torch.autocast(device_type, enabled=False)
    device, dtype = recorded.autocast
    return torch.autocast(device, dtype=dtype)


def _device_type(recorded: RecordedStep) -> str:
    for value in tree_flatten(recorded.calls)[0]:
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _run_recorded(
    model,
    optimizer,
    recorded: RecordedStep,
    *,
    watch: OpWatch | None,
    scope: str,
    offender: torch.nn.Module | None,
    fp32: bool = False,
) -> torch.Tensor:
    """Forward, backward and optimizer step of ``recorded``, with ``watch`` active where
    ``scope`` says. Raises :class:`ReplayUnavailable` when the model returns no loss."""
    handles = []
    if watch is not None and scope == "forward" and offender is not None:
        handles.append(
            offender.register_forward_pre_hook(lambda *a: setattr(watch, "active", True))
        )
        handles.append(offender.register_forward_hook(lambda *a: setattr(watch, "active", False)))
    device_type = _device_type(recorded)
    scaling = recorded.grad_scale is not None
    try:
        losses = []
        for args, kwargs in recorded.calls:
            if fp32:
                args, kwargs = tree_map(_to_fp32, (args, kwargs))
            with _autocast_of(recorded, fp32, device_type):
                output = model(*args, **kwargs)
            if scope == "forward":
                # The forward is all that is judged: NaN here when any output is not finite.
                finite = all(bool(torch.isfinite(t).all()) for t in _float_tensors(output))
                losses.append(torch.tensor(0.0 if finite else math.nan))
                continue
            loss = loss_of(output)
            if loss is None:
                raise ReplayUnavailable(
                    "the model's output carries no loss (it was computed outside the model)"
                )
            loss = loss / recorded.loss_divisor
            losses.append(loss.detach().float())
            scaled = loss * recorded.grad_scale if scaling and not fp32 else loss
            if watch is not None and scope == "backward":
                watch.active = True
            scaled.backward()
            if watch is not None and scope == "backward":
                watch.active = False
        if scope == "forward":
            return torch.stack(losses).sum()
        if scaling and recorded.unscaled and not fp32:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(recorded.grad_scale)
        if watch is not None and scope == "optimizer":
            watch.active = True
        optimizer.step()
        if watch is not None:
            watch.active = False
        optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).sum()
    finally:
        for handle in handles:
            handle.remove()


def _to_fp32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def _foreach_off(optimizer) -> list:
    # foreach/fused kernels update every tensor in one op; per-tensor ops name the culprit.
    saved = []
    for group in optimizer.param_groups:
        saved.append((group.get("foreach"), group.get("fused")))
        group["foreach"] = False
        if "fused" in group:
            group["fused"] = None
    return saved


def _restore_groups(optimizer, saved) -> None:
    for group, (foreach, fused) in zip(optimizer.param_groups, saved, strict=True):
        group["foreach"] = foreach
        if "fused" in group:
            group["fused"] = fused


def replay_step(
    *,
    model,
    optimizer,
    before,
    anomaly: Anomaly,
    tracer,
    rng_state,
    recorded: RecordedStep | None,
    write_bundle: Callable[[], Path] | None = None,
) -> ReplayResult:
    """Replay the step that produced ``anomaly``; fills ``anomaly.op`` and evidence.

    ``before`` is the pre-step :class:`~stabilizer.detector.policy.StateSnapshot`;
    ``recorded`` what the step's forwards were called with (None or without calls:
    only an optimizer-pass anomaly can be replayed, from the gradients still held).
    """
    from stabilizer.detector.policy import StateSnapshot

    after = StateSnapshot(before.params, optimizer)
    after.capture()
    grads = [p.grad for p in before.params]  # the loop's gradients, put back at the end
    rng_after = torch.get_rng_state()
    offender = None
    if anomaly.module_path:
        try:
            offender = model.get_submodule(anomaly.module_path)
        except AttributeError:
            offender = None
    scope = {"forward": "forward", "backward": "backward", "optimizer": "optimizer"}.get(
        anomaly.pass_
    )
    rerun = recorded is not None and bool(recorded.calls)
    if rerun and scope != "forward" and recorded.forward_only:
        if scope == "backward":
            raise ReplayUnavailable(recorded.forward_only)
        rerun = False  # the optimizer pass replays from the gradients instead
    if scope is None:
        raise ReplayUnavailable(f"nothing to re-run for the {anomaly.pass_} pass")
    if not rerun and scope != "optimizer":
        why = (recorded.why_not if recorded is not None else None) or "no recorded forward"
        raise ReplayUnavailable(why)
    if not rerun and all(g is None for g in grads):
        raise ReplayUnavailable("the step's gradients are gone (zero_grad ran before the check)")
    result = ReplayResult(op=None, fp32_finite=None, bundle=None)
    was_recording = tracer.recording
    tracer.close()  # the replay must not record into the run's trace
    tracer.recording = False
    was_training = model.training
    try:
        # 1. op by op, from the state before the step.
        before.restore()
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        saved = _foreach_off(optimizer)
        watch = OpWatch({p.data_ptr(): n for n, p in model.named_parameters()})
        try:
            with watch:
                if rerun:
                    _run_recorded(
                        model, optimizer, recorded, watch=watch, scope=scope, offender=offender
                    )
                else:
                    watch.active = True
                    optimizer.step()  # on the gradients the step had
                    watch.active = False
        finally:
            _restore_groups(optimizer, saved)
        result.op = watch.first
        if watch.first is not None:
            anomaly.op = watch.first["op"]
            target = f" updating {watch.first['tensor']}" if "tensor" in watch.first else ""
            anomaly.evidence["exact op"] = (
                f"{watch.first['overload']}{target} on {', '.join(watch.first['dtypes'])} "
                f"inputs {watch.first['input shapes']}"
            )
        # 2. the same step in fp32.
        for p, g in zip(before.params, grads, strict=True):
            p.grad = g
        try:
            if rerun:
                result.fp32_finite = _fp32_rerun(
                    model, optimizer, before, recorded, rng_state, scope=scope
                )
            else:
                result.fp32_finite = _fp32_optimizer_rerun(optimizer, before, grads)
            verdict = _fp32_verdict(result.fp32_finite)
        except ReplayUnavailable as why:
            verdict = f"not run: {why}"
        anomaly.evidence["same step in fp32"] = verdict
        # 3. the repro bundle, from the state before the step.
        if write_bundle is not None:
            before.restore()
            result.bundle = write_bundle()
    finally:
        after.restore()
        for p, g in zip(before.params, grads, strict=True):
            p.grad = g
        torch.set_rng_state(rng_after)
        model.train(was_training)
        tracer.recording = was_recording
        tracer.attach()
    return result


def _fp32_verdict(finite: bool | None) -> str:
    if finite is None:
        return "not run: an fp32 copy of a model this size would not fit beside it"
    return (
        "finite: a precision problem" if finite else "non-finite too: a math problem, not precision"
    )


def _twin_optimizer(optimizer, before, ordered: list[torch.nn.Parameter]):
    """An fp32 copy of ``optimizer`` over ``ordered`` (the twins of ``before.params``)."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params" and k in accepted}
    group["foreach"] = False
    if "fused" in group:
        group["fused"] = None
    twin_opt = type(optimizer)(ordered, **group)
    for src, dst in zip(before.params, ordered, strict=True):
        state = optimizer.state.get(src)
        if state:
            twin_opt.state[dst] = {
                k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in state.items()
            }
    return twin_opt


def _fp32_rerun(
    model, optimizer, before, recorded: RecordedStep, rng_state, *, scope: str
) -> bool | None:
    """The step again on an fp32 copy: its forward alone for a forward anomaly (finite
    outputs?), else forward, backward and update (finite loss and weights?)."""
    params = sum(p.numel() for p in model.parameters())
    if params > 2_000_000_000:
        return None  # an fp32 copy of a multi-billion model would not fit beside it
    before.restore()
    trainable_names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    twin = _hookless_copy(model).float()
    names = [trainable_names[id(p)] for p in before.params]
    twin_params = dict(twin.named_parameters())
    ordered = [twin_params[n] for n in names]
    for p in ordered:
        p.grad = None
    twin_opt = _twin_optimizer(optimizer, before, ordered)
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    if scope == "forward":
        with torch.no_grad():
            flag = _run_recorded(
                twin, twin_opt, recorded, watch=None, scope="forward", offender=None, fp32=True
            )
        return math.isfinite(float(flag))
    loss = _run_recorded(
        twin, twin_opt, recorded, watch=None, scope="optimizer", offender=None, fp32=True
    )
    finite = math.isfinite(float(loss)) and all(bool(torch.isfinite(p).all()) for p in ordered)
    del twin, twin_opt
    return finite


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _ours(hook) -> bool:
    return getattr(hook, "__module__", "").startswith("stabilizer.")


def _hookless_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy without stabilizer's own module hooks: they hold consoles, stores and
    locks that cannot be copied, and the twin must not record into the run. The user's
    hooks stay (the same objects): they are part of what the model computes."""
    memo = {}
    for module in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks:
                memo[id(hooks)] = type(hooks)((k, h) for k, h in hooks.items() if not _ours(h))
    return copy.deepcopy(model, memo)


def _fp32_optimizer_rerun(optimizer, before, grads) -> bool:
    """The update alone in fp32: fp32 copies of the pre-step weights, their gradients
    and the optimizer state, one step, finite or not."""
    before.restore()
    ordered = []
    for p, g in zip(before.params, grads, strict=True):
        twin = torch.nn.Parameter(p.detach().float().clone())
        twin.grad = g.detach().float().clone() if g is not None else None
        ordered.append(twin)
    twin_opt = _twin_optimizer(optimizer, before, ordered)
    with torch.no_grad():
        twin_opt.step()
    return all(bool(torch.isfinite(p).all()) for p in ordered)


def write_bundle(run_dir, anomaly, cfg, model, optimizer, micro_batches, rng_state) -> Path:
    """``runs/<name>/repro/step-N/``: batch, pre-step state, config, diagnosis.

    Called with the model and optimizer holding the pre-step state."""
    from safetensors.torch import save_file

    from stabilizer.checkpoint import save_checkpoint

    bundle = Path(run_dir) / "repro" / f"step-{anomaly.step:08d}"
    bundle.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{i}.{key}": value.detach().cpu().contiguous()
        for i, batch in enumerate(micro_batches)
        for key, value in batch.items()
    }
    save_file(tensors, str(bundle / BATCH_FILE))
    rng_now = torch.get_rng_state()
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    save_checkpoint(bundle, anomaly.step, model=model, optimizer=optimizer)
    torch.set_rng_state(rng_now)
    (bundle / BUNDLE_FILE).write_text(
        json.dumps(
            {
                "format": "stabilizer-repro",
                "version": 1,
                "step": anomaly.step,
                "micro_batches": len(micro_batches),
                "config": cfg.to_dict(),
                "anomaly": anomaly.to_dict(),
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    return bundle


BUNDLE_FORMAT = "stabilizer-repro"
BUNDLE_VERSION = 1
_MAX_STEP = 2**63 - 1  # steps are SQLite INTEGERs in the trace store
REMAKE_BUNDLE = (
    "copy the whole repro/step-N folder again from the run, or make a new bundle with "
    "`stabilizer train --trace`"
)


def load_bundle(path: Path) -> dict:
    """Read and check ``bundle.json`` (JSON only: bundles may come from strangers).

    Every field the replay uses is checked here, so a tampered or damaged manifest is
    a ConfigError naming the file and the field, never a KeyError halfway through.
    """
    from stabilizer.errors import ConfigError

    path = Path(path)
    manifest = path / BUNDLE_FILE
    if not manifest.is_file():
        raise ConfigError(
            f"{path}: not a repro bundle (no {BUNDLE_FILE}); bundles are written to "
            "runs/<name>/repro/step-N/ when --trace finds an anomaly"
        )
    data = _read_manifest(manifest)
    _check_manifest(data, manifest)
    return data


def _read_manifest(manifest: Path) -> dict:
    from stabilizer.errors import ConfigError

    try:
        data = json.loads(manifest.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{manifest}: cannot be read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{manifest}: not valid JSON (not UTF-8 text: byte {exc.start}); {REMAKE_BUNDLE}"
        ) from exc
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: absurd nesting
        raise ConfigError(f"{manifest}: not valid JSON ({exc}); {REMAKE_BUNDLE}") from exc
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise ConfigError(
            f'{manifest}: not a stabilizer repro bundle (no "format": "{BUNDLE_FORMAT}"); '
            "pass a runs/<name>/repro/step-N folder that `stabilizer train --trace` wrote"
        )
    return data


def _check_manifest(data: dict, manifest: Path) -> None:
    """Each field the replay reads is present and of its type (raises ConfigError)."""
    from stabilizer.errors import ConfigError

    if data.get("version") != BUNDLE_VERSION:
        raise ConfigError(
            f"{manifest}: field 'version' is {data.get('version')!r}; this stabilizer "
            f"replays version {BUNDLE_VERSION} bundles. Use the stabilizer that wrote it"
        )
    _check_whole_number(data, "step", manifest, low=0, high=_MAX_STEP)
    # The upper bound of micro_batches is what batch.safetensors holds (checked there).
    _check_whole_number(data, "micro_batches", manifest, low=1, high=_MAX_STEP)
    for key in ("config", "anomaly"):
        if not isinstance(data.get(key), dict):
            raise _field_error(manifest, key, data, "a JSON object")
    missing = [k for k in ("step", "pass", "cause") if k not in data["anomaly"]]
    if missing:
        raise ConfigError(
            f"{manifest}: field 'anomaly' lacks {', '.join(map(repr, missing))} (the "
            f"recorded diagnosis the replay is compared with); {REMAKE_BUNDLE}"
        )


def _check_whole_number(data: dict, key: str, manifest: Path, *, low: int, high: int) -> None:
    value = data.get(key)
    # bool is an int in Python, and JSON's 1e99 a float: neither is a count.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        top = "2**63-1" if high == _MAX_STEP else str(high)
        raise _field_error(manifest, key, data, f"a whole number from {low} to {top}")


def _field_error(manifest: Path, key: str, data: dict, expected: str):
    from stabilizer.errors import ConfigError

    if key not in data:
        problem = f"is missing (it must be {expected})"
    else:
        problem = f"must be {expected}, not {data[key]!r:.80}"
    return ConfigError(f"{manifest}: field '{key}' {problem}; {REMAKE_BUNDLE}")
