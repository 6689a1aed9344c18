"""Training checkpoints that resume a run exactly, written atomically, read without pickle.

A checkpoint is one folder, ``run_dir/checkpoints/step-00000123/``, holding:

- ``adapter_model.safetensors`` + ``adapter_config.json``: the LoRA adapter as peft writes
  it, so ``peft.PeftModel.from_pretrained(base, ckpt_dir)`` works on it directly;
- ``trainable.safetensors``: every parameter with ``requires_grad=True``, keyed by its full
  ``named_parameters()`` name (covers trainables peft does not save, e.g. ``query_tokens``);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and the rest;
- ``rng.safetensors`` + ``rng.json``: python, numpy, torch CPU/CUDA and caller generators;
- ``trainer_state.json``: format version, step, scheduler, grad scaler and the caller's
  ``extra`` dict. It is written last: a folder without it is not a checkpoint.

Files may come from strangers, so nothing here unpickles: tensors are read with
safetensors and everything else with ``json``.

Example::

    ckpt = save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched,
                           generators=[sampler_gen], extra={"epoch": 1}, keep_last=3)
    ...
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:
        state = load_checkpoint(latest, model=model, optimizer=opt, scheduler=sched,
                                generators=[sampler_gen])
        start_step = state["step"]
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from stabilizer.errors import CheckpointError

FORMAT_NAME = "stabilizer-checkpoint"
FORMAT_VERSION = 1

CHECKPOINTS_SUBDIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
RNG_JSON = "rng.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")

# ``.tmp-*``: a save in progress or a dead one (removed by the next save).
# ``.old-step-N-*``: a finished checkpoint moved aside while the same step is saved again;
# it still counts as step N until the new ``step-N`` is in place.
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_STEP_RE = re.compile(r"^step-(\d+)$")
_OLD_RE = re.compile(r"^\.old-step-(\d+)-[0-9a-f]+$")

# How many offending names an error message lists before "... and N more".
_MAX_NAMES_SHOWN = 10


# --------------------------------------------------------------------------- public API


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    generators: Sequence[torch.Generator] = (),
    extra: dict | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write a complete checkpoint for ``step`` and return its folder.

    Everything goes into a ``.tmp-*`` folder next to the final one, is fsynced, then renamed
    into place, so a kill at any moment leaves the previous checkpoint intact. Saving a step
    that already exists replaces it. Call it from one process only (rank 0 under DDP).

    Args:
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints/step-XXXXXXXX``.
        step: number of optimizer steps done so far.
        model: the ``peft.PeftModel`` being trained (any ``nn.Module`` works; the adapter
            files are written only for a peft model).
        optimizer: any torch optimizer.
        scheduler: an LR scheduler whose ``state_dict()`` is JSON-able (``LambdaLR`` is).
        scaler: an optional ``torch.amp.GradScaler``.
        generators: extra RNGs to restore on resume, e.g. the data sampler's generator.
        extra: JSON-able caller state (epoch, position in the data order, ...).
        keep_last: if set, delete the oldest complete checkpoints beyond this many.

    Example::

        save_checkpoint(Path("runs/a"), 500, model=model, optimizer=opt, scheduler=sched,
                        generators=[gen], extra={"epoch": 2, "batch_in_epoch": 17})
    """
    _check_step(step)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    # Take RNG states first, before anything below could draw from them.
    rng_tensors, rng_json = _capture_rng(generators)
    # Serialize the small JSON parts up front so bad input fails before touching the disk.
    trainer_state = _trainer_state(step, model, scheduler, scaler, extra)
    opt_tensors, opt_json = _encode_optimizer(optimizer, model)
    trainable = _trainable_tensors(model)

    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    final = root / _step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if _is_peft_model(model):
            model.save_pretrained(str(tmp), safe_serialization=True)
        _write_safetensors(tmp / TRAINABLE, trainable)
        _write_safetensors(tmp / OPTIMIZER_TENSORS, opt_tensors)
        _write_json(tmp / OPTIMIZER_JSON, opt_json)
        _write_safetensors(tmp / RNG_TENSORS, rng_tensors)
        _write_json(tmp / RNG_JSON, rng_json)
        _write_json(tmp / TRAINER_STATE, trainer_state)  # last: marks the folder complete
        _fsync_tree(tmp)
        _move_into_place(tmp, final)
    except Exception:
        # Best effort only: a kill skips this, and the next save removes the leftover.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        _prune(root, keep_last, keep=final)
    return final


def load_checkpoint(
    ckpt_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    generators: Sequence[torch.Generator] = (),
    restore_rng: bool = True,
) -> dict:
    """Restore a run from ``ckpt_dir`` and return its trainer state.

    Every file is read and checked (names, shapes, parameter order) before anything is
    changed, so a missing or mismatched file leaves model, optimizer and RNGs untouched;
    only a complaint from ``optimizer/scheduler/scaler.load_state_dict`` itself comes after
    the weights were copied. ``restore_rng=False`` touches no RNG at all
    (neither the global ones nor ``generators``), e.g. for evaluation.

    Returns:
        ``{"step": int, "extra": dict, "format_version": int, "path": str}``.

    Raises:
        CheckpointError: a file is missing or unreadable, or the checkpoint does not match
            the model's trainable parameters, the optimizer, scheduler, scaler or generators.

    Example::

        latest = find_latest_checkpoint(run_dir)
        state = load_checkpoint(latest, model=model, optimizer=opt, scheduler=sched,
                                generators=[gen])
        step, epoch = state["step"], state["extra"]["epoch"]
    """
    ckpt_dir = Path(ckpt_dir)
    state = _read_trainer_state(ckpt_dir)
    if state.get("has_adapter"):
        for name in ADAPTER_FILES:
            _require_file(ckpt_dir, name)
    weights = _read_trainable(ckpt_dir, model)
    try:
        opt_state = _read_optimizer(ckpt_dir, optimizer, model) if optimizer is not None else None
        sched_state = _component_state(ckpt_dir, state, "scheduler", scheduler)
        scaler_state = _component_state(ckpt_dir, state, "scaler", scaler)
        rng = _read_rng(ckpt_dir, len(generators)) if restore_rng else None
    except (KeyError, TypeError, ValueError) as err:
        # JSON that parses but has the wrong shape: damaged or not written by us.
        raise CheckpointError(
            f"checkpoint {ckpt_dir} is malformed ({err!r}); use an older checkpoint"
        ) from err

    _copy_weights(model, weights)
    if opt_state is not None:
        _apply(ckpt_dir, "optimizer", optimizer.load_state_dict, opt_state)
    if sched_state is not None:
        _apply(ckpt_dir, "scheduler", scheduler.load_state_dict, sched_state)
    if scaler_state is not None:
        _apply(ckpt_dir, "grad scaler", scaler.load_state_dict, scaler_state)
    if rng is not None:
        _restore_rng(*rng, generators)  # last, so nothing above draws from the restored RNGs
    return {
        "step": state["step"],
        "extra": state.get("extra", {}),
        "format_version": state["format_version"],
        "path": str(ckpt_dir),
    }


def load_trainable_weights(ckpt_dir: Path, model: nn.Module) -> None:
    """Copy only the trained weights of ``ckpt_dir`` into ``model`` (for eval/predict).

    ``model`` must be built like the training one (same LoRA targets and rank, same
    trainable parameters). Optimizer, scheduler and RNG states are ignored.

    Example::

        model = build_model(cfg)  # same peft wrapping as in training
        load_trainable_weights(find_latest_checkpoint(run_dir), model)
        model.eval()
    """
    ckpt_dir = Path(ckpt_dir)
    _read_trainer_state(ckpt_dir)  # refuses incomplete folders
    _copy_weights(model, _read_trainable(ckpt_dir, model))


def read_checkpoint_extra(ckpt_dir: Path) -> dict:
    """The caller's ``extra`` state of a checkpoint, without loading any tensor."""
    return dict(_read_trainer_state(Path(ckpt_dir)).get("extra", {}))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of ``run_dir``, oldest (lowest step) first.

    In-progress or dead ``.tmp-*`` folders and folders without ``trainer_state.json`` are
    skipped. A checkpoint moved aside by an interrupted re-save of the same step is listed
    under its aside name until the next save puts it back.

    Example::

        >>> [p.name for p in list_checkpoints(Path("runs/a"))]  # doctest: +SKIP
        ['step-00000100', 'step-00000200']
    """
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    if not root.is_dir():
        return []
    final: dict[int, Path] = {}
    aside: dict[int, Path] = {}
    for entry in root.iterdir():
        if not (entry / TRAINER_STATE).is_file():
            continue
        if match := _STEP_RE.match(entry.name):
            final[int(match.group(1))] = entry
        elif match := _OLD_RE.match(entry.name):
            aside[int(match.group(1))] = entry
    found = {**aside, **final}  # a final folder wins over an aside copy of the same step
    return [found[step] for step in sorted(found)]


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir``, or ``None``.

    Example::

        latest = find_latest_checkpoint(Path("runs/a"))
        start = 0 if latest is None else load_checkpoint(latest, model=model)["step"]
    """
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# --------------------------------------------------------------------------- saving parts


def _check_step(step: int) -> None:
    """Reject steps that would make a bad folder name (bool is an int, but not a step)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def _step_dir_name(step: int) -> str:
    """``step-00000123``; zero-padded so folders sort by name too (parsing does not rely on it)."""
    return f"step-{step:08d}"


def _is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel``; checked lazily so listing checkpoints needs no peft."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by full name, as contiguous CPU tensors for safetensors."""
    tensors = {
        name: param.detach().cpu().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    if not tensors:
        raise CheckpointError(
            "the model has no trainable parameters (requires_grad=True), nothing to save; "
            "wrap it with peft (get_peft_model) before training"
        )
    return tensors


def _trainer_state(
    step: int, model: nn.Module, scheduler: Any, scaler: Any, extra: dict | None
) -> dict:
    """The JSON written last. Scheduler/scaler states must be plain JSON (no tensors)."""
    extra = {} if extra is None else extra
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"extra must be JSON-able (str keys, plain values): {err}") from err
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": step,
        "extra": extra,
        "has_adapter": _is_peft_model(model),
        "scheduler": None if scheduler is None else _encode_plain(scheduler, "scheduler"),
        "scaler": None if scaler is None else _encode_plain(scaler, "grad scaler"),
        "torch_version": torch.__version__,
    }


def _encode_plain(component: Any, what: str) -> Any:
    """Encode a scheduler/scaler ``state_dict()``; they hold scalars, so tensors are refused.

    ``LambdaLR`` stores ``None`` for plain-function lambdas (and the ``__dict__`` of callable
    objects), so its state is JSON-able as is.
    """

    def refuse(path: str, tensor: torch.Tensor) -> dict:
        raise CheckpointError(
            f"the {what} state holds a tensor at '{path}', which checkpoints do not support "
            f"for the {what}; use a {what} whose state_dict() holds plain numbers"
        )

    return _encode(component.state_dict(), what, refuse)


def _encode_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON tree pointing at them.

    Tensor keys look like ``state.0.exp_avg`` (AdamW's ``step`` is a float32 tensor too).
    The JSON also records each optimized parameter's model name, so a resume with another
    parameter order is caught instead of silently mixing up moments.
    """
    tensors: dict[str, torch.Tensor] = {}

    def keep(path: str, tensor: torch.Tensor) -> dict:
        if path in tensors:
            raise CheckpointError(f"optimizer state has two entries named '{path}'")
        tensors[path] = tensor.detach().cpu().contiguous()
        return {"__tensor__": path}

    tree = _encode(optimizer.state_dict(), "", keep)
    return tensors, {"state_dict": tree, "param_names": _optimizer_param_names(optimizer, model)}


def _optimizer_param_names(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> list[list[str | None]]:
    """Model names of each param group's parameters (None for one outside the model)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names.get(id(p)) for p in group["params"]] for group in optimizer.param_groups]


def _encode(obj: Any, path: str, on_tensor: Any) -> Any:
    """Turn a state_dict tree into JSON, keeping what plain JSON would lose.

    Tuples become ``{"__tuple__": [...]}`` (AdamW's ``betas``), dicts with non-str keys
    ``{"__items__": [[key, value], ...]}`` (optimizer state is keyed by int), and tensors
    whatever ``on_tensor(path, tensor)`` returns. ``_decode`` reverses it exactly.
    """
    if isinstance(obj, torch.Tensor):
        return on_tensor(path, obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(path, i), on_tensor) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), on_tensor) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, _join(path, k), on_tensor) for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, path, _no_tensor_keys), _encode(v, _join(path, k), on_tensor)]
                for k, v in obj.items()
            ]
        }
    raise CheckpointError(
        f"cannot store a {type(obj).__name__} at '{path or '<root>'}' in a checkpoint: "
        "only tensors, numbers, strings, None, lists, tuples and dicts are supported"
    )


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _no_tensor_keys(path: str, tensor: torch.Tensor) -> None:
    raise CheckpointError(f"a tensor used as a dict key at '{path}' cannot be stored")


# --------------------------------------------------------------------------- RNG


def _capture_rng(
    generators: Sequence[torch.Generator],
) -> tuple[dict[str, torch.Tensor], dict]:
    """All RNG states: byte tensors for torch, JSON for python and numpy."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors = {"torch.cpu": torch.get_rng_state()}
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, cuda_state in enumerate(cuda_states):
        tensors[f"torch.cuda.{i}"] = cuda_state.cpu()
    for i, gen in enumerate(generators):
        tensors[f"generator.{i}"] = gen.get_state().cpu()
    info = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": name,
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "cuda_devices": len(cuda_states),
        "generators": len(generators),
    }
    return tensors, info


def _read_rng(ckpt_dir: Path, n_generators: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and check RNG states; the generator count must match the caller's."""
    tensors = _read_safetensors(ckpt_dir, RNG_TENSORS)
    info = _read_json(ckpt_dir, RNG_JSON)
    expected = ["torch.cpu"]
    expected += [f"torch.cuda.{i}" for i in range(info["cuda_devices"])]
    expected += [f"generator.{i}" for i in range(info["generators"])]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(
            f"{ckpt_dir / RNG_TENSORS} lacks RNG states {missing}; the checkpoint is damaged, "
            "use an older one"
        )
    if info["generators"] != n_generators:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} saved {info['generators']} generator state(s) but "
            f"{n_generators} generator(s) were passed to load_checkpoint; pass the same "
            "generators, in the same order, as to save_checkpoint"
        )
    return tensors, info


def _restore_rng(
    tensors: dict[str, torch.Tensor], info: dict, generators: Sequence[torch.Generator]
) -> None:
    """Put every RNG back. CUDA states are skipped with a warning if the devices differ."""
    py = info["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = info["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            np.asarray(npy["key"], dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(tensors["torch.cpu"])
    _restore_cuda_rng(tensors, info["cuda_devices"])
    for i, gen in enumerate(generators):
        gen.set_state(tensors[f"generator.{i}"])


def _restore_cuda_rng(tensors: dict[str, torch.Tensor], saved_devices: int) -> None:
    """Restore per-device CUDA RNG states when the device count matches."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved_devices == 0:
        return
    if available != saved_devices:
        # Still resumable, just not bit-exact on the GPU (dropout masks differ).
        warnings.warn(
            f"checkpoint has CUDA RNG states for {saved_devices} device(s) but {available} "
            "are visible; CUDA RNGs are not restored, so the resumed run is not bit-exact",
            stacklevel=3,
        )
        return
    torch.cuda.set_rng_state_all([tensors[f"torch.cuda.{i}"] for i in range(saved_devices)])


# --------------------------------------------------------------------------- loading parts


def _read_trainer_state(ckpt_dir: Path) -> dict:
    """``trainer_state.json``, checked for format and version."""
    if not ckpt_dir.is_dir():
        raise CheckpointError(
            f"checkpoint folder {ckpt_dir} does not exist; a run's checkpoints are the "
            "step-* folders in its checkpoints/ folder (without --checkpoint, eval and "
            "predict take the latest complete one)"
        )
    state = _read_json(ckpt_dir, TRAINER_STATE)
    if state.get("format") != FORMAT_NAME or not isinstance(state.get("step"), int):
        raise CheckpointError(
            f"{ckpt_dir / TRAINER_STATE} is not a stabilizer trainer state "
            f"(format={state.get('format')!r}); point to a folder written by save_checkpoint"
        )
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has format version {version!r}, this stabilizer reads up "
            f"to {FORMAT_VERSION}; upgrade stabilizer to load it"
        )
    return state


def _read_trainable(ckpt_dir: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights, checked name by name and shape by shape against ``model``."""
    saved = _read_safetensors(ckpt_dir, TRAINABLE)
    wanted = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    shapes = [
        f"{name} (checkpoint {tuple(saved[name].shape)}, model {tuple(wanted[name].shape)})"
        for name in sorted(set(saved) & set(wanted))
        if saved[name].shape != wanted[name].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_names(missing)}")
    if unexpected:
        problems.append(f"not trainable in the model: {_names(unexpected)}")
    if shapes:
        problems.append(f"shape differs: {_names(shapes)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not match the model's trainable parameters; "
            + "; ".join(problems)
            + ". The run that wrote it probably used other LoRA target modules or rank, or "
            "trained other parameters: rebuild the model with that run's config, or start "
            "a new run directory"
        )
    dtypes = [n for n in saved if saved[n].dtype != wanted[n].dtype]
    if dtypes:
        # Loading still works (values are cast), but resuming is no longer bit-exact.
        warnings.warn(
            f"checkpoint {ckpt_dir}: dtype differs from the model for {_names(dtypes)}; "
            "the weights are cast",
            stacklevel=3,
        )
    return saved


def _copy_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy checked weights into the model's parameters, in place (keeps optimizer refs)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def _read_optimizer(ckpt_dir: Path, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """Rebuild the exact ``optimizer.state_dict()`` that was saved (dtypes included)."""
    tensors = _read_safetensors(ckpt_dir, OPTIMIZER_TENSORS)
    info = _read_json(ckpt_dir, OPTIMIZER_JSON)
    saved_names = info.get("param_names")
    current = _optimizer_param_names(optimizer, model)
    if saved_names != current:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: the optimizer's parameters differ from the saved run "
            f"(saved {_group_summary(saved_names)}, now {_group_summary(current)}); build the "
            "optimizer over the same parameters, grouped and ordered as in that run"
        )
    used: set[str] = set()

    def fetch(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CheckpointError(
                f"{ckpt_dir / OPTIMIZER_TENSORS} lacks tensor '{key}' named in "
                f"{OPTIMIZER_JSON}; the checkpoint is damaged, use an older one"
            )
        used.add(key)
        return tensors[key]

    state_dict = _decode(info["state_dict"], fetch)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(
            f"{ckpt_dir / OPTIMIZER_TENSORS} has tensors {_names(unused)} that "
            f"{OPTIMIZER_JSON} does not use; the checkpoint is damaged, use an older one"
        )
    return state_dict


def _group_summary(names: Any) -> str:
    if not isinstance(names, list):
        return "unknown"
    return f"{len(names)} group(s) of sizes {[len(g) for g in names]}"


def _component_state(ckpt_dir: Path, state: dict, key: str, component: Any) -> Any:
    """The saved scheduler/scaler state if the caller passed one to restore, else None."""
    if component is None:
        return None
    saved = state.get(key)
    if saved is None:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has no {key} state, but a {key} was passed to "
            f"load_checkpoint; pass {key}=None (the run was saved without one)"
        )
    return _decode(saved, _no_tensors)


def _no_tensors(key: str) -> torch.Tensor:
    raise CheckpointError(f"unexpected tensor reference '{key}' in trainer state")


def _decode(obj: Any, fetch: Any) -> Any:
    """Reverse ``_encode``: tuples, non-str dict keys and tensors come back as saved."""
    if isinstance(obj, list):
        return [_decode(v, fetch) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return fetch(obj["__tensor__"])
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, fetch) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {_decode(k, fetch): _decode(v, fetch) for k, v in obj["__items__"]}
    return {k: _decode(v, fetch) for k, v in obj.items()}


def _apply(ckpt_dir: Path, what: str, load_state_dict: Any, state: Any) -> None:
    """Call ``load_state_dict`` and turn its complaints into a CheckpointError."""
    try:
        load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: the {what} state does not fit the {what} passed to "
            f"load_checkpoint ({err}); build it as in the run that saved the checkpoint"
        ) from err


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return shown + (f" ... and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------- file I/O


def _require_file(ckpt_dir: Path, name: str) -> Path:
    path = ckpt_dir / name
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {ckpt_dir} lacks {name}; it is incomplete or damaged: use an older "
            f"one, another step-* folder beside it in {ckpt_dir.parent}"
        )
    return path


def _read_json(ckpt_dir: Path, name: str) -> Any:
    path = _require_file(ckpt_dir, name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; use an older checkpoint") from err


def _read_safetensors(ckpt_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file: a plain header plus raw bytes, never pickle."""
    path = _require_file(ckpt_dir, name)
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (OSError, safetensors.SafetensorError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; use an older checkpoint") from err


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors with safetensors (fsync happens later, for the whole folder)."""
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` so the rename publishes durable data."""
    for dirpath, _dirnames, filenames in os.walk(folder):
        for filename in filenames:
            _fsync_path(Path(dirpath) / filename)
        _fsync_dir(Path(dirpath))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (not possible on Windows)."""
    if os.name == "nt":
        return
    _fsync_path(path)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside, then removed.

    Linux cannot rename onto a non-empty folder, so replacing is two renames. In between,
    the aside copy (``.old-step-N-*``) still lists as step N, so a kill loses nothing.
    """
    aside = None
    if final.exists():
        aside = final.parent / f"{_OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        _remove_dir(aside)


def _remove_dir(path: Path) -> None:
    """Delete a folder so no half-deleted copy can look complete: rename to .tmp-, then rm."""
    doomed = path.parent / f"{_TMP_PREFIX}del-{uuid.uuid4().hex[:8]}"
    os.rename(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed)


def _clean_stale(root: Path) -> None:
    """Remove leftovers of killed saves; put back a checkpoint moved aside by one.

    Assumes one writer per run directory: a ``.tmp-*`` folder here is dead, not in use.
    """
    for entry in list(root.iterdir()):
        if match := _OLD_RE.match(entry.name):
            final = root / _step_dir_name(int(match.group(1)))
            if final.exists() or not (entry / TRAINER_STATE).is_file():
                _remove_dir(entry)
            else:
                os.rename(entry, final)  # the re-save of this step died before finishing
                _fsync_dir(root)
    for entry in [e for e in root.iterdir() if e.name.startswith(_TMP_PREFIX)]:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Delete the oldest complete checkpoints beyond ``keep_last``, never ``keep``."""
    found = list_checkpoints(root.parent)
    for path in found[: max(0, len(found) - keep_last)]:
        if path != keep:
            _remove_dir(path)
