"""Offline tokenizers and processors for presets built from config.

Presets must run with no hub access, so their tokenizers are trained here, at
build time, from a fixed corpus. WordPiece over the easy-vqa vocabulary keeps
easy-vqa words whole (short sequences, fast training) while the ASCII alphabet
lets any other dataset's text be encoded piece by piece instead of as [UNK].
"""

from __future__ import annotations

import string
from collections import Counter
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]", "[MASK]"]


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """Every question and answer of easy-vqa, plus prompt scaffolding words."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    test_questions, _, _ = easy_vqa.get_test_questions()
    scaffolding = ["question answer context options choose yes no the a an of"]
    # Every character once inside a word too, so "##c" pieces exist for all of them
    # and unseen words are spelled out instead of becoming [UNK].
    scaffolding.append(" ".join("x" + c for c in string.ascii_lowercase + string.digits))
    return tuple(questions) + tuple(test_questions) + tuple(answers) + tuple(scaffolding)


@lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """The tokenizer as JSON, identical in every process.

    The vocabulary is built here rather than by ``WordPieceTrainer``: the trainer breaks
    ties between equally frequent pieces in hash order, so each process got a different
    vocabulary, and a run's token ids changed between training and a later evaluation
    (or between the ranks of a torchrun job).
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in _corpus():
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        counts.update(word for word, _ in words)
    alphabet = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [*alphabet, *("##" + c for c in alphabet)]
    room = vocab_size - len(SPECIAL_TOKENS) - len(pieces)
    if room < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small for the alphabet")
    # Most frequent words first, ties by spelling: a fixed order, whatever the hash seed.
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    words = [w for w in words if w not in pieces][:room]
    # Reserved entries fill the vocabulary to the size asked for (as BERT's [unused]
    # tokens do), so the model's embedding tables do not depend on the corpus.
    unused = [f"[unused{i}]" for i in range(room - len(words))]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *pieces, *words, *unused])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 384, *, add_bos: bool) -> PreTrainedTokenizerFast:
    """A deterministic word-piece tokenizer trained on easy-vqa text.

    ``add_bos`` frames each text as ``[BOS] ... `` (decoder-only LMs, like OPT's
    ``</s>`` prefix); otherwise as ``... [EOS]`` (T5 style). The frame is part of
    the tokenizer so the collator can treat hub and preset tokenizers alike.

    >>> tok = build_tokenizer(add_bos=False)
    >>> tok.decode(tok("what color is the shape?").input_ids, skip_special_tokens=True)
    'what color is the shape?'
    """
    from tokenizers import processors

    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", tok.token_to_id("[BOS]"))]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A [EOS]", special_tokens=[("[EOS]", tok.token_to_id("[EOS]"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        clean_up_tokenization_spaces=False,
    )


def build_processor(
    *,
    family: str,
    num_query_tokens: int,
    image_size: int,
    decoder_only: bool,
    vocab_size: int = 384,
):
    """The processor of a preset: image processor, LM tokenizer (+ Q-Former tokenizer).

    The processor adds ``<image>`` to the LM tokenizer, so the LM vocabulary must be
    larger than the tokenizer's; the caller sets ``config.image_token_index`` to
    ``processor.tokenizer.convert_tokens_to_ids("<image>")``.
    """
    from transformers import Blip2Processor, InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    # The PIL processor avoids torchvision, which the CPU torch wheel lacks.
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    tokenizer = build_tokenizer(vocab_size, add_bos=decoder_only)
    if family == "instructblip":
        qformer_tokenizer = build_tokenizer(vocab_size, add_bos=False)
        return InstructBlipProcessor(
            image_processor, tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens
        )
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
