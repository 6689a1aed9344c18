"""One multi-tensor reduction per pass instead of kernels per hooked tensor.

A hook only *notes* the tensor it sees (no kernel). At the end of the pass (the
root module's forward returns, autograd finishes a backward, the step ends), or
when the noted tensors pass a memory budget, everything noted is reduced at once:

- check steps: ``torch._foreach_norm(ord=1)`` per (device, dtype) group. An L1 norm
  is finite exactly when every element is, and it accumulates in float64, so no
  finite fp16/bf16/fp32 values overflow it. One op (a multi-tensor kernel on a GPU) for
  the whole group, however many modules fired. In host memory a sum per tensor is
  used instead (the fastest pass on a CPU, which runs a multi-tensor op one tensor
  at a time anyway), and the rare non-finite reading is checked again exactly, which
  on the host costs no sync.
- full steps: the group is flattened into one buffer (``torch._chunk_cat``) and
  every statistic is one segmented reduction over it (``torch.segment_reduce``):
  a fixed number of ops per statistic, not per tensor.

Exactness under in-place ops. A reduction that runs later than the hook sees the
tensor as it is *then*. Each noted tensor keeps its version counter; a tensor
changed in place before the flush is *stale*, and its reading is reported as
unknown (finite, no statistics): what it held when its hook ran is gone, and what
it holds now was made later, by someone else. So ``h[0] = nan`` between module
``a``'s output and module ``b``'s input is not blamed on ``a`` (``b``'s input,
noted after the change, is a new reading and shows it), and a module that writes
NaN into its own input is blamed itself. Inputs of modules that say they work in
place (``nn.ReLU(inplace=True)``, ``Dropout(inplace=True)``) are measured at once
instead, so the module before them keeps an exact reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from stabilizer.probes.stats import near_limit_threshold

RAW_WIDTH = 6  # [absmax, l2, sum, nan, inf, near] per tensor on full steps


def _version_of(tensor: torch.Tensor) -> int | None:
    # Inference-mode tensors have no version counter: never reuse their readings.
    try:
        return tensor._version
    except RuntimeError:
        return None


def measurable(tensor: torch.Tensor) -> bool:
    """Dense tensors with storage: meta tensors hold no values, sparse ones no strides,
    and a gradient hook may be handed None (an undefined gradient, as gradcheck sends)."""
    return (
        isinstance(tensor, torch.Tensor) and not tensor.is_meta and tensor.layout is torch.strided
    )


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _norms_float32(tensors: list[torch.Tensor], order: int = 2) -> torch.Tensor:
    """Per-tensor norms as one float32 vector, by multi-tensor ops, accumulated in
    float32 (float64 tensors in float64, a finite norm clamped to float32's largest
    value). A finite tensor's norm can still overflow: see :func:`exact_norms`."""
    wide = [t.dtype == torch.float64 for t in tensors]
    if not any(wide):
        return torch.stack(torch._foreach_norm(tensors, order, dtype=torch.float32))
    wide_norms = torch._foreach_norm([t for t, w in zip(tensors, wide, strict=True) if w], order)
    wide_norms = iter(
        torch.where(n.isfinite(), n.clamp(max=_FLOAT32_MAX), n).float() for n in wide_norms
    )
    narrow = [t for t, w in zip(tensors, wide, strict=True) if not w]
    narrow_norms = iter(torch._foreach_norm(narrow, order, dtype=torch.float32) if narrow else [])
    return torch.stack([next(wide_norms) if w else next(narrow_norms) for w in wide])


def _overflowed(tensors: list[torch.Tensor], readings: list[float]) -> list[int]:
    """Positions whose host reading is non-finite while their tensor is finite: a sum or
    square past fp32's range, not NaN/Inf. Checked exactly, one pass over just those."""
    return [
        i
        for i, value in enumerate(readings)
        if not math.isfinite(value) and bool(torch.isfinite(tensors[i]).all())
    ]


def _recheck_on_host(tensors: list[torch.Tensor], norms: torch.Tensor, order: int) -> torch.Tensor:
    """``norms`` (host memory) with each one that only overflowed measured again in
    float64, clamped to float32's largest value. Reading host values is no sync
    (tolist(): not even an op)."""
    for i in _overflowed(tensors, norms.tolist()):
        wide = float(torch.linalg.vector_norm(tensors[i].double(), order))
        norms[i] = min(wide, _FLOAT32_MAX) if math.isfinite(wide) else _FLOAT32_MAX
    return norms


def _wide_l2_and_sum(tensor: torch.Tensor, absmax: float) -> tuple[float, float]:
    """A finite tensor's L2 norm and sum in float64, the norm scaled by its largest
    magnitude so that even float64 squares cannot overflow (one tensor, rarely)."""
    wide = tensor.double()
    scale = absmax if absmax > 0 else 1.0
    return float(torch.linalg.vector_norm(wide / scale)) * scale, float(wide.sum())


def exact_norms(tensors: list[torch.Tensor], order: int = 2, *, host: bool | None = None):
    """Per-tensor norms, one vector, non-finite exactly where a tensor holds NaN/Inf.

    A norm accumulated in float32 overflows on finite values: squares past 1.8e19 (an
    exploding gradient long before it is Inf), sums past 3.4e38 (bf16 and fp32 reach
    that). Called non-finite, such a tensor would be reported as NaN/Inf where there is
    none, and "first" would name the wrong module. So:

    - in host memory (``host``, default: every tensor on the CPU): float32 norms, the
      fast ones there, and the rare non-finite one checked again exactly;
    - on a device: accumulated in float64 inside the same multi-tensor kernel (CUDA's
      ``_foreach_norm`` accumulates in the output's type: no copy, no extra op), which
      no finite fp16/bf16/fp32 tensor can overflow (float64 tensors keep float64's own
      limit, ~1e154 for a square). The vector is float64: a norm past float32's range
      stays finite on its way to the host. MPS has no float64: there the float32 norm
      is used (values past fp32's range read as non-finite).

    The values are the norms themselves, for display (clamped to float32's largest
    value where they exceed it, in host memory)."""
    if host is None:
        host = all(t.device.type == "cpu" for t in tensors)
    if host:
        return _recheck_on_host(tensors, _norms_float32(tensors, order), order)
    if any(t.device.type == "mps" for t in tensors):
        return _norms_float32(tensors, order)
    return torch.stack(torch._foreach_norm(tensors, order, dtype=torch.float64))


def segment_stats(flat: torch.Tensor, lengths: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(len(lengths), RAW_WIDTH)`` ``[absmax, l2, sum, nan, inf, near]`` rows of the
    consecutive segments of ``flat`` (shape ``(1, N)``): one op per statistic.

    The squares and the sum accumulate in float64 (the rows are float64): fp32 squares
    overflow at 1.8e19, and a finite exploding tensor must not read as Inf (the stack
    promotes the other columns). MPS has no float64: there they stay fp32 (such values
    read as Inf)."""
    x = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    wide = x if x.device.type == "mps" else x.double()

    def per_tensor(values: torch.Tensor, how: str = "sum") -> torch.Tensor:
        return torch.segment_reduce(values, how, lengths=lengths, axis=1)[0]

    a = x.abs()
    absmax = per_tensor(a, "max")
    l2 = per_tensor(wide * wide).sqrt()
    total = per_tensor(wide)
    nan = per_tensor(torch.isnan(x).to(x.dtype))
    inf = per_tensor(torch.isinf(a).to(x.dtype))
    near = per_tensor((a > threshold).to(x.dtype))
    return torch.stack([absmax, l2, total, nan, inf, near], dim=1)  # promoted to float64


_compiled = None


def compiled_segment_stats():
    """:func:`segment_stats` through ``torch.compile`` (fused passes over the buffer).

    The first call compiles (tens of seconds on a small CPU); sizes are dynamic, so
    later steps reuse it. Where compiling is not possible the eager version is used,
    with a warning, so tracing never stops for it."""
    global _compiled
    if _compiled is not None:
        return _compiled
    try:
        candidate = torch.compile(segment_stats, dynamic=True)
        warm = torch.ones(1, 12)
        candidate(warm, torch.tensor([[5, 7]]), math.inf)  # compile now, not in a hook
        _compiled = candidate
    except Exception as exc:  # no compiler, unsupported platform, ...
        import warnings

        warnings.warn(
            f"compiled statistics are off ({type(exc).__name__}: {exc}); using eager ones",
            stacklevel=2,
        )
        _compiled = segment_stats
    return _compiled


@dataclass
class _Chunk:
    """The device result of one flush and, on the host, which slot each row is."""

    values: torch.Tensor  # (rows,) on check steps, (rows, RAW_WIDTH) on full steps
    slots: list[int] = field(default_factory=list)


class PassReducer:
    """Collects the tensors one step's hooks saw and reduces them in a few ops.

    ``note(tensor)`` returns a slot number (one slot per distinct tensor and version:
    a tensor seen by several probes is measured once). ``finish()`` flushes and
    returns the step's readings: device tensors of rows and, per slot, its row in
    them (or None when the reading is unknown or the tensor was empty).
    """

    # Flush early once the noted tensors hold this many bytes: a held tensor that
    # would otherwise be freed (most gradients, some activations) is memory the step
    # did not need. The budget is a small share of what the previous step's forward
    # noted (about the step's activations), so the peak memory of a step grows by at
    # most about that share, for a few more reductions per pass on large models. The
    # first step, with nothing to go by, uses the fixed budgets (full steps also make
    # fp32 temporaries of the flattened buffer, so theirs is lower).
    check_budget_bytes = 64 * 2**20
    full_budget_bytes = 16 * 2**20
    budget_share = 0.05
    min_budget_bytes = 2 * 2**20
    # How readings are reduced: "multi-tensor" (a fixed number of ops per statistic:
    # what a GPU, where launches are the cost, runs), "per-tensor" (host memory, where
    # the cost is passes over memory, not launches: full statistics by three
    # single-pass ops per tensor with counts only where a tensor needs them, check
    # flags by one sum per tensor) or "auto" (by device).
    strategy = "auto"

    def __init__(
        self, full: bool, *, compiled: bool = False, forward_bytes: int | None = None
    ) -> None:
        self.full = full
        self.compiled = compiled  # compiles on first use: only the multi-tensor path uses it
        self.budget = self.full_budget_bytes if full else self.check_budget_bytes
        if forward_bytes:
            self.budget_by(forward_bytes)  # the same share, from the last forward
        # Per slot, in parallel lists rather than an object each: a step notes thousands
        # of tensors, and objects alive through a pass are what makes Python's garbage
        # collector run (a full collection of a test process's heap takes ~0.2 s).
        self._tensors: list[torch.Tensor | None] = []  # held until the flush, then dropped
        self._versions: list[int | None] = []
        self._numels: list[int] = []
        self._stale: list[bool] = []
        self._pending: list[int] = []
        self._pending_bytes = 0
        self._chunks: list[_Chunk] = []
        self._seen: dict[int, int] = {}  # id(tensor) -> its latest slot
        self._lengths: dict[tuple, torch.Tensor] = {}
        self.flushes = 0
        self.noted_bytes = 0  # over the reducer's life, for the backward budget

    def budget_by(self, forward_bytes: int | None = None) -> None:
        """Budget from here on by a share of a forward's bytes (default: this one's)."""
        forward = self.noted_bytes if forward_bytes is None else forward_bytes
        self.budget = min(self.budget, max(self.min_budget_bytes, int(self.budget_share * forward)))

    # -- noting ------------------------------------------------------------------------
    def note(self, tensor: torch.Tensor, *, now: bool = False) -> int:
        """The slot that measures ``tensor`` as it is now; ``now`` reduces at once."""
        key = id(tensor)
        version = _version_of(tensor)
        seen = self._seen.get(key)
        # The same tensor while it is still held (an id alone may be a dead tensor's,
        # reused at once by CPython); once reduced and let go, a later note of it is
        # measured again, which costs a pass but is never wrong.
        if (
            seen is not None
            and version is not None
            and self._versions[seen] == version
            and self._tensors[seen] is tensor
        ):
            if now:
                self.flush()  # noted earlier and still pending: measure it now
            return seen
        slot = len(self._tensors)
        numel = tensor.numel()
        self._tensors.append(tensor)
        self._versions.append(version)
        self._numels.append(numel)
        self._stale.append(False)
        self._seen[key] = slot
        self._pending.append(slot)
        nbytes = numel * tensor.element_size()
        self._pending_bytes += nbytes
        self.noted_bytes += nbytes
        if now or self._pending_bytes >= self.budget:
            self.flush()
        return slot

    # -- reducing ----------------------------------------------------------------------
    @torch.no_grad()  # invisible to autograd: no graph, nothing saved for backward
    def flush(self) -> None:
        """Reduce every pending tensor now (a few ops per dtype group)."""
        if not self._pending:
            return
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        held = self._tensors
        for slot in self._pending:
            tensor = held[slot]
            version = self._versions[slot]
            self._stale[slot] = version is not None and _version_of(tensor) != version
            if self._numels[slot] == 0:  # nothing to measure: finite, zero statistics
                held[slot] = None
                continue
            groups.setdefault((tensor.device, tensor.dtype), []).append(slot)
        for (device, dtype), slots in groups.items():
            tensors = [held[s] for s in slots]
            if not self.full:
                values = self._flags(tensors, device)
            elif self._per_tensor(device):
                values = self._full_stats_per_tensor(tensors, dtype)
            else:
                values = self._full_stats(tensors, device, dtype)
            self._chunks.append(_Chunk(values, slots))
            for s in slots:
                held[s] = None  # let the tensor go
        self._pending.clear()
        self._pending_bytes = 0
        self.flushes += bool(groups)

    def _flags(self, tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        if device.type != "cpu" or not self._per_tensor(device):
            # What a GPU runs: one multi-tensor L1 norm, accumulated in float64.
            return exact_norms(tensors, 1, host=False)
        # Host memory, where the cost is the one pass a check step makes over every
        # tensor. A sum is finite exactly when every element is, short of overflowing,
        # and it is the fastest pass there is (twice the L2 norm's speed on large
        # tensors, and no slower on small ones: a CPU runs a multi-tensor norm one
        # tensor at a time anyway). A non-finite sum is checked again exactly (finite
        # values that add up past the dtype's limit); the sums lie on the host, so
        # reading them is no sync. A group is one dtype: fp16 accumulates in fp32
        # (its own sums overflow at 65504), the rest in their own type.
        wide = {"dtype": torch.float32} if tensors[0].dtype == torch.float16 else {}
        sums = torch.stack([t.sum(**wide) for t in tensors])
        if sums.dtype not in (torch.float32, torch.float64):
            sums = sums.float()
        values = sums.numpy()
        if not np.isfinite(values).all():
            # Finite, only too large to add up: a flag needs no exact value.
            values[_overflowed(tensors, values.tolist())] = np.finfo(values.dtype).max
        return sums

    def _per_tensor(self, device: torch.device) -> bool:
        if self.strategy == "auto":
            # Compiling fuses the multi-tensor statistics on a GPU; on a CPU the
            # per-tensor ones already make the fewest passes and stay faster.
            return device.type == "cpu"
        return self.strategy == "per-tensor"

    @staticmethod
    def _full_stats_per_tensor(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        # Host memory: values are read where they lie (no device to wait for), so the
        # counts, zero on a healthy tensor, are taken only for the tensors that need them.
        # The three passes over a tensor run back to back, so the second and third read
        # it from cache (a third faster than three sweeps over the whole group).
        wide = dtype == torch.float64
        accumulate = None if wide else torch.float32  # fp16/bf16 sums overflow early
        # fp32/fp64 in one piece: the sum of squares as a BLAS dot product of the tensor
        # with itself, 2.5x faster than vector_norm's generic reduction on a CPU (the
        # same fp32 accumulation); 16-bit tensors keep vector_norm's fp32 accumulation.
        blas = dtype in (torch.float32, torch.float64)
        lows, highs, totals, norms, squared = [], [], [], [], []
        for t in tensors:
            low, high = torch.aminmax(t)  # one pass for both ends
            lows.append(low)
            highs.append(high)
            totals.append(t.sum(dtype=accumulate))
            if blas and t.is_contiguous():
                flat = t.view(-1)
                norms.append(torch.dot(flat, flat))
                squared.append(True)
            else:
                norms.append(torch.linalg.vector_norm(t, dtype=accumulate))
                squared.append(False)
        # 16/32-bit ends are exact in float32 (numpy has no bfloat16).
        low, high = (torch.stack(ends).to(totals[0].dtype).numpy() for ends in (lows, highs))
        total = torch.stack(totals).numpy().astype(np.float64)
        l2 = torch.stack(norms).numpy().astype(np.float64)
        l2[squared] = np.sqrt(l2[squared])
        rows = np.zeros((len(tensors), RAW_WIDTH), dtype=np.float64)
        rows[:, 0] = np.maximum(np.abs(low), np.abs(high))  # NaN stays NaN
        rows[:, 1], rows[:, 2] = l2, total
        threshold = near_limit_threshold(dtype)
        for i in np.flatnonzero(~(np.isfinite(l2) & np.isfinite(total))):
            rows[i, 3] = float(torch.isnan(tensors[i]).sum())
            rows[i, 4] = float(torch.isinf(tensors[i]).sum())
            if rows[i, 3] == rows[i, 4] == 0:
                # Finite, only squared or added up past the accumulator's range (an
                # exploding activation before it is Inf): measured again exactly.
                rows[i, 1], rows[i, 2] = _wide_l2_and_sum(tensors[i], rows[i, 0])
        if threshold is not None:
            for i in np.flatnonzero(np.nan_to_num(rows[:, 0]) > threshold):
                rows[i, 5] = float((tensors[i].abs() > threshold).sum())
        return torch.from_numpy(rows)

    def _full_stats(
        self, tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        # _chunk_cat flattens tensors of any shape into one (1, N) buffer in one op;
        # 0-d tensors need a dimension first.
        flat = torch._chunk_cat([t if t.dim() else t.reshape(1) for t in tensors], 0, 1)
        lengths = self._lengths_for(tuple(t.numel() for t in tensors), device)
        threshold = near_limit_threshold(dtype) or math.inf
        stats = compiled_segment_stats() if self.compiled else segment_stats
        return stats(flat, lengths, threshold)

    def _lengths_for(self, numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
        # The same shapes come back every step: build each lengths tensor once (on a
        # GPU, a fresh one would be a host-to-device copy per flush).
        key = (device, numels)
        cached = self._lengths.get(key)
        if cached is None:
            cached = torch.tensor([numels], device=device)  # (1, S): segments of axis 1
            self._lengths[key] = cached
        return cached

    # -- results -----------------------------------------------------------------------
    def finish(self) -> tuple[list[torch.Tensor], list[int | None], list[int]]:
        """``(chunks, row_of_slot, numel_of_slot)`` for the whole step (flushes first).

        ``chunks`` are device tensors whose rows, concatenated in order, are the slots'
        readings. ``row_of_slot[s]`` is None for a slot whose reading is unknown (its
        tensor changed in place before the reduction) or that was empty (nothing to
        measure, nothing wrong)."""
        self.flush()
        chunks, row_of = self.readings()
        return chunks, row_of, list(self._numels)

    @property
    def settled(self) -> int:
        """How many leading slots have their final reading: every slot but the pending
        ones, which are always the newest (a flush reduces all that are pending)."""
        return len(self._tensors) - len(self._pending)

    def readings(self) -> tuple[list[torch.Tensor], list[int | None]]:
        """``finish()``'s chunks and rows for the slots reduced so far, without a flush
        (the noting goes on); a slot at or past ``settled`` has no row yet."""
        row_of: list[int | None] = [None] * len(self._tensors)
        stale = self._stale
        row = 0
        for chunk in self._chunks:
            for s in chunk.slots:
                if not stale[s]:
                    row_of[s] = row
                row += 1
        return [c.values for c in self._chunks], row_of
