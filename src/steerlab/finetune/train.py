"""Trained interventions at one layer: a bias vector added to the residual stream, LoRA on the layer's
attention and/or MLP weights, and full fine-tuning of the layer's MLP (the upper bound), all trained on the
same loss, data, steps and seed.

Loss ("positive"): the mean token NLL of the positive texts. Loss ("contrast"): that minus the mean token
NLL of the paired negative texts. Loss ("ab", for A/B items): the mean over items of -log p(matching letter)
at the answer position of the chat-formatted question (full-vocabulary softmax, the letter token found as
`steerlab.evaluate.prepare_ab` finds it). Loss ("reply", for `Replies`: a target model's replies, e.g.
a model organism's): the mean NLL of the reply tokens after the chat-formatted prompt. Each step draws
`batch_size` items (seeded) and takes one Adam step.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from steerlab.data import ABDataset, PairedTexts, encode, format_prompt
from steerlab.data.batching import pad_batch
from steerlab.data.templating import encode_continuation
from steerlab.errors import UserError
from steerlab.evaluate import ABPrompts, prepare_ab
from steerlab.hooks import Positions, add
from steerlab.io import load_record, save_record
from steerlab.models import LoadedModel, wrap
from steerlab.models.architectures import block, hidden_size, mlp, num_layers

LOSSES = ("positive", "contrast", "ab", "reply")
PAIR_LOSSES = ("positive", "contrast")
TARGETS = ("attn", "mlp", "both")


@dataclass(frozen=True)
class TrainConfig:
    """The shared budget and recipe: steps of Adam at `lr` on `batch_size` items (pairs or A/B items), seeded."""

    layer: int
    steps: int = 50
    lr: float = 1e-2
    batch_size: int = 4
    seed: int = 0
    loss: str = "positive"

    def check(self, n_layers: int | None = None) -> None:
        """Validate without a model (`n_layers` None) or against the model's depth."""
        if self.steps <= 0:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if n_layers is not None and not 0 <= self.layer < n_layers:
            raise UserError(f"--layer {self.layer} is out of range: the model has layers 0..{n_layers - 1}")


@dataclass(frozen=True)
class Replies:
    """Prompts with the replies a target model gives them (what "reply" training imitates) and the replies
    the model being trained gives (the other side of the mean difference)."""

    prompts: list[str]
    replies: list[str]
    base_replies: list[str]
    name: str = ""

    def __post_init__(self) -> None:
        if not len(self.prompts) == len(self.replies) == len(self.base_replies):
            raise ValueError("Replies: prompts, replies and base replies must have the same length")

    def __len__(self) -> int:
        return len(self.prompts)

    def as_pairs(self, tokenizer) -> PairedTexts:
        """(chat prompt + target reply, chat prompt + base reply) as paired texts."""
        chats = [format_prompt(tokenizer, p) for p in self.prompts]
        return PairedTexts(
            [c + r for c, r in zip(chats, self.replies, strict=True)],
            [c + r for c, r in zip(chats, self.base_replies, strict=True)],
            self.name,
        )


TrainingData = PairedTexts | ABDataset | Replies


def check_data(data: TrainingData, loss: str, option: str = "--data") -> None:
    """A `UserError` naming `option` when `data` is empty or does not suit `loss`."""
    if isinstance(data, Replies):
        if not len(data):
            raise UserError(f"{option}: no prompts with replies to train on")
        if loss != "reply":
            raise UserError(f"--loss {loss}: a target model's replies train with --loss reply")
        return
    if isinstance(data, ABDataset):
        if not len(data):
            raise UserError(f"{option}: no A/B items to train on")
        if loss != "ab":
            raise UserError(f"--loss {loss}: A/B items train with --loss ab")
        return
    if not len(data.positive):
        raise UserError(f"{option}: no paired texts to train on")
    if loss not in PAIR_LOSSES:
        raise UserError(f"--loss {loss}: paired texts train with --loss {' or '.join(PAIR_LOSSES)}")


@dataclass
class TrainedIntervention:
    """What training produced: tensors (the bias, or LoRA adapter weights), the loss curve and the budget."""

    kind: str  # "bias" or "lora"
    tensors: dict[str, torch.Tensor]
    config: dict
    losses: list[float]
    trainable_params: int
    tokens_seen: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return save_record(self, path, "TrainedIntervention")

    @classmethod
    def load(cls, path: str | Path) -> TrainedIntervention:
        return load_record(cls, path, "TrainedIntervention")


def _tokenised(lm: LoadedModel, texts: list[str]) -> list[list[int]]:
    out = [encode(lm.tokenizer, t) for t in texts]
    if any(len(ids) < 2 for ids in out):
        raise UserError("every training text needs at least two tokens (one to predict)")
    return out


def mean_nll(lm: LoadedModel, sequences: list[list[int]]) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over all predicted tokens of `sequences` (one padded batch) and their count."""
    ids, mask = pad_batch(sequences, lm.tokenizer.pad_token_id or 0, lm.device)
    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    valid = mask[:, 1:].bool()
    logprobs = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return -logprobs[valid].mean(), int(valid.sum())


def behaviour_loss(
    lm: LoadedModel, pos: list[list[int]], neg: list[list[int]], loss: str
) -> tuple[torch.Tensor, int]:
    """The training loss on one batch (see the module docstring) and the tokens it predicted."""
    value, tokens = mean_nll(lm, pos)
    if loss == "contrast":
        neg_value, neg_tokens = mean_nll(lm, neg)
        value, tokens = value - neg_value, tokens + neg_tokens
    return value, tokens


def ab_loss(lm: LoadedModel, prefixes: list[list[int]], letters: list[int]) -> tuple[torch.Tensor, int]:
    """Mean over items of -log p(letter | prefix) at each prefix's last position (one right-padded batch),
    and the number of letters predicted."""
    ids, mask = pad_batch(prefixes, lm.tokenizer.pad_token_id or 0, lm.device)
    rows = torch.arange(len(prefixes), device=ids.device)
    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, mask.sum(-1) - 1]
    logprobs = logits.log_softmax(-1)[rows, torch.tensor(letters, device=ids.device)]
    return -logprobs.mean(), len(prefixes)


def reply_ids(lm: LoadedModel, prompt: str, reply: str) -> tuple[list[int], int]:
    """(ids of the chat-formatted prompt followed by `reply`, number of prompt tokens)."""
    try:
        return encode_continuation(lm.tokenizer, format_prompt(lm.tokenizer, prompt), reply)
    except UserError:
        raise UserError(f"an empty reply to {prompt[:60]!r}: nothing to train on") from None


def reply_nll(lm: LoadedModel, sequences: list[tuple[list[int], int]]) -> tuple[torch.Tensor, int]:
    """Mean NLL of the tokens after each sequence's prompt (one padded batch) and their count."""
    ids, mask = pad_batch([s for s, _ in sequences], lm.tokenizer.pad_token_id or 0, lm.device)
    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    predicted = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
    starts = torch.tensor([keep for _, keep in sequences], device=ids.device)[:, None]
    valid = mask[:, 1:].bool() & (predicted >= starts)
    logprobs = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return -logprobs[valid].mean(), int(valid.sum())


def matching_letters(prompts: ABPrompts) -> list[int]:
    """The token of each item's matching answer letter."""
    return [tokens[i] for tokens, i in zip(prompts.option_tokens, prompts.matching_index, strict=True)]


def batch_loss_function(lm: LoadedModel, data: TrainingData, loss: str):
    """(number of items, f(rows) -> (loss on those items, tokens predicted)), the data tokenised once."""
    if isinstance(data, Replies):
        sequences = [reply_ids(lm, p, r) for p, r in zip(data.prompts, data.replies, strict=True)]
        return len(sequences), lambda rows: reply_nll(lm, [sequences[i] for i in rows])
    if isinstance(data, ABDataset):
        prompts = prepare_ab(lm, data)
        prefixes, letters = prompts.prefixes, matching_letters(prompts)
        return len(prefixes), lambda rows: ab_loss(
            lm, [prefixes[i] for i in rows], [letters[i] for i in rows]
        )
    pos, neg = _tokenised(lm, data.positive), _tokenised(lm, data.negative)
    return len(pos), lambda rows: behaviour_loss(lm, [pos[i] for i in rows], [neg[i] for i in rows], loss)


def _train(
    lm: LoadedModel,
    data: TrainingData,
    config: TrainConfig,
    params: list[nn.Parameter],
    context,
    desc: str,
    progress: bool,
) -> tuple[list[float], int, float]:
    """Adam on `params` with `context()` active during each forward pass; (losses, tokens, seconds)."""
    n_items, batch_loss = batch_loss_function(lm, data, config.loss)
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.Adam(params, lr=config.lr)
    losses, tokens_seen = [], 0
    started = time.perf_counter()
    for _ in tqdm(range(config.steps), desc=desc, disable=not progress, unit="step"):
        rows = torch.randperm(n_items, generator=generator)[: config.batch_size].tolist()
        optimiser.zero_grad()
        with context():
            value, tokens = batch_loss(rows)
        value.backward()
        optimiser.step()
        losses.append(float(value.detach()))
        tokens_seen += tokens
    return losses, tokens_seen, time.perf_counter() - started


def _frozen(lm: LoadedModel) -> list[tuple[nn.Parameter, bool]]:
    state = [(p, p.requires_grad) for p in lm.model.parameters()]
    for p, _ in state:
        p.requires_grad_(False)
    return state


def train_bias(
    lm: LoadedModel,
    data: TrainingData,
    config: TrainConfig,
    positions: Positions | None = None,
    progress: bool = True,
) -> TrainedIntervention:
    """A vector b (zero-initialised) added after block `config.layer` at `positions` (default: all but the
    sink, as steering adds vectors), trained by Adam; the model's weights are left alone."""
    config.check(num_layers(lm.model))
    check_data(data, config.loss)
    torch.manual_seed(config.seed)
    bias = nn.Parameter(torch.zeros(hidden_size(lm.model), dtype=torch.float32, device=lm.device))
    state = _frozen(lm)
    try:
        losses, tokens, seconds = _train(
            lm,
            data,
            config,
            [bias],
            lambda: add(lm, {config.layer: bias}, positions),
            "bias vector",
            progress,
        )
    finally:
        for p, flag in state:
            p.requires_grad_(flag)
    return TrainedIntervention(
        "bias", {"bias": bias.detach().clone()}, vars(config).copy(), losses, bias.numel(), tokens, seconds
    )


def lora_targets(model: nn.Module, layer: int, target: str) -> list[str]:
    """Full names of the nn.Linear modules of block `layer` in its attention ("attn"), MLP or both."""
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    owner = block(model, layer)
    prefix = next(name for name, module in model.named_modules() if module is owner)
    wanted = ("attn", "mlp") if target == "both" else (target,)
    names = [
        f"{prefix}.{name}"
        for name, module in owner.named_modules()
        if isinstance(module, nn.Linear) and any(w in name.split(".")[0] for w in wanted)
    ]
    if not names:
        raise UserError(f"block {layer} has no linear layers under its {target} module(s)")
    return names


def lora_model(lm: LoadedModel, tensors: dict[str, torch.Tensor], layer: int, rank: int, target: str):
    """A copy of `lm` with a LoRA adapter (weights `tensors`, or fresh ones if empty) on `layer`; the
    original model is untouched."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    copied = copy.deepcopy(lm.model)
    names = lora_targets(copied, layer, target)
    peft_config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names, bias="none")
    peft_model = get_peft_model(copied, peft_config)
    if tensors:
        set_peft_model_state_dict(peft_model, tensors)
    return peft_model, wrap(peft_model.base_model.model, lm.tokenizer, name=lm.info.name + "+lora")


def train_lora(
    lm: LoadedModel,
    data: TrainingData,
    config: TrainConfig,
    rank: int = 4,
    target: str = "both",
    progress: bool = True,
) -> tuple[TrainedIntervention, LoadedModel]:
    """LoRA (rank `rank`, alpha = rank) on block `config.layer`'s attention and/or MLP linears, trained
    like the bias; returns the result and a LoadedModel of a trained copy (the given model is untouched)."""
    from peft import get_peft_model_state_dict

    if rank <= 0:
        raise UserError(f"--rank must be at least 1, got {rank}")
    config.check(num_layers(lm.model))
    check_data(data, config.loss)
    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn at random
    peft_model, tuned = lora_model(lm, {}, config.layer, rank, target)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    losses, tokens, seconds = _train(tuned, data, config, params, nullcontext, "LoRA", progress)
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return (
        TrainedIntervention(
            "lora",
            tensors,
            vars(config).copy(),
            losses,
            sum(p.numel() for p in params),
            tokens,
            seconds,
            {"rank": rank, "target": target},
        ),
        tuned,
    )


def train_mlp(
    lm: LoadedModel, data: TrainingData, config: TrainConfig, progress: bool = True
) -> tuple[TrainedIntervention, LoadedModel]:
    """Full fine-tuning of block `config.layer`'s MLP (every weight of it, nothing else) on a copy of the
    model, trained like the bias; returns the result (the tuned MLP weights) and the tuned copy."""
    config.check(num_layers(lm.model))
    check_data(data, config.loss)
    torch.manual_seed(config.seed)
    copied = copy.deepcopy(lm.model)
    for p in copied.parameters():
        p.requires_grad_(False)
    owner = mlp(copied, config.layer)
    params = list(owner.parameters())
    for p in params:
        p.requires_grad_(True)
    tuned = wrap(copied, lm.tokenizer, name=lm.info.name + "+mlp")
    losses, tokens, seconds = _train(tuned, data, config, params, nullcontext, "MLP", progress)
    tensors = {name: p.detach().clone() for name, p in owner.named_parameters()}
    return (
        TrainedIntervention(
            "mlp", tensors, vars(config).copy(), losses, sum(p.numel() for p in params), tokens, seconds
        ),
        tuned,
    )
