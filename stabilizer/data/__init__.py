"""Dataset loaders and checks. Every loader returns ``list[VQASample]`` in a fixed order.

>>> from stabilizer.data import check_samples, load_image, load_samples
>>> samples = load_samples("easy-vqa", "train", limit=8)
>>> good, bad = check_samples(samples, on_bad_sample="error")
>>> load_image(good[0]).mode
'RGB'

No module here imports torch, so loading and checking data stays quick.
"""

from __future__ import annotations

from stabilizer.data.easy_vqa import load_easy_vqa
from stabilizer.data.iconqa import load_iconqa
from stabilizer.data.jsonl import format_prompt, load_jsonl
from stabilizer.data.registry import DEFAULT_SPEC, load_samples, resolve_spec
from stabilizer.data.sample import VQASample
from stabilizer.data.scienceqa import load_scienceqa
from stabilizer.data.validate import ON_BAD_SAMPLE_CHOICES, check_samples, load_image

__all__ = [
    "DEFAULT_SPEC",
    "ON_BAD_SAMPLE_CHOICES",
    "VQASample",
    "check_samples",
    "format_prompt",
    "load_easy_vqa",
    "load_iconqa",
    "load_image",
    "load_jsonl",
    "load_samples",
    "load_scienceqa",
    "resolve_spec",
]
