"""Load a user's own data from a JSON Lines file, and the shared prompt format.

One object per line::

    {"image": "images/0.png", "question": "What colour is it?", "answer": "red",
     "choices": ["red", "blue"], "type": "colour", "id": "q0"}

``image``, ``question`` and ``answer`` are required; ``choices``, ``type`` and ``id``
are optional. Relative image paths are resolved from the folder holding the file.
Blank lines are ignored.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabilizer.data.sample import VQASample
from stabilizer.errors import BadSampleError, ConfigError

FIX_LINE_HINT = "Fix or remove the line, or pass --on-bad-sample skip to leave it out"


def option_label(index: int) -> str:
    """The letter shown before option ``index``: ``option_label(0) == "A"``.

    Past 26 options the label falls back to the 1-based number, which no dataset
    used here reaches but which keeps the prompt unambiguous if one does.
    """
    letters = string.ascii_uppercase
    return letters[index] if index < len(letters) else str(index + 1)


def _one_line(text: str) -> str:
    """Collapse runs of whitespace (newlines included) so each prompt part stays on its line."""
    return " ".join(text.split())


def format_prompt(question: str, choices: Sequence[str] | None = None, context: str = "") -> str:
    """Build the text instruction for one question.

    An open question with no context is just the question, the same text easy-vqa
    uses. Multiple choice adds lettered options, and a non-empty context comes first:

    >>> format_prompt("What colour is the shape?")
    'What colour is the shape?'
    >>> print(format_prompt("Which is a mammal?", ["cat", "trout"], context="Look closely."))
    Context: Look closely.
    Question: Which is a mammal?
    Options: (A) cat (B) trout
    Answer:
    """
    question = _one_line(question)
    context = _one_line(context)
    if not choices and not context:
        return question
    lines = []
    if context:
        lines.append(f"Context: {context}")
    lines.append(f"Question: {question}")
    if choices:
        options = " ".join(
            f"({option_label(i)}) {_one_line(choice)}" for i, choice in enumerate(choices)
        )
        lines.append(f"Options: {options}")
    lines.append("Answer:")
    return "\n".join(lines)


def _text_field(record: dict[str, Any], key: str, source: str) -> str:
    """A required text field; numbers are accepted (``"answer": 3``) and turned into text."""
    if key not in record:
        raise BadSampleError(source, f"has no '{key}' field", FIX_LINE_HINT)
    value = record[key]
    # bool is an int subclass, but `"answer": true` is almost surely a mistake.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadSampleError(
            source, f"field '{key}' should be text, got {type(value).__name__}", FIX_LINE_HINT
        )
    return str(value).strip()


def _choices_field(record: dict[str, Any], source: str) -> tuple[str, ...] | None:
    """The optional ``choices`` list as a tuple of stripped texts, ``None`` when absent."""
    value = record.get("choices")
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in value
    ):
        raise BadSampleError(source, "field 'choices' should be a list of texts", FIX_LINE_HINT)
    return tuple(str(c).strip() for c in value)


def _parse_line(line: str, source: str) -> dict[str, Any]:
    """Decode one line into a JSON object, or say exactly what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadSampleError(
            source, f"is not valid JSON ({err.msg} at column {err.colno})", FIX_LINE_HINT
        ) from None
    if not isinstance(record, dict):
        raise BadSampleError(
            source, f"should be a JSON object, got {type(record).__name__}", FIX_LINE_HINT
        )
    return record


def _sample_from_record(record: dict[str, Any], path: Path, line_no: int) -> VQASample:
    """Turn one decoded line into a sample; ``line_no`` is 1-based as editors show it."""
    source = f"{path}, line {line_no}"
    image = Path(_text_field(record, "image", source)).expanduser()
    question = _text_field(record, "question", source)
    answer = _text_field(record, "answer", source)
    choices = _choices_field(record, source)
    question_type = str(record.get("type") or "all").strip() or "all"
    record_id = record.get("id")
    local_id = f"line-{line_no}" if record_id is None else str(record_id)
    return VQASample(
        sample_id=f"{path.stem}/{local_id}",
        source=source,
        image_path=image if image.is_absolute() else path.parent / image,
        prompt=format_prompt(question, choices),
        answer=answer,
        choices=choices,
        question_type=question_type,
        extra={"line": line_no},
    )


def load_jsonl(path: Path | str) -> list[VQASample]:
    """Load every record of a JSONL file, in file order.

    >>> samples = load_jsonl("my_data/train.jsonl")  # doctest: +SKIP
    >>> samples[0].source  # doctest: +SKIP
    'my_data/train.jsonl, line 1'

    Raises ``BadSampleError`` naming the file and line for a malformed line, a
    missing field or a repeated ``id``; ``ConfigError`` when the file is missing.
    Whether images exist and answers match choices is checked later by
    :func:`stabilizer.data.validate.check_samples`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"JSONL file {path} does not exist")
    samples: list[VQASample] = []
    first_line_of: dict[str, int] = {}
    # utf-8-sig: files saved by some Windows editors start with a byte-order mark.
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{path}, line {line_no}"
            sample = _sample_from_record(_parse_line(line, source), path, line_no)
            # Ids key per-sample results downstream, so a repeat would silently merge two.
            if sample.sample_id in first_line_of:
                raise BadSampleError(
                    source,
                    f"repeats id {sample.sample_id.split('/', 1)[1]!r} "
                    f"first used on line {first_line_of[sample.sample_id]}",
                    "Give every record its own id",
                )
            first_line_of[sample.sample_id] = line_no
            samples.append(sample)
    return samples
