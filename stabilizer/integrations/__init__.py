"""stabilizer inside other people's training loops.

    >>> from stabilizer.integrations import StabilizerCallback     # transformers.Trainer

``import stabilizer.integrations`` imports nothing heavy; each integration loads
its framework on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stabilizer.integrations.transformers import StabilizerCallback

__all__ = ["StabilizerCallback"]


def __getattr__(name: str) -> Any:
    # Lazy: the callback subclasses transformers.TrainerCallback, so importing it
    # imports transformers; only do that for someone who asks for it.
    if name == "StabilizerCallback":
        from stabilizer.integrations.transformers import StabilizerCallback

        return StabilizerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
