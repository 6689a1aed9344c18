"""Turn samples into model batches: one encoder for both families and both LM kinds.

The model finds where to put the Q-Former output by looking for ``<image>`` tokens
in ``input_ids``: exactly ``num_query_tokens`` of them per sample, placed before
the text as the transformers processors do. Without them the Q-Former gets no
gradient at all, silently, so they are written here and checked.

Batch layouts (``Q`` = num_query_tokens):

- encoder-decoder (T5): ``input_ids = [<image>]*Q + prompt + </s>``;
  ``labels = answer + </s>`` (T5 shifts them right into decoder inputs).
- decoder-only (OPT, LLaMA): ``input_ids = [<image>]*Q + <bos> + prompt + answer + </s>``;
  ``labels`` as long as ``input_ids``, -100 everywhere but the answer and ``</s>``.
  Padding is on the right for training and on the left for generation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from stabilizer.data.sample import VQASample
from stabilizer.data.validate import load_image
from stabilizer.errors import BadSampleError

IGNORE_INDEX = -100


@dataclass
class BatchEncoder:
    """Encodes ``VQASample`` lists into tensors the model's forward takes.

    >>> enc = BatchEncoder(processor  # doctest: +SKIP, family="instructblip", decoder_only=False,
    ...                    num_query_tokens=8, image_token_id=193)
    >>> batch = enc.train_batch(samples)        # pixel_values, input_ids, labels, ...
    >>> loss = model(**batch).loss
    """

    processor: object
    family: str
    decoder_only: bool
    num_query_tokens: int
    image_token_id: int
    max_prompt_tokens: int = 128
    max_answer_tokens: int = 16
    max_lm_positions: int | None = None
    image_cache_size: int = 16384
    _pixel_cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # -- images ---------------------------------------------------------------
    def pixel_values(self, samples: Sequence[VQASample], images: str = "real") -> torch.Tensor:
        """Processed images, ``(B, 3, H, W)`` fp32. ``images="blank"`` gives a grey image."""
        rows = []
        for sample in samples:
            key = "<blank>" if images == "blank" else str(sample.image_path)
            cached = self._pixel_cache.get(key)
            if cached is None:
                image = (
                    Image.new("RGB", (64, 64), (128, 128, 128))
                    if images == "blank"
                    else load_image(sample)
                )
                out = self.processor.image_processor(images=[image], return_tensors="pt")
                cached = out["pixel_values"][0]
                self._pixel_cache[key] = cached
                if len(self._pixel_cache) > self.image_cache_size:
                    self._pixel_cache.popitem(last=False)
            rows.append(cached)
        return torch.stack(rows)

    # -- text -----------------------------------------------------------------
    def _prompt_ids(self, sample: VQASample) -> list[int]:
        ids = self.tokenizer(sample.prompt, add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            # Keep the end: for long contexts the question and options come last.
            ids = ids[-self.max_prompt_tokens :]
        return ids

    def _answer_ids(self, sample: VQASample, answer: str) -> list[int]:
        text = (" " + answer) if self.decoder_only else answer
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_answer_tokens]
        return ids + [self.tokenizer.eos_token_id]

    def _qformer_inputs(self, samples: Sequence[VQASample]) -> dict[str, torch.Tensor]:
        if self.family != "instructblip":
            return {}
        enc = self.processor.qformer_tokenizer(
            [s.prompt for s in samples],
            padding=True,
            truncation=True,
            max_length=self.max_prompt_tokens,
            return_tensors="pt",
        )
        return {
            "qformer_input_ids": enc["input_ids"],
            "qformer_attention_mask": enc["attention_mask"],
        }

    def _check_labels(self, sample: VQASample, answer: str, answer_ids: list[int]) -> None:
        # The eos alone is no answer: a loss on it teaches nothing and an empty
        # answer usually means the text was lost (e.g. truncated away).
        if len(answer_ids) <= 1:
            raise BadSampleError(
                sample.source,
                f"the answer {answer!r} encodes to no token, so every label is masked "
                "and the loss would be 0/0",
                "Fix the record's answer, or pass --on-bad-sample skip",
            )

    def _fit_decoder_only(
        self, sample: VQASample, prompt: list[int], answer: list[int]
    ) -> list[int]:
        if self.max_lm_positions is None:
            return prompt
        room = self.max_lm_positions - self.num_query_tokens - len(answer)
        if room < 1:
            raise BadSampleError(
                sample.source,
                f"the answer was truncated away: {self.num_query_tokens} query tokens + "
                f"{len(answer)} answer tokens leave no room in the LM's "
                f"{self.max_lm_positions} positions, so every label would be masked",
                "Lower --max-answer-tokens or use an LM with more positions",
            )
        return prompt[-room:] if len(prompt) > room else prompt

    def train_batch(
        self,
        samples: Sequence[VQASample],
        *,
        answers: Sequence[str] | None = None,
        images: str = "real",
        pixel_values: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """A teacher-forced batch with labels (``answers`` overrides the targets)."""
        answers = list(answers) if answers is not None else [s.answer for s in samples]
        pad = self.tokenizer.pad_token_id
        prefix = [self.image_token_id] * self.num_query_tokens
        inputs, labels = [], []
        for sample, answer in zip(samples, answers, strict=True):
            prompt = self._prompt_ids(sample)
            answer_ids = self._answer_ids(sample, answer)
            # ``answer`` may be a candidate being ranked, not the sample's own answer.
            self._check_labels(sample, answer, answer_ids)
            if self.decoder_only:
                prompt = self._fit_decoder_only(sample, prompt, answer_ids)
                ids = prefix + prompt + answer_ids
                inputs.append(ids)
                labels.append([IGNORE_INDEX] * (len(ids) - len(answer_ids)) + answer_ids)
            else:
                inputs.append(prefix + prompt)
                labels.append(answer_ids)
        batch = {
            "pixel_values": pixel_values
            if pixel_values is not None
            else self.pixel_values(samples, images),
            **self._qformer_inputs(samples),
        }
        batch["input_ids"], batch["attention_mask"] = _pad(inputs, pad, left=False)
        padded_labels, _ = _pad(labels, IGNORE_INDEX, left=False)
        batch["labels"] = padded_labels
        return batch

    def prompt_batch(self, samples: Sequence[VQASample], *, images: str = "real") -> dict:
        """Inputs for ``generate``: prompts only, left-padded for decoder-only LMs."""
        prefix = [self.image_token_id] * self.num_query_tokens
        inputs = [prefix + self._prompt_ids(s) for s in samples]
        batch = {
            "pixel_values": self.pixel_values(samples, images),
            **self._qformer_inputs(samples),
        }
        batch["input_ids"], batch["attention_mask"] = _pad(
            inputs, self.tokenizer.pad_token_id, left=self.decoder_only
        )
        return batch

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


def _pad(rows: list[list[int]], value: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if left:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        else:
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
    return ids, mask
