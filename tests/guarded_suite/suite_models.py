"""Model tests of the kind third-party suites hold (transformers' and peft's), on tiny
models built from config: every one is healthy. tests/test_pytest_plugin.py runs this
file with and without ``--nan-guard`` / ``--nan-guard-ops`` and expects the same
outcomes; a difference is a false failure of the plugin.

Not collected by the main run (the file name does not start with ``test_``).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 99


def tiny(kind: str, attn: str = "eager"):
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            num_labels=3,
        )
        model = BertForSequenceClassification(config)
    elif kind == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    else:
        config = T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        )
        model = T5ForConditionalGeneration(config)
    model.config._attn_implementation = attn
    return model


TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}


def batch(kind: str, *, pad: bool = True) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :3] = 0 if kind == "llama" else 1  # llama: left padding
        mask[1, -3:] = 1 if kind == "llama" else 0
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        out["labels"] = torch.tensor([0, 2])
    elif kind == "llama":
        out["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        out["labels"] = torch.randint(1, VOCAB, (2, 4), generator=gen)
    return out


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", ["bert", "llama", "t5"])
def test_lora_training_step(kind, checkpointing):
    model = get_peft_model(tiny(kind), LoraConfig(r=4, target_modules=TARGETS[kind]))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(**batch(kind)).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    opt.zero_grad()


def test_lora_on_embeddings_keeps_adapters_in_parameter_dicts():
    model = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["embed_tokens"]))
    assert any("lora_embedding_A" in n for n, _ in model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch("llama")).loss.backward()
    opt.step()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_sdpa_matches_eager(kind):
    eager, sdpa = tiny(kind, "eager").eval(), tiny(kind, "sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    inputs = {k: v for k, v in batch(kind).items() if k != "labels"}
    with torch.no_grad():
        a, b = eager(**inputs).logits, sdpa(**inputs).logits
    if kind == "llama":  # padded positions are undefined: compare the real tokens
        keep = inputs["attention_mask"].bool()
        a, b = a[keep], b[keep]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_half_precision_forward(kind, dtype):
    model = tiny(kind).to(dtype).eval()
    with torch.no_grad():
        out = model(**batch(kind))
    assert torch.isfinite(out.logits).all()


def test_generate_with_padding():
    model = tiny("llama").eval()
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)
    t5 = tiny("t5").eval()
    t5_inputs = {k: v for k, v in batch("t5").items() if k != "labels"}
    assert t5.generate(**t5_inputs, max_new_tokens=3, do_sample=False).shape[0] == 2


def test_meta_device_model():
    with torch.device("meta"):
        model = tiny("llama")
    ids = torch.randint(1, VOCAB, (2, 5)).to("meta")
    assert model(input_ids=ids).logits.shape == (2, 5, VOCAB)


def test_sparse_embedding_gradients():
    torch.manual_seed(0)
    embed, head = nn.Embedding(VOCAB, 8, sparse=True), nn.Linear(8, 2)
    sparse_opt = torch.optim.SparseAdam(list(embed.parameters()), lr=1e-2)
    dense_opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    head(embed(ids).mean(1)).logsumexp(-1).mean().backward()
    assert embed.weight.grad.is_sparse
    sparse_opt.step()
    dense_opt.step()


def test_buffers_from_empty_are_filled_before_use():
    model = tiny("bert")
    scratch = torch.empty(4, 32)  # uninitialised, as model code preallocates
    scratch[:2] = model.bert.embeddings.word_embeddings.weight[:2]
    scratch[2:] = 0.0
    assert torch.isfinite(scratch @ scratch.T).all()


def test_a_skip_after_an_unsupported_dtype_check():
    model = tiny("t5").half().eval()
    with torch.no_grad():
        model(**batch("t5"))
    pytest.skip("fp16 generation is not tested on CPU")


def test_float64_gradcheck_and_nan_sentinels():
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.tanh(layer(t)), (x,))
    # NaN as a deliberate "no value" marker, passed in as a number: not invalid math.
    scores = torch.where(x > 0, x, float("nan"))
    assert torch.nanmean(scores).isfinite()
