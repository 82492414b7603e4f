"""The pass cache: start the forward pass at the first tracked layer, and skip the output head.

Influence passes (covariance, eigenvalue correction, scoring) differ only above the first tracked layer:
with MLPs of layers 24-29 of a 30-layer model tracked, 80% of each forward pass recomputes the same hidden
states. The covariance pass records the input of block L (the first tracked layer); later passes replace
blocks 0..L-1 by a pass-through and feed the recorded states to block L, so only blocks L.. run. The
model is restored on exit, also on exceptions. Supported where decoder blocks return a tensor
(Llama-like families in transformers >= 5); the equality of logits is tested. The hooks are
`steerlab.hooks.record_block_input`, `start_at_block` and `record_head_input`.

The covariance pass also records g_h, the gradient of the data-label training loss with respect to the
output head's input h. Every later pass that uses data labels (scoring; the eigenvalue correction of the
empirical Fisher) backpropagates the surrogate <h, g_h> instead of the loss: its gradient is the same
everywhere below the head, and the head (vocabulary x hidden, the largest matrix of a small LM) is
neither run forward nor backward.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from steerlab.influence.scores import layer_of

__all__ = ["first_tracked_layer"]


def first_tracked_layer(modules: Mapping[str, nn.Module]) -> int | None:
    """The lowest decoder-layer index among tracked module names (None if any is outside the layers)."""
    layers = [layer_of(n) for n in modules]
    return None if not layers or any(x is None for x in layers) else min(layers)
