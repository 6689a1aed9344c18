"""Load ScienceQA: multiple-choice science questions, kept only where there is an image.

Expected layout (the one the ScienceQA release unpacks to)::

    root/problems.json                    # {pid: {question, choices, answer, hint, image, split, subject, ...}}
    root/images/<split>/<pid>/image.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stabilizer.data.jsonl import format_prompt
from stabilizer.data.sample import VQASample
from stabilizer.errors import BadSampleError, ConfigError

PROBLEMS_FILE = "problems.json"
FIX_RECORD_HINT = (
    f"The {PROBLEMS_FILE} record is malformed; fix or remove it, or re-download ScienceQA"
)


def _pid_order(pid: str) -> tuple[int, int, str]:
    """Sort key putting numeric pids in numeric order ("2" before "10"), others after."""
    return (0, int(pid), pid) if pid.isdigit() else (1, 0, pid)


def read_problems(root: Path) -> dict[str, Any]:
    """Read ``root/problems.json``; a missing or unreadable file is a ``ConfigError``."""
    path = root / PROBLEMS_FILE
    if not path.is_file():
        raise ConfigError(
            f"ScienceQA folder {root} has no {PROBLEMS_FILE}; expected {path} "
            f"and images under {root / 'images'}"
        )
    try:
        with path.open(encoding="utf-8") as handle:
            problems = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); re-download ScienceQA") from None
    if not isinstance(problems, dict):
        raise ConfigError(f"{path} should hold a JSON object of pid -> record")
    return problems


def _choices_and_answer(record: dict[str, Any], source: str) -> tuple[tuple[str, ...], str]:
    """The option texts and the correct one, checking the fields' shapes."""
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise BadSampleError(source, "has no usable 'choices' list of texts", FIX_RECORD_HINT)
    answer = record.get("answer")
    # bool is an int subclass; `true` is not an index.
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise BadSampleError(
            source,
            f"has answer {answer!r}, not an index into its {len(choices)} choices",
            FIX_RECORD_HINT,
        )
    options = tuple(c.strip() for c in choices)
    return options, options[answer]


def _sample_from_record(root: Path, pid: str, record: dict[str, Any], split: str) -> VQASample:
    """One ScienceQA record (already known to be of ``split`` and to have an image)."""
    source = f"{root / PROBLEMS_FILE}, record {pid!r}"
    question = record.get("question")
    if not isinstance(question, str):
        raise BadSampleError(source, "has no 'question' text", FIX_RECORD_HINT)
    choices, answer = _choices_and_answer(record, source)
    context = record.get("hint") or ""
    subject = record.get("subject") or "all"
    return VQASample(
        sample_id=f"scienceqa/{split}/{pid}",
        source=source,
        image_path=root / "images" / split / pid / str(record["image"]),
        prompt=format_prompt(question, choices, context=str(context)),
        answer=answer,
        choices=choices,
        question_type=str(subject),
        extra={"pid": pid, "grade": record.get("grade"), "topic": record.get("topic")},
    )


def load_scienceqa(
    root: Path | str, split: str = "train", *, skipped: list[BadSampleError] | None = None
) -> list[VQASample]:
    """Load the records of ``split`` that have an image, in numeric pid order.

    >>> samples = load_scienceqa("data/scienceqa", "val")  # doctest: +SKIP
    >>> print(samples[0].prompt)  # doctest: +SKIP
    Context: Figure: Arizona.
    Question: Which of these states is farthest north?
    Options: (A) West Virginia (B) Louisiana (C) Arizona
    Answer:

    ``question_type`` is the record's subject (``"natural science"``, ...). Raises
    ``ConfigError`` when problems.json is missing or the split has no record, and
    ``BadSampleError`` naming the record when a kept record is malformed; with
    ``skipped`` (a list, for ``--on-bad-sample skip``) that error is appended to it
    and the record left out.
    """
    root = Path(root)
    problems = read_problems(root)
    splits_present = sorted(
        {str(r.get("split")) for r in problems.values() if isinstance(r, dict) and r.get("split")}
    )
    if split not in splits_present:
        raise ConfigError(
            f"ScienceQA at {root} has no split {split!r}; "
            f"its splits are {', '.join(splits_present) or '(none)'}"
        )
    with_image = [
        (pid, record)
        for pid, record in sorted(problems.items(), key=lambda item: _pid_order(item[0]))
        # About half of ScienceQA is text-only; a VQA model needs the picture.
        if isinstance(record, dict) and record.get("split") == split and record.get("image")
    ]
    if not with_image:
        raise ConfigError(f"ScienceQA split {split!r} at {root} has no record with an image")
    samples = []
    for pid, record in with_image:
        try:
            samples.append(_sample_from_record(root, pid, record, split))
        except BadSampleError as err:
            if skipped is None:
                raise
            skipped.append(err)
    return samples
