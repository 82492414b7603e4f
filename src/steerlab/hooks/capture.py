"""Per-token inputs and output gradients of tracked Linear/Conv1D modules, for one forward/backward.

The weight gradient of one example is G = sum_t ds_t a_t^T (out x in), with a_t the module's input at token
t (a constant 1 appended when the module has a bias: the bias is an extra input column) and ds_t the
gradient of the summed loss with respect to the module's output at t. Padding rows are zeroed in both,
so padding contributes nothing to covariances, eigenvalues or scores. Parameter gradients are switched off
while capturing: only activation gradients are computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from steerlab.models.architectures import is_transposed_linear

__all__ = ["Captured", "capture", "module_shape"]


def module_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the tracked weight matrix, the bias column included in `in`."""
    weight = module.weight
    out_dim, in_dim = (weight.shape[1], weight.shape[0]) if is_transposed_linear(module) else weight.shape
    return int(out_dim), int(in_dim) + (module.bias is not None)


def weight_gradient_matrix(module: nn.Module) -> torch.Tensor:
    """The module's `.grad` in steerlab's (out, in[+1]) layout (used by tests and brute-force checks)."""
    grad = module.weight.grad
    grad = grad.T if is_transposed_linear(module) else grad
    if module.bias is not None:
        grad = torch.cat([grad, module.bias.grad[:, None]], dim=1)
    return grad


@dataclass
class Captured:
    """After backward: `inputs[name]` [B, T, in(+1)] and `grads[name]` [B, T, out], padding rows zeroed."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)

    def check_complete(self, names) -> None:
        missing = [n for n in names if n not in self.grads]
        if missing:
            raise RuntimeError(
                f"no output gradient reached tracked modules {missing[:5]}: are they used by the loss?"
            )


@contextmanager
def capture(
    modules: Mapping[str, nn.Module], mask: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> Iterator[Captured]:
    """Record inputs and output gradients of `modules` during one forward and backward inside the block.

    mask: [B, T] (1 = real token). dtype: store captured tensors in this dtype (e.g. bfloat16 to halve
    memory; consumers accumulate in float32 or wider).
    """
    captured = Captured()
    handles = []
    model_params: list[tuple[nn.Parameter, bool]] = []

    def to_store(x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if x.dim() == 2:
            x = x[:, None]
        if mask is not None:
            x = x * mask[..., None].to(device=x.device, dtype=x.dtype)
        return x if dtype is None else x.to(dtype)

    def make_hook(name: str, has_bias: bool):
        def hook(_module, args, output):
            if name in captured.inputs:
                raise RuntimeError(
                    f"module {name} ran twice in one forward pass; shared modules are not supported"
                )
            x = args[0]
            if has_bias:
                x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
            captured.inputs[name] = to_store(x)
            if not output.requires_grad:  # nothing tracked below: start the graph here
                output = output.detach().requires_grad_(True)

            def grad_hook(grad: torch.Tensor) -> None:
                captured.grads[name] = to_store(grad)

            output.register_hook(grad_hook)
            return output

        return hook

    for module in modules.values():
        for param in module.parameters():  # ensure no param grads are accumulated for tracked modules
            model_params.append((param, param.requires_grad))
    try:
        for param, _ in model_params:
            param.requires_grad_(False)
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name, module.bias is not None)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in model_params:
            param.requires_grad_(flag)
