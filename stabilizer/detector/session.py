"""The tracing core: probes, store, detector and policy around one training run.

Every face sits on this: ``stabilizer.watch`` (a user's own loop),
``stabilizer train --trace`` (our loop) and the transformers ``StabilizerCallback``.
A face says where a step begins and ends and hands over what it has seen; only
``model`` and ``optimizer`` are required, everything else is learned from them:

    session = TraceSession(model=model, optimizer=optimizer)   # trainable tensors,
    session.begin_step(0)                                     # Adam's eps: from the optimizer
    ...forward, backward...; session.before_update(); optimizer.step()
    accepted, record = session.end_step(0, loss)
    session.close()

Judged one step late (``TraceSettings(judge_late=...)``, ``warn`` only), a step's
record is read at the end of the next step: its copy to the host has finished by
then, so no step ends in a host-device sync; ``close()`` judges the last one.

Every action is logged in the store and printed. A skipped step is said out
loud (AMP's GradScaler skips silently), and ``max_anomalies`` stops the run
with the diagnosis instead of skipping forever. Early warnings (nothing
non-finite yet) are printed and kept, never a stop unless ``on_warning`` is
"raise"; the NaN/Inf that follows names the warning that predicted it.

Under torchrun (``ranks`` given) each rank traces its own replica into its own
store, and every step the ranks agree on one verdict (one small host-side
collective), so all of them take the same action in the same step. A rank that
only received a NaN through the gradient all-reduce records an "other-rank"
anomaly naming the rank where it was born.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.panel import Panel

from stabilizer.config import TraceSettings, TrainConfig, judges_late
from stabilizer.data.collate import IGNORE_INDEX
from stabilizer.detector.detect import Detector, DetectorContext
from stabilizer.detector.diagnosis import CAUSES, ROOT_CAUSE, Anomaly, make_anomaly
from stabilizer.detector.policy import ClampOutput, NumericalAnomalyError, StateSnapshot
from stabilizer.detector.repair import (
    AutocastForward,
    Float32Module,
    repair_kind,
    upcast_state,
)
from stabilizer.detector.replay import RecordedStep, ReplayUnavailable
from stabilizer.distributed import RankGroup, RankVerdict, StepAgreement
from stabilizer.errors import ConfigError
from stabilizer.probes.schema import PASSES, TENSOR_STATS
from stabilizer.probes.tracer import PendingRecord, StepRecord, Tracer
from stabilizer.store import ModuleInfo, ParamInfo, StepData, TraceStore, store_path

_CAUSE_IDS = list(CAUSES)
_GRADSCALER_PATIENCE = 5  # consecutive AMP skips before a run counts it as an anomaly
# Above this many trainable elements the per-step snapshot (weights + Adam state, ~3x)
# is not taken just for the replay: a full fine-tune of a large model would not fit it.
_SNAPSHOT_LIMIT = 200_000_000
_COMPUTE_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def compute_dtype_name(value: str | torch.dtype) -> str:
    """``torch.float16`` / "fp16" / "float16" -> "float16"; anything else is an error."""
    name = str(value).removeprefix("torch.")
    if name not in _COMPUTE_DTYPES:
        raise ConfigError(
            f"compute_dtype {value!r}: use torch.float32, torch.bfloat16 or torch.float16 "
            "(or their names)"
        )
    return _COMPUTE_DTYPES[name]


def trainable_of(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The tensors the optimizer updates, in param-group order, each once."""
    seen: set[int] = set()
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
    return out


def adam_eps_of(optimizer: torch.optim.Optimizer) -> float | None:
    eps = optimizer.param_groups[0].get("eps") if optimizer.param_groups else None
    return float(eps) if isinstance(eps, (int, float)) else None


@dataclass
class SessionSummary:
    anomalies: list[Anomaly] = field(default_factory=list)
    warnings: list[Anomaly] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    rolled_back_steps: list[int] = field(default_factory=list)
    # --on-anomaly repair: {"step", "cause", "module", "repair", "detail"} per repair.
    repairs: list[dict] = field(default_factory=list)
    dropped_batches: list[int] = field(default_factory=list)
    bundle: Path | None = None


@dataclass
class _HeldStep:
    """A step judged one step late: its record on the way to the host, and what its
    judging needs that the next step overwrites (the pre-step state for the replay)."""

    step: int
    pending: PendingRecord
    recorded: RecordedStep | None
    scaler_skipped: bool
    compute_dtype: str
    before: StateSnapshot | None = None
    rng_before: torch.Tensor | None = None
    # The gradients the optimizer stepped on, for a replay of the optimizer pass alone
    # (the next step's backward replaces them before this step is judged).
    grads: list[torch.Tensor | None] | None = None


class TraceSession:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        trainable: list[torch.nn.Parameter] | None = None,
        settings: TraceSettings | None = None,
        run_dir: Path | str = Path("runs/trace"),
        console: Console | None = None,
        compute_dtype: str | torch.dtype = "float32",
        uses_grad_scaler: bool = False,
        meta: dict | None = None,
        resume_from: int | None = None,
        train_config: TrainConfig | None = None,
        ranks: RankGroup | None = None,
    ) -> None:
        """Only ``model`` and ``optimizer`` are required. ``trainable`` defaults to the
        optimizer's tensors, ``settings.adam_eps`` to the optimizer's eps; without a
        ``scheduler`` rollback lowers the optimizer's learning rates directly.
        ``train_config`` lets the replay write a repro bundle (``stabilizer train``);
        ``meta`` goes into the store; ``ranks`` is the torchrun group."""
        settings = settings or TraceSettings()
        if settings.adam_eps is None:
            settings = dataclasses.replace(settings, adam_eps=adam_eps_of(optimizer))
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.settings = settings
        self.train_config = train_config
        # Stderr: stdout may be the user's own output (a table, a JSON stream).
        self.console = console if console is not None else Console(stderr=True)
        # Causes the preflight named before step 0 (set by the face that ran it): the
        # card of a NaN with one of them says it was predicted.
        self.preflight_causes: tuple[str, ...] = ()
        self.run_dir = Path(run_dir)
        self.uses_grad_scaler = uses_grad_scaler
        self.ranks = ranks
        self.rank = ranks.rank if ranks is not None else 0
        trainable = trainable if trainable is not None else trainable_of(optimizer)
        self.trainable = trainable
        self.tracer = Tracer(
            model,
            optimizer=optimizer,
            pattern=settings.probe,
            trace_every=settings.trace_every,
            compile_stats=settings.compile_stats,
        ).attach()
        self.detector = Detector(
            self.tracer,
            DetectorContext(
                compute_dtype=compute_dtype_name(compute_dtype),
                adam_eps=settings.adam_eps,
                uses_grad_scaler=uses_grad_scaler,
            ),
        )
        self.store = self._open_store(meta or {}, resume_from)
        self.policy = settings.on_anomaly
        # The replay starts from the pre-step state; skip/clip/rollback restore it.
        small = sum(p.numel() for p in trainable) <= _SNAPSHOT_LIMIT
        self.replays = settings.replay and small
        self.needs_snapshot = self.policy in ("skip", "clip", "rollback", "repair") or self.replays
        self.before = StateSnapshot(trainable, optimizer)
        self.good = StateSnapshot(trainable, optimizer)
        # Judging one step late (--judge-late): the step's copy to the host is waited for
        # at the end of the next step, so no step ends in a host-device sync. The held
        # step keeps its pre-step snapshot; the other one is the next step's (two kept).
        device = trainable[0].device if trainable else torch.device("cpu")
        self.judge_late = judges_late(settings, device)
        self._held: _HeldStep | None = None
        self._spare_before: StateSnapshot | None = None
        self.summary = SessionSummary()
        self.replaying = False  # True while the replay re-runs a step (faces ignore it)
        self._clamps: list[ClampOutput] = []
        self._repairs: list = []  # the hook owners repairs installed (removed on close)
        self._repaired: set[tuple[str, int | None]] = set()
        # Set by a repair that the step should run again on the same batch; the loop
        # that can (stabilizer's) reads it with take_redo().
        self._redo = False
        self._redo_step: int | None = None
        # The autocast dtype an upcast repair needs the forward to run under (None: none).
        self.autocast_dtype: torch.dtype | None = None
        # Set by a loop that can add a GradScaler after an upcast repair (stabilizer's):
        # fp16 autocast without loss scaling flushes small gradients to zero.
        self.can_add_grad_scaler = False
        self._amp_skips_in_a_row = 0
        self._clean_since_good = 0
        self.max_grad_norm = settings.max_grad_norm
        self._rng_before: torch.Tensor | None = None
        # TensorBoard and W&B get the same rows, in the order the store gets them.
        self.sinks = self._open_sinks(settings)

    def _open_store(self, meta: dict, resume_from: int | None) -> TraceStore:
        path = store_path(self.run_dir, self.rank)
        if self.ranks is not None:
            meta = {**meta, "rank": self.rank, "world_size": self.ranks.world_size}
        if resume_from is not None and path.exists():
            store = TraceStore.create(path, meta=meta, append=True)
            store.delete_steps_after(resume_from - 1)
        else:
            store = TraceStore.create(path, meta=meta, overwrite=True)
        store.register_modules(
            [
                ModuleInfo(m.index, m.name, m.label, m.kind, m.layer, m.component, m.is_attention)
                for m in self.tracer.modules
            ]
        )
        store.register_params(
            [
                ParamInfo(p.index, p.name, p.label, p.module_index, p.numel, p.dtype)
                for p in self.tracer.params
            ]
        )
        return store

    # -- per step --------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self.tracer.begin_step(step)
        if self.needs_snapshot:
            self.before.capture()
            self._rng_before = torch.get_rng_state()

    def before_update(self) -> None:
        self.tracer.measure_grads()

    def end_step(
        self,
        step: int,
        loss: torch.Tensor | float | None,
        grad_norm: torch.Tensor | float | None = None,
        micro_batches: list[dict[str, torch.Tensor]] | None = None,
        lr: float | None = None,
        *,
        label_tokens: torch.Tensor | None = None,
        recorded: RecordedStep | None = None,
        extra: dict[str, torch.Tensor | float] | None = None,
        scaler_skipped: bool = False,
    ) -> tuple[bool, StepRecord | None]:
        """Check the step; apply the policy. Returns (accepted, record).

        Judged one step late (``judge_late``), the record is None: this call judges the
        step before (its warnings, anomaly and store row come now), ``flush()`` or
        ``close()`` the last one.

        ``label_tokens``: the fewest label tokens of any micro-batch (0: a NaN loss is
        "all labels masked"); counted from ``micro_batches`` when they are given.
        ``recorded``: what the replay re-runs (None: only an optimizer-pass anomaly can
        be replayed, from the gradients the optimizer still holds).
        ``scaler_skipped``: the GradScaler refused this step's update (said out loud).
        """
        extra = dict(extra or {})
        if label_tokens is None and micro_batches:
            counts = [(b["labels"] != IGNORE_INDEX).sum() for b in micro_batches if "labels" in b]
            label_tokens = torch.stack(counts).min() if counts else None
        if label_tokens is not None:
            extra["label_tokens"] = label_tokens
        if lr is None:
            lr = float(self.optimizer.param_groups[0]["lr"])
        if self.judge_late:
            pending = self.tracer.end_step_late(loss=loss, lr=lr, grad_norm=grad_norm, extra=extra)
            # The step before first: its pre-step snapshot is then free for the next step.
            # This step is held even when that judging stops the run: close() judges it.
            try:
                self.flush()
            finally:
                self._held = self._hold(step, pending, recorded, scaler_skipped)
            # Only a step the GradScaler refused is known to be refused now; warn (the one
            # policy judged late) accepts every other step.
            return not scaler_skipped, None
        record = self.tracer.end_step(loss=loss, lr=lr, grad_norm=grad_norm, extra=extra)
        return self._judge(record, recorded, scaler_skipped)

    def _judge(
        self,
        record: StepRecord,
        recorded: RecordedStep | None,
        scaler_skipped: bool,
        *,
        agree: bool = True,
    ) -> tuple[bool, StepRecord]:
        anomaly = self.detector.check(record)
        if self.ranks is not None and agree:
            anomaly = self._agree(anomaly, record)
        status, accepted = "ok", True
        try:
            # An early warning says "nothing is non-finite yet": never beside an anomaly.
            for warning in self.detector.warnings(record) if anomaly is None else []:
                self._warn(warning, record)
            if anomaly is not None and self._is_amp_skip(anomaly, record):
                # GradScaler already refused the update; the schedule must not advance either.
                status, accepted = "skipped", False
            elif anomaly is not None:
                self._amp_skips_in_a_row = 0
                self._predicted_by(anomaly)
                status, accepted = self._handle(anomaly, record, recorded)
            elif scaler_skipped:
                self._amp_skip_unexplained(record)
                status, accepted = "skipped", False
        except NumericalAnomalyError:
            # The step that stops the run is the one a reader looks at first: keep it.
            self._append_step(_step_data(record, "stopped"))
            raise
        if anomaly is None and not scaler_skipped:
            self._amp_skips_in_a_row = 0
            self._maybe_keep_good(record.step)
        self._append_step(_step_data(record, status))
        return accepted, record

    # -- judging one step late ---------------------------------------------------------
    def _hold(
        self,
        step: int,
        pending: PendingRecord,
        recorded: RecordedStep | None,
        scaler_skipped: bool,
    ) -> _HeldStep:
        held = _HeldStep(
            step, pending, recorded, scaler_skipped, self.detector.context.compute_dtype
        )
        if self.needs_snapshot and self.before.ready:
            # The next begin_step captures into the other snapshot: this one stays as
            # it was before this step until the step is judged.
            held.before, held.rng_before = self.before, self._rng_before
            spare = self._spare_before or StateSnapshot(self.trainable, self.optimizer)
            self.before, self._spare_before = spare, None
            reruns = recorded is not None and bool(recorded.calls) and not recorded.forward_only
            if not reruns:
                held.grads = _copy_grads(self.trainable)
        return held

    def _judge_held(self, held: _HeldStep, *, agree: bool = True) -> None:
        """Judge a held step: its snapshot, RNG state and gradients stand in for the
        current ones while it is judged (a replay re-runs it from them)."""
        record = held.pending.result()  # the step's copy finished a step ago: no stall
        saved = (self.before, self._rng_before, self.detector.context.compute_dtype)
        grads = [p.grad for p in self.trainable] if held.grads is not None else None
        if held.before is not None:
            self.before, self._rng_before = held.before, held.rng_before
        if held.grads is not None:
            for param, grad in zip(self.trainable, held.grads, strict=True):
                param.grad = grad
        self.detector.context.compute_dtype = held.compute_dtype
        try:
            self._judge(record, held.recorded, held.scaler_skipped, agree=agree)
        finally:
            self.before, self._rng_before, self.detector.context.compute_dtype = saved
            if grads is not None:
                for param, grad in zip(self.trainable, grads, strict=True):
                    param.grad = grad
            if held.before is not None:
                self._spare_before = held.before

    @property
    def policy_text(self) -> str:
        """How this session acts, for the faces' start line."""
        late = "; each step judged at the end of the next" if self.judge_late else ""
        return f"on anomaly: {self.policy}{late}"

    def flush(self, *, agree: bool = True) -> None:
        """Judge the step still held (``judge_late``): call it when the loop ends;
        ``close()`` does. A no-op when every step was judged in its own step.
        ``agree=False``: without the ranks' collective (a rank failing alone)."""
        held, self._held = self._held, None
        if held is not None:
            self._judge_held(held, agree=agree)

    def _warn(self, warning: Anomaly, record: StepRecord) -> None:
        self.summary.warnings.append(warning)
        self._append_anomaly(warning)
        rank = f" (rank {self.rank})" if self.ranks is not None else ""
        self.console.print(
            Panel(
                _plain(warning.card()),
                title=f"stabilizer: early warning{rank}",
                border_style="yellow",
            )
        )
        if self.settings.on_warning == "raise":
            self._act(record.step, "raise", "stopping on the first warning (on_warning=raise)")
            raise NumericalAnomalyError(warning, f"training stopped at step {record.step}")

    def _predicted_by(self, anomaly: Anomaly) -> None:
        """Name the earlier warning that foretold this NaN/Inf: the same module's if
        there is one, else the first warning of the run."""
        for cause in (anomaly.cause, ROOT_CAUSE.get(anomaly.cause)):
            if cause in self.preflight_causes:
                anomaly.evidence["predicted by"] = (
                    f"the preflight, before step 0 ({cause}), {anomaly.step + 1} step(s) ahead"
                )
                return
        earlier = [w for w in self.summary.warnings if w.step <= anomaly.step]
        if not earlier:
            return
        # The earliest warning that points at this anomaly: the update it follows from,
        # else the same module's first, else the run's first.
        root = [w for w in earlier if w.cause == ROOT_CAUSE.get(anomaly.cause)]
        same = [w for w in earlier if w.module_index == anomaly.module_index]
        warning = (root or same or earlier)[0]
        ahead = anomaly.step - warning.step
        anomaly.evidence["predicted by"] = (
            f"the warning of step {warning.step} ({warning.cause}"
            f"{', ' + warning.module if warning.module else ''}), {ahead} step(s) ahead"
        )

    def _amp_skip_unexplained(self, record: StepRecord) -> None:
        """The GradScaler skipped a step whose probed modules were all finite."""
        self._say_amp_skip(record.step, "outside the probed modules")

    def _say_amp_skip(self, step: int, where: str) -> None:
        """Log and print a step the GradScaler refused (it says nothing itself)."""
        self._amp_skips_in_a_row += 1
        detail = (
            f"GradScaler skipped step {step}: non-finite gradients {where}; "
            f"{self._amp_skips_in_a_row} in a row"
        )
        self._log_action(step, "skip", detail)
        if self.rank == 0:
            self.console.print(f"[yellow]{_plain(detail)}[/]")

    def _agree(self, local: Anomaly | None, record: StepRecord) -> Anomaly | None:
        """Every rank's verdict on this step; the anomaly this rank acts on (or None).

        All ranks get the same answer to "is this step kept?", so the policy acts on
        every replica alike. The rank(s) that saw the earliest pass go non-finite keep
        their own diagnosis; the others record that the NaN came from them.
        """
        mine = RankVerdict(
            rank=self.rank,
            anomalous=local is not None,
            pass_index=PASSES.index(local.pass_) if local is not None else len(PASSES),
            module_index=(
                local.module_index if local is not None and local.module_index is not None else -1
            ),
            cause_index=_CAUSE_IDS.index(local.cause) if local is not None else -1,
        )
        agreement = self.ranks.agree(mine)
        if not agreement.anomalous:
            return None
        origins = agreement.origin_ranks
        if self.rank in origins:
            anomaly = local
        else:
            anomaly = self._other_rank_anomaly(record.step, agreement, local)
        anomaly.evidence["rank"] = self.rank
        anomaly.evidence["first non-finite on rank(s)"] = origins
        anomaly.evidence["ranks with non-finite values"] = agreement.anomalous_ranks
        return anomaly

    def _other_rank_anomaly(
        self, step: int, agreement: StepAgreement, local: Anomaly | None
    ) -> Anomaly:
        origin = agreement.verdicts[agreement.origin_ranks[0]]
        module = ""
        if 0 <= origin.module_index < len(self.tracer.modules):
            module = f", first in {self.tracer.modules[origin.module_index].label}"
        anomaly = make_anomaly(
            step,
            origin.pass_,
            "other-rank",
            origin=origin.rank,
            origin_pass=origin.pass_,
            origin_module=module,
            origin_store=store_path(Path("."), origin.rank).name,
        )
        if 0 <= origin.cause_index < len(_CAUSE_IDS):
            anomaly.evidence["cause on that rank"] = _CAUSE_IDS[origin.cause_index]
        anomaly.evidence["on this rank"] = (
            local.headline() if local is not None else "every value was finite"
        )
        return anomaly

    def _append_step(self, data: StepData) -> None:
        # A step redone after a repair replaces its failed attempt's row (the anomaly
        # and the repair action stay in their own tables).
        redone = data.step == self._redo_step and data.status != "repaired"
        self.store.append_step(data, replace=redone)
        if redone:
            self._redo_step = None
        for sink in self.sinks:
            sink.write_step(data)

    def _append_anomaly(self, anomaly: Anomaly) -> None:
        row = _anomaly_row(anomaly, self.store)
        self.store.append_anomaly(**row)
        for sink in self.sinks:
            sink.write_anomaly({**row, "pass": row["pass_"]})

    def _is_amp_skip(self, anomaly: Anomaly, record: StepRecord) -> bool:
        if not (self.uses_grad_scaler and anomaly.pass_ == "backward"):
            return False
        if record.optimizer_stepped:
            return False
        self._say_amp_skip(record.step, f"(first in {anomaly.module or 'a parameter'})")
        if self._amp_skips_in_a_row >= _GRADSCALER_PATIENCE:
            anomaly.evidence["GradScaler skips in a row"] = self._amp_skips_in_a_row
            self._record_anomaly(anomaly, record)
            raise NumericalAnomalyError(
                anomaly, "the GradScaler's scale keeps shrinking: every step overflows"
            )
        return True

    def _record_anomaly(self, anomaly: Anomaly, record: StepRecord) -> None:
        self.summary.anomalies.append(anomaly)
        self._append_anomaly(anomaly)

    def _handle(
        self, anomaly: Anomaly, record: StepRecord, recorded: RecordedStep | None
    ) -> tuple[str, bool]:
        first = not self.summary.anomalies
        if first and self.replays and self.before.ready and anomaly.cause != "other-rank":
            anomaly = self._replay(anomaly, record, recorded)
        self._record_anomaly(anomaly, record)
        if anomaly.cause != "other-rank":
            where = f" on rank {self.rank}" if self.ranks is not None else ""
            self.console.print(
                Panel(
                    _plain(anomaly.card()),
                    title=f"stabilizer: anomaly {len(self.summary.anomalies)}{where}",
                    border_style="red",
                )
            )
        elif self.rank == 0:
            self.console.print(f"[bold red]{anomaly.headline()}:[/] {anomaly.summary}")
        count = len(self.summary.anomalies)
        if self.policy == "raise":
            self._act(record.step, "raise", "stopping on the first anomaly (--on-anomaly raise)")
            raise NumericalAnomalyError(anomaly, f"training stopped at step {record.step}")
        if count > self.settings.max_anomalies:
            if self.policy in ("skip", "clip", "rollback"):
                self.before.restore()  # these policies never keep an anomalous update
                self.detector.weights_restored()
            self._act(
                record.step,
                "stop",
                f"{count} anomalies > --max-anomalies {self.settings.max_anomalies}",
            )
            raise NumericalAnomalyError(
                anomaly,
                f"training stopped at step {record.step}: {count} anomalies "
                f"(--max-anomalies {self.settings.max_anomalies}); the first diagnosis is in the store",
            )
        if self.policy == "warn":
            self._act(record.step, "warn", "update applied anyway (--on-anomaly warn)")
            return "anomaly", True
        if self.policy == "repair":
            kind = repair_kind(anomaly.cause, anomaly.pass_)
            if kind != "rollback":
                return self._repair(anomaly, record, kind)
            if len(self.summary.repairs) >= self.settings.max_repairs:
                why = f"{len(self.summary.repairs)} repairs = --max-repairs"
                self._act(record.step, "stop", f"cannot repair: {why}")
                raise NumericalAnomalyError(
                    anomaly, f"training stopped at step {record.step}: {why}"
                )
        if self.policy in ("skip", "clip"):
            self.before.restore()
            self.detector.weights_restored()
            self.summary.skipped_steps.append(record.step)
            self._act(
                record.step,
                "skip",
                f"step {record.step} skipped: its update was undone and the learning-rate "
                "schedule did not advance",
            )
            if self.policy == "clip":
                self._clip(anomaly, record)
            return "skipped", False
        # rollback
        if self.good.ready:
            self.good.restore()
        else:
            self.before.restore()
        self.detector.weights_restored()
        factor = self.settings.rollback_lr_factor
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        # The schedule does not advance on this step, so the lower rate must also reach
        # the optimizer now: the very next step is the one that must not diverge again.
        # Without a scheduler this is the whole of it.
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        if self.scheduler is not None:
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        peak = (
            self.scheduler.base_lrs[0]
            if self.scheduler is not None and hasattr(self.scheduler, "base_lrs")
            else self.optimizer.param_groups[0]["lr"]
        )
        # The unstable update (if one was warned) is undone with the rest: a good state
        # may be kept again from here.
        self.detector.update_repaired()
        self.summary.rolled_back_steps.append(record.step)
        detail = (
            f"restored the last good adapter and optimizer state; learning rate x"
            f"{self.settings.rollback_lr_factor} (peak now {peak:.3g})"
        )
        if self.policy == "repair":
            self.summary.repairs.append(
                {
                    "step": record.step,
                    "cause": anomaly.cause,
                    "module": anomaly.module,
                    "repair": "rollback",
                    "detail": detail,
                }
            )
        self._act(record.step, "rollback", detail)
        return "rolled_back", False

    def _repair(self, anomaly: Anomaly, record: StepRecord, kind: str | None):
        """Undo the step, apply the fix for ``anomaly.cause``, ask for a redo."""
        step = record.step
        key = (anomaly.cause, anomaly.module_index)
        why = None
        if kind is None:
            why = f"no mechanical repair for {anomaly.cause}: apply the card's fix"
        elif kind != "drop" and key in self._repaired:
            where = f" in {anomaly.module}" if anomaly.module else ""
            why = f"{anomaly.cause}{where} came back after its repair"
        elif self.ranks is not None and kind in ("upcast", "module-fp32"):
            # DDP's buckets are laid out for the dtypes it was built with.
            why = f"{kind} changes tensor dtypes, which DDP cannot follow"
        elif len(self.summary.repairs) >= self.settings.max_repairs:
            why = f"{len(self.summary.repairs)} repairs = --max-repairs"
        if why is not None:
            self._act(step, "stop", f"cannot repair: {why}")
            raise NumericalAnomalyError(anomaly, f"training stopped at step {step}: {why}")
        source = "the pre-step state"
        if anomaly.cause in ROOT_CAUSE:
            # The state went wrong in an earlier step's update: go back to before it.
            self.good.restore()
            earlier = self.detector.unstable_update
            source = f"the state before step {earlier.step}'s update" if earlier else "a good state"
        else:
            self.before.restore()
        self.detector.weights_restored()
        if kind == "upcast":
            self.detector.update_repaired()
            changed = upcast_state(self.trainable, self.optimizer)
            dtype = self._base_half_dtype()
            if dtype is not None:
                self.autocast_dtype = dtype
                self._repairs.append(AutocastForward(self.model, dtype))
            scaled = (
                dtype == torch.float16 and self.can_add_grad_scaler and not self.uses_grad_scaler
            )
            if scaled:
                self.adopt_grad_scaler()
            detail = (
                f"{changed} trainable tensor(s) and their optimizer state upcast to fp32 "
                f"from {source}"
                + (f"; the forward now runs under {dtype} autocast" if dtype else "")
                + ("; a GradScaler now scales the loss" if scaled else "")
            )
        elif kind == "module-fp32":
            info = self.tracer.modules[anomaly.module_index]
            self._repairs.append(Float32Module(self.model.get_submodule(info.name), self.optimizer))
            detail = f"{info.label} runs in fp32 from now on (weights, inputs; autocast off)"
        else:  # drop
            self.summary.dropped_batches.append(step)
            detail = f"batch of step {step} dropped ({anomaly.cause}); its update undone"
        self._repaired.add(key)
        self._redo = kind != "drop"
        self._redo_step = step if self._redo else None
        self.summary.repairs.append(
            {
                "step": step,
                "cause": anomaly.cause,
                "module": anomaly.module,
                "repair": kind,
                "detail": detail,
            }
        )
        self._act(step, "repair", detail)
        return "repaired", False

    def adopt_grad_scaler(self) -> None:
        """The loop scales its loss from now on: backward overflows are then the
        scaler's to skip, not anomalies (as for a run that started with one)."""
        self.uses_grad_scaler = True
        self.detector.context = dataclasses.replace(self.detector.context, uses_grad_scaler=True)

    def _base_half_dtype(self) -> torch.dtype | None:
        # The frozen weights' 16-bit dtype, if any: fp32 adapters then need autocast.
        for param in self.model.parameters():
            if not param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
                return param.dtype
        return None

    def _clip(self, anomaly: Anomaly, record: StepRecord) -> None:
        if anomaly.pass_ == "forward" and anomaly.module_index is not None:
            info = self.tracer.modules[anomaly.module_index]
            module = self.model.get_submodule(info.name)
            dtype = getattr(torch, self.detector.context.compute_dtype)
            bound = torch.finfo(dtype).max / 2
            self._clamps.append(ClampOutput(module, bound))
            self._act(record.step, "clip", f"clamping {info.label} output to +-{bound:.4g}")
        else:
            current = self.max_grad_norm or 1.0
            self.max_grad_norm = current / 2
            self._act(
                record.step, "clip", f"gradient-norm clip lowered to {self.max_grad_norm:.3g}"
            )

    def _maybe_keep_good(self, step: int) -> None:
        if self.policy not in ("rollback", "repair"):
            return
        unstable = self.detector.unstable_update
        if unstable is not None:
            # Keep the state from before the unstable update: a repair goes back to it.
            if unstable.step == step and self.before.ready:
                self.good.copy_from(self.before)
            return
        self._clean_since_good += 1
        if not self.good.ready or self._clean_since_good >= 20:
            self.good.copy_from(self.before) if self.before.ready else self.good.capture()
            self._clean_since_good = 0

    def _act(self, step: int, action: str, detail: str) -> None:
        self._log_action(step, action, detail)
        if self.rank == 0:  # every rank takes the same action: one of them says it
            self.console.print(f"[bold yellow]{action}:[/] {detail}")

    def _log_action(self, step: int, action: str, detail: str) -> None:
        self.store.append_action(step=step, action=action, detail=detail)
        for sink in self.sinks:
            sink.write_action({"step": step, "action": action, "detail": detail})

    def _replay(
        self, anomaly: Anomaly, record: StepRecord, recorded: RecordedStep | None
    ) -> Anomaly:
        """The op-level and fp32 re-run of this step; returns the (sharpened) anomaly."""
        from stabilizer.detector.replay import replay_step, write_bundle

        writer = None
        if self.train_config is not None and recorded is not None and recorded.calls:

            def writer() -> Path:
                return write_bundle(
                    self.run_dir,
                    anomaly,
                    self.train_config,
                    self.model,
                    self.optimizer,
                    recorded.batches(),
                    self._rng_before,
                )

        started = time.perf_counter()
        self.replaying = True
        try:
            result = replay_step(
                model=self.model,
                optimizer=self.optimizer,
                before=self.before,
                anomaly=anomaly,
                tracer=self.tracer,
                rng_state=self._rng_before,
                recorded=recorded,
                write_bundle=writer,
            )
        except ReplayUnavailable as why:
            anomaly.evidence["replay"] = f"not run: {why}"
            return anomaly
        except Exception as exc:  # a failed replay must not hide the anomaly itself
            anomaly.evidence["replay"] = f"failed: {type(exc).__name__}: {exc}"
            return anomaly
        finally:
            self.replaying = False
        anomaly.evidence["replay seconds"] = round(time.perf_counter() - started, 2)
        anomaly = self.detector.refine(anomaly, result.op)
        if result.bundle is not None:
            self.summary.bundle = result.bundle
            self._act(record.step, "replay", f"repro bundle saved to {result.bundle}")
        return anomaly

    def take_redo(self) -> bool:
        """True once after a repair asked for the step to be redone on the same batch."""
        redo, self._redo = self._redo, False
        return redo

    def close(self, *, failing: bool = False) -> None:
        """Judge the held step, remove every hook, close the store and the sinks.

        ``failing``: an error is on its way; a stop the held step would raise (too many
        anomalies) is then logged in the store but not raised over it, and no rank is
        waited for (the others may not be failing)."""
        try:
            self.flush(agree=not failing)
        except NumericalAnomalyError:
            if not failing:
                raise
        finally:
            self._close_owned()

    def _close_owned(self) -> None:
        for clamp in self._clamps:
            clamp.remove()
        self._clamps.clear()
        for owner in self._repairs:
            owner.remove()
        self._repairs.clear()
        self.tracer.close()
        self.store.close()
        for sink in self.sinks:
            sink.close()

    def _open_sinks(self, settings: TraceSettings) -> list:
        sinks = []
        if settings.tensorboard:
            from stabilizer.reports.tensorboard import TensorBoardSink

            log_dir = self.run_dir / "tensorboard" / f"rank{self.rank}"
            sinks.append(TensorBoardSink(log_dir, self.store.modules(), self.store.params()))
        if settings.wandb:
            from stabilizer.reports.wandb_sink import WandbSink

            try:
                sinks.append(
                    WandbSink(
                        self.run_dir,
                        self.rank,
                        self.store.modules(),
                        self.store.params(),
                        config=self.store.meta().get("config"),
                    )
                )
            except BaseException:
                for sink in sinks:  # the TensorBoard writer opened before: close it
                    sink.close()
                raise
        return sinks


def _copy_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    present = [p.grad for p in params if p.grad is not None]
    copies = iter(torch._foreach_mul(present, 1.0) if present else [])  # one multi-tensor op
    return [next(copies) if p.grad is not None else None for p in params]


def _plain(text: str) -> str:
    """Text for rich that is never read as markup (module names, data strings)."""
    from rich.markup import escape

    return escape(text)


def _step_data(record: StepRecord, status: str) -> StepData:
    stats = record.stats
    if stats is None:
        # Between full steps only finiteness is known: keep the modules that failed it.
        stats, fire_order = {}, {}
        for site, finite in record.finite.items():
            if finite.all():
                continue
            rows = np.full((len(finite), len(TENSOR_STATS)), np.nan)
            rows[~finite, TENSOR_STATS.index("nan")] = 1.0
            stats[site] = rows
            fire_order[site] = np.where(finite, -1, record.order[site]).astype("int64")
    else:
        fire_order = {site: order.astype("int64") for site, order in record.order.items()}
    return StepData(
        step=record.step,
        loss=record.loss,
        lr=record.lr if record.lr is not None else math.nan,
        grad_norm=record.grad_norm,
        status=status,
        full=record.full,
        module_stats=stats,
        fire_order=fire_order,
        score_max=record.score_max,
        param_stats=record.param_stats,
        extra={k: v for k, v in record.extra.items()},
    )


def _anomaly_row(anomaly: Anomaly, store: TraceStore) -> dict:
    return {
        "step": anomaly.step,
        "pass_": anomaly.pass_,
        "module_id": anomaly.module_index,
        "op": anomaly.op,
        "cause": anomaly.cause,
        "summary": anomaly.summary,
        "fix": anomaly.fix,
        "evidence": {
            **anomaly.evidence,
            "module": anomaly.module,
            "warning": anomaly.warning,
            "module_path": anomaly.module_path,
        },
    }
