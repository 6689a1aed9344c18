"""The one record type every dataset loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The question_type of a sample whose dataset gives none. Accuracy by type leaves such
# samples out (they count in the overall "all" figure only), so "all" is never a row twice.
NO_TYPE = "all"


@dataclass(frozen=True)
class VQASample:
    """One visual question with its answer.

    Attributes:
        sample_id: stable id, unique within a dataset split (``"easy-vqa/train/17"``).
        source: where it came from, for error messages: file and record
            (``"problems.json, record '5'"``).
        image_path: the image file on disk.
        prompt: the full text instruction given to the model (question, and for
            multiple choice the context and lettered options).
        answer: the target text the model should produce.
        choices: for multiple choice, the candidate target texts (``answer`` is one
            of them); ``None`` for open answers.
        question_type: a coarse type used to break accuracy down
            (``"colour"``, ``"shape"``, ``"yes/no"``); ``NO_TYPE`` (``"all"``) when unknown.
    """

    sample_id: str
    source: str
    image_path: Path
    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    question_type: str = NO_TYPE
    extra: dict = field(default_factory=dict, compare=False, hash=False)
