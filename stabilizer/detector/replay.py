"""Replay one anomalous step: op by op to name the exact aten op, and again in fp32.

On the first anomaly the loop still holds what the step started from (the
batch, the RNG state, the trainable weights and optimizer state from before the
update). The step is run again from there:

1. under :class:`OpWatch`, a ``TorchDispatchMode`` that reports the first aten op
   whose floating-point inputs were all finite and whose output was not, counted
   only inside the offending module (forward), in backward, or inside the
   optimizer step, according to the pass that failed;
2. on an fp32 copy of the model and optimizer state: finite there means a
   precision problem, non-finite a math problem.

Then a repro bundle is written (``runs/<name>/repro/step-N/``: the batch as
safetensors, the pre-step state as a checkpoint, the config and the diagnosis as
JSON) that ``stabilizer replay BUNDLE`` runs again. The training state is put
back exactly as it was, so replaying changes nothing in the run.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stabilizer.detector.diagnosis import Anomaly

BUNDLE_FILE = "bundle.json"
BATCH_FILE = "batch.safetensors"


def _float_tensors(values) -> list[torch.Tensor]:
    flat, _ = tree_flatten(values)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    # Deliberate host syncs: replay is the expensive path, run once per run.
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())


def _emergent(tensors: list[torch.Tensor]) -> bool:
    """Non-finite values that are not a masking idiom.

    Masks (T5's log(0) in relative-position buckets, ``masked_fill(-inf)``) make
    only -inf; overflow and invalid math make NaN or +inf.
    """
    for t in tensors:
        if not t.numel():
            continue
        if bool(torch.isnan(t).any()) or bool((t == math.inf).any()):
            return True
    return False


class OpWatch(TorchDispatchMode):
    """Records the first aten op that turns finite inputs into NaN/+Inf while ``active``."""

    def __init__(self, names: dict[int, str] | None = None) -> None:
        super().__init__()
        self.active = False
        self.first: dict | None = None
        self.names = names or {}  # data_ptr -> parameter name, to say what an op updated

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        watch = self.active and self.first is None
        inputs = _float_tensors((args, kwargs)) if watch else []
        # Only ops that turn finite *inputs* into NaN/Inf count: factories have none,
        # and torch.empty & co. return uninitialised memory that may hold NaN bits.
        inputs_ok = bool(inputs) and _all_finite(inputs)
        out = func(*args, **kwargs)
        if watch and inputs_ok:
            outputs = _float_tensors(out)
            if not outputs and func._schema.name.endswith("_"):
                outputs = _float_tensors(args[:1])  # in-place op: the result is args[0]
            if _emergent(outputs):
                self.first = {
                    "op": str(func.overloadpacket.__name__),
                    "overload": str(func),
                    "input shapes": [list(t.shape) for t in _float_tensors((args, kwargs))][:4],
                    "dtypes": sorted({str(t.dtype) for t in _float_tensors((args, kwargs))}),
                }
                target = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if target is not None and target.data_ptr() in self.names:
                    self.first["tensor"] = self.names[target.data_ptr()]
        return out


@dataclass
class ReplayResult:
    op: dict | None
    fp32_finite: bool | None
    bundle: Path | None


def _run_step(
    model,
    optimizer,
    micro_batches,
    *,
    plan,
    watch: OpWatch | None,
    scope: str,
    offender: torch.nn.Module | None,
):
    """Forward, backward and optimizer step, with ``watch`` active where ``scope`` says."""
    handles = []
    if watch is not None and scope == "forward" and offender is not None:
        handles.append(
            offender.register_forward_pre_hook(lambda *a: setattr(watch, "active", True))
        )
        handles.append(offender.register_forward_hook(lambda *a: setattr(watch, "active", False)))
    try:
        losses = []
        for batch in micro_batches:
            with plan.autocast(batch["input_ids"].device.type):
                loss = model(**batch).loss / len(micro_batches)
            losses.append(loss.detach())
            if watch is not None and scope == "backward":
                watch.active = True
            loss.backward()
            if watch is not None and scope == "backward":
                watch.active = False
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
    micro_batches,
    anomaly: Anomaly,
    tracer,
    rng_state,
    run_dir: Path,
    cfg,
    write: bool = True,
) -> ReplayResult:
    """Replay the step that produced ``anomaly``; fills ``anomaly.op`` and evidence."""
    from stabilizer.detector.policy import StateSnapshot
    from stabilizer.precision import plan_precision

    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    after = StateSnapshot(before.params, optimizer)
    after.capture()
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
    result = ReplayResult(op=None, fp32_finite=None, bundle=None)
    tracer.close()  # the replay must not record into the run's trace
    was_training = model.training
    try:
        # 1. op by op, from the state before the step.
        if scope is not None:
            before.restore()
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            saved = _foreach_off(optimizer)
            watch = OpWatch({p.data_ptr(): n for n, p in model.named_parameters()})
            try:
                with watch:
                    _run_step(
                        model,
                        optimizer,
                        micro_batches,
                        plan=plan,
                        watch=watch,
                        scope=scope,
                        offender=offender,
                    )
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
        result.fp32_finite = _fp32_rerun(model, optimizer, before, micro_batches, rng_state)
        if result.fp32_finite is None:
            anomaly.evidence["same step in fp32"] = (
                "not run: an fp32 copy of a model this size would not fit beside it"
            )
        else:
            anomaly.evidence["same step in fp32"] = (
                "finite: a precision problem"
                if result.fp32_finite
                else "non-finite too: a math problem, not precision"
            )
        # 3. the repro bundle, from the state before the step.
        if write:
            result.bundle = write_bundle(
                run_dir, anomaly, cfg, model, optimizer, before, micro_batches, rng_state
            )
    finally:
        after.restore()
        torch.set_rng_state(rng_after)
        model.train(was_training)
        tracer.attach()
    return result


def _fp32_rerun(model, optimizer, before, micro_batches, rng_state) -> bool | None:
    params = sum(p.numel() for p in model.parameters())
    if params > 2_000_000_000:
        return None  # an fp32 copy of a multi-billion model would not fit beside it
    before.restore()
    trainable_names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    twin = copy.deepcopy(model).float()
    names = [trainable_names[id(p)] for p in before.params]
    twin_params = dict(twin.named_parameters())
    ordered = [twin_params[n] for n in names]
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
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    batches = [
        {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
        for b in micro_batches
    ]
    from stabilizer.precision import PrecisionPlan

    fp32 = PrecisionPlan(torch.float32, torch.float32, None, False)
    loss = _run_step(twin, twin_opt, batches, plan=fp32, watch=None, scope="", offender=None)
    finite = math.isfinite(float(loss)) and all(bool(torch.isfinite(p).all()) for p in ordered)
    del twin, twin_opt
    return finite


def write_bundle(run_dir, anomaly, cfg, model, optimizer, before, micro_batches, rng_state) -> Path:
    """``runs/<name>/repro/step-N/``: batch, pre-step state, config, diagnosis."""
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
    before.restore()
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


def load_bundle(path: Path) -> dict:
    """Read ``bundle.json`` (JSON only: bundles may come from strangers)."""
    from stabilizer.errors import ConfigError

    path = Path(path)
    manifest = path / BUNDLE_FILE
    if not manifest.is_file():
        raise ConfigError(
            f"{path}: not a repro bundle (no {BUNDLE_FILE}); bundles are written to "
            "runs/<name>/repro/step-N/ when --trace finds an anomaly"
        )
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{manifest}: not valid JSON ({exc})") from exc
    if data.get("format") != "stabilizer-repro":
        raise ConfigError(f"{manifest}: not a stabilizer repro bundle")
    return data


def replay_bundle(path: Path, *, device: str = "cpu"):
    """Rebuild the model, load the pre-step state and batch, run the step traced.

    Returns the new diagnosis (or None if the step is clean here) after an op-level
    and fp32 replay, exactly as during training.
    """
    from safetensors.torch import load_file

    from stabilizer.checkpoint import list_checkpoints, load_checkpoint
    from stabilizer.config import TrainConfig
    from stabilizer.detector.detect import Detector, DetectorContext
    from stabilizer.detector.policy import StateSnapshot
    from stabilizer.precision import plan_precision
    from stabilizer.probes.tracer import Tracer
    from stabilizer.train import build_model, make_optimizer, resolve_device, train_step

    path = Path(path)
    data = load_bundle(path)
    cfg = TrainConfig.from_dict({**data["config"], "device": device}, source=str(path))
    torch_device = resolve_device(device)
    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    _, model = build_model(cfg, plan, torch_device)
    optimizer = make_optimizer(model, cfg)
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        from stabilizer.errors import ConfigError

        raise ConfigError(f"{path}: the bundle has no checkpoint of the pre-step state")
    load_checkpoint(checkpoints[-1], model=model, optimizer=optimizer)
    tensors = load_file(str(path / BATCH_FILE))
    batches = []
    for i in range(int(data["micro_batches"])):
        prefix = f"{i}."
        batches.append(
            {
                k[len(prefix) :]: v.to(torch_device)
                for k, v in tensors.items()
                if k.startswith(prefix)
            }
        )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    tracer = Tracer(model, optimizer=optimizer, pattern=cfg.probe).attach()
    dtype = str(plan.autocast_dtype or plan.base_dtype).replace("torch.", "")
    detector = Detector(tracer, DetectorContext(compute_dtype=dtype, adam_eps=cfg.adam_eps))
    before = StateSnapshot(trainable, optimizer)
    before.capture()
    rng = torch.get_rng_state()
    step = int(data["step"])
    try:
        tracer.begin_step(step, full=True)
        loss, grad_norm = train_step(
            model,
            batches,
            optimizer=optimizer,
            scaler=None,
            plan=plan,
            trainable=trainable,
            max_grad_norm=cfg.max_grad_norm,
            before_update=tracer.measure_grads,
        )
        record = tracer.end_step(loss=loss, grad_norm=grad_norm)
        anomaly = detector.check(record)
        if anomaly is not None:
            replay_step(
                model=model,
                optimizer=optimizer,
                before=before,
                micro_batches=batches,
                anomaly=anomaly,
                tracer=tracer,
                rng_state=rng,
                run_dir=path,
                cfg=cfg,
                write=False,
            )
        return anomaly, data["anomaly"]
    finally:
        tracer.close()
