"""Accuracy of a model on VQA samples: rank scoring for multiple choice, exact match otherwise.

Rank scoring asks the model for the log-likelihood of every candidate answer
(``answer </s>``) and picks the most likely; it needs no generation and cannot
produce an answer outside the choices. Open answers are generated greedily and
compared after normalisation (case, surrounding space and final punctuation).

To show that the Q-Former learned to *see*, the same samples can be scored with
``images="blank"`` (one grey image for all) or ``images="shuffled"`` (every
image moved to another question, with a fixed seed): a model that uses the
image loses accuracy on both; a model that guesses from the question does not.

    >>> result = evaluate(model, encoder, samples, images="real")
    >>> result.accuracy, result.by_type["colour"]
    (0.87, 0.99)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stabilizer.data.collate import IGNORE_INDEX, BatchEncoder
from stabilizer.data.sample import NO_TYPE, VQASample

IMAGE_MODES = ("real", "blank", "shuffled")


@dataclass
class EvalResult:
    """Accuracy overall and by question type; samples without a type (``NO_TYPE``)
    count in ``accuracy`` and ``count`` only, never in ``by_type``."""

    images: str
    accuracy: float
    loss: float
    count: int
    by_type: dict[str, float] = field(default_factory=dict)
    count_by_type: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "count": self.count,
            "by_type": self.by_type,
            "count_by_type": self.count_by_type,
        }


def normalise_answer(text: str) -> str:
    return text.strip().lower().rstrip(".!?").strip()


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor, *, decoder_only: bool) -> torch.Tensor:
    """Summed negative log-likelihood of the labelled tokens of each row, ``(B,)`` fp32."""
    if decoder_only:
        # Position t predicts token t+1, as in the model's own causal-LM loss.
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logp = F.log_softmax(logits.float(), dim=-1)
    token_nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_nll * mask).sum(-1)


def _shuffled_order(n: int, seed: int) -> list[int]:
    """A permutation that moves every index (when n > 1), fixed by ``seed``."""
    if n < 2:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).tolist()
    # Each index takes the image of the next one along a random cycle: a
    # derangement, so no question keeps its own image.
    image_of = [0] * n
    for k in range(n):
        image_of[perm[k]] = perm[(k + 1) % n]
    return image_of


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    encoder: BatchEncoder,
    samples: Sequence[VQASample],
    *,
    images: str = "real",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    autocast: Callable[[], object] | None = None,
    shuffle_seed: int = 1234,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score ``samples``; returns accuracy overall and by question type, and the mean loss."""
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {IMAGE_MODES}, got {images!r}")
    was_training = model.training
    model.eval()
    image_of = list(range(len(samples)))
    if images == "shuffled":
        image_of = _shuffled_order(len(samples), shuffle_seed)
    correct: dict[str, int] = defaultdict(int)
    seen: dict[str, int] = defaultdict(int)
    loss_sum, loss_count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        image_source = [samples[image_of[i]] for i in range(start, start + len(chunk))]
        pixel_values = encoder.pixel_values(image_source, "blank" if images == "blank" else "real")
        predictions, batch_loss = _score_chunk(
            model, encoder, chunk, pixel_values, device=device, autocast=autocast
        )
        loss_sum += batch_loss * len(chunk)
        loss_count += len(chunk)
        for sample, prediction in zip(chunk, predictions, strict=True):
            hit = normalise_answer(prediction) == normalise_answer(sample.answer)
            seen[sample.question_type] += 1
            correct[sample.question_type] += int(hit)
        if progress is not None:
            progress(len(chunk))
    model.train(was_training)
    total = sum(seen.values())
    # NO_TYPE is spelled "all", the overall figure's name: as a type it would repeat it.
    typed = [t for t in sorted(seen) if t != NO_TYPE]
    return EvalResult(
        images=images,
        accuracy=sum(correct.values()) / total if total else math.nan,
        loss=loss_sum / loss_count if loss_count else math.nan,
        count=total,
        by_type={t: correct[t] / seen[t] for t in typed},
        count_by_type={t: seen[t] for t in typed},
    )


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _score_chunk(model, encoder, chunk, pixel_values, *, device, autocast):
    autocast = autocast or _null
    # Loss of the reference answers, comparable to the training loss.
    batch = _to(encoder.train_batch(chunk, pixel_values=pixel_values), device)
    with autocast():
        loss = float(model(**batch).loss)  # one host sync per eval batch, deliberate
    predictions: list[str] = [""] * len(chunk)
    ranked = [i for i, s in enumerate(chunk) if s.choices]
    open_ended = [i for i, s in enumerate(chunk) if not s.choices]
    if ranked:
        rows, answers, owner = [], [], []
        for i in ranked:
            for choice in chunk[i].choices:
                rows.append(chunk[i])
                answers.append(choice)
                owner.append(i)
        owner_t = torch.tensor(owner)
        pv = pixel_values[owner_t]
        batch = _to(encoder.train_batch(rows, answers=answers, pixel_values=pv), device)
        with autocast():
            logits = model(**batch).logits
        nll = sequence_nll(logits, batch["labels"], decoder_only=encoder.decoder_only).cpu()
        offset = 0
        for i in ranked:
            n = len(chunk[i].choices)
            predictions[i] = chunk[i].choices[int(nll[offset : offset + n].argmin())]
            offset += n
    if open_ended:
        subset = [chunk[i] for i in open_ended]
        predictions_open = generate_answers(
            model,
            encoder,
            subset,
            device=device,
            autocast=autocast,
            pixel_values=pixel_values[torch.tensor(open_ended)],
        )
        for i, text in zip(open_ended, predictions_open, strict=True):
            predictions[i] = text
    return predictions, loss


@torch.no_grad()
def generate_answers(
    model, encoder: BatchEncoder, samples, *, device="cpu", autocast=None, pixel_values=None
) -> list[str]:
    """Greedy answers for ``samples`` (prompt only; the answer is generated)."""
    autocast = autocast or _null
    batch = encoder.prompt_batch(samples)
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    batch = _to(batch, device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with autocast():
        out = base.generate(**batch, max_new_tokens=encoder.max_answer_tokens + 1, do_sample=False)
    if encoder.decoder_only:
        out = out[:, batch["input_ids"].shape[1] :]
    return encoder.decode(out)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
