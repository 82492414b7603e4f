"""What influence is computed for: a `Task` names the tracked modules, the training loss and the query loss.

Sign convention used everywhere in `steerlab.influence`: the *query loss* is the negative of the
measurement we care about (for a language model: minus the completion's log-probability). A score
s(q, z) = <(F + lambda I)^-1 grad L_q, grad L_z> is positive when one (preconditioned) gradient step on the
training example z lowers the query loss, i.e. raises the completion's log-probability.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from steerlab.models.architectures import is_transposed_linear, plain_head

__all__ = [
    "ClassificationTask",
    "LanguageModelTask",
    "Task",
    "is_trackable",
    "linear_modules",
    "mlp_modules",
]


def is_trackable(module: nn.Module) -> bool:
    """`nn.Linear`, or the `Conv1D` GPT-2 uses (weight stored as [in, out])."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def linear_modules(model: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Every trackable module of `model` (names as in `named_modules`), optionally under `prefix`."""
    return {n: m for n, m in model.named_modules() if is_trackable(m) and n.startswith(prefix)}


def mlp_modules(model: nn.Module, layers: Sequence[int] | None = None) -> dict[str, nn.Module]:
    """The trackable modules inside the MLP of each decoder layer (all layers by default)."""
    from steerlab.models import mlp, num_layers, resolve_layer

    names = {id(m): n for n, m in model.named_modules()}
    layers = range(num_layers(model)) if layers is None else [resolve_layer(model, i) for i in layers]
    out: dict[str, nn.Module] = {}
    for layer in layers:
        for sub in mlp(model, layer).modules():
            if is_trackable(sub):
                out[names[id(sub)]] = sub
    if not out:
        raise ValueError(f"no nn.Linear/Conv1D found in the MLPs of layers {list(layers)}")
    return out


@runtime_checkable
class Task(Protocol):
    """The three things influence needs to know about a model and its data.

    Batches are whatever the task understands. Losses are *sums* over the examples of the batch, so the
    output gradient of one example's tokens is the gradient of that example's own loss.
    """

    def modules(self, model: nn.Module) -> Mapping[str, nn.Module]:
        """The `nn.Linear`/`Conv1D` modules whose weights are tracked, by name."""
        ...

    def train_loss(self, model: nn.Module, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Summed training loss. With a generator, labels are sampled from the model (true Fisher)."""
        ...

    def query_loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Summed query loss: minus the measurement (e.g. minus the completion log-probability)."""
        ...

    def token_mask(self, batch) -> torch.Tensor | None:
        """[batch, tokens] 1 for real tokens, 0 for padding (None: no token dimension or no padding)."""
        ...

    def batch_size(self, batch) -> int: ...


def _sample_categorical(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    from steerlab.influence.head import sample_categorical

    return sample_categorical(torch.softmax(logits.detach().float(), dim=-1), generator)


@dataclass
class LanguageModelTask:
    """A causal LM. Batches are dicts with `input_ids`, `attention_mask` and `labels` (HF convention:
    `labels` aligned with `input_ids`, -100 where no loss is taken, shifted inside).

    Training loss: summed next-token cross-entropy over positions with a label (for training documents
    every real token; for prompt/completion pairs only the completion). Query loss: the same over the
    completion, i.e. minus its log-probability. With `generator`, the training labels at those positions
    are sampled from the model's own distribution (the true Fisher); without, the data labels are used.
    """

    layers: Sequence[int] | None = None
    module_names: Sequence[str] | None = None

    def modules(self, model: nn.Module) -> dict[str, nn.Module]:
        if self.module_names is not None:
            found = dict(model.named_modules())
            missing = [n for n in self.module_names if n not in found]
            if missing:
                raise KeyError(f"modules not found in the model: {missing}")
            return {n: found[n] for n in self.module_names}
        return mlp_modules(model, self.layers)

    def _forward(self, model: nn.Module, batch, head: bool = True) -> torch.Tensor:
        """Logits, or (head=False) the hidden states entering the output head."""
        kwargs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch.get("attention_mask"),
            "use_cache": False,
        }
        net = model if head else model.base_model
        if "prefix_hidden" in batch:  # cached hidden states entering block `prefix_layer` (see pass_cache.py)
            from steerlab.hooks import start_at_block

            with start_at_block(model, int(batch["prefix_layer"]), batch["prefix_hidden"]):
                out = net(**kwargs)
        else:
            out = net(**kwargs)
        return out.logits if head else out.last_hidden_state

    @staticmethod
    def _shifted_labels(batch) -> torch.Tensor:
        # shift the labels, not the logits: slicing [B, T, vocab] logits would copy them (and their gradient)
        labels = batch["labels"]
        return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)

    @staticmethod
    def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.to(logits.device).reshape(-1),
            reduction="sum",
            ignore_index=-100,
        )

    def train_loss(self, model: nn.Module, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None and "head_grad" in batch:
            # <head input, recorded data-label gradient there> has the training loss's gradient everywhere
            # below the head, so the head (vocabulary x hidden) is skipped (see pass_cache.py)
            hidden = self._forward(model, batch, head=False)
            return (hidden * batch["head_grad"].to(hidden.dtype)).sum()
        return self.train_loss_and_head_gradient(model, batch, generator)[0]

    def train_loss_and_head_gradient(
        self, model: nn.Module, batch, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training loss to backpropagate, and the gradient of the *data-label* loss with respect to
        the head's input (None when nothing below the head is tracked), recorded once so that later
        passes with data labels skip the head (see pass_cache.py). A plain head (see head.py) is computed
        in chunks with its gradient, other heads (e.g. soft-capped logits) by autograd."""
        from steerlab.influence.head import head_cross_entropy, loss_with_gradient

        labels = self._shifted_labels(batch)
        head = plain_head(model)
        if head is not None and head not in self.modules(model).values():
            hidden = self._forward(model, batch, head=False)
            out = head_cross_entropy(hidden, head, labels, generator)
            if not hidden.requires_grad:  # nothing tracked below the head
                return out.loss, None
            return loss_with_gradient(hidden, out.grad, out.loss), out.data_grad
        from steerlab.hooks import record_head_input

        with record_head_input(model) as seen:
            logits = self._forward(model, batch)
        data_loss = self._cross_entropy(logits, labels)
        hidden = seen[0]
        if generator is not None:
            sampled = _sample_categorical(logits, generator).to(labels.device)
            loss = self._cross_entropy(logits, torch.where(labels != -100, sampled, labels))
        else:
            loss = data_loss
        if not hidden.requires_grad:
            return loss, None
        (grad,) = torch.autograd.grad(data_loss, hidden, retain_graph=True)
        if generator is None:
            return loss_with_gradient(hidden, grad, loss), grad.detach()
        return loss, grad.detach()

    def query_loss(self, model: nn.Module, batch) -> torch.Tensor:
        return self.train_loss(model, batch, None)

    def token_mask(self, batch) -> torch.Tensor | None:
        return batch.get("attention_mask")

    def batch_size(self, batch) -> int:
        return int(batch["input_ids"].shape[0])


@dataclass
class ClassificationTask:
    """Any `model(x) -> [batch, classes]` (cross-entropy) or `[batch, outputs]` (`regression=True`, loss
    0.5 * squared error, whose Fisher is the Gauss-Newton with unit noise). Batches are `(x, y)` tuples.
    The query loss is the same loss on the query example. `module_names=None` tracks every Linear.

    `exact_fisher=C` (the number of classes, or of outputs for regression): when labels are sampled (a
    generator is given: the true Fisher), the expectation over labels is taken exactly instead of drawing
    one: every example is repeated once per class c, its loss weighted by sqrt(p_c) (detached), so that
    the summed outer products of the copies' gradients are sum_c p_c g_c g_c^T, the Gauss-Newton matrix
    J^T (diag p - p p^T) J (regression: output k's copy has unit noise e_k, giving J^T J). One pass costs
    C copies of each example, and the result has no sampling noise (`samples` > 1 repeats it)."""

    regression: bool = False
    module_names: Sequence[str] | None = None
    exact_fisher: int | None = None

    def modules(self, model: nn.Module) -> dict[str, nn.Module]:
        found = linear_modules(model)
        if self.module_names is None:
            return found
        return {n: dict(model.named_modules())[n] for n in self.module_names}

    def train_loss(self, model: nn.Module, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        x, y = batch
        if generator is not None and self.exact_fisher is not None:
            return self._expected_fisher_loss(model, x)
        out = model(x)
        if self.regression:
            if generator is not None:
                noise = torch.randn(
                    out.shape, generator=generator, dtype=out.dtype, device=generator.device
                ).to(out.device)
                y = out.detach() + noise
            return 0.5 * ((out - y.to(out.dtype).reshape(out.shape)) ** 2).sum()
        if generator is not None:
            y = _sample_categorical(out, generator).to(out.device)
        return F.cross_entropy(out, y, reduction="sum")

    def _expected_fisher_loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A loss over C copies of each example whose copies' gradients g'_c satisfy
        sum_c g'_c g'_c^T = the example's Gauss-Newton matrix (see the class docstring)."""
        c = int(self.exact_fisher)
        out = model(x.repeat_interleave(c, dim=0))  # rows: example 0 class 0..C-1, example 1, ...
        if out.shape[-1] != c:
            raise ValueError(f"exact_fisher={c} but the model has {out.shape[-1]} outputs")
        eye = torch.eye(c, dtype=out.dtype, device=out.device).repeat(len(x), 1)
        if self.regression:  # 0.5 |out - (out + e_k)|^2 per copy: gradient -J^T e_k
            return 0.5 * ((out - (out.detach() + eye)) ** 2).sum()
        logp = torch.log_softmax(out, dim=-1)
        weight = logp.detach().exp().mul(eye).sum(-1).sqrt()  # sqrt(p_c) of copy c
        return -(weight * (logp * eye).sum(-1)).sum()

    def query_loss(self, model: nn.Module, batch) -> torch.Tensor:
        return self.train_loss(model, batch, None)

    def token_mask(self, batch) -> torch.Tensor | None:
        return None

    def batch_size(self, batch) -> int:
        return int(batch[0].shape[0])
