"""Hooks that turn every probed module's tensors into per-step statistics.

    >>> with stabilizer.trace(model, optimizer=opt) as tracer:
    ...     for step, batch in enumerate(batches):
    ...         tracer.begin_step(step)
    ...         loss = model(**batch).loss
    ...         loss.backward()
    ...         opt.step(); opt.zero_grad()
    ...         record = tracer.end_step(loss=loss)     # one device->host copy
    ...         print(record.first_nonfinite())

``end_step_late`` ends the step the same way but only starts the copy (on a GPU,
non-blocking into pinned memory); its ``.result()``, read a step later, is the
record, so no step ends waiting for the device.

Cost tiers. Every step, each hooked tensor gets a finiteness flag (so the step
where NaN first appears names its module); every ``trace_every`` steps it gets
full statistics (abs-max, RMS, mean, NaN/Inf counts, fp16 headroom), attention
modules get the largest |q·k| product (before the 1/sqrt(d) scale), and trainable
parameters get weight/grad norms and update/weight ratios. Hooks launch no kernels: they note
their tensors, and each pass's notes are reduced together by a few multi-tensor
ops (:mod:`stabilizer.probes.batched`), so the cost in kernels does not grow with
the number of probed modules. Results stay on the device until ``end_step``
copies them once.

Correctness notes:
- Input statistics are taken in a forward *pre*-hook, so an in-place op inside
  the module cannot make a finite input look non-finite.
- Under activation checkpointing, forward hooks fire again while backward
  recomputes; those calls are recognised (autograd is executing a graph task)
  and ignored, so nothing is counted twice and "first" stays first.
- Gradients are read with tensor hooks on module outputs and inputs, never with
  ``register_full_backward_hook``, which changes gradient accumulation order.
- A ``torch.compile``d model is refused with a clear message: hooks do not run
  inside compiled graphs, so tracing would be silently off.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from stabilizer.errors import ConfigError
from stabilizer.probes.batched import RAW_WIDTH, PassReducer, exact_norms, measurable
from stabilizer.probes.gradhooks import SharedGradHooks
from stabilizer.probes.hostcopy import HostCopies, InFlight
from stabilizer.probes.naming import describe, strip_peft
from stabilizer.probes.schema import PARAM_STATS, SITES, TENSOR_STATS
from stabilizer.probes.stats import first_float_tensor, output_tensor

# Modules probed in InstructBLIP/BLIP-2 (names without peft's prefix).
_L = r"qformer\.encoder\.layer\.\d+\."
QFORMER_PROBES = (
    _L + r"(attention|crossattention)\.attention(\.(query|key|value))?",
    _L + r"(attention|crossattention)\.output\.(dense|LayerNorm)",
    _L + r"(intermediate|output|intermediate_query|output_query)\.dense",
    _L + r"(output|output_query)\.LayerNorm",
    _L + r".*\.lora_[AB]\.default",
    r"qformer\.(embeddings\.)?layernorm",
    r"language_projection(\.modules_to_save\.default)?",
    r"vision_model|qformer|language_model",
)


@dataclass(frozen=True)
class ProbedModule:
    index: int
    name: str  # raw path from named_modules()
    label: str
    kind: str
    layer: int | None
    component: str
    is_attention: bool
    # A LoRA adapter's A/B: probed on full steps only. On check steps the wrapped
    # layer's output already carries their contribution, so a NaN they make is still
    # caught there, for a third less data to reduce and fewer hook calls.
    full_only: bool = False


@dataclass(frozen=True)
class ProbedParam:
    index: int
    name: str
    label: str
    module_index: int | None
    numel: int
    dtype: str


@dataclass
class StepRecord:
    """The statistics of one step, as numpy arrays indexed by module / parameter.

    ``finite[site][i]`` is False where module i's tensor at ``site`` held NaN/Inf,
    True where it was finite, and True where the site did not fire.
    ``order[site][i]`` is the firing position (-1: did not fire). ``stats`` holds
    ``TENSOR_STATS`` rows on full steps and is None otherwise.
    """

    step: int
    full: bool
    loss: float
    lr: float | None
    grad_norm: float
    finite: dict[str, np.ndarray]
    order: dict[str, np.ndarray]
    stats: dict[str, np.ndarray] | None
    score_max: np.ndarray | None
    param_stats: np.ndarray  # (n_params, len(PARAM_STATS)); NaN where not measured
    optimizer_stepped: bool
    inputs_finite: dict[str, bool] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def loss_finite(self) -> bool:
        return math.isfinite(self.loss)

    def nonfinite_sites(self) -> dict[str, list[int]]:
        """Module indices with a non-finite tensor, per site, in firing order."""
        out = {}
        for site, flags in self.finite.items():
            bad = [int(i) for i in np.flatnonzero(~flags)]
            out[site] = sorted(bad, key=lambda i: self.order[site][i])
        return out

    @property
    def params_finite(self) -> bool:
        col = PARAM_STATS.index("weight_nonfinite")
        return not np.nansum(self.param_stats[:, col]) > 0

    @property
    def grads_finite(self) -> bool:
        col = PARAM_STATS.index("grad_nonfinite")
        return not np.nansum(self.param_stats[:, col]) > 0

    @property
    def clean(self) -> bool:
        return (
            self.loss_finite
            and all(self.inputs_finite.values())
            and all(bool(f.all()) for f in self.finite.values())
            and self.params_finite
            and self.grads_finite
        )


@dataclass(frozen=True)
class _StepNotes:
    """What a step's hooks noted besides the readings themselves: with the copied
    readings, enough to build its record after the next step has begun."""

    step: int
    full: bool
    order: list[dict[int, int]]
    entries: list[tuple[int, int, int]]
    inputs: list[tuple[str, int]]
    row_of: list[int | None]
    numel_of: list[int]
    optimizer_stepped: bool


class PendingRecord:
    """A step whose readings are on their way to the host (``Tracer.end_step_late``)."""

    def __init__(self, copy: InFlight, build) -> None:
        self._copy = copy
        self._build = build
        self._record: StepRecord | None = None

    def result(self) -> StepRecord:
        """The step's record (waits for its copy to the host if that still runs)."""
        if self._record is None:
            self._record = self._build(self._copy.wait())
            self._build = self._copy = None
        return self._record


def _in_backward() -> bool:
    # Autograd runs a graph task during backward; forward hooks that fire then are
    # activation-checkpointing recomputation, not a new forward pass.
    return torch._C._current_graph_task_id() != -1


def select_modules(model: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """The modules to probe: ``pattern`` (full match on names without peft's prefix),
    the InstructBLIP/BLIP-2 preset when the model has a Q-Former, else every module
    but the root.

    Parameter-less modules are probed too: a user's attention-pooling head may own
    no weights and still be where a fully masked softmax row makes the NaN. The root
    is left out because its output is usually the loss, and a loss-only NaN (all
    labels masked) is the loss pass's, not the forward's."""
    named = list(model.named_modules())
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(
                f"--probe '{pattern}' is not a valid regular expression: {exc}"
            ) from exc
        chosen = [(n, m) for n, m in named if n and regex.fullmatch(strip_peft(n))]
        if not chosen:
            raise ConfigError(f"--probe '{pattern}' matches no module of this model")
        return chosen
    if any(strip_peft(n) == "qformer" for n, _ in named):
        regex = re.compile("|".join(f"(?:{p})" for p in QFORMER_PROBES))
        return [(n, m) for n, m in named if n and regex.fullmatch(strip_peft(n))]
    return [(n, m) for n, m in named if n]


_LORA_PART = re.compile(r"\.lora_[AB](\.|$)")
# Sites as codes (positions in SITES) where hooks note them: ints index arrays.
_FWD_IN, _FWD_OUT, _GRAD_OUT, _GRAD_IN = map(
    SITES.index, ("fwd_in", "fwd_out", "grad_out", "grad_in")
)


class Tracer:
    """Owns every hook it installs; ``close()`` (or leaving ``with``) removes them all."""

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        pattern: str | None = None,
        trace_every: int = 1,
        attention_scores: bool = True,
        compile_stats: bool = False,
    ) -> None:
        if trace_every < 1:
            raise ConfigError(f"--trace-every must be >= 1, got {trace_every}")
        if type(model).__name__ == "OptimizedModule" or hasattr(model, "_orig_mod"):
            raise ConfigError(
                "this model is torch.compile'd: module hooks do not run inside compiled "
                "graphs, so tracing would be silently off. Trace the model before compiling "
                "it (or pass model._orig_mod and run it uncompiled while tracing)"
            )
        self.model = model
        self.optimizer = optimizer
        self.trace_every = trace_every
        self.attention_scores = attention_scores
        self.compile_stats = compile_stats
        self._last_forward_bytes: int | None = None  # sizes the reducer's memory budget
        self._host_copies = HostCopies()  # pinned buffers for steps judged late
        chosen = select_modules(model, pattern)
        self.modules: list[ProbedModule] = []
        self._index: dict[int, int] = {}
        for name, module in chosen:
            info = describe(name)
            is_attention = hasattr(module, "query") and hasattr(module, "key")
            index = len(self.modules)
            self.modules.append(
                ProbedModule(
                    index,
                    name,
                    info.label,
                    info.kind,
                    info.layer,
                    info.component,
                    is_attention,
                    full_only=_LORA_PART.search(name) is not None,
                )
            )
            self._index[id(module)] = index
        self._module_objs = [m for _, m in chosen]
        module_index = {m.name: m.index for m in self.modules}
        self.params: list[ProbedParam] = []
        self._param_tensors: list[nn.Parameter] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            owner_label = describe(owner).label if strip_peft(owner + ".") != "" else ""
            label = f"{owner_label} .{leaf}" if owner_label else leaf.replace("_", " ")
            self.params.append(
                ProbedParam(
                    len(self.params),
                    name,
                    label,
                    module_index.get(owner),
                    param.numel(),
                    str(param.dtype).replace("torch.", ""),
                )
            )
            self._param_tensors.append(param)
        self._handles: list = []
        self._full_only_handles: list = []
        self._tensor_handles: list = []
        self._step = -1
        self._full = False
        self._reset_step_buffers()
        self._attached = False
        # False while the model runs outside training (an evaluation forward inside a
        # watched loop): hooks then record nothing.
        self._recording = True
        # Called at the first hook of a step that nobody began (``stabilizer.watch``
        # delimits steps by the optimizer's own step, and begins one lazily here).
        self.on_unbegun_step = None
        # Called at the first forward hook after a backward within a begun step (the next
        # micro-batch, or a step the GradScaler skipped and nobody ended).
        self.on_forward_after_backward = None

    # -- lifecycle ---------------------------------------------------------------
    def attach(self) -> Tracer:
        if self._attached:
            return self
        for index, module in enumerate(self._module_objs):
            if not self.modules[index].full_only:
                self._handles += self._hook_module(index, module)
        self._attached = True
        self._hook_full_only(self._full)
        self._handles.append(
            self.model.register_forward_pre_hook(self._input_hook, with_kwargs=True)
        )
        # The end of the forward pass: reduce what it produced together.
        self._handles.append(self.model.register_forward_hook(self._after_root_forward))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_opt_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._after_opt_step))
        return self

    def _hook_module(self, index: int, module: nn.Module) -> list:
        return [
            module.register_forward_pre_hook(self._make_pre_hook(index), with_kwargs=True),
            module.register_forward_hook(self._make_post_hook(index)),
        ]

    def _hook_full_only(self, on: bool) -> None:
        # LoRA A/B modules carry hooks only while a full step runs: a module without
        # hooks takes PyTorch's fast call path, so check steps pay nothing for them.
        if on and self._attached and not self._full_only_handles:
            for index, module in enumerate(self._module_objs):
                if self.modules[index].full_only:
                    self._full_only_handles += self._hook_module(index, module)
        elif not on and self._full_only_handles:
            for handle in self._full_only_handles:
                handle.remove()
            self._full_only_handles.clear()

    def close(self) -> None:
        for handle in self._handles + self._tensor_handles:
            handle.remove()
        self._handles.clear()
        self._tensor_handles.clear()
        self._hook_full_only(False)
        self._attached = False

    def __enter__(self) -> Tracer:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- step boundaries -----------------------------------------------------------
    def _reset_step_buffers(self) -> None:
        # Hooks note tensors here; each pass's notes are reduced together.
        self._reducer = PassReducer(
            self._full, compiled=self.compile_stats, forward_bytes=self._last_forward_bytes
        )
        self._entries: list[tuple[int, int, int]] = []  # (site code, module index, slot)
        self._backward_open = False
        # Per site code, module index -> firing position (a dict keeps the first firing).
        self._order: list[dict[int, int]] = [{} for _ in SITES]
        self._scores: list[tuple[int, torch.Tensor]] = []
        self._inputs: list[tuple[str, int]] = []  # (argument name, slot)
        self._last_qk: dict[tuple[str, str], torch.Tensor] = {}
        # One gradient hook per tensor, crediting every (site, module) that asked: a
        # module's output is usually the next module's input, so its grad_out and the
        # next module's grad_in are one gradient and one Python call.
        self._grad_hooks = SharedGradHooks(self._credit_grad)
        self._param_device: dict[str, torch.Tensor] = {}
        self._snapshot: list[torch.Tensor] | None = None
        self._optimizer_stepped = False
        # What the step ran in: output dtypes of probed modules, autocast at its first hook.
        self.output_dtypes: set[torch.dtype] = set()
        self.autocast_dtype: torch.dtype | None = None
        self._autocast_known = False
        self._begun = False
        # True once a begun step's one-time checks are done: hooks then skip them.
        self._steady = False
        self._after_backward = False

    def begin_step(self, step: int, *, full: bool | None = None) -> None:
        """Start recording step ``step`` (full statistics every ``trace_every`` steps)."""
        for handle in self._tensor_handles:
            handle.remove()
        self._tensor_handles.clear()
        self._step = step
        self._full = (step % self.trace_every == 0) if full is None else full
        self._hook_full_only(self._full)
        self._reset_step_buffers()
        self._begun = True

    @property
    def step_begun(self) -> bool:
        """True between ``begin_step`` and ``end_step``."""
        return self._begun

    @property
    def recording(self) -> bool:
        return self._recording

    @recording.setter
    def recording(self, on: bool) -> None:
        self._recording = on
        self._steady = False

    def _ready(self, tensor: torch.Tensor | None = None) -> bool:
        """Whether a hook should record now; begins a step lazily when asked to."""
        if self._steady and not self._after_backward:
            return True  # every hook of a running step but the first few
        if not self._recording:
            return False
        if self._after_backward and tensor is not None:
            self._after_backward = False
            if self.on_forward_after_backward is not None:
                self.on_forward_after_backward()
        if not self._begun and self.on_unbegun_step is not None:
            self.on_unbegun_step()
        if not self._autocast_known and tensor is not None:
            # Read once per step: the precision the step's forward runs in.
            self._autocast_known = True
            device = tensor.device.type
            if torch.is_autocast_enabled(device):
                self.autocast_dtype = torch.get_autocast_dtype(device)
        self._steady = self._begun and self._autocast_known
        return True

    def compute_dtype(self) -> str:
        """The dtype this step's activations were computed in, as the hooks saw it:
        autocast's when it was on, else the narrowest float the probed modules output."""
        if self.autocast_dtype is not None:
            return str(self.autocast_dtype).removeprefix("torch.")
        for dtype in (torch.float16, torch.bfloat16):
            if dtype in self.output_dtypes:
                return str(dtype).removeprefix("torch.")
        return "float32"

    @property
    def full(self) -> bool:
        return self._full

    # -- hooks ---------------------------------------------------------------------
    def _record(self, site: int, index: int, tensor: torch.Tensor, *, now: bool = False) -> None:
        if not measurable(tensor):
            return
        # One tensor is often seen by several probes (a layer's input feeds query, key
        # and value; lora_A's output is lora_B's input): the reducer measures it once
        # per version (an in-place op like h[0] = nan makes a new reading).
        self._enter(site, index, self._reducer.note(tensor, now=now))

    def _credit_grad(self, grad: torch.Tensor, owners: list[tuple[int, int]]) -> None:
        if not measurable(grad):
            return
        self._after_backward = True
        if not self._backward_open:
            self._open_backward()
        slot = self._reducer.note(grad)
        for site, index in owners:
            self._enter(site, index, slot)

    def _enter(self, site: int, index: int, slot: int) -> None:
        """Module ``index``'s reading at ``site`` is ``slot``; its first one sets its order."""
        order = self._order[site]
        if index not in order:
            order[index] = len(order)
        self._entries.append((site, index, slot))

    def _watch_grad(self, tensor: torch.Tensor, site: int, index: int) -> None:
        handle = self._grad_hooks.watch(tensor, (site, index))
        if handle is not None:
            self._tensor_handles.append(handle)

    def _open_backward(self) -> None:
        # The first gradient of a backward: the forward's notes are complete, and the
        # backward's are reduced when autograd finishes this graph (queue_callback runs
        # at the end of the current backward, in its thread).
        self._backward_open = True
        self._reducer.flush()
        self._last_forward_bytes = self._reducer.noted_bytes
        self._reducer.budget_by()
        reducer = self._reducer

        def end_of_backward() -> None:
            reducer.flush()
            if reducer is self._reducer:
                self._backward_open = False

        torch.autograd.Variable._execution_engine.queue_callback(end_of_backward)

    def _after_root_forward(self, module, args, output):
        if not _in_backward():
            self._reducer.flush()
        return None

    def _make_pre_hook(self, index: int):
        full_only = self.modules[index].full_only
        # A module that overwrites its input (ReLU(inplace=True)) would change the
        # tensor before a deferred reduction sees it: that input is measured at once.
        # (Read here once: a missing attribute costs nn.Module an exception per call.)
        in_place = getattr(self._module_objs[index], "inplace", False) is True

        def hook(module, args, kwargs):
            if _in_backward() or (full_only and not self._full):
                return None
            first = args[0] if args else None
            if type(first) is torch.Tensor and first.is_floating_point():
                tensor = first  # the common case, without walking the arguments
            else:
                tensor = first_float_tensor(args) if args else None
                if tensor is None:
                    tensor = first_float_tensor(kwargs)
            if tensor is None or not self._ready(tensor):
                return None
            self._record(_FWD_IN, index, tensor, now=in_place)
            if tensor.requires_grad and torch.is_grad_enabled():
                self._watch_grad(tensor, _GRAD_IN, index)
            return None

        return hook

    def _make_post_hook(self, index: int):
        info = self.modules[index]

        def hook(module, args, output):
            if _in_backward() or (info.full_only and not self._full):
                return None
            if type(output) is torch.Tensor:
                tensor = output if output.is_floating_point() else None
            else:
                tensor = output_tensor(output)
            if tensor is None or not self._ready(tensor):
                return None
            self.output_dtypes.add(tensor.dtype)
            self._record(_FWD_OUT, index, tensor)
            if self._full and self.attention_scores:
                self._note_attention(module, index, info, tensor)
            if tensor.requires_grad and torch.is_grad_enabled():
                self._watch_grad(tensor, _GRAD_OUT, index)
            return None

        return hook

    def _note_attention(self, module, index, info, output) -> None:
        # Query/key outputs are kept for the attention module that fires right after
        # them; SDPA never shows its scores, so their maximum is recomputed here.
        if info.name.endswith((".query", ".key")):
            parent = info.name.rsplit(".", 1)[0]
            self._last_qk[(parent, info.name.rsplit(".", 1)[1])] = output.detach()
            return
        if not info.is_attention:
            return
        q = self._last_qk.pop((info.name, "query"), None)
        k = self._last_qk.pop((info.name, "key"), None)
        heads = getattr(module, "num_attention_heads", None)
        if q is None or k is None or not heads or q.dim() != 3 or k.dim() != 3:
            return
        d = q.shape[-1] // heads
        qh = q.float().reshape(q.shape[0], q.shape[1], heads, d)
        kh = k.float().reshape(k.shape[0], k.shape[1], heads, d)
        # The product before the 1/sqrt(d) scale: eager attention computes q @ k^T in
        # the compute dtype first, so that is the value fp16 must hold (|.|: a large
        # negative product overflows as surely as a large positive one). Autocast off:
        # the hook runs inside the model's, which would cast the fp32 copies back.
        with torch.autocast(q.device.type, enabled=False):
            products = torch.einsum("bihd,bjhd->bhij", qh, kh)
        self._scores.append((index, products.abs().amax()))

    def _input_hook(self, module, args, kwargs):
        if _in_backward() or not self._ready():
            return None
        for name, value in list(kwargs.items()) + [(f"arg{i}", a) for i, a in enumerate(args)]:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and measurable(value):
                self._inputs.append((name, self._reducer.note(value)))
        return None

    # -- parameters around the optimizer step ------------------------------------------
    def measure_grads(self) -> None:
        """Measure parameter gradients now (after unscaling, before the optimizer step).

        Called by the loop so that a step GradScaler skips (no optimizer hook runs)
        still has its gradients measured; the optimizer pre-hook then does nothing.
        """
        self._before_opt_step(None, (), {})

    @torch.no_grad()  # the norms need no graph, so no detach() op per tensor either
    def _before_opt_step(self, optimizer, args, kwargs) -> None:
        if "grad_norm" in self._param_device or not self._param_tensors:
            return
        grads = [
            p.grad if p.grad is not None else torch.zeros(1, device=p.device)
            for p in self._param_tensors
        ]
        # One fused norm per list; a NaN/Inf element makes its norm NaN/Inf, which is
        # the per-tensor finiteness flag (no separate kernel per tensor).
        norms = exact_norms(grads)
        self._param_device["grad_norm"] = norms
        self._param_device["grad_nonfinite"] = norms
        if self._full:
            self._snapshot = torch._foreach_mul(self._param_tensors, 1.0)

    @torch.no_grad()
    def _after_opt_step(self, optimizer, args, kwargs) -> None:
        self._optimizer_stepped = True
        if not self._param_tensors:
            return
        weights = self._param_tensors
        norms = exact_norms(weights)
        self._param_device["weight_norm"] = norms
        self._param_device["weight_nonfinite"] = norms
        if self._snapshot is not None:
            deltas = torch._foreach_sub(weights, self._snapshot)
            delta = exact_norms(deltas)
            base = exact_norms(self._snapshot)
            # A tensor that starts at exactly zero (lora_B) has no update ratio on its
            # first step: dividing by a clamped 0 would call every healthy step huge. (The
            # division itself never sees 0: no 0/0 for an op-level NaN watch to report.)
            started = base > 0
            ratio = delta / torch.where(started, base, 1.0)
            self._param_device["update_ratio"] = torch.where(started, ratio, math.nan)
            # Over all trainable tensors together: a freshly started tensor (lora_B from 0)
            # has a large ratio of its own on its first steps without anything being wrong.
            self._param_device["update_ratio_all"] = delta.norm() / base.norm().clamp_min(1e-30)
            self._snapshot = None

    def measure_params(self) -> None:
        """Measure weights when no optimizer is attached (or its step was skipped)."""
        if "weight_norm" not in self._param_device:
            saved = self._optimizer_stepped
            self._after_opt_step(None, (), {})
            self._optimizer_stepped = saved

    # -- the one copy per step -----------------------------------------------------------
    def end_step(
        self,
        *,
        loss: torch.Tensor | float | None = None,
        lr: float | None = None,
        grad_norm: torch.Tensor | float | None = None,
        extra: dict[str, torch.Tensor | float] | None = None,
    ) -> StepRecord:
        """Stack everything recorded this step, copy it to the host once, and build the record."""
        return self.end_step_late(loss=loss, lr=lr, grad_norm=grad_norm, extra=extra).result()

    def end_step_late(
        self,
        *,
        loss: torch.Tensor | float | None = None,
        lr: float | None = None,
        grad_norm: torch.Tensor | float | None = None,
        extra: dict[str, torch.Tensor | float] | None = None,
    ) -> PendingRecord:
        """End the step as ``end_step`` does, but only start the copy to the host.

        On a GPU the copy goes to pinned memory without waiting, so the host queues the
        next step while it runs; ``.result()`` on what this returns waits for it (a step
        later, it has long finished) and builds the :class:`StepRecord`. The next step
        may begin before then: what this step noted is kept with it.
        """
        self.measure_params()
        chunks, row_of, numel_of = self._reducer.finish()
        device = self._device(loss, chunks)
        layout: list[tuple[str, object, int]] = []  # (kind, key, size) in copy order
        parts: list[torch.Tensor] = []

        def scalar(value) -> torch.Tensor:
            if isinstance(value, torch.Tensor):
                return value.detach().reshape(()).to(device, torch.float32)
            return torch.tensor(math.nan if value is None else float(value), device=device)

        # Scalars first, then one stacked tensor per kind of record: a handful of
        # ops however many modules fired, then the step's one device->host copy.
        heads = [("loss", None, loss), ("grad_norm", None, grad_norm)]
        heads += [("extra", name, value) for name, value in (extra or {}).items()]
        heads += [("score", index, value) for index, value in self._scores]
        parts.append(torch.stack([scalar(v) for _, _, v in heads]))
        layout += [(kind, key, 1) for kind, key, _ in heads]
        # Every hooked tensor's reading, in the reducer's row order (see _build_record).
        for chunk in chunks:
            parts.append(chunk.reshape(-1))
            layout.append(("readings", None, chunk.numel()))
        for stat, value in self._param_device.items():
            # float64 where exact_norms made it so: a finite norm past fp32's range
            # stays finite (the one copy then carries float64; it is a few KB).
            wide = value.dtype == torch.float64
            parts.append(value.reshape(-1) if wide else value.reshape(-1).float())
            layout.append(("param", stat, value.numel()))
        notes = _StepNotes(
            step=self._step,
            full=self._full,
            order=self._order,
            entries=self._entries,
            inputs=self._inputs,
            row_of=row_of,
            numel_of=numel_of,
            optimizer_stepped=self._optimizer_stepped,
        )
        # The step's one device->host copy; on a GPU the wait for it is result()'s.
        copy = self._host_copies.start(torch.cat([p.to(device) for p in parts]))
        self._begun = self._steady = False
        return PendingRecord(copy, lambda flat: self._build_record(flat, layout, lr, notes))

    def _device(self, loss, chunks: list[torch.Tensor]) -> torch.device:
        if isinstance(loss, torch.Tensor):
            return loss.device
        for chunk in chunks:
            return chunk.device
        return torch.device("cpu")

    def _build_record(self, flat, layout, lr, notes: _StepNotes) -> StepRecord:
        n = len(self.modules)
        full = notes.full
        order = {site: np.full(n, -1, dtype=np.int64) for site in SITES}
        for site, positions in zip(SITES, notes.order, strict=True):
            for index, position in positions.items():
                order[site][index] = position
        scores = np.full(n, np.nan) if full else None
        params = np.full((len(self.params), len(PARAM_STATS)), np.nan)
        inputs: dict[str, bool] = {}
        extra: dict[str, float] = {}
        loss = grad_norm = math.nan
        readings: list[np.ndarray] = []
        offset = 0
        for kind, key, size in layout:
            chunk = flat[offset : offset + size]
            offset += size
            if kind == "loss":
                loss = float(chunk[0])
            elif kind == "grad_norm":
                grad_norm = float(chunk[0])
            elif kind == "extra":
                extra[key] = float(chunk[0])
            elif kind == "readings":
                readings.append(chunk)
            elif kind == "score":
                value = float(chunk[0])
                scores[key] = value if np.isnan(scores[key]) else max(scores[key], value)
            elif kind == "param" and key not in PARAM_STATS:
                extra[key] = float(chunk[0])
            elif kind == "param":
                column = PARAM_STATS.index(key)
                if key.endswith("nonfinite"):
                    # A norm is NaN/Inf for "has non-finite": store it as a count of 1.
                    params[:, column] = np.where(np.isfinite(chunk), 0.0, 1.0)
                else:
                    params[:, column] = chunk
        width = RAW_WIDTH if full else 1
        rows = np.concatenate(readings).reshape(-1, width) if readings else np.zeros((0, width))

        row_of = np.fromiter(
            (-1 if r is None else r for r in notes.row_of), np.int64, len(notes.row_of)
        )

        def finite_rows(values: np.ndarray) -> np.ndarray:
            # Check steps: a norm, finite iff every element is. Full steps: the counts.
            if not full:
                return np.isfinite(values[:, 0])
            return (values[:, 3] == 0) & (values[:, 4] == 0)

        for name, slot in notes.inputs:
            row = row_of[slot]
            ok = row < 0 or bool(finite_rows(rows[row : row + 1])[0])
            inputs[name] = inputs.get(name, True) and ok
        # Every (site, module, slot) noted this step, judged together. A slot without a
        # row is unknown (changed in place, read again later) or empty: left out.
        entries = np.array(notes.entries, dtype=np.int64).reshape(-1, 3)
        entry_rows = row_of[entries[:, 2]]
        known = entry_rows >= 0
        entries, entry_rows = entries[known], entry_rows[known]
        values = rows[entry_rows].astype(np.float64)
        bad = ~finite_rows(values)
        finite_grid = np.ones((len(SITES), n), dtype=bool)
        finite_grid[entries[bad, 0], entries[bad, 1]] = False
        finite = {site: finite_grid[code] for code, site in enumerate(SITES)}
        stats = None
        if full:
            stats = self._combine_calls(entries, values, n, notes.numel_of)
        return StepRecord(
            step=notes.step,
            full=full,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            finite=finite,
            order=order,
            stats=stats,
            score_max=scores,
            param_stats=params,
            optimizer_stepped=notes.optimizer_stepped,
            inputs_finite=inputs,
            extra=extra,
        )

    def _combine_calls(
        self, entries: np.ndarray, values: np.ndarray, n: int, numel_of: list[int]
    ) -> dict:
        """Full statistics per (site, module): the raw rows of a module's calls in
        this step combined (max of maxima, root of summed squares, sums of sums and
        counts), then turned into ``TENSOR_STATS`` by its total element count."""
        key = entries[:, 0] * n + entries[:, 1]
        cells = len(SITES) * n
        numel = np.zeros(cells)
        np.add.at(numel, key, np.asarray(numel_of, dtype=np.float64)[entries[:, 2]])
        absmax = np.full(cells, -np.inf)
        with np.errstate(invalid="ignore"):  # NaN, where a call had one, stays NaN
            np.maximum.at(absmax, key, values[:, 0])
        sums = np.zeros((cells, RAW_WIDTH - 1))
        np.add.at(sums, key, np.column_stack([values[:, 1] ** 2, values[:, 2:]]))
        count = np.maximum(numel, 1.0)
        table = np.column_stack(
            [
                absmax,
                np.sqrt(sums[:, 0] / count),
                sums[:, 1] / count,
                sums[:, 2],
                sums[:, 3],
                sums[:, 4] / count,
            ]
        )
        seen = np.zeros(cells, dtype=bool)
        seen[key] = True
        table[~seen] = np.nan
        table = table.reshape(len(SITES), n, len(TENSOR_STATS))
        return {site: table[code] for code, site in enumerate(SITES)}


def trace(model: nn.Module, **kwargs) -> Tracer:
    """``with stabilizer.trace(model, optimizer=opt) as tracer: ...`` (see :class:`Tracer`)."""
    return Tracer(model, **kwargs)
