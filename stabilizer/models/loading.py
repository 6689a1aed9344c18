"""Load a model and its processor from a preset name, a local folder or a hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from stabilizer.errors import ModelLoadError
from stabilizer.models.presets import PRESETS, build_preset

SUPPORTED_MODEL_TYPES = {"instructblip": "instructblip", "blip-2": "blip2"}
MODEL_CLASSES = {
    "instructblip": "InstructBlipForConditionalGeneration",
    "blip-2": "Blip2ForConditionalGeneration",
}
# The weight files transformers reads with use_safetensors=True: nothing else is loaded.
SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Suffixes of pickled weights (torch.save, pickle); loading one may run its author's code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class LoadedModel:
    """A vision-language model ready for LoRA, and what the loop needs to know of it.

    Attributes:
        model: an ``InstructBlipForConditionalGeneration`` or ``Blip2ForConditionalGeneration``.
        processor: its processor (image processor, LM tokenizer, Q-Former tokenizer).
        family: ``"instructblip"`` or ``"blip2"``.
        decoder_only: True for OPT/LLaMA-style LMs, False for T5.
        source: the preset name, folder or hub id it came from.
    """

    model: torch.nn.Module
    processor: object
    family: str
    decoder_only: bool
    source: str

    @property
    def num_query_tokens(self) -> int:
        return int(self.model.config.num_query_tokens)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_index)


def describe(model: torch.nn.Module) -> tuple[str, bool]:
    """``(family, decoder_only)`` of a transformers BLIP-2/InstructBLIP model."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type '{model_type}' is not supported: stabilizer trains the Q-Former "
            "of InstructBLIP and BLIP-2 (model_type 'instructblip' or 'blip-2')"
        )
    return SUPPORTED_MODEL_TYPES[model_type], bool(model.config.use_decoder_only_language_model)


def load_model(
    name_or_path: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Build a preset, or load a pretrained model from a local folder or the hub.

    >>> loaded = load_model("tiny-instructblip-t5")
    >>> loaded.family, loaded.decoder_only
    ('instructblip', False)

    A folder must hold what ``save_pretrained`` writes for both the model and its
    processor. Hub ids need network access or a filled local cache
    (``HF_HUB_OFFLINE=1`` uses the cache only).
    """
    if name_or_path in PRESETS:
        model, processor = build_preset(
            name_or_path, seed=seed, device=device, attn_implementation=attn_implementation
        )
        if dtype != torch.float32 and torch.device(device).type != "meta":
            model.to(dtype)
        family, decoder_only = describe(model)
        return LoadedModel(model, processor, family, decoder_only, name_or_path)
    return _load_pretrained(
        name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation
    )


def _load_pretrained(
    name_or_path: str,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    attn_implementation: str | None,
) -> LoadedModel:
    from transformers import AutoConfig, AutoProcessor

    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~"))
    if looks_local and not path.is_dir():
        raise ModelLoadError(
            f"--model '{name_or_path}': no such folder. Pass a folder written by "
            "save_pretrained, a hub id such as Salesforce/instructblip-flan-t5-xl, "
            f"or a preset ({', '.join(PRESETS)})"
        )
    if looks_local and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"--model '{name_or_path}': the folder has no config.json. It must hold what "
            "model.save_pretrained() and processor.save_pretrained() write"
        )
    source = str(path) if looks_local else name_or_path
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:  # ValueError: a config.json without a known model_type
        hint = _folder_hint if looks_local else _hub_hint
        raise ModelLoadError(hint(name_or_path, exc)) from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"--model '{name_or_path}' is a '{config.model_type}' model; stabilizer trains "
            "the Q-Former of InstructBLIP and BLIP-2 models. Pass an InstructBLIP/BLIP-2 "
            "folder or hub id (e.g. Salesforce/instructblip-flan-t5-xl) or a preset "
            f"({', '.join(PRESETS)})"
        )
    _refuse_explicit_pickle(name_or_path, config)
    if looks_local:
        _refuse_pickled_folder(name_or_path, path, MODEL_CLASSES[config.model_type])
    import transformers as tf

    cls = getattr(tf, MODEL_CLASSES[config.model_type])
    # safetensors only, from a folder and from the hub: transformers would otherwise
    # torch.load a pytorch_model.bin, and unpickling runs whatever its author put in it.
    kwargs = {"dtype": dtype, "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = cls.from_pretrained(source, **kwargs)
        processor = AutoProcessor.from_pretrained(source)
    except OSError as exc:
        if looks_local:
            raise ModelLoadError(_folder_hint(name_or_path, exc)) from exc
        if "cannot be loaded with `safetensors`" in str(exc):  # transformers' words
            raise ModelLoadError(_no_safetensors_on_hub(name_or_path)) from exc
        raise ModelLoadError(_hub_hint(name_or_path, exc)) from exc
    if config.image_token_index is None:
        raise ModelLoadError(
            f"--model '{name_or_path}': config.image_token_index is not set, so the "
            "Q-Former output cannot be placed in the LM input. Set it to the id of the "
            "'<image>' token of its tokenizer and save the config again"
        )
    model.to(device)
    model.eval()
    family, decoder_only = describe(model)
    return LoadedModel(model, processor, family, decoder_only, source)


def _hub_hint(name: str, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        f"--model '{name}' could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
        + (
            "HF_HUB_OFFLINE=1 is set and it is not in the local cache. "
            if offline
            else "Is the hub reachable from here? "
        )
        + "Download it where you have network (huggingface-cli download), then pass "
        "the local folder, or use a preset: " + ", ".join(PRESETS)
    )


def _refuse_explicit_pickle(name: str, config) -> None:
    """config.json may name its weight file (``transformers_weights``); transformers
    then loads that file even with use_safetensors=True, and it may be a pickle."""
    named = getattr(config, "transformers_weights", None)
    if named is None or str(named).endswith((".safetensors", ".safetensors.index.json")):
        return
    raise ModelLoadError(
        f"--model '{name}': config.json field 'transformers_weights' names {named!r}, "
        "which is not a safetensors file; stabilizer loads safetensors weights only. "
        "Remove the field (model.safetensors is then used) or point it at a .safetensors file"
    )


def _refuse_pickled_folder(name: str, folder: Path, class_name: str) -> None:
    """A folder whose weights are only pickles is refused before anything reads them."""
    if any((folder / f).is_file() for f in SAFE_WEIGHT_FILES):
        return  # safetensors weights: the only ones loaded, pickles beside them stay unread
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise ModelLoadError(
            f"--model '{name}': the folder holds no model.safetensors (nor a "
            "model.safetensors.index.json with its shards). It must hold what "
            "model.save_pretrained() and processor.save_pretrained() write"
        )
    raise ModelLoadError(
        f"--model '{name}': its weights are a pickle ({', '.join(pickles)}), and stabilizer "
        "loads safetensors only: unpickling a file runs any code its author put in it. On "
        f"a machine where you trust {pickles[0]}, convert it to safetensors: "
        f"{_conversion_command(folder, pickles, class_name)} (it writes model.safetensors), "
        f"then remove {', '.join(pickles)}"
    )


def _conversion_command(folder: Path, pickles: list[str], class_name: str) -> str:
    """A one-line command that rewrites the pickled weights as model.safetensors."""
    if any(p.startswith("pytorch_model") for p in pickles):  # what save_pretrained wrote
        return (
            f'python -c "import transformers as t; t.{class_name}.from_pretrained('
            f"'{folder}', use_safetensors=False).save_pretrained('{folder}')\""
        )
    # A bare state dict (torch.save(model.state_dict(), ...)): build the model from the
    # folder's config and let save_pretrained write it (it handles tied weights).
    return (
        f'python -c "import torch, transformers as t; m = t.{class_name}('
        f"t.AutoConfig.from_pretrained('{folder}')); m.load_state_dict(torch.load("
        f"'{folder / pickles[0]}', weights_only=True)); m.save_pretrained('{folder}')\""
    )


def _no_safetensors_on_hub(name: str) -> str:
    return (
        f"--model '{name}' has no safetensors weights on the hub (only pickled ones, such as "
        "pytorch_model.bin), and stabilizer loads safetensors only: unpickling a file runs "
        "any code its author put in it. Download it, convert it where you trust it "
        "(from_pretrained(...).save_pretrained(folder) writes model.safetensors), and pass "
        "that folder"
    )


def _folder_hint(name: str, exc: Exception) -> str:
    return (
        f"--model '{name}': the folder could not be loaded ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}). It must hold what "
        "model.save_pretrained() and processor.save_pretrained() write; save it again"
    )
