"""Turn a dataset spec (what the user types) into samples.

>>> samples = load_samples("easy-vqa", "train", limit=100)  # doctest: +SKIP
>>> samples = load_samples("scienceqa:~/data/ScienceQA", "val")  # doctest: +SKIP
>>> samples = load_samples("~/data/ScienceQA", "val")  # auto-detected  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stabilizer.data.easy_vqa import load_easy_vqa
from stabilizer.data.iconqa import find_iconqa_root, load_iconqa
from stabilizer.data.jsonl import load_jsonl
from stabilizer.data.sample import VQASample
from stabilizer.data.scienceqa import PROBLEMS_FILE, load_scienceqa
from stabilizer.data.validate import check_limit
from stabilizer.errors import BadSampleError, ConfigError

DEFAULT_SPEC = "easy-vqa"
EASY_VQA_NAMES = frozenset({"easy-vqa", "easy_vqa", "easyvqa"})
PATH_KINDS = ("scienceqa", "iconqa", "jsonl")
ACCEPTED_FORMS = (
    "accepted forms: 'easy-vqa'; 'scienceqa:PATH', 'iconqa:PATH' or 'jsonl:PATH'; "
    "or a bare PATH to a ScienceQA folder (holding problems.json), an IconQA folder "
    "(holding <split>/choose_txt), a .jsonl file, or a folder of <split>.jsonl files"
)
# ScienceQA and IconQA name their validation split "val"; accept the usual spellings.
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


def _detect_kind(path: Path, spec: str) -> str:
    """Which loader reads the existing ``path``, judged by what it contains."""
    if path.is_file():
        if path.suffix == ".jsonl":
            return "jsonl"
        raise ConfigError(
            f"dataset spec {spec!r} is a file but not a .jsonl file; {ACCEPTED_FORMS}"
        )
    if (path / PROBLEMS_FILE).is_file():
        return "scienceqa"
    if find_iconqa_root(path) is not None:
        return "iconqa"
    if any(path.glob("*.jsonl")):
        return "jsonl"
    raise ConfigError(
        f"dataset folder {path} (from spec {spec!r}) holds no {PROBLEMS_FILE}, "
        f"no <split>/choose_txt folder and no .jsonl file; {ACCEPTED_FORMS}"
    )


def resolve_spec(spec: str) -> tuple[str, Path | None]:
    """Split a spec into a loader kind and its path (``None`` for easy-vqa).

    >>> resolve_spec("easy-vqa")
    ('easy-vqa', None)
    >>> resolve_spec("jsonl:data/train.jsonl")  # doctest: +SKIP
    ('jsonl', PosixPath('data/train.jsonl'))
    """
    text = spec.strip()
    if text.lower() in EASY_VQA_NAMES:
        return "easy-vqa", None
    if not text:
        raise ConfigError(f"dataset spec is empty; {ACCEPTED_FORMS}")
    prefix, colon, rest = text.partition(":")
    if colon and prefix.lower() in PATH_KINDS:
        if not rest.strip():  # Path("") would silently mean the current folder
            raise ConfigError(f"dataset spec {spec!r} has no path after the colon")
        path = Path(rest.strip()).expanduser()
        if not path.exists():
            raise ConfigError(f"dataset path {path} (from spec {spec!r}) does not exist")
        return prefix.lower(), path
    path = Path(text).expanduser()
    if path.exists():
        return _detect_kind(path, spec), path
    if colon and len(prefix) > 1:  # one letter would be a Windows drive, not a kind
        raise ConfigError(f"unknown dataset kind {prefix!r} in spec {spec!r}; {ACCEPTED_FORMS}")
    raise ConfigError(
        f"dataset spec {spec!r} is not a known dataset or an existing path; {ACCEPTED_FORMS}"
    )


def _jsonl_for_split(path: Path, split: str) -> Path:
    """The JSONL file to read: ``path`` itself, or ``<split>.jsonl`` inside a folder."""
    if path.is_file():
        return path  # one file serves every split
    candidate = path / f"{split}.jsonl"
    if candidate.is_file():
        return candidate
    present = sorted(p.stem for p in path.glob("*.jsonl"))
    raise ConfigError(
        f"JSONL folder {path} has no split {split!r} ({candidate} is missing); "
        f"its splits are {', '.join(present) or '(none)'}"
    )


# Each takes (path, split, skipped); see load_samples for ``skipped``.
_PATH_LOADERS: dict[str, Callable[[Path, str, list | None], list[VQASample]]] = {
    "scienceqa": lambda path, split, skipped: load_scienceqa(
        path, SPLIT_ALIASES.get(split, split), skipped=skipped
    ),
    "iconqa": lambda path, split, skipped: load_iconqa(
        path, SPLIT_ALIASES.get(split, split), skipped=skipped
    ),
    "jsonl": lambda path, split, skipped: load_jsonl(
        _jsonl_for_split(path, split), skipped=skipped
    ),
}


def load_samples(
    spec: str,
    split: str,
    *,
    limit: int | None = None,
    skipped: list[BadSampleError] | None = None,
) -> list[VQASample]:
    """Load ``split`` of the dataset named by ``spec``, keeping the first ``limit``.

    >>> len(load_samples("easy-vqa", "test", limit=5))
    5

    ``spec`` is ``"easy-vqa"``, ``"scienceqa:PATH"``, ``"iconqa:PATH"``,
    ``"jsonl:PATH"``, or a bare path whose kind is detected from its contents. An
    unknown spec, a missing path or a missing split raises ``ConfigError`` saying
    what is accepted or which splits exist. A record that cannot be read raises
    ``BadSampleError``, or, when ``skipped`` is a list (``--on-bad-sample skip``), is
    appended to it and left out; the whole file is read, so a bad record past
    ``limit`` counts too. Images are not opened here; run
    :func:`stabilizer.data.validate.check_samples` on the result.
    """
    check_limit(limit)
    kind, path = resolve_spec(spec)
    if path is None:
        return load_easy_vqa(split, limit=limit)
    samples = _PATH_LOADERS[kind](path, split, skipped)
    return samples if limit is None else samples[:limit]
