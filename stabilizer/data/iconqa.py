"""Load IconQA's ``choose_txt`` sub-task: pick the text answer for an icon picture.

Expected layout (``root`` may also be the folder above, as the release unpacks to
``iconqa_data/iconqa/``)::

    root/<split>/choose_txt/<qid>/data.json    # {question, choices, answer, ques_type, ...}
    root/<split>/choose_txt/<qid>/image.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stabilizer.data.jsonl import format_prompt
from stabilizer.data.sample import VQASample
from stabilizer.errors import BadSampleError, ConfigError

SPLITS = ("train", "val", "test")
TASK = "choose_txt"
# Folders below ``root`` where the split folders may live, tried in this order.
NESTINGS = (Path(), Path("iconqa"), Path("iconqa_data") / "iconqa")
FIX_RECORD_HINT = "Fix or remove the question folder, or pass --on-bad-sample skip to leave it out"


def find_iconqa_root(root: Path) -> Path | None:
    """The folder holding ``<split>/choose_txt`` under ``root``, or ``None``.

    >>> find_iconqa_root(Path("downloads"))  # doctest: +SKIP
    PosixPath('downloads/iconqa_data/iconqa')
    """
    for nesting in NESTINGS:
        candidate = root / nesting
        if any((candidate / split / TASK).is_dir() for split in SPLITS):
            return candidate
    return None


def _qid_order(folder: Path) -> tuple[int, int, str]:
    """Sort key putting numeric question ids in numeric order ("2" before "10")."""
    name = folder.name
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def _read_record(path: Path) -> dict[str, Any]:
    """Decode one data.json into a dict, naming the file when it cannot."""
    if not path.is_file():
        raise BadSampleError(str(path), "is missing", FIX_RECORD_HINT)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadSampleError(str(path), f"is not valid JSON ({err})", FIX_RECORD_HINT) from None
    if not isinstance(record, dict):
        raise BadSampleError(str(path), "should hold a JSON object", FIX_RECORD_HINT)
    return record


def _sample_from_folder(folder: Path, split: str) -> VQASample:
    """One question folder (``.../choose_txt/<qid>``) as a sample."""
    data_path = folder / "data.json"
    source = str(data_path)
    record = _read_record(data_path)
    question, choices, answer = (record.get(k) for k in ("question", "choices", "answer"))
    if not isinstance(question, str):
        raise BadSampleError(source, "has no 'question' text", FIX_RECORD_HINT)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise BadSampleError(source, "has no usable 'choices' list of texts", FIX_RECORD_HINT)
    # bool is an int subclass; `true` is not an index.
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise BadSampleError(
            source,
            f"has answer {answer!r}, not an index into its {len(choices)} choices",
            FIX_RECORD_HINT,
        )
    options = tuple(c.strip() for c in choices)
    return VQASample(
        sample_id=f"iconqa/{split}/{folder.name}",
        source=source,
        image_path=folder / "image.png",
        prompt=format_prompt(question, options),
        answer=options[answer],
        choices=options,
        question_type=TASK,
        extra={"qid": folder.name, "ques_type": record.get("ques_type")},
    )


def load_iconqa(
    root: Path | str, split: str = "train", *, skipped: list[BadSampleError] | None = None
) -> list[VQASample]:
    """Load the ``choose_txt`` questions of ``split``, in numeric question-id order.

    >>> samples = load_iconqa("iconqa_data", "val")  # doctest: +SKIP
    >>> samples[0].source  # doctest: +SKIP
    'iconqa_data/iconqa/val/choose_txt/12/data.json'

    Raises ``ConfigError`` when no ``<split>/choose_txt`` folder is found under
    ``root`` (the message lists the splits that exist), ``BadSampleError`` naming the
    data.json when one is malformed; with ``skipped`` (a list, for
    ``--on-bad-sample skip``) that error is appended to it and the question left out.
    """
    root = Path(root)
    base = find_iconqa_root(root)
    if base is None:
        raise ConfigError(
            f"IconQA folder {root} has no <split>/{TASK} folder (looked in "
            f"{', '.join(str(root / n / '<split>' / TASK) for n in NESTINGS)})"
        )
    task_dir = base / split / TASK
    if not task_dir.is_dir():
        present = [s for s in SPLITS if (base / s / TASK).is_dir()]
        raise ConfigError(
            f"IconQA at {base} has no split {split!r} ({task_dir} is missing); "
            f"its splits are {', '.join(present)}"
        )
    folders = sorted((p for p in task_dir.iterdir() if p.is_dir()), key=_qid_order)
    if not folders:
        raise ConfigError(f"IconQA split folder {task_dir} holds no question folders")
    samples = []
    for folder in folders:
        try:
            samples.append(_sample_from_folder(folder, split))
        except BadSampleError as err:
            if skipped is None:
                raise
            skipped.append(err)
    return samples
