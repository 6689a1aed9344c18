"""What a probe records, shared by the probes (torch), the store and the reports (no torch).

Every traced tensor becomes one row of ``TENSOR_STATS`` (float64 once on the host):

| stat         | meaning                                                                 |
|--------------|-------------------------------------------------------------------------|
| absmax       | largest finite absolute value (0 when none is finite)                    |
| rms          | root mean square of the finite values                                   |
| mean         | mean of the finite values                                               |
| nan          | count of NaN elements                                                   |
| inf          | count of +/-Inf elements                                                |
| near_limit   | fraction of elements whose magnitude exceeds half the dtype's max        |
|              | (fp16: 32752; the headroom left before overflow)                         |

Each module has one row per *site*:

| site       | tensor                                                        |
|------------|---------------------------------------------------------------|
| fwd_in     | the module's first floating-point input in forward            |
| fwd_out    | the module's (first floating-point) output in forward          |
| grad_out   | gradient w.r.t. the module's output (flows into it in backward) |
| grad_in    | gradient w.r.t. the module's input (flows out of it)           |

plus, for attention modules, ``score_max``: the largest |q·k| of the step before
the 1/sqrt(d) scale (eager attention computes q @ k^T in the compute dtype first,
so this is the value fp16 must hold), computed from the hooked query and key
outputs since SDPA hides the scores. Every trainable parameter gets ``PARAM_STATS``.
A site that did not fire in a step holds NaN stats and fire order -1.
"""

from __future__ import annotations

TENSOR_STATS = ("absmax", "rms", "mean", "nan", "inf", "near_limit")
SITES = ("fwd_in", "fwd_out", "grad_out", "grad_in")
PARAM_STATS = (
    "weight_norm",  # L2 norm of the parameter after the step's update
    "grad_norm",  # L2 norm of its gradient (unscaled, before clipping)
    "update_ratio",  # ||w_after - w_before|| / ||w_before||
    "weight_nonfinite",  # count of non-finite elements after the update
    "grad_nonfinite",  # count of non-finite gradient elements
)
# The forward and backward passes in the order they run inside one step.
PASSES = ("input", "forward", "loss", "backward", "optimizer")
