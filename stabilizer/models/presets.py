"""Models built from config with seeded random weights: no download needed.

Tiny presets train on a laptop CPU in minutes (the demo), so they follow the
recipe measured in shared/reference/qformer-facts.md: widths 64, 4 Q-Former
layers, 8 queries, 64x64 images, a 2+2 layer LM, dropout 0 everywhere. The
real-size presets reproduce the published architectures with random weights,
for memory and speed benchmarks on a GPU; here they build on the meta device.

    >>> model, processor = build_preset("tiny-instructblip-t5", seed=0)
    >>> model.config.num_query_tokens
    8
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stabilizer.errors import ModelLoadError


@dataclass(frozen=True)
class PresetSpec:
    """What a preset is built from."""

    family: str  # "instructblip" | "blip2"
    lm: str  # "t5" | "opt"
    vision: dict
    qformer: dict
    text: dict
    num_query_tokens: int
    description: str
    tiny_tokenizer: bool = True  # False: real-size vocab, tokenizer only sizes the embeddings


_NO_DROPOUT_QFORMER = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
_TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
    "attention_dropout": 0.0,
    # The config default (1e-10) makes a random vision tower output ~0 for every image.
    "initializer_range": 0.02,
}
_TINY_QFORMER = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "encoder_hidden_size": 64,
    "max_position_embeddings": 128,
    **_NO_DROPOUT_QFORMER,
}
_TINY_T5 = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
    # Tied embeddings make T5 scale decoder outputs by d_model**-0.5; an untied
    # random head without that scale starts at loss ~26 and learns the image far less.
}
_TINY_OPT = {
    "hidden_size": 64,
    "word_embed_proj_dim": 64,
    "ffn_dim": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "dropout": 0.0,
    "attention_dropout": 0.0,
}
# Real sizes, as published for Salesforce/instructblip-flan-t5-xl and blip2-opt-2.7b.
_EVA_VIT_G = {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "initializer_range": 0.02,
}
_QFORMER_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "encoder_hidden_size": 1408,
    "cross_attention_frequency": 2,
}
_FLAN_T5_XL = {
    "vocab_size": 32128,
    "d_model": 2048,
    "d_kv": 64,
    "d_ff": 5120,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 32,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
}
_OPT_2_7B = {
    "vocab_size": 50272,
    "hidden_size": 2560,
    "word_embed_proj_dim": 2560,
    "ffn_dim": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
}

PRESETS: dict[str, PresetSpec] = {
    "tiny-instructblip-t5": PresetSpec(
        "instructblip",
        "t5",
        _TINY_VISION,
        _TINY_QFORMER,
        _TINY_T5,
        8,
        "InstructBLIP, T5 LM; widths 64, 4 Q-Former layers, 8 queries (the default)",
    ),
    "tiny-instructblip-opt": PresetSpec(
        "instructblip",
        "opt",
        _TINY_VISION,
        _TINY_QFORMER,
        _TINY_OPT,
        8,
        "InstructBLIP, decoder-only OPT LM; widths 64",
    ),
    "tiny-blip2-opt": PresetSpec(
        "blip2",
        "opt",
        _TINY_VISION,
        _TINY_QFORMER,
        _TINY_OPT,
        8,
        "BLIP-2, decoder-only OPT LM; widths 64",
    ),
    "tiny-blip2-t5": PresetSpec(
        "blip2",
        "t5",
        _TINY_VISION,
        _TINY_QFORMER,
        _TINY_T5,
        8,
        "BLIP-2, T5 LM; widths 64",
    ),
    "medium-instructblip-t5": PresetSpec(
        "instructblip",
        "t5",
        {
            **_TINY_VISION,
            "hidden_size": 1408,
            "intermediate_size": 1408,
            "num_hidden_layers": 1,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
        },
        {**_QFORMER_BASE, "max_position_embeddings": 512, **_NO_DROPOUT_QFORMER},
        _TINY_T5,
        32,
        "real-size Q-Former (768x12, 32 queries, 257 image tokens of width 1408), tiny vision tower and LM",
    ),
    "instructblip-flan-t5-xl-random": PresetSpec(
        "instructblip",
        "t5",
        _EVA_VIT_G,
        {**_QFORMER_BASE, "vocab_size": 30522},
        _FLAN_T5_XL,
        32,
        "architecture of Salesforce/instructblip-flan-t5-xl with random weights (benchmarks)",
        tiny_tokenizer=False,
    ),
    "blip2-opt-2.7b-random": PresetSpec(
        "blip2",
        "opt",
        _EVA_VIT_G,
        _QFORMER_BASE,
        _OPT_2_7B,
        32,
        "architecture of Salesforce/blip2-opt-2.7b with random weights (benchmarks)",
        tiny_tokenizer=False,
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def _config_classes(family: str):
    import transformers as tf

    if family == "instructblip":
        return tf.InstructBlipConfig, tf.InstructBlipVisionConfig, tf.InstructBlipQFormerConfig
    return tf.Blip2Config, tf.Blip2VisionConfig, tf.Blip2QFormerConfig


def _model_class(family: str):
    import transformers as tf

    if family == "instructblip":
        return tf.InstructBlipForConditionalGeneration
    return tf.Blip2ForConditionalGeneration


def build_config(spec: PresetSpec, *, vocab_size: int, image_token_index: int):
    """The transformers config of a preset, with the LM vocab sized for the tokenizer."""
    from transformers import OPTConfig, T5Config

    config_cls, vision_cls, qformer_cls = _config_classes(spec.family)
    qformer_kwargs = dict(spec.qformer)
    if spec.family == "instructblip":
        qformer_kwargs.setdefault("vocab_size", vocab_size)
    qformer_kwargs["encoder_hidden_size"] = spec.vision["hidden_size"]
    text_kwargs = dict(spec.text)
    text_kwargs.setdefault("vocab_size", vocab_size)
    if spec.lm == "t5":
        text = T5Config(**text_kwargs, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3)
    else:
        text = OPTConfig(**text_kwargs, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return config_cls(
        vision_config=vision_cls(**spec.vision),
        qformer_config=qformer_cls(**qformer_kwargs),
        text_config=text,
        num_query_tokens=spec.num_query_tokens,
        image_token_index=image_token_index,
    )


def build_preset(
    name: str,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[torch.nn.Module, object]:
    """Build preset ``name`` with seeded random weights; returns ``(model, processor)``.

    ``device="meta"`` builds the architecture without allocating weights, which is
    how the real-size presets are checked on a machine without a GPU.
    """
    from stabilizer.models.tokenizer import IMAGE_TOKEN, build_processor

    if name not in PRESETS:
        raise ModelLoadError(
            f"unknown preset '{name}'. Presets: {', '.join(PRESETS)}; "
            "or pass a hub id (e.g. Salesforce/instructblip-flan-t5-xl) or a local folder"
        )
    spec = PRESETS[name]
    decoder_only = spec.lm == "opt"
    image_size = spec.vision["image_size"]
    processor = build_processor(
        family=spec.family,
        num_query_tokens=spec.num_query_tokens,
        image_size=image_size,
        decoder_only=decoder_only,
    )
    image_token_index = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # Keep the LM vocabulary larger than the tokenizer's (which now includes <image>).
    vocab_size = max(len(processor.tokenizer), len(getattr(processor, "qformer_tokenizer", []))) + 1
    vocab_size = 8 * math.ceil(vocab_size / 8)
    config = build_config(spec, vocab_size=vocab_size, image_token_index=image_token_index)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation

    torch_device = torch.device(device)
    fork_devices = [torch_device] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        if torch_device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        with torch_device:
            model = _model_class(spec.family)(config)
        if torch_device.type != "meta":
            _init_for_training(model, spec)
    model.eval()
    return model, processor


@torch.no_grad()
def _init_for_training(model: torch.nn.Module, spec: PresetSpec) -> None:
    # The model zero-initialises query_tokens; trained from zero, every query starts
    # identical and LayerNorm over a constant row has no signal. Small noise breaks it.
    model.query_tokens.normal_(0.0, 0.02)
    head = model.language_model.get_output_embeddings()
    if spec.lm == "t5" and head.weight is not model.language_model.get_input_embeddings().weight:
        # An untied random T5 head (where transformers keeps it untied) starts with
        # logits ~sqrt(d_model) too large (loss ~26 instead of ~ln(vocab)); the tied
        # head rescales by d_model**-0.5, so apply the same factor once here.
        head.weight.mul_(model.config.text_config.d_model**-0.5)


def describe_presets() -> str:
    """One line per preset, for ``--help`` and errors."""
    return "\n".join(f"{name}: {spec.description}" for name, spec in PRESETS.items())


PresetBuilder = Callable[..., tuple[torch.nn.Module, object]]
