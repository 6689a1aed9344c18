"""``--trace`` inside the training loop: probes, store, detector and policy, step by step.

    session = TraceSession.start(model, optimizer, scheduler, trainable, cfg, run_dir, console)
    for step ...:
        session.begin_step(step)
        loss, grad_norm = train_step(..., before_update=session.before_update)
        accepted = session.end_step(step, loss, grad_norm, micro_batches, lr)
        if accepted:
            scheduler.step()
    session.close()

Every action is logged in the store and printed. A skipped step is said out
loud (AMP's GradScaler skips silently), and ``max_anomalies`` stops the run
with the diagnosis instead of skipping forever.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.panel import Panel

from stabilizer.config import TrainConfig
from stabilizer.data.collate import IGNORE_INDEX
from stabilizer.detector.detect import Detector, DetectorContext
from stabilizer.detector.diagnosis import Anomaly
from stabilizer.detector.policy import ClampOutput, NumericalAnomalyError, StateSnapshot
from stabilizer.probes.schema import TENSOR_STATS
from stabilizer.probes.tracer import StepRecord, Tracer
from stabilizer.store import ModuleInfo, ParamInfo, StepData, TraceStore

TRACE_FILE = "trace.db"
_GRADSCALER_PATIENCE = 5  # consecutive AMP skips before a run counts it as an anomaly


@dataclass
class SessionSummary:
    anomalies: list[Anomaly] = field(default_factory=list)
    warnings: list[Anomaly] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    rolled_back_steps: list[int] = field(default_factory=list)
    bundle: Path | None = None


class TraceSession:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        trainable: list[torch.nn.Parameter],
        cfg: TrainConfig,
        run_dir: Path,
        console: Console,
        compute_dtype: str,
        uses_grad_scaler: bool,
        resume_from: int | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cfg = cfg
        self.console = console
        self.run_dir = run_dir
        self.uses_grad_scaler = uses_grad_scaler
        self.tracer = Tracer(
            model,
            optimizer=optimizer,
            pattern=cfg.probe,
            trace_every=cfg.trace_every,
            compile_stats=cfg.compile_stats,
        ).attach()
        self.detector = Detector(
            self.tracer,
            DetectorContext(
                compute_dtype=compute_dtype,
                adam_eps=cfg.adam_eps,
                uses_grad_scaler=uses_grad_scaler,
            ),
        )
        self.store = self._open_store(resume_from)
        self.policy = cfg.on_anomaly
        self.needs_snapshot = self.policy in ("skip", "clip", "rollback") or cfg.replay
        self.before = StateSnapshot(trainable, optimizer)
        self.good = StateSnapshot(trainable, optimizer)
        self.summary = SessionSummary()
        self._clamps: list[ClampOutput] = []
        self._amp_skips_in_a_row = 0
        self._clean_since_good = 0
        self.max_grad_norm = cfg.max_grad_norm
        self._batches: list[dict] | None = None
        self._rng_before: torch.Tensor | None = None

    def _open_store(self, resume_from: int | None) -> TraceStore:
        path = self.run_dir / TRACE_FILE
        meta = {"config": self.cfg.to_dict()}
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
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        micro_batches: list[dict[str, torch.Tensor]],
        lr: float,
    ) -> tuple[bool, StepRecord]:
        """Check the step; apply the policy. Returns (accepted, record)."""
        label_tokens = sum((b["labels"] != IGNORE_INDEX).sum() for b in micro_batches)
        record = self.tracer.end_step(
            loss=loss, lr=lr, grad_norm=grad_norm, extra={"label_tokens": label_tokens}
        )
        anomaly = self.detector.check(record)
        # An early warning says "nothing is non-finite yet": never beside an anomaly.
        for warning in self.detector.warnings(record) if anomaly is None else []:
            self.summary.warnings.append(warning)
            self.store.append_anomaly(**_anomaly_row(warning, self.store))
            self.console.print(f"[yellow]early warning:[/] {warning.card()}")
        status, accepted = "ok", True
        try:
            if anomaly is not None and self._is_amp_skip(anomaly, record):
                # GradScaler already refused the update; the schedule must not advance either.
                status, accepted = "skipped", False
            elif anomaly is not None:
                self._amp_skips_in_a_row = 0
                status, accepted = self._handle(anomaly, record, micro_batches)
        except NumericalAnomalyError:
            # The step that stops the run is the one a reader looks at first: keep it.
            self.store.append_step(_step_data(record, "stopped"))
            raise
        if anomaly is None:
            self._amp_skips_in_a_row = 0
            self._maybe_keep_good()
        self.store.append_step(_step_data(record, status))
        return accepted, record

    def _is_amp_skip(self, anomaly: Anomaly, record: StepRecord) -> bool:
        if not (self.uses_grad_scaler and anomaly.pass_ == "backward"):
            return False
        if record.optimizer_stepped:
            return False
        self._amp_skips_in_a_row += 1
        detail = (
            f"GradScaler skipped step {record.step}: non-finite gradients "
            f"(first in {anomaly.module or 'a parameter'}); {self._amp_skips_in_a_row} in a row"
        )
        self.store.append_action(step=record.step, action="skip", detail=detail)
        self.console.print(f"[yellow]{detail}[/]")
        if self._amp_skips_in_a_row >= _GRADSCALER_PATIENCE:
            anomaly.evidence["GradScaler skips in a row"] = self._amp_skips_in_a_row
            self._record_anomaly(anomaly, record)
            raise NumericalAnomalyError(
                anomaly, "the GradScaler's scale keeps shrinking: every step overflows"
            )
        return True

    def _record_anomaly(self, anomaly: Anomaly, record: StepRecord) -> None:
        self.summary.anomalies.append(anomaly)
        self.store.append_anomaly(**_anomaly_row(anomaly, self.store))

    def _handle(self, anomaly: Anomaly, record: StepRecord, micro_batches) -> tuple[str, bool]:
        first = not self.summary.anomalies
        if first and self.cfg.replay and self.before.ready:
            self._replay(anomaly, record, micro_batches)
        self._record_anomaly(anomaly, record)
        self.console.print(
            Panel(
                anomaly.card(),
                title=f"stabilizer: anomaly {len(self.summary.anomalies)}",
                border_style="red",
            )
        )
        count = len(self.summary.anomalies)
        if self.policy == "raise":
            self._act(record.step, "raise", "stopping on the first anomaly (--on-anomaly raise)")
            raise NumericalAnomalyError(anomaly, f"training stopped at step {record.step}")
        if count > self.cfg.max_anomalies:
            if self.policy in ("skip", "clip", "rollback"):
                self.before.restore()  # these policies never keep an anomalous update
                self.detector.weights_restored()
            self._act(
                record.step,
                "stop",
                f"{count} anomalies > --max-anomalies {self.cfg.max_anomalies}",
            )
            raise NumericalAnomalyError(
                anomaly,
                f"training stopped at step {record.step}: {count} anomalies "
                f"(--max-anomalies {self.cfg.max_anomalies}); the first diagnosis is in the store",
            )
        if self.policy == "warn":
            self._act(record.step, "warn", "update applied anyway (--on-anomaly warn)")
            return "anomaly", True
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
        factor = self.cfg.rollback_lr_factor
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        # The schedule does not advance on this step, so the lower rate must also reach
        # the optimizer now: the very next step is the one that must not diverge again.
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.summary.rolled_back_steps.append(record.step)
        self._act(
            record.step,
            "rollback",
            f"restored the last good adapter and optimizer state; learning rate x"
            f"{self.cfg.rollback_lr_factor} (peak now {self.scheduler.base_lrs[0]:.3g})",
        )
        return "rolled_back", False

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

    def _maybe_keep_good(self) -> None:
        if self.policy != "rollback":
            return
        self._clean_since_good += 1
        if not self.good.ready or self._clean_since_good >= 20:
            self.good.copy_from(self.before) if self.before.ready else self.good.capture()
            self._clean_since_good = 0

    def _act(self, step: int, action: str, detail: str) -> None:
        self.store.append_action(step=step, action=action, detail=detail)
        self.console.print(f"[bold yellow]{action}:[/] {detail}")

    def _replay(self, anomaly: Anomaly, record: StepRecord, micro_batches) -> None:
        from stabilizer.detector.replay import replay_step

        started = time.perf_counter()
        try:
            result = replay_step(
                model=self.model,
                optimizer=self.optimizer,
                before=self.before,
                micro_batches=micro_batches,
                anomaly=anomaly,
                tracer=self.tracer,
                rng_state=self._rng_before,
                run_dir=self.run_dir,
                cfg=self.cfg,
            )
        except Exception as exc:  # a failed replay must not hide the anomaly itself
            anomaly.evidence["replay"] = f"failed: {type(exc).__name__}: {exc}"
            return
        anomaly.evidence["replay seconds"] = round(time.perf_counter() - started, 2)
        if result is not None and result.bundle is not None:
            self.summary.bundle = result.bundle
            self._act(record.step, "replay", f"repro bundle saved to {result.bundle}")

    def close(self) -> None:
        for clamp in self._clamps:
            clamp.remove()
        self._clamps.clear()
        self.tracer.close()
        self.store.close()


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
