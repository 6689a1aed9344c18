"""TensorBoard event files from a traced run: written live during training, or exported
afterwards from the trace stores. Both go through ``TensorBoardSink`` (one code path).

Export a finished (or crashed, or still running) run, one TensorBoard run per rank::

    >>> export_tensorboard(Path("runs/classic"))
    PosixPath('runs/classic/tensorboard')
    $ tensorboard --logdir runs/classic/tensorboard      # runs "rank0", "rank1", ...

Live, beside the store (the session appends to the store first, then to the sink)::

    with TensorBoardSink(run_dir / "tensorboard" / "rank0", modules, params) as tb:
        store.append_anomaly(**row); tb.write_anomaly(row)    # before the step it belongs to
        store.append_step(data);     tb.write_step(data)

What is written (x axis: optimizer step; wall time: the store's, else the time of writing):

| tag                            | steps              | value                                        |
|--------------------------------|--------------------|----------------------------------------------|
| train/loss, train/lr,          | every step         | as recorded (NaN/Inf kept)                   |
| train/grad_norm                |                    |                                              |
| train/status_code              | every step         | 0 ok, 1 skipped, 2 rolled_back, 3 anomaly,   |
|                                |                    | 4 stopped (the index in ``STEP_STATUSES``)   |
| anomaly/count                  | every step         | anomalies up to this step (no early warnings)|
| anomaly/warnings               | every step         | early warnings up to this step               |
| anomaly/nonfinite_modules      | every step         | modules with NaN/Inf at any site this step   |
| anomaly/nonfinite_params       | steps with params  | parameters whose weight or gradient held     |
|                                |                    | NaN/Inf (the optimizer-pass failures)        |
| activation_absmax/<group>      | full steps         | max over the group of fwd_out abs-max        |
| activation_rms/<group>         | full steps         | max over the group of fwd_out RMS            |
| gradient_rms/<group>           | full steps         | max over the group of grad_out RMS           |
| attention_score_max/<group>    | full steps         | max |q·k| (unscaled) of the group's        |
|                                |                    | attention modules (+Inf kept: an overflow)   |
| lora_update_ratio/<group>      | steps with params  | max finite ||dW||/||W|| of the group's LoRA  |
|                                |                    | tensors (lora_B's first ratio is undefined)  |
| text anomaly/diagnosis         | anomaly steps      | cause, pass, first offender, op, summary, fix|
| text action/taken              | action steps       | what a policy did and why                    |
| text train/status              | non-ok steps       | the status in words                          |

``<group>`` is the HTML report's grouping (``plots.group_label``) with ``_`` for spaces:
``L0_self-attn``, ``L3_cross-attn``, ``L2_FFN``, ``embeddings``, ``projection``,
``components``. A group without a recorded value at a step gets no point there: curves
of one layer, not hundreds of per-module lines. Check-only steps (between
``--trace-every`` steps) carry only the train/ and anomaly/ scalars.

The writer is ``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard``
package (``pip install 'stabilizer[tensorboard]'``); an installed ``tensorboardX`` is the
fallback. Both are imported on first use: importing this module needs neither (nor torch).
"""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from stabilizer.errors import ConfigError
from stabilizer.probes.schema import PARAM_STATS, TENSOR_STATS
from stabilizer.reports.plots import STATUS_STYLE, group_label, hard_anomalies, module_order
from stabilizer.store import (
    STEP_STATUSES,
    ModuleInfo,
    ParamInfo,
    StepData,
    TraceStore,
    rank_store_paths,
)

TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = "pip install 'stabilizer[tensorboard]'"
STATUS_CODES = {status: code for code, status in enumerate(STEP_STATUSES)}
# (tag prefix, site, stat): the per-group curves of full-statistics steps.
MODULE_CURVES = (
    ("activation_absmax", "fwd_out", "absmax"),
    ("activation_rms", "fwd_out", "rms"),
    ("gradient_rms", "grad_out", "rms"),
)
ANOMALY_TEXT = "anomaly/diagnosis"
ACTION_TEXT = "action/taken"
STATUS_TEXT = "train/status"

_NAN, _INF = TENSOR_STATS.index("nan"), TENSOR_STATS.index("inf")
_UPDATE_RATIO = PARAM_STATS.index("update_ratio")
_PARAM_NONFINITE = [PARAM_STATS.index("weight_nonfinite"), PARAM_STATS.index("grad_nonfinite")]
# scalar(tag, value, skip_nan=False): one point at the step being written.
_Scalar = Callable[..., None]
_RANK_FOLDER = re.compile(r"rank\d+")
# Characters Python-Markdown (TensorBoard's text renderer) treats as markup and accepts
# a backslash escape for; & < > are HTML-escaped first instead.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|])")


# ---------------------------------------------------------------------- the writer


def load_summary_writer(option: str = "--tensorboard") -> type:
    """The ``SummaryWriter`` class to use; ``ConfigError`` naming ``option`` if none imports.

    torch's writer comes first (torch is installed anyway; it needs the ``tensorboard``
    package), then ``tensorboardX``'s, which has the same ``add_scalar``/``add_text``.

    Example::

        SummaryWriter = load_summary_writer("--tensorboard")
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as torch_err:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError(
                f"{option} writes TensorBoard event files, but no TensorBoard writer is "
                f"installed (torch.utils.tensorboard: {torch_err}; tensorboardX is missing "
                f"too). Install the extra with: {INSTALL_HINT}"
            ) from None
    return SummaryWriter


def group_tag(module: ModuleInfo) -> str:
    """The ``<group>`` part of a tag: ``"L3 cross-attn"`` becomes ``"L3_cross-attn"``."""
    return group_label(module).replace(" ", "_")


def markdown_text(text: Any) -> str:
    """``text`` as Markdown that TensorBoard renders back as exactly these characters.

    TensorBoard renders text summaries as Markdown and drops HTML, so a fix like
    ``--adapter-dtype fp32`` or ``lora_A * 2 <= x`` must not turn into markup.

    Example::

        markdown_text("**lora_A** <b>")    # '\\*\\*lora\\_A\\*\\* &lt;b&gt;'
    """
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False))
    # A blank line would end the list item the text sits in; keep line breaks visible.
    return escaped.replace("\r\n", "\n").replace("\n", "<br>")


# ---------------------------------------------------------------------- the sink


class TraceSink:
    """What one rank's steps, anomalies and actions become: the tags, values and texts.

    Backend-neutral: a subclass says how a scalar and a text reach its backend
    (``_add_scalar``, ``_add_text``, ``_flush``, ``_close``), so TensorBoard and W&B get
    the same tags and the same values from one computation. ``_escape``, ``_strong`` and
    ``_code`` format the texts (Markdown for TensorBoard; W&B shows plain strings).
    Call the ``write_*`` methods in step order, an anomaly or action before the
    ``write_step`` of its step (the order the session appends them to the store).
    """

    def __init__(self, modules: Sequence[ModuleInfo], params: Sequence[ParamInfo]) -> None:
        self.modules = {m.id: m for m in modules}
        self._groups = _module_groups(modules)
        self._attention_groups = _module_groups([m for m in modules if m.is_attention])
        self._lora_groups = _lora_groups(self.modules, params, [t for t, _ in self._groups])
        self._anomaly_steps: list[int] = []
        self._warning_steps: list[int] = []
        self._closed = False

    # -- the backend (subclasses) ----------------------------------------------------

    def _add_scalar(self, tag: str, value: float, step: int, wall: float) -> None:
        raise NotImplementedError

    def _add_text(self, tag: str, text: str, step: int, wall: float) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _escape(self, text: Any) -> str:
        return markdown_text(text)

    def _strong(self, text: str) -> str:
        return f"**{text}**"

    def _code(self, text: str) -> str:
        return f"`{text}`"

    # -- per step --------------------------------------------------------------------

    def write_step(self, data: StepData) -> None:
        """Write one step: train/ and anomaly/ scalars always, per-group curves when recorded."""
        step = int(data.step)
        wall = _wall_time(data.wall_time)
        scalar = self._scalar_writer(step, wall)
        scalar("train/loss", data.loss)
        scalar("train/lr", data.lr)
        scalar("train/grad_norm", data.grad_norm)
        scalar("train/status_code", STATUS_CODES.get(data.status, math.nan))
        scalar("anomaly/count", sum(s <= step for s in self._anomaly_steps))
        scalar("anomaly/warnings", sum(s <= step for s in self._warning_steps))
        scalar("anomaly/nonfinite_modules", _nonfinite_modules(data))
        if data.param_stats is not None:
            scalar("anomaly/nonfinite_params", _nonfinite_params(data.param_stats))
            self._write_update_ratios(data.param_stats, scalar)
        if data.full:
            self._write_module_curves(data, scalar)
        if data.status != "ok":
            meaning = STATUS_STYLE.get(data.status, ("", data.status))[1]
            status = self._code(data.status)
            text = f"step {step}: {self._strong(self._escape(meaning))} (status {status})"
            self._add_text(STATUS_TEXT, text, step, wall)

    def _write_module_curves(self, data: StepData, scalar: _Scalar) -> None:
        for prefix, site, stat in MODULE_CURVES:
            stats = data.module_stats.get(site)
            if stats is None:
                continue
            column = np.asarray(stats, dtype=float)[:, TENSOR_STATS.index(stat)]
            for tag, ids in self._groups:
                scalar(f"{prefix}/{tag}", _group_max(column[ids]), skip_nan=True)
        if data.score_max is not None:
            scores = np.asarray(data.score_max, dtype=float)
            for tag, ids in self._attention_groups:
                scalar(f"attention_score_max/{tag}", _group_max(scores[ids]), skip_nan=True)

    def _write_update_ratios(self, param_stats: np.ndarray, scalar: _Scalar) -> None:
        ratios = np.asarray(param_stats, dtype=float)[:, _UPDATE_RATIO]
        for tag, ids in self._lora_groups:
            finite = ratios[ids][np.isfinite(ratios[ids])]
            # Non-finite ratios are left out: lora_B's first one divides by ||W|| = 0 in
            # every healthy run, and NaN weights show in anomaly/nonfinite_params.
            if finite.size:
                scalar(f"lora_update_ratio/{tag}", float(finite.max()))

    # -- events ----------------------------------------------------------------------

    def write_anomaly(self, row: dict) -> None:
        """Write one anomaly or early warning (a ``store.anomalies()`` row) as text.

        It counts in ``anomaly/count`` (or ``anomaly/warnings``) from its step on; the
        session's ``append_anomaly`` keyword ``pass_`` is accepted for ``pass``.
        """
        step = int(row["step"])
        warning = not hard_anomalies([row])
        (self._warning_steps if warning else self._anomaly_steps).append(step)
        number = len(self._warning_steps if warning else self._anomaly_steps)
        text = self._anomaly_card(row, "early warning" if warning else "anomaly", number)
        self._add_text(ANOMALY_TEXT, text, step, _wall_time(row.get("created")))
        # An anomaly often precedes a crash: get it to disk now, not at the next flush.
        self._flush()

    def write_action(self, row: dict) -> None:
        """Write one policy action (a ``store.actions()`` row) as text at its step."""
        step = int(row["step"])
        action, detail = self._escape(row["action"]), self._escape(row["detail"])
        text = f"{self._strong(action)} at step {step}: {detail}"
        self._add_text(ACTION_TEXT, text, step, _wall_time(row.get("created")))

    def _anomaly_card(self, row: dict, kind: str, number: int) -> str:
        """A short card: what, where, why, and what to do."""
        escape = self._escape
        pass_ = row.get("pass", row.get("pass_"))
        module = self.modules.get(row["module_id"]) if row.get("module_id") is not None else None
        offender = escape(module.label) if module else "none named"
        if row.get("op"):
            offender += f" (op {escape(row['op'])})"
        title = self._strong(f"{kind} {number}")
        lines = [
            f"{title} at step {int(row['step'])}, {escape(pass_)} pass",
            "",
            f"- cause: {escape(row.get('cause'))}",
            f"- first offender: {offender}",
            f"- summary: {escape(row.get('summary'))}",
            f"- fix: {escape(row.get('fix'))}",
        ]
        return "\n".join(lines)

    # -- lifetime --------------------------------------------------------------------

    def flush(self) -> None:
        self._flush()

    def close(self) -> None:
        """Flush and close the backend's files; closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> TraceSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _scalar_writer(self, step: int, wall: float) -> _Scalar:
        """``scalar(tag, value, skip_nan=False)`` bound to this step and wall time."""

        def scalar(tag: str, value: float, *, skip_nan: bool = False) -> None:
            value = float(value)
            if skip_nan and math.isnan(value):
                return  # nothing recorded for this group at this step: no point, not NaN
            self._add_scalar(tag, value, step, wall)

        return scalar


class TensorBoardSink(TraceSink):
    """Writes one rank's steps, anomalies and actions as TensorBoard events.

    ``log_dir`` is that rank's run folder (e.g. ``run_dir/tensorboard/rank0``);
    ``modules`` and ``params`` are what the store registered (``store.modules()``,
    ``store.params()``). Call the ``write_*`` methods in step order, an anomaly or action
    before the ``write_step`` of its step (the order the session appends them to the
    store): TensorBoard drops points it reads after a later step as left over from a
    restart (which also makes a resumed run's re-written steps replace the old ones).
    The counts in ``anomaly/`` start from what this sink has seen: after a resume, export
    the run for exact totals. The writer is imported here, so a missing extra fails
    before training starts.

    Example::

        with TensorBoardSink(log_dir, store.modules(), store.params()) as tb:
            tb.write_step(store.read_step(0))
    """

    def __init__(
        self,
        log_dir: Path,
        modules: Sequence[ModuleInfo],
        params: Sequence[ParamInfo],
        *,
        option: str = "--tensorboard",
    ) -> None:
        writer_class = load_summary_writer(option)
        super().__init__(modules, params)
        self.log_dir = Path(log_dir)
        self._writer = writer_class(log_dir=str(self.log_dir))

    def _add_scalar(self, tag: str, value: float, step: int, wall: float) -> None:
        self._writer.add_scalar(tag, value, global_step=step, walltime=wall)

    def _add_text(self, tag: str, text: str, step: int, wall: float) -> None:
        self._writer.add_text(tag, text, global_step=step, walltime=wall)

    def _flush(self) -> None:
        self._writer.flush()

    def _close(self) -> None:
        self._writer.close()


# ---------------------------------------------------------------------- export


def export_tensorboard(
    run_dir: Path, log_dir: Path | None = None, *, option: str = "--tensorboard"
) -> Path:
    """Write TensorBoard events for every rank store of ``run_dir``; return ``log_dir``.

    ``log_dir`` (default ``run_dir/tensorboard``) gets one folder per rank, ``rank0``,
    ``rank1``..., each a separate run in TensorBoard. Running it again replaces the
    previous export (written beside it, then swapped in) instead of adding duplicate
    points. A ``log_dir`` holding anything but ``rank<N>`` folders is refused. While a
    run still writes live events to ``run_dir/tensorboard``, export to another folder.

    Example::

        export_tensorboard(Path("runs/classic"))    # runs/classic/tensorboard/rank0/events...
    """
    run_dir = Path(run_dir)
    stores = trace_stores_of(run_dir, "TensorBoard events are")
    log_dir = Path(log_dir) if log_dir is not None else run_dir / TENSORBOARD_DIR
    load_summary_writer(option)  # a missing extra fails before anything is written
    _check_replaceable(log_dir)
    staging = log_dir.with_name(f".{log_dir.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for rank, path in stores:
            with (
                TraceStore.open(path) as store,
                TensorBoardSink(
                    staging / f"rank{rank}", store.modules(), store.params(), option=option
                ) as sink,
            ):
                feed_store(store, sink)
        _swap_in(staging, log_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return log_dir


def trace_stores_of(run_dir: Path, what: str) -> list[tuple[int, Path]]:
    """The run's (rank, store path) pairs to export ``what`` from; a clear error if none."""
    stores = rank_store_paths(run_dir)
    if not stores:
        why = "is not a folder" if not run_dir.is_dir() else "has no trace store (trace.db)"
        raise ConfigError(
            f"{run_dir} {why}: {what} exported from a run's trace store; train with "
            "--trace (stabilizer train --trace ...) and pass that run folder"
        )
    return stores


def feed_store(store: TraceStore, sink: TraceSink) -> None:
    """Feed one store through a sink in the order training wrote it (any backend)."""
    events = _events_in_order(store)
    done = 0
    for step in store.steps()["step"].tolist():
        while done < len(events) and events[done][0] <= step:
            _write_event(sink, events[done])
            done += 1
        sink.write_step(store.read_step(step))
    for event in events[done:]:  # e.g. of a step a crash kept from being recorded
        _write_event(sink, event)


def _events_in_order(store: TraceStore) -> list[tuple[int, float, str, dict]]:
    """Anomalies and actions as (step, created, kind, row), in the order they happened."""
    rows = [(int(a["step"]), a["created"] or 0.0, "anomaly", a) for a in store.anomalies()]
    rows += [(int(a["step"]), a["created"] or 0.0, "action", a) for a in store.actions()]
    return sorted(rows, key=lambda r: (r[0], r[1]))


def _write_event(sink: TraceSink, event: tuple[int, float, str, dict]) -> None:
    _, _, kind, row = event
    if kind == "anomaly":
        sink.write_anomaly(row)
    else:
        sink.write_action(row)


def _check_replaceable(log_dir: Path) -> None:
    """Refuse to replace a folder holding anything an export would not have written."""
    if not log_dir.exists():
        return
    if not log_dir.is_dir():
        raise ConfigError(f"{log_dir} is a file; pass a folder for the TensorBoard events")
    foreign = sorted(
        p.name for p in log_dir.iterdir() if not (p.is_dir() and _RANK_FOLDER.fullmatch(p.name))
    )
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ConfigError(
            f"{log_dir} holds files a TensorBoard export did not write ({listed}); an export "
            "replaces its whole folder, so pass a new or empty folder"
        )


def _swap_in(staging: Path, log_dir: Path) -> None:
    """Put ``staging`` where ``log_dir`` is; the old export is removed only afterwards."""
    log_dir.parent.mkdir(parents=True, exist_ok=True)
    if not log_dir.exists():
        staging.rename(log_dir)
        return
    old = log_dir.with_name(f".{log_dir.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    log_dir.rename(old)
    staging.rename(log_dir)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- helpers


def _module_groups(modules: Sequence[ModuleInfo]) -> list[tuple[str, np.ndarray]]:
    """``(tag, module ids)`` per report group, in the report's top-to-bottom order."""
    by_id = {m.id: m for m in modules}
    groups: dict[str, list[int]] = {}
    for mid in module_order(modules):
        groups.setdefault(group_tag(by_id[mid]), []).append(mid)
    return [(tag, np.array(ids, dtype=np.int64)) for tag, ids in groups.items()]


def _lora_groups(
    modules: dict[int, ModuleInfo], params: Sequence[ParamInfo], tag_order: list[str]
) -> list[tuple[str, np.ndarray]]:
    """``(tag, param ids)`` of the LoRA tensors (name holds ``lora_``, as in the report),
    grouped by the group of the module they belong to, in ``tag_order``."""
    groups: dict[str, list[int]] = {}
    for p in params:
        if "lora_" not in p.name:
            continue
        parent = modules.get(p.module_id) if p.module_id is not None else None
        groups.setdefault(group_tag(parent) if parent else "other", []).append(p.id)
    rank = {tag: i for i, tag in enumerate(tag_order)}
    return [
        (tag, np.array(ids, dtype=np.int64))
        for tag, ids in sorted(groups.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    ]


def _group_max(values: np.ndarray) -> float:
    """Max ignoring NaN (a site that did not fire); +Inf stays; all-NaN gives NaN."""
    return float(np.fmax.reduce(values)) if values.size else math.nan


def _nonfinite_modules(data: StepData) -> int:
    """Modules with NaN/Inf elements at any site (check-only steps keep only those rows)."""
    bad: np.ndarray | None = None
    for stats in data.module_stats.values():
        stats = np.asarray(stats, dtype=float)
        # NaN counts mean "not recorded" and compare False: only real counts mark a module.
        site_bad = (stats[:, _NAN] > 0) | (stats[:, _INF] > 0)
        bad = site_bad if bad is None else bad | site_bad
    return 0 if bad is None else int(bad.sum())


def _nonfinite_params(param_stats: np.ndarray) -> int:
    flags = np.asarray(param_stats, dtype=float)[:, _PARAM_NONFINITE]
    return int((flags > 0).any(axis=1).sum())


def _wall_time(value: float | None) -> float:
    """The recorded time when there is one, else now (live steps before the store stamps them)."""
    if value is None or not math.isfinite(value):
        return time.time()
    return float(value)
