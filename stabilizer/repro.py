"""``stabilizer replay BUNDLE``: rebuild a run from its repro bundle and re-run the step.

A bundle (``runs/<name>/repro/step-N/``, written by ``stabilizer train --trace``
at the first anomaly) holds the batch as safetensors, the pre-step state as a
checkpoint and the config and diagnosis as JSON: nothing here unpickles. This
module rebuilds the model with the training loop's own builders, which is why it
lives beside the loop and not in ``detector/`` (the detector never imports the loop).

Bundles may come from strangers: every file is checked before it is used, and what
does not fit is a ConfigError naming the file and the field, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stabilizer.checkpoint import list_checkpoints, load_checkpoint
from stabilizer.config import TrainConfig
from stabilizer.detector.detect import Detector, DetectorContext
from stabilizer.detector.policy import StateSnapshot
from stabilizer.detector.replay import (
    BATCH_FILE,
    BUNDLE_FILE,
    REMAKE_BUNDLE,
    RecordedStep,
    ReplayUnavailable,
    load_bundle,
    replay_step,
)
from stabilizer.errors import ConfigError, ModelLoadError
from stabilizer.precision import plan_precision
from stabilizer.probes.tracer import Tracer
from stabilizer.train import build_model, make_optimizer, resolve_device, train_step

# What the training loop's BatchEncoder puts in a micro-batch, and what the replay needs.
_REQUIRED_INPUTS = ("pixel_values", "input_ids", "labels")
_OPTIONAL_INPUTS = ("attention_mask", "qformer_input_ids", "qformer_attention_mask")
_IGNORE_INDEX = -100  # labels that are not scored


def replay_bundle(path: Path, *, device: str = "cpu"):
    """Rebuild the model, load the pre-step state and batch, run the step traced.

    Returns the new diagnosis (or None if the step is clean here) after an op-level
    and fp32 replay, exactly as during training.
    """
    path = Path(path)
    data = load_bundle(path)
    cfg = _bundle_config(data, path / BUNDLE_FILE, device)
    # The batch is read before the model is built: a damaged bundle fails in a second.
    tensors = _read_batch_file(path / BATCH_FILE)
    batches = _micro_batches(tensors, data["micro_batches"], path)
    torch_device = resolve_device(device)
    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    try:
        loaded, model = build_model(cfg, plan, torch_device)
    except ModelLoadError as exc:  # say where the model's name came from
        raise ModelLoadError(f"{path / BUNDLE_FILE}, config field 'model': {exc}") from exc
    _check_batches_fit(batches, loaded.model, path / BATCH_FILE)
    optimizer = make_optimizer(model, cfg)
    _load_pre_step_state(path, data["step"], model, optimizer)
    batches = [{k: v.to(torch_device) for k, v in batch.items()} for batch in batches]
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
            recorded = RecordedStep.from_batches(
                batches, autocast_dtype=plan.autocast_dtype, grad_scale=None
            )
            try:
                result = replay_step(
                    model=model,
                    optimizer=optimizer,
                    before=before,
                    anomaly=anomaly,
                    tracer=tracer,
                    rng_state=rng,
                    recorded=recorded,
                )
            except ReplayUnavailable as why:
                anomaly.evidence["replay"] = f"not run: {why}"
            else:
                anomaly = detector.refine(anomaly, result.op)
        return anomaly, data["anomaly"]
    finally:
        tracer.close()


def _bundle_config(data: dict, manifest: Path, device: str) -> TrainConfig:
    """The run's config from ``bundle.json``; a bad value names the manifest's field."""
    try:
        return TrainConfig.from_dict({**data["config"], "device": device}, source=str(manifest))
    except ConfigError as exc:
        raise ConfigError(f"{manifest}, field 'config': {exc}") from exc
    except (TypeError, ValueError) as exc:  # a value of the wrong JSON type
        raise ConfigError(
            f"{manifest}, field 'config': a value has the wrong type ({exc}); {REMAKE_BUNDLE}"
        ) from exc


def _read_batch_file(batch_file: Path) -> dict[str, torch.Tensor]:
    """The recorded batch, read as safetensors (a header and raw bytes, never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not batch_file.is_file():
        raise ConfigError(
            f"{batch_file}: missing, so the bundle has no batch to replay; {REMAKE_BUNDLE}"
        )
    try:
        return load_file(str(batch_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(
            f"{batch_file}: not a readable safetensors file, truncated or damaged ({exc}); "
            f"{REMAKE_BUNDLE}"
        ) from exc


def _micro_batches(tensors: dict[str, torch.Tensor], count: int, bundle: Path) -> list[dict]:
    """Split ``<i>.<input>`` tensors into micro-batches; their number must be ``count``."""
    batch_file = bundle / BATCH_FILE
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not (index.isascii() and index.isdigit() and name):
            raise ConfigError(
                f"{batch_file}: tensor {key!r} is not named <micro-batch>.<input> (such as "
                f"'0.pixel_values'); {REMAKE_BUNDLE}"
            )
        groups.setdefault(int(index), {})[name] = value
    if sorted(groups) != list(range(len(groups))):
        raise ConfigError(
            f"{batch_file}: micro-batches {sorted(groups)} are not numbered 0..n-1; {REMAKE_BUNDLE}"
        )
    if count != len(groups):
        raise ConfigError(
            f"{bundle / BUNDLE_FILE}: field 'micro_batches' is {count}, but {batch_file} "
            f"holds {len(groups)} micro-batch(es); set it to {len(groups)}, or "
            f"{REMAKE_BUNDLE}"
        )
    return [groups[i] for i in range(count)]


def _check_batches_fit(batches: list[dict], model: torch.nn.Module, batch_file: Path) -> None:
    """Each micro-batch has the inputs, dtypes, shapes and token ids ``model`` takes.

    ``model`` is the transformers model (before LoRA), whose config says what fits.
    """
    config = model.config
    required = _REQUIRED_INPUTS + (
        ("qformer_input_ids",) if config.model_type == "instructblip" else ()
    )
    for i, batch in enumerate(batches):
        where = f"{batch_file}, micro-batch {i}"
        _check_input_names(batch, required, where)
        _check_pixels(batch["pixel_values"], config.vision_config, where)
        rows = batch["pixel_values"].shape[0]
        for name, tensor in batch.items():
            if name != "pixel_values":
                _check_token_tensor(name, tensor, rows, config, where)
        _check_image_tokens(batch["input_ids"], config, where)


def _check_input_names(batch: dict, required: tuple[str, ...], where: str) -> None:
    missing = [n for n in required if n not in batch]
    unknown = sorted(set(batch) - set(_REQUIRED_INPUTS) - set(_OPTIONAL_INPUTS))
    if missing or unknown:
        found = f"lacks {missing}" if missing else f"has unknown input(s) {unknown}"
        raise ConfigError(
            f"{where} {found}; the model takes {', '.join(required)} (and optionally "
            f"{', '.join(_OPTIONAL_INPUTS)}); {REMAKE_BUNDLE}"
        )


def _check_pixels(pixels: torch.Tensor, vision_config, where: str) -> None:
    size = int(vision_config.image_size)
    channels = int(getattr(vision_config, "num_channels", 3))
    shape = tuple(pixels.shape)
    if not pixels.is_floating_point() or len(shape) != 4 or shape[1:] != (channels, size, size):
        raise ConfigError(
            f"{where}: pixel_values is {pixels.dtype} of shape {list(shape)}; the model "
            f"takes floating-point images of shape [batch, {channels}, {size}, {size}] "
            f"(vision_config.image_size {size}); {REMAKE_BUNDLE}"
        )


def _check_token_tensor(name: str, tensor: torch.Tensor, rows: int, config, where: str) -> None:
    """An integer [rows, length] tensor whose ids are inside the vocabulary it indexes."""
    shape = list(tensor.shape)
    if tensor.is_floating_point() or tensor.is_complex() or len(shape) != 2 or shape[0] != rows:
        raise ConfigError(
            f"{where}: {name} is {tensor.dtype} of shape {shape}; it must be an integer "
            f"tensor of shape [{rows}, length] (one row per image); {REMAKE_BUNDLE}"
        )
    if name.endswith("attention_mask") or not tensor.numel():
        return
    vocab = (config.qformer_config if name.startswith("qformer") else config.text_config).vocab_size
    ids = tensor[tensor != _IGNORE_INDEX] if name == "labels" else tensor
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ConfigError(
            f"{where}: {name} holds ids from {int(ids.min())} to {int(ids.max())}, outside "
            f"the model's vocabulary of {vocab}; {REMAKE_BUNDLE}"
        )


def _check_image_tokens(input_ids: torch.Tensor, config, where: str) -> None:
    """Each row holds one ``<image>`` token per query token: the Q-Former output goes there."""
    per_row = (input_ids == config.image_token_index).sum(dim=1)
    wanted = int(config.num_query_tokens)
    if bool((per_row != wanted).any()):
        raise ConfigError(
            f"{where}: input_ids rows hold {sorted(set(per_row.tolist()))} <image> token(s) "
            f"(id {config.image_token_index}); the model needs {wanted} in every row; "
            f"{REMAKE_BUNDLE}"
        )


def _load_pre_step_state(bundle: Path, step: int, model, optimizer) -> None:
    """Load the bundle's checkpoint, which must be of the step ``bundle.json`` names."""
    checkpoints = list_checkpoints(bundle)
    if not checkpoints:
        raise ConfigError(
            f"{bundle}: the bundle has no checkpoint of the pre-step state "
            f"(checkpoints/step-*/); {REMAKE_BUNDLE}"
        )
    state = load_checkpoint(checkpoints[-1], model=model, optimizer=optimizer)
    if state.get("step") != step:
        raise ConfigError(
            f"{bundle / BUNDLE_FILE}: field 'step' is {step}, but the bundle's checkpoint "
            f"{checkpoints[-1].name} holds the state before step {state.get('step')}; set "
            f"'step' to {state.get('step')}, or {REMAKE_BUNDLE}"
        )
