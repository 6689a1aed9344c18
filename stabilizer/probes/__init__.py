"""Probes: hooks that record activation, gradient and parameter statistics per step.

The names below load lazily: the store and the reports import
``stabilizer.probes.schema`` and must not pay for (or need) torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stabilizer.probes.tracer import StepRecord, Tracer, select_modules, trace

__all__ = ["StepRecord", "Tracer", "select_modules", "trace"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from stabilizer.probes import tracer

        return getattr(tracer, name)
    raise AttributeError(f"module 'stabilizer.probes' has no attribute {name!r}")
