"""Load a user's own data from a JSON Lines file, and the shared prompt format.

One object per line::

    {"image": "images/0.png", "question": "What colour is it?", "answer": "red",
     "choices": ["red", "blue"], "type": "colour", "id": "q0"}

``image``, ``question`` and ``answer`` are required; ``choices``, ``type`` and ``id``
are optional. Relative image paths are resolved from the folder holding the file.
Blank lines are ignored. The file must be UTF-8 (a UTF-8 byte-order mark is allowed).
"""

from __future__ import annotations

import codecs
import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabilizer.data.sample import NO_TYPE, VQASample
from stabilizer.errors import BadSampleError, ConfigError

FIX_LINE_HINT = "Fix or remove the line, or pass --on-bad-sample skip to leave it out"
# Byte-order marks that say the whole file is in another encoding, with the name iconv
# knows it by. UTF-32-LE's mark begins with UTF-16-LE's, so it must be tested first.
_FOREIGN_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian)", "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian)", "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian)", "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian)", "UTF-16"),
)
# How many bytes before an undecodable one the message quotes, to help find it.
_CONTEXT_BYTES = 20


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


def _utf8_body(data: bytes, path: Path) -> bytes:
    """The file's bytes without a UTF-8 byte-order mark; refuse UTF-16 and UTF-32 files.

    A UTF-16/32 file is wrong on every line, so it is one error for the whole file
    (never skipped line by line), naming the encoding its byte-order mark shows.
    """
    for bom, encoding, iconv_name in _FOREIGN_BOMS:
        if data.startswith(bom):
            raise BadSampleError(
                f"{path}, line 1",
                f"starts with a {encoding} byte-order mark: the file looks {iconv_name} "
                "encoded, and JSONL files must be UTF-8",
                f"Re-save it as UTF-8, for example: iconv -f {iconv_name} -t UTF-8 "
                f"{path.name} > {path.stem}-utf8.jsonl",
            )
    # Files saved by some Windows editors start with a UTF-8 byte-order mark.
    return data.removeprefix(codecs.BOM_UTF8)


def _decode_line(raw: bytes, source: str) -> str:
    """One line's bytes as text, or a message saying where the non-UTF-8 byte is."""
    if b"\x00" in raw:
        # UTF-8 text never holds NUL bytes; UTF-16/32 without a byte-order mark does.
        raise BadSampleError(
            source,
            "holds NUL bytes: the file looks UTF-16 or UTF-32 encoded, and JSONL files must "
            "be UTF-8",
            "Re-save it as UTF-8, for example: iconv -f UTF-16 -t UTF-8 in.jsonl > out.jsonl",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        before = raw[max(0, err.start - _CONTEXT_BYTES) : err.start].decode("utf-8", "replace")
        raise BadSampleError(
            source,
            f"is not UTF-8 text: byte 0x{raw[err.start]:02x} at position {err.start + 1} of "
            f"the line, after {before!r}, cannot be decoded, and JSONL files must be UTF-8",
            "Re-save the file as UTF-8 (from Latin-1 or Windows-1252, for example: "
            "iconv -f CP1252 -t UTF-8 in.jsonl > out.jsonl), or pass --on-bad-sample skip "
            "to leave the line out",
        ) from None


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
    question_type = str(record.get("type") or NO_TYPE).strip() or NO_TYPE
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


def load_jsonl(path: Path | str, *, skipped: list[BadSampleError] | None = None) -> list[VQASample]:
    """Load every record of a JSONL file, in file order.

    >>> samples = load_jsonl("my_data/train.jsonl")  # doctest: +SKIP
    >>> samples[0].source  # doctest: +SKIP
    'my_data/train.jsonl, line 1'

    Raises ``BadSampleError`` naming the file and line for a line that is not UTF-8
    or not JSON, a missing field or a repeated ``id``; ``ConfigError`` when the file
    is missing. With ``skipped`` (a list, for ``--on-bad-sample skip``) such a line is
    appended to it and left out instead; a file in UTF-16 or UTF-32 is still an error.
    Whether images exist and answers match choices is checked later by
    :func:`stabilizer.data.validate.check_samples`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"JSONL file {path} does not exist")
    samples: list[VQASample] = []
    first_line_of: dict[str, int] = {}
    # Bytes, decoded line by line, so a non-UTF-8 byte is reported with its line number.
    lines = _utf8_body(path.read_bytes(), path).splitlines()
    for line_no, raw in enumerate(lines, start=1):
        source = f"{path}, line {line_no}"
        try:
            line = _decode_line(raw, source)
            if not line.strip():
                continue
            sample = _sample_from_record(_parse_line(line, source), path, line_no)
            _check_unique_id(sample, first_line_of, source)
        except BadSampleError as err:
            if skipped is None:
                raise
            skipped.append(err)
            continue
        first_line_of[sample.sample_id] = line_no
        samples.append(sample)
    return samples


def _check_unique_id(sample: VQASample, first_line_of: dict[str, int], source: str) -> None:
    """Refuse a repeated id: ids key per-sample results downstream, so two would merge."""
    if sample.sample_id in first_line_of:
        raise BadSampleError(
            source,
            f"repeats id {sample.sample_id.split('/', 1)[1]!r} "
            f"first used on line {first_line_of[sample.sample_id]}",
            "Give every record its own id",
        )
