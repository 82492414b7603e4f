"""The one place that registers hooks on a model: reading the residual stream and editing it (`add`:
gradient-carrying deltas, one per layer or one per row; `add_block`: one delta per prompt position, as in
ActAdd; `steer`: a fixed vector times a multiplier, built on `add`; `ablate`: project out a direction), all
at the positions a `Positions` spec selects; recording a block's or the head's input, starting a forward
pass at a later block or after a block whose outputs were recorded, capturing Linear inputs and output
gradients for influence, and temporary modes (no parameter gradients, eager attention).

Every hook is removed when its context exits, also on exceptions.
"""

from steerlab.hooks.blocks import record_block_input, record_head_input, resume_after_block, start_at_block
from steerlab.hooks.capture import Captured, capture, module_shape, weight_gradient_matrix
from steerlab.hooks.modes import curvature_mode, no_param_grads
from steerlab.hooks.positions import Positions
from steerlab.hooks.residual import (
    StopForward,
    ablate,
    add,
    add_block,
    as_module,
    capture_residual,
    read_residual,
    run_to_layers,
    steer,
)

__all__ = [
    "Captured",
    "Positions",
    "StopForward",
    "ablate",
    "add",
    "add_block",
    "as_module",
    "capture",
    "capture_residual",
    "curvature_mode",
    "module_shape",
    "no_param_grads",
    "read_residual",
    "record_block_input",
    "record_head_input",
    "resume_after_block",
    "run_to_layers",
    "start_at_block",
    "steer",
    "weight_gradient_matrix",
]
