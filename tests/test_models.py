"""Presets, loading, and the batch layout the model's forward really uses.

The key test recomputes the loss by hand from the model's parts (vision tower ->
Q-Former -> projection -> written at the ``<image>`` positions -> LM) and checks it
equals ``model(**batch).loss``, so a batch that silently skips the Q-Former fails.
"""

from __future__ import annotations

import os
import time

import huggingface_hub.constants as hub_constants
import pytest
import torch
import torch.nn.functional as F
from data_fixtures import write_png
from PIL import Image

from stabilizer.data.collate import IGNORE_INDEX, BatchEncoder
from stabilizer.data.sample import VQASample
from stabilizer.errors import ModelLoadError
from stabilizer.evaluate import generate_answers, sequence_nll
from stabilizer.models.loading import LoadedModel, load_model
from stabilizer.models.presets import PRESETS, build_preset

TINY = {
    # name: (family, decoder_only)
    "tiny-instructblip-t5": ("instructblip", False),
    "tiny-instructblip-opt": ("instructblip", True),
    "tiny-blip2-opt": ("blip2", True),
    "tiny-blip2-t5": ("blip2", False),
}
COMPONENTS = ("vision_model", "qformer", "language_projection", "language_model")

# Prompts of different lengths; answers of one and several tokens (so labels get padded).
RECORDS = [
    ("red", "circle", "what color is the shape?", "red"),
    ("blue", "square", "is there a circle?", "no"),
    ("green", "triangle", "what shape is in the image? answer with one word.", "light green"),
]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[VQASample]:
    root = tmp_path_factory.mktemp("images")
    out = []
    for i, (colour, shape, prompt, answer) in enumerate(RECORDS):
        path = write_png(root / f"{i}.png", colour, shape)
        out.append(VQASample(f"test/{i}", f"test record {i}", path, prompt, answer))
    return out


def encoder_for(loaded: LoadedModel) -> BatchEncoder:
    return BatchEncoder(
        loaded.processor,
        family=loaded.family,
        decoder_only=loaded.decoder_only,
        num_query_tokens=loaded.num_query_tokens,
        image_token_id=loaded.image_token_id,
    )


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- presets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_preset_is_seeded_and_described(name):
    family, decoder_only = TINY[name]
    first = load_model(name, seed=0)
    again = load_model(name, seed=0)
    other = load_model(name, seed=1)

    assert (first.family, first.decoder_only, first.source) == (family, decoder_only, name)
    assert not first.model.training  # built ready for evaluation; the loop calls train()
    assert first.num_query_tokens == 8
    assert first.image_token_id == first.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert first.image_token_id < first.model.config.text_config.vocab_size

    a, b, c = state_of(first.model), state_of(again.model), state_of(other.model)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"seed 0 twice gave different {key}"
    assert not torch.equal(a["query_tokens"], c["query_tokens"])
    for component in COMPONENTS:
        differs = [k for k in a if k.startswith(component + ".") and not torch.equal(a[k], c[k])]
        assert differs, f"seed 1 gave the same {component} weights as seed 0"


def test_real_size_instructblip_on_meta():
    loaded = load_model("instructblip-flan-t5-xl-random", device="meta")
    model = loaded.model
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 3_957_170_176
    assert sum(p.numel() for p in model.qformer.parameters()) == 185_659_392
    assert (loaded.family, loaded.decoder_only) == ("instructblip", False)
    assert loaded.num_query_tokens == 32
    assert loaded.image_token_id < model.config.text_config.vocab_size == 32128


def test_real_size_blip2_opt_on_meta():
    loaded = load_model("blip2-opt-2.7b-random", device="meta")
    model = loaded.model
    assert all(p.device.type == "meta" for p in model.parameters())
    assert (loaded.family, loaded.decoder_only) == ("blip2", True)
    assert loaded.num_query_tokens == 32
    text = model.config.text_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers) == ("opt", 2560, 32)
    assert loaded.image_token_id < text.vocab_size
    assert model.config.vision_config.hidden_size == 1408
    assert model.config.qformer_config.num_hidden_layers == 12
    # A 2.7B LM with a 1B vision tower and a Q-Former: 3.7-3.8B parameters.
    assert 3.7e9 < sum(p.numel() for p in model.parameters()) < 3.8e9


def test_medium_preset_has_real_size_qformer():
    model, _ = build_preset("medium-instructblip-t5", device="meta")
    qformer = model.config.qformer_config
    assert (qformer.num_hidden_layers, qformer.hidden_size) == (12, 768)
    assert tuple(model.query_tokens.shape) == (1, 32, 768)
    vision = model.config.vision_config
    assert (vision.hidden_size, vision.image_size, vision.patch_size) == (1408, 224, 14)
    # (224 / 14)^2 patches + the class token = 257 image tokens of width 1408.
    pixels = torch.empty(1, 3, 224, 224, device="meta")
    image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
    assert tuple(image_embeds.shape) == (1, 257, 1408)
    cross_key = model.qformer.encoder.layer[0].crossattention.attention.key
    assert cross_key.in_features == 1408


# -- loading from a folder or the hub -----------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_load_model_from_saved_folder(name, tmp_path, samples):
    model, processor = build_preset(name, seed=5)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    loaded = load_model(str(folder))

    assert (loaded.family, loaded.decoder_only) == TINY[name]
    assert loaded.num_query_tokens == model.config.num_query_tokens
    assert loaded.image_token_id == model.config.image_token_index
    saved, back = state_of(model), state_of(loaded.model)
    assert saved.keys() == back.keys()
    for key in saved:
        assert torch.equal(saved[key], back[key]), key
    # The saved processor encodes exactly as the original: same batch, same loss.
    original = LoadedModel(model, processor, *TINY[name], source=name)
    batch = encoder_for(original).train_batch(samples)
    batch_back = encoder_for(loaded).train_batch(samples)
    for key in batch:
        assert torch.equal(batch[key], batch_back[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).loss, model(**batch).loss)


def test_missing_folder_is_refused(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as err:
        load_model(str(missing))
    message = str(err.value)
    assert str(missing) in message
    assert "no such folder" in message
    assert "save_pretrained" in message
    assert "Salesforce/" in message  # a hub id to pass instead
    assert "tiny-instructblip-t5" in message  # and the presets


def test_folder_without_config_is_refused(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert str(folder) in message
    assert "config.json" in message
    assert "save_pretrained" in message  # what the folder must hold instead


def test_non_blip_folder_is_refused(tmp_path):
    from transformers import BertConfig

    folder = tmp_path / "bert"
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert str(folder) in message
    assert "'bert'" in message
    assert "InstructBLIP" in message and "BLIP-2" in message


def test_unknown_preset_error_lists_presets():
    from stabilizer.models.presets import build_preset as build

    with pytest.raises(ModelLoadError) as err:
        build("tiny-nonexistent")
    message = str(err.value)
    assert "tiny-nonexistent" in message
    assert all(name in message for name in PRESETS)


def test_unreachable_hub_id_fails_fast_with_advice(monkeypatch, tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE and the cache folder at import time, so set
    # its constants too: offline with an empty cache fails at once instead of hanging.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model("Salesforce/instructblip-flan-t5-xl")
    assert time.perf_counter() - started < 30
    message = str(err.value)
    assert "Salesforce/instructblip-flan-t5-xl" in message
    assert "HF_HUB_OFFLINE" in message
    assert "local folder" in message
    assert "preset" in message and "tiny-instructblip-t5" in message


def test_preset_tokenizer_spells_out_unseen_words():
    # tokenizer.py promises that text outside easy-vqa is encoded piece by piece, not as [UNK].
    _, processor = build_preset("tiny-instructblip-t5")
    tokenizer = processor.tokenizer
    for text in ("seven zebras above the quartz jar", "mass 250 kg"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.decode(ids) == text


# -- forward: the loss by hand, the layout, the gradient ---------------------------


def manual_loss(model: torch.nn.Module, batch: dict, family: str, decoder_only: bool):
    """The model's loss recomputed from its parts, as the BLIP-2/InstructBLIP papers describe."""
    pixel_values, input_ids = batch["pixel_values"], batch["input_ids"]
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    rows = image_embeds.shape[0]
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    queries = model.query_tokens.expand(rows, -1, -1)
    n_query = queries.shape[1]
    if family == "instructblip":
        # The instruction is read by the Q-Former after the queries.
        query_mask = torch.ones(rows, n_query, dtype=torch.long)
        mask = torch.cat([query_mask, batch["qformer_attention_mask"]], dim=1)
        hidden = model.qformer(
            input_ids=batch["qformer_input_ids"],
            attention_mask=mask,
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state[:, :n_query]
    else:
        hidden = model.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
    assert hidden.shape[1] == n_query
    image_features = model.language_projection(hidden)

    lm = model.language_model
    embeds = lm.get_input_embeddings()(input_ids).clone()
    for row in range(rows):
        positions = (input_ids[row] == model.config.image_token_index).nonzero().squeeze(-1)
        assert len(positions) == n_query
        embeds[row, positions] = image_features[row]

    labels = batch["labels"]
    if decoder_only:
        logits = lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1], labels[:, 1:]
    else:
        # T5: the decoder reads the labels shifted right after the start token.
        text = model.config.text_config
        start = torch.full((rows, 1), text.decoder_start_token_id, dtype=torch.long)
        decoder_ids = torch.cat([start, labels[:, :-1]], dim=1)
        decoder_ids = decoder_ids.masked_fill(decoder_ids == IGNORE_INDEX, text.pad_token_id)
        logits = lm(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            decoder_input_ids=decoder_ids,
        ).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


@pytest.mark.parametrize("name", list(TINY))
def test_loss_equals_loss_computed_from_the_parts(name, samples):
    loaded = load_model(name)
    batch = encoder_for(loaded).train_batch(samples)
    with torch.no_grad():
        expected = manual_loss(loaded.model, batch, loaded.family, loaded.decoder_only)
        loss = loaded.model(**batch).loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(TINY))
def test_batch_layout(name, samples):
    loaded = load_model(name)
    tokenizer = loaded.processor.tokenizer
    n_query, image_id = loaded.num_query_tokens, loaded.image_token_id
    batch = encoder_for(loaded).train_batch(samples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert len({len(s.prompt) for s in samples}) == len(samples)  # prompts differ in length

    for row, sample in enumerate(samples):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # right padding
        assert (ids[row] == image_id).sum() == n_query
        assert (ids[row, :n_query] == image_id).all()  # the image comes first
        answer = tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
        expected_labels = [*answer, tokenizer.eos_token_id]
        assert len(answer) >= 1
        if loaded.decoder_only:
            assert ids[row, n_query] == tokenizer.bos_token_id  # image, then <bos>, then text
            row_labels = labels[row, :length]
            answer_start = length - len(expected_labels)
            assert (row_labels[:answer_start] == IGNORE_INDEX).all()  # image and prompt
            assert row_labels[answer_start:].tolist() == expected_labels
            assert ids[row, answer_start:length].tolist() == expected_labels  # teacher forcing
            assert (labels[row, length:] == IGNORE_INDEX).all()
            prompt_ids = ids[row, n_query + 1 : answer_start]
        else:
            row_labels = labels[row]
            assert row_labels[: len(expected_labels)].tolist() == expected_labels
            assert (row_labels[len(expected_labels) :] == IGNORE_INDEX).all()
            assert ids[row, length - 1] == tokenizer.eos_token_id
            prompt_ids = ids[row, n_query : length - 1]
        assert tokenizer.decode(prompt_ids) == sample.prompt
        shown = tokenizer.decode(row_labels[row_labels != IGNORE_INDEX], skip_special_tokens=True)
        assert shown == sample.answer


@pytest.mark.parametrize("name", list(TINY))
def test_batch_matches_what_the_processor_produces(name, samples):
    loaded = load_model(name)
    n_query = loaded.num_query_tokens
    batch = encoder_for(loaded).train_batch(samples)
    for row, sample in enumerate(samples):
        image = Image.open(sample.image_path).convert("RGB")
        ref = loaded.processor(images=image, text=sample.prompt, return_tensors="pt")
        ref_ids = ref["input_ids"][0]
        prompt_len = len(loaded.processor.tokenizer(sample.prompt)["input_ids"])
        assert len(ref_ids) == n_query + prompt_len
        assert batch["input_ids"][row, : len(ref_ids)].tolist() == ref_ids.tolist()
        torch.testing.assert_close(batch["pixel_values"][row], ref["pixel_values"][0])
        if loaded.family == "instructblip":
            ref_q = ref["qformer_input_ids"][0]
            assert batch["qformer_input_ids"][row, : len(ref_q)].tolist() == ref_q.tolist()
            assert int(batch["qformer_attention_mask"][row].sum()) == len(ref_q)
        else:
            assert "qformer_input_ids" not in batch


def qformer_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    params = [model.query_tokens, *model.qformer.parameters()]
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("name", list(TINY))
def test_qformer_gets_gradient_only_with_image_tokens(name, samples):
    loaded = load_model(name)
    model, n_query = loaded.model, loaded.num_query_tokens
    batch = encoder_for(loaded).train_batch(samples)

    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    norm = torch.stack([g.norm() for g in qformer_grads(model)]).norm()
    assert torch.isfinite(norm) and norm > 0

    # The trap: without placeholders forward runs silently and the Q-Former learns nothing.
    stripped = dict(batch)
    stripped["input_ids"] = batch["input_ids"][:, n_query:]
    stripped["attention_mask"] = batch["attention_mask"][:, n_query:]
    if loaded.decoder_only:
        stripped["labels"] = batch["labels"][:, n_query:]
    assert not (stripped["input_ids"] == loaded.image_token_id).any()
    model.zero_grad(set_to_none=True)
    loss = model(**stripped).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.count_nonzero(g) == 0 for g in qformer_grads(model))
    lm_grads = [p.grad for p in model.language_model.parameters() if p.grad is not None]
    assert any(torch.count_nonzero(g) > 0 for g in lm_grads)  # the LM still trains


# -- scoring and generation ------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_sequence_nll_matches_model_loss(name, samples):
    loaded = load_model(name)
    encoder = encoder_for(loaded)
    alone = []
    with torch.no_grad():
        for sample in samples:
            batch = encoder.train_batch([sample])
            out = loaded.model(**batch)
            nll = sequence_nll(out.logits, batch["labels"], decoder_only=loaded.decoder_only)
            n_labels = int((batch["labels"] != IGNORE_INDEX).sum())
            assert nll.shape == (1,)
            torch.testing.assert_close(nll[0], out.loss * n_labels, rtol=1e-5, atol=1e-5)
            alone.append(nll[0])
        # Rank scoring runs in padded batches: padding must not change a row's score.
        batch = encoder.train_batch(samples)
        logits = loaded.model(**batch).logits
        together = sequence_nll(logits, batch["labels"], decoder_only=loaded.decoder_only)
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(TINY))
def test_generate_answers_one_string_per_sample(name, samples):
    loaded = load_model(name)
    encoder = encoder_for(loaded)
    encoder.max_answer_tokens = 4
    answers = generate_answers(loaded.model, encoder, samples)
    assert isinstance(answers, list) and len(answers) == len(samples)
    assert all(isinstance(a, str) for a in answers)
    # Left padding (decoder-only) or encoder padding (T5) does not change greedy answers.
    assert answers == [generate_answers(loaded.model, encoder, [s])[0] for s in samples]


def test_preset_tokenizer_is_the_same_in_every_process():
    # WordPieceTrainer broke frequency ties in hash order: each process (each torchrun
    # rank, each later `stabilizer eval`) got different token ids for the same words.
    import subprocess
    import sys

    from stabilizer.models.tokenizer import build_tokenizer

    code = (
        "import hashlib; from stabilizer.models.tokenizer import _trained_tokenizer_json as t; "
        "print(hashlib.sha256(t(384).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(digests) == 1
    tokenizer = build_tokenizer(add_bos=False)
    assert len(tokenizer) == 384  # the size asked for, whatever the corpus holds
