"""stabilizer: numerical-stability diagnostics for Q-Former LoRA fine-tuning.

    with stabilizer.watch(model, optimizer, scaler=scaler) as watch:
        ...your loop...        # stops with stabilizer.NumericalAnomalyError at the first NaN/Inf

``import stabilizer`` stays light (no torch import), so the pytest plugin costs
nothing when it is not enabled; the heavy parts load on first use.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["NumericalAnomalyError", "PreflightError", "check", "watch", "trace"]


def watch(model, optimizer, **options):
    """``with stabilizer.watch(model, optimizer, scaler=scaler) as watch:`` around your loop.

    See :class:`stabilizer.watcher.Watch` for the options and what it learns by itself.
    (The module is ``watcher``, not ``watch``: importing a submodule named ``watch``
    would replace this function on the package.)
    """
    from stabilizer.watcher import Watch

    return Watch(model, optimizer, **options)


def check(model, optimizer=None, *, scaler=None, batches=()):
    """The preflight of ``stabilizer check`` on your own model, optimizer, scaler and
    first batches, before step 0: a report with ``.errors``, ``.warnings``,
    ``.table()`` (rich) and ``.raise_for_errors()``. Nothing is run or changed."""
    from stabilizer.preflight import preflight

    return preflight(model, optimizer, scaler=scaler, batches=batches)


def __getattr__(name: str) -> Any:
    if name == "NumericalAnomalyError":
        from stabilizer.detector.policy import NumericalAnomalyError

        return NumericalAnomalyError
    if name == "PreflightError":
        from stabilizer.preflight import PreflightError

        return PreflightError
    raise AttributeError(f"module 'stabilizer' has no attribute {name!r}")


def trace(model, **kwargs):
    """``with stabilizer.trace(model, optimizer=opt) as tracer:`` — see stabilizer.probes.Tracer."""
    from stabilizer.probes.tracer import trace as _trace

    return _trace(model, **kwargs)
