"""LoRA on the Q-Former: target sets, what is trainable, scope checks, the parameter table."""

from __future__ import annotations

import re

import pytest
import torch
from rich.console import Console

from stabilizer.config import TrainConfig
from stabilizer.errors import ConfigError, LoraScopeError
from stabilizer.models.loading import load_model
from stabilizer.models.lora import (
    TARGET_SETS,
    LoraSettings,
    allowed_components,
    apply_lora,
    count_parameters,
    lora_module_names,
    parameter_table,
    resolve_targets,
    strip_peft_prefix,
    verify_lora_scope,
)
from stabilizer.models.presets import build_preset
from stabilizer.precision import plan_precision
from stabilizer.train import build_model

REAL = "instructblip-flan-t5-xl-random"
TINY = ("tiny-instructblip-t5", "tiny-instructblip-opt", "tiny-blip2-opt", "tiny-blip2-t5")
# LM attention query projections, by LM kind.
LM_QUERY = {"t5": r"^language_model\..*\.q$", "opt": r".*q_proj$"}


@pytest.fixture(scope="module")
def real_model():
    model, _ = build_preset(REAL, device="meta")
    return model


def lora_params_per_rank(model: torch.nn.Module, names: list[str]) -> int:
    modules = dict(model.named_modules())
    return sum(modules[n].in_features + modules[n].out_features for n in names)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [strip_peft_prefix(n) for n, p in model.named_parameters() if p.requires_grad]


# -- target sets on the real-size model ------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "modules", "per_rank"),
    [
        ("all", 120, 302_592),
        ("name-list", 120, 302_592),
        ("attention", 72, 118_272),
        ("ffn", 48, 184_320),
        ("paper", 96, None),
    ],
)
def test_target_sets_on_real_size_instructblip(real_model, targets, modules, per_rank):
    names = resolve_targets(real_model, targets)
    assert len(names) == len(set(names)) == modules
    assert all(n.startswith("qformer.") for n in names)
    if per_rank is not None:
        assert lora_params_per_rank(real_model, names) == per_rank


def test_target_sets_relations(real_model):
    sets = {t: set(resolve_targets(real_model, t)) for t in TARGET_SETS}
    assert sets["all"] == sets["attention"] | sets["ffn"]
    assert not sets["attention"] & sets["ffn"]
    assert sets["name-list"] == sets["all"]  # T5 LM: nothing outside the Q-Former matches
    assert sets["paper"] < sets["all"]
    # The paper leaves out the self-attention key and output.
    left_out = sets["all"] - sets["paper"]
    assert left_out and all(
        re.search(r"\.attention\.(attention\.key|output\.dense)$", n) for n in left_out
    )
    assert all(".crossattention." not in n for n in left_out)


def test_lora_on_real_size_model_on_meta():
    model, _ = build_preset(REAL, device="meta")
    peft_model = apply_lora(model, LoraSettings(targets="all", rank=8), adapter_dtype=None)
    counts = {c.component: c for c in count_parameters(peft_model)}
    assert counts["qformer"].trainable == 8 * 302_592 == 2_420_736
    assert counts["qformer"].total == 185_659_392 + 2_420_736
    assert counts["vision_model"].trainable == counts["language_model"].trainable == 0
    assert counts["query_tokens"].trainable == 32 * 768
    assert counts["language_projection"].trainable == 768 * 2048 + 2048
    assert sum(c.total for c in counts.values()) == 3_957_170_176 + 2_420_736


def test_user_regex_selects_modules(real_model):
    pattern = r"^qformer\.encoder\.layer\.(0|1)\.attention\.attention\.(query|value)$"
    names = resolve_targets(real_model, pattern)
    assert names == [
        "qformer.encoder.layer.0.attention.attention.query",
        "qformer.encoder.layer.0.attention.attention.value",
        "qformer.encoder.layer.1.attention.attention.query",
        "qformer.encoder.layer.1.attention.attention.value",
    ]
    # Matched in full, not searched: a bare suffix selects nothing.
    with pytest.raises(ConfigError):
        resolve_targets(real_model, "query")


def test_invalid_regex_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        LoraSettings(targets="qformer.(query")
    message = str(err.value)
    assert "--lora-targets" in message and "qformer.(query" in message
    assert "attention" in message  # lists the target sets


def test_regex_matching_nothing_is_a_config_error(real_model):
    with pytest.raises(ConfigError) as err:
        resolve_targets(real_model, r"^qformer\.no_such_module$")
    message = str(err.value)
    assert "--lora-targets" in message and "no_such_module" in message
    assert "stabilizer inspect" in message


def test_regex_matching_nothing_fails_apply_lora():
    model, _ = build_preset("tiny-blip2-t5")
    with pytest.raises(ConfigError, match="--lora-targets"):
        apply_lora(model, LoraSettings(targets=r"^nothing$"), adapter_dtype=None)


# -- what apply_lora makes trainable -------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_only_lora_query_tokens_and_projection_train(name):
    model, _ = build_preset(name)
    settings = LoraSettings(targets="all", rank=4)
    targets = resolve_targets(model, "all")
    peft_model = apply_lora(model, settings, adapter_dtype=None)

    names = trainable_names(peft_model)
    lora = [n for n in names if ".lora_" in n]
    other = sorted(n for n in names if ".lora_" not in n)
    assert all(n.startswith("qformer.") for n in lora)
    assert len(lora) == 2 * len(targets)  # lora_A and lora_B on every target, no bias
    assert sorted(lora_module_names(peft_model)) == sorted(targets)
    assert other == [
        "language_projection.modules_to_save.default.bias",
        "language_projection.modules_to_save.default.weight",
        "query_tokens",
    ]
    verify_lora_scope(peft_model, allowed_components(settings))  # does not raise


def test_lora_only_when_query_tokens_and_projection_are_frozen():
    model, _ = build_preset("tiny-instructblip-t5")
    settings = LoraSettings(targets="attention", train_query_tokens=False, train_projection=False)
    peft_model = apply_lora(model, settings, adapter_dtype=None)
    names = trainable_names(peft_model)
    assert names and all(n.startswith("qformer.") and ".lora_" in n for n in names)
    assert allowed_components(settings) == ("qformer",)
    verify_lora_scope(peft_model, allowed_components(settings))


def test_trainable_tensors_are_fp32_on_a_bf16_base():
    loaded = load_model("tiny-instructblip-opt", dtype=torch.bfloat16)
    peft_model = apply_lora(loaded.model, LoraSettings(), adapter_dtype=None)
    trainable = {n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert frozen and set(frozen.values()) == {torch.bfloat16}


def test_adapter_dtype_fp16_casts_trainable_tensors():
    model, _ = build_preset("tiny-blip2-t5")
    peft_model = apply_lora(model, LoraSettings(), adapter_dtype=torch.float16)
    trainable = {n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable)
    assert set(trainable.values()) == {torch.float16}


# -- verify_lora_scope refuses what lies outside the Q-Former -------------------------------


@pytest.mark.parametrize(
    "parameter",
    [
        "vision_model.embeddings.patch_embedding.weight",
        "language_model.decoder.final_layer_norm.weight",
    ],
)
def test_scope_refuses_trainable_parameter_outside(parameter):
    model, _ = build_preset("tiny-instructblip-t5")
    settings = LoraSettings()
    peft_model = apply_lora(model, settings, adapter_dtype=None)
    dict(peft_model.get_base_model().named_parameters())[parameter].requires_grad_(True)
    with pytest.raises(LoraScopeError) as err:
        verify_lora_scope(peft_model, allowed_components(settings))
    message = str(err.value)
    assert parameter in message
    assert "--lora-targets" in message


def test_scope_refuses_query_tokens_when_not_allowed():
    model, _ = build_preset("tiny-blip2-opt")
    settings = LoraSettings(train_query_tokens=False)
    peft_model = apply_lora(model, settings, adapter_dtype=None)
    peft_model.get_base_model().query_tokens.requires_grad_(True)
    with pytest.raises(LoraScopeError, match="query_tokens"):
        verify_lora_scope(peft_model, allowed_components(settings))


@pytest.mark.parametrize(
    ("name", "lm"), [("tiny-instructblip-t5", "t5"), ("tiny-blip2-opt", "opt")]
)
def test_build_model_refuses_lora_on_the_language_model(name, lm):
    cfg = TrainConfig(model=name, lora=LoraSettings(targets=LM_QUERY[lm]))
    with pytest.raises(LoraScopeError) as err:
        build_model(cfg, plan_precision("fp32", "fp32"), torch.device("cpu"))
    message = str(err.value)
    assert "training refused" in message
    assert "language_model." in message
    suffix = ".q" if lm == "t5" else ".q_proj"
    assert re.search(re.escape(suffix) + r"\b", message)


# -- the parameter table -------------------------------------------------------------------


def _numbers(line: str) -> list[int]:
    return [int(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?![\d.]*%)", line)]


@pytest.mark.parametrize("name", ["tiny-instructblip-t5", "tiny-blip2-opt"])
def test_parameter_table_totals(name):
    model, _ = build_preset(name)
    base_total = sum(p.numel() for p in model.parameters())
    peft_model = apply_lora(model, LoraSettings(rank=4), adapter_dtype=None)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)

    console = Console(record=True, width=120)
    console.print(parameter_table(peft_model, title="Trainable parameters (test)"))
    text = console.export_text()

    assert "Trainable parameters (test)" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 6}
    for component in ("vision_model", "query_tokens", "qformer", "language_projection"):
        assert component in rows
    assert "language_model" in rows and "total" in rows
    total_params, total_trainable = _numbers(rows["total"])[:2]
    assert total_trainable == trainable
    # The frozen original of the projection is not counted beside its trainable copy.
    assert total_params == base_total + lora
    component_rows = [_numbers(rows[c]) for c in rows if c not in ("component", "total")]
    assert sum(r[1] for r in component_rows) == trainable
    assert sum(r[0] for r in component_rows) == total_params
    projection = model.language_projection.modules_to_save["default"]
    assert (
        _numbers(rows["language_projection"])[:2]
        == [projection.weight.numel() + projection.bias.numel()] * 2
    )


# -- the classic failure, reproduced on purpose -------------------------------------------


def test_classic_failure_setup_is_all_fp16():
    cfg = TrainConfig(adapter_dtype="fp16")
    loaded, peft_model = build_model(cfg, plan_precision("fp32", "fp16"), torch.device("cpu"))
    lora = {n: p.dtype for n, p in peft_model.named_parameters() if ".lora_" in n}
    base = {n: p.dtype for n, p in peft_model.named_parameters() if ".lora_" not in n}
    assert lora and set(lora.values()) == {torch.float16}
    assert base and set(base.values()) == {torch.float16}
    assert peft_model.get_base_model().query_tokens.dtype == torch.float16
    assert loaded.model.query_tokens.requires_grad  # still trained, in fp16
