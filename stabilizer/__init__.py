"""stabilizer: numerical-stability diagnostics for Q-Former LoRA fine-tuning.

``import stabilizer`` stays light (no torch import), so the pytest plugin costs
nothing when it is not enabled; the heavy parts load on first use.
"""

__version__ = "0.1.0"


def trace(model, **kwargs):
    """``with stabilizer.trace(model, optimizer=opt) as tracer:`` — see stabilizer.probes.Tracer."""
    from stabilizer.probes.tracer import trace as _trace

    return _trace(model, **kwargs)
