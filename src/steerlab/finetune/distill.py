"""Distil a system prompt into an activation injection (context distillation into the residual stream).

Teacher: the model with the system prompt in its chat template. Student: the same model without it (the
template's default system turn, if any, stays) plus a learned injection. The teacher greedily writes a
reply of at most `reply_tokens` tokens (ending early at EOS) to each user prompt; both models are then
teacher-forced on that reply, and the loss is KL(teacher || student) of the next-token distributions at
the reply positions: the last prompt token (which predicts the first reply token) and every reply token
but the last. The two prompts differ in length, so positions are aligned on the reply. Teacher log-probs
are computed once and kept. Per prompt the KL is averaged over its reply positions; a batch's loss is the
mean over its prompts.

Injections, all added through `steerlab.hooks.add` at every position but the sink:
- "vectors": one free vector at each of the given layers (one layer: a single steering vector);
- "lowrank": one vector at each of the given layers, all in a shared learned r-dimensional subspace
  (delta_L = coef_L @ basis, basis (r, D), coef (layers, r));
- "actadd": the mean residual difference at the last prompt token, with the system prompt minus without,
  at each layer (no training; optionally rescaled to a given norm per layer);
- "lora": LoRA of rank r on the first given layer's attention and MLP (`finetune.train.lora_model`),
  trained on the same KL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from steerlab.data import encode, format_prompt, load_builtin
from steerlab.data.batching import pad_batch
from steerlab.errors import UserError
from steerlab.evaluate.generation import generate_ids
from steerlab.hooks import add, resume_after_block, run_to_layers
from steerlab.io import load_record, load_result, save_record, save_result
from steerlab.models import LoadedModel
from steerlab.models.architectures import hidden_size, num_layers

TRAINED = ("vectors", "lowrank", "lora")
METHODS = (*TRAINED, "actadd")


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def read_system_prompt(spec: str, option: str = "--system-prompt") -> str:
    """The text of `builtin:NAME` (a built-in system prompt) or of a UTF-8 text file."""
    if spec.startswith("builtin:"):
        name = spec[len("builtin:") :]
        try:
            text = load_builtin(name)
        except KeyError as error:
            raise UserError(f"{option}: {error.args[0]}") from None
        if not isinstance(text, str):
            raise UserError(f"{option}: builtin:{name} is not a system prompt (pirate-persona, constitution)")
        return text
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{option}: no such file {spec}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{option}: {spec} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{option}: {spec} is empty")
    return text.strip()


def context_length(lm: LoadedModel) -> int | None:
    """The model's context length (max_position_embeddings), None when the config does not say."""
    return getattr(lm.model.config, "max_position_embeddings", None)


def check_prompts(lm: LoadedModel, system_prompt: str, prompts: Sequence[str], reply_tokens: int) -> None:
    """Refuse an empty system prompt or prompt list, or a prompted input (+ reply) beyond the context."""
    if not system_prompt.strip():
        raise UserError("--system-prompt: the system prompt is empty")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise UserError("--prompts: give non-empty user prompts")
    limit = context_length(lm)
    if limit is None:
        return
    longest = max(len(encode(lm.tokenizer, format_prompt(lm.tokenizer, p, system_prompt))) for p in prompts)
    if longest + reply_tokens > limit:
        raise UserError(
            f"--system-prompt: {longest} prompt tokens + {reply_tokens} reply tokens exceed the model's "
            f"context of {limit} tokens"
        )


def tokens_saved(lm: LoadedModel, system_prompt: str, prompts: Sequence[str]) -> float:
    """Mean input tokens per call saved by dropping the system prompt (prompted minus unprompted length)."""
    tok = lm.tokenizer
    diffs = [
        len(encode(tok, format_prompt(tok, p, system_prompt))) - len(encode(tok, format_prompt(tok, p)))
        for p in prompts
    ]
    return sum(diffs) / len(diffs)


@dataclass
class Targets:
    """The teacher's side, computed once: per user prompt, the student's input ids (unprompted chat +
    reply without its last token), the index of its last prompt token, and the teacher's log-probs
    (reply length, vocabulary) at the aligned reply positions (float32, CPU)."""

    prompts: list[str]
    student_ids: list[list[int]]
    starts: list[int]
    teacher_logprobs: list[torch.Tensor]
    replies: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)


def greedy_replies(
    lm: LoadedModel, inputs: Sequence[list[int]], max_new_tokens: int, batch_size: int = 8
) -> list[list[int]]:
    """Greedy continuations (token ids, cut after the first EOS, which is kept) of tokenised inputs."""
    eos = lm.tokenizer.eos_token_id
    rows = generate_ids(lm, inputs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def _tail_logprobs(
    lm: LoadedModel,
    sequences: Sequence[list[int]],
    counts: Sequence[int],
    lower: Sequence[torch.Tensor] | None = None,
    layer: int | None = None,
) -> list[torch.Tensor]:
    """Log-probs at the last `counts[i]` positions of each sequence, in one left-padded forward pass that
    runs the output head on those positions only. With `lower` (the recorded output of block `layer` for
    each sequence, (len, D)), blocks 0..`layer` are skipped and those outputs are used instead; hooks on
    block `layer` entered inside this call's caller still see them (`hooks.resume_after_block`)."""
    ids, mask = pad_batch(sequences, lm.tokenizer.pad_token_id or 0, lm.device, left=True)
    keep = max(counts)
    inputs = dict(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=False,
        logits_to_keep=keep,
    )
    if lower is None:
        logits = lm.model(**inputs).logits
    else:
        width = ids.shape[1]
        hidden = torch.stack([torch.nn.functional.pad(h, (0, 0, width - h.shape[0], 0)) for h in lower])
        with resume_after_block(lm, layer, [hidden.to(lm.device)]):
            logits = lm.model(**inputs).logits
    return [_wide(logits[row, keep - n :]).log_softmax(-1) for row, n in enumerate(counts)]


@torch.no_grad()
def teacher_targets(
    lm: LoadedModel,
    system_prompt: str | None,
    prompts: Sequence[str],
    reply_tokens: int = 24,
    progress: bool = True,
) -> Targets:
    """Generate the teacher's replies and its log-probs at the reply positions (one prompt per forward
    pass, so each row's numbers do not depend on the batch). `system_prompt=None`: the teacher is the
    unprompted model itself (its KL to the uninjected student is 0)."""
    tok = lm.tokenizer
    teacher_inputs = [encode(tok, format_prompt(tok, p, system_prompt)) for p in prompts]
    replies = greedy_replies(lm, teacher_inputs, reply_tokens)
    student_ids, starts, logprobs = [], [], []
    for ids, reply in tqdm(
        list(zip(teacher_inputs, replies, strict=True)), desc="teacher", disable=not progress, unit="prompt"
    ):
        if not reply:
            raise UserError("the teacher wrote an empty reply; give --reply-tokens >= 1")
        logprobs += [t.cpu() for t in _tail_logprobs(lm, [ids + reply[:-1]], [len(reply)])]
    for prompt, reply in zip(prompts, replies, strict=True):
        plain = encode(tok, format_prompt(tok, prompt))
        student_ids.append(plain + reply[:-1])
        starts.append(len(plain) - 1)
    return Targets(list(prompts), student_ids, starts, logprobs, replies)


@torch.no_grad()
def block_outputs(lm: LoadedModel, targets: Targets, layer: int) -> list[torch.Tensor]:
    """The output of block `layer` (len, D) for each student sequence, one sequence per pass."""
    outputs: list[torch.Tensor] = []

    def keep(_layer: int, hidden: torch.Tensor) -> None:
        outputs.append(hidden[0].detach().clone())

    for ids in targets.student_ids:
        run_to_layers(lm, [layer], keep, input_ids=torch.tensor([ids], device=lm.device))
    return outputs


def student_kl(
    lm: LoadedModel,
    targets: Targets,
    rows: Sequence[int],
    lower: Sequence[torch.Tensor] | None = None,
    layer: int | None = None,
) -> torch.Tensor:
    """KL(teacher || student) per prompt of `rows` (B,), averaged over each prompt's reply positions; the
    student is `lm` as it runs now (inside any injection context). `lower`/`layer`: the recorded outputs
    of block `layer` for every prompt of `targets` (`block_outputs`), to start the pass above it."""
    counts = [targets.teacher_logprobs[i].shape[0] for i in rows]
    chosen = None if lower is None else [lower[i] for i in rows]
    students = _tail_logprobs(lm, [targets.student_ids[i] for i in rows], counts, chosen, layer)
    kls = []
    for i, student in zip(rows, students, strict=True):
        teacher = targets.teacher_logprobs[i].to(device=student.device)
        kls.append((teacher.exp() * (teacher - student)).sum(-1).mean())
    return torch.stack(kls)


@dataclass(frozen=True)
class DistillConfig:
    """The recipe shared by every trained method: Adam steps at `lr` on `batch_size` prompts, seeded."""

    method: str = "vectors"
    layers: tuple[int, ...] = (15,)
    rank: int = 4
    steps: int = 60
    lr: float = 1e-2
    batch_size: int = 8
    seed: int = 0

    def check(self, n_layers: int | None = None) -> None:
        """Validate without a model (`n_layers` None) or against the model's depth."""
        if self.method not in METHODS:
            raise UserError(f"--methods: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if not self.layers:
            raise UserError("--layers: give at least one layer")
        if len(set(self.layers)) != len(self.layers):
            raise UserError(f"--layers: a layer is named twice in {list(self.layers)}")
        if self.rank <= 0:
            raise UserError(f"--rank must be at least 1, got {self.rank}")
        if self.steps <= 0:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if n_layers is not None:
            for layer in self.layers:
                if not 0 <= layer < n_layers:
                    raise UserError(
                        f"--layers: layer {layer} is out of range; the model has layers 0..{n_layers - 1}"
                    )


@dataclass
class Distilled:
    """A distilled injection: its tensors (vectors; basis and coef; or LoRA weights), the recipe, the
    training loss curve and cost. `student(lm)` gives the model and context that apply it."""

    method: str
    layers: list[int]
    tensors: dict[str, torch.Tensor]
    config: dict
    losses: list[float] = field(default_factory=list)
    trainable_params: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def deltas(self) -> dict[int, torch.Tensor]:
        """Layer -> added vector (not for LoRA)."""
        if self.method == "lowrank":
            vectors = self.tensors["coef"] @ self.tensors["basis"]
        elif self.method in ("vectors", "actadd"):
            vectors = self.tensors["vectors"]
        else:
            raise UserError(f"a {self.method} result adds no residual vectors")
        return {layer: vectors[i] for i, layer in enumerate(self.layers)}

    def norms(self) -> dict[int, float]:
        """Layer -> norm of the added vector ({} for LoRA)."""
        if self.method == "lora":
            return {}
        return {layer: float(v.norm()) for layer, v in self.deltas().items()}

    def student(self, lm: LoadedModel) -> tuple[LoadedModel, Callable[[], AbstractContextManager]]:
        """(model, context factory) that run the unprompted model with this injection."""
        if self.method == "lora":
            from steerlab.finetune.train import lora_model

            _, tuned = lora_model(lm, self.tensors, self.layers[0], self.config["rank"], "both")
            return tuned, nullcontext
        deltas = self.deltas()
        return lm, lambda: add(lm, deltas)

    def save(self, path: str | Path) -> Path:
        return save_record(self, path, "DistilledInjection")

    @classmethod
    def load(cls, path: str | Path) -> Distilled:
        return load_record(cls, path, "DistilledInjection")


def _save_checkpoint(
    path: Path, params: dict[str, nn.Parameter], optimiser, generator, step: int, losses, config
) -> None:
    tensors = {f"param/{name}": p.detach().clone() for name, p in params.items()}
    for name, p in params.items():
        state = optimiser.state.get(p, {})
        for key, value in state.items():
            tensors[f"adam/{name}/{key}"] = value.detach().clone().reshape(value.shape or (1,))
    tensors["generator"] = generator.get_state()
    save_result(path, tensors, {"step": step, "losses": losses, "config": config}, kind="DistillCheckpoint")


def _load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimiser, generator, config) -> tuple:
    tensors, meta = load_result(path, "DistillCheckpoint")
    if meta.get("config") != config:
        raise UserError(f"{path}: a checkpoint of another run ({meta.get('config')}); use another --out")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                value = tensors.get(f"adam/{name}/{key}")
                if value is not None:
                    state[key] = value.reshape(()) if key == "step" else value.to(p.device)
            if state:
                optimiser.state[p] = state
    generator.set_state(tensors["generator"])
    return int(meta["step"]), list(meta["losses"])


def fit(
    params: dict[str, nn.Parameter],
    loss: Callable[[list[int]], torch.Tensor],
    n_items: int,
    config: DistillConfig,
    desc: str,
    progress: bool = True,
    checkpoint: Path | None = None,
    every: int = 10,
) -> list[float]:
    """Adam on `params`; each step draws `batch_size` item indices (seeded) and minimises `loss(rows)`.
    With `checkpoint`, the parameters, Adam state, batch generator and losses are saved every `every`
    steps and a run resumes from them (giving the same result as an uninterrupted run)."""
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.Adam(list(params.values()), lr=config.lr)
    recipe = {**vars(config), "layers": list(config.layers)}
    done, losses = 0, []
    if checkpoint is not None and checkpoint.with_suffix(".json").exists():
        done, losses = _load_checkpoint(checkpoint, params, optimiser, generator, recipe)
    bar = tqdm(total=config.steps, initial=done, desc=desc, disable=not progress, unit="step")
    for step in range(done, config.steps):
        rows = torch.randperm(n_items, generator=generator)[: config.batch_size].tolist()
        optimiser.zero_grad()
        value = loss(rows)
        value.backward()
        optimiser.step()
        losses.append(float(value.detach()))
        bar.update(1)
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
        if checkpoint is not None and ((step + 1) % every == 0 or step + 1 == config.steps):
            _save_checkpoint(checkpoint, params, optimiser, generator, step + 1, losses, recipe)
    bar.close()
    return losses


def _frozen(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    state = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in state:
        p.requires_grad_(False)
    return state


def injection_params(lm: LoadedModel, config: DistillConfig) -> dict[str, nn.Parameter]:
    """Fresh parameters of a "vectors" (zeros) or "lowrank" (seeded random basis, zero coefficients)
    injection on the model's device, in float32 (float64 for a float64 model)."""
    width, k = hidden_size(lm.model), len(config.layers)
    kind = dict(device=lm.device, dtype=torch.promote_types(lm.dtype, torch.float32))
    if config.method == "vectors":
        return {"vectors": nn.Parameter(torch.zeros(k, width, **kind))}
    generator = torch.Generator().manual_seed(config.seed)
    basis = torch.randn(config.rank, width, generator=generator, dtype=torch.float64) / width**0.5
    return {
        "basis": nn.Parameter(basis.to(**kind)),
        "coef": nn.Parameter(torch.zeros(k, config.rank, **kind)),
    }


def distill(
    lm: LoadedModel,
    targets: Targets,
    config: DistillConfig,
    progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 10,
) -> Distilled:
    """Train the injection `config.method` ("vectors", "lowrank" or "lora") on KL(teacher || student)."""
    config.check(num_layers(lm.model))
    if config.method not in TRAINED:
        raise UserError(f"--methods: {config.method} is not trained; use actadd_injection")
    if not len(targets):
        raise UserError("--prompts: no training prompt")
    started = time.perf_counter()
    layers = list(config.layers)
    # Nothing changes below the lowest edited block: record the output of the block under it once.
    below = (layers[0] if config.method == "lora" else min(layers)) - 1
    lower = block_outputs(lm, targets, below) if below >= 0 else None
    if config.method == "lora":
        from peft import get_peft_model_state_dict

        from steerlab.finetune.train import lora_model

        torch.manual_seed(config.seed)  # LoRA's A matrices are drawn at random
        peft_model, tuned = lora_model(lm, {}, layers[0], config.rank, "both")
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        losses = fit(
            params,
            lambda rows: student_kl(tuned, targets, rows, lower, below).mean(),
            len(targets),
            config,
            "LoRA",
            progress,
            checkpoint,
            checkpoint_every,
        )
        tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        layers = layers[:1]
    else:
        params = injection_params(lm, config)
        probe = Distilled(config.method, layers, params, {})
        state = _frozen(lm.model)
        try:
            losses = fit(
                params,
                lambda rows: _injected_kl(lm, targets, rows, probe, lower, below),
                len(targets),
                config,
                f"{config.method} injection",
                progress,
                checkpoint,
                checkpoint_every,
            )
        finally:
            for p, flag in state:
                p.requires_grad_(flag)
        tensors = {name: p.detach().clone() for name, p in params.items()}
    return Distilled(
        config.method,
        layers,
        tensors,
        {**vars(config), "layers": list(config.layers)},
        losses,
        sum(p.numel() for p in params.values()),
        time.perf_counter() - started,
    )


def _injected_kl(
    lm: LoadedModel,
    targets: Targets,
    rows: list[int],
    injection: Distilled,
    lower: Sequence[torch.Tensor] | None = None,
    layer: int | None = None,
) -> torch.Tensor:
    """Mean KL over `rows` with the injection added (blocks above `layer` only, given `lower`)."""
    with add(lm, injection.deltas()):
        return student_kl(lm, targets, rows, lower, layer).mean()


def actadd_injection(
    lm: LoadedModel,
    system_prompt: str,
    prompts: Sequence[str],
    layers: Sequence[int],
    norms: dict[int, float] | None = None,
    progress: bool = True,
) -> Distilled:
    """The ActAdd-style baseline: mean residual at the last prompt token with the system prompt minus
    without it, at each layer; rescaled to `norms[layer]` where given."""
    from steerlab.steering.extract import difference_vector, text_read_spec

    with_prompt = [text_read_spec(lm, p, "last", system_prompt, True) for p in prompts]
    without = [text_read_spec(lm, p, "last", None, True) for p in prompts]
    vector = difference_vector(lm, with_prompt, without, list(layers), "prompt-difference", progress=progress)
    rows = []
    for layer in layers:
        v = vector.vectors[layer].float()
        if norms and layer in norms:
            v = v * (norms[layer] / float(v.norm()))
        rows.append(v)
    stacked = torch.stack(rows).to(lm.device)
    return Distilled(
        "actadd", list(layers), {"vectors": stacked}, {"layers": list(layers)}, extra={"matched_norms": norms}
    )


@torch.no_grad()
def evaluate_kl(
    lm: LoadedModel, targets: Targets, injection: Distilled | None, batch_size: int = 8
) -> list[float]:
    """KL(teacher || student) per prompt of `targets`; `injection=None`: the plain unprompted model."""
    student, context = injection.student(lm) if injection is not None else (lm, nullcontext)
    values: list[float] = []
    for start in range(0, len(targets), batch_size):
        rows = list(range(start, min(start + batch_size, len(targets))))
        with context():
            values += student_kl(student, targets, rows).tolist()
    return values


def fraction_removed(
    unprompted: Sequence[float], injected: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """1 - mean(injected KL) / mean(unprompted KL) over the same prompts, with a percentile bootstrap 95%
    interval (prompts resampled, paired)."""
    base, kl = np.asarray(unprompted, dtype=np.float64), np.asarray(injected, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(base), size=(n_boot, len(base)))
    ratios = 1 - kl[draws].mean(axis=1) / base[draws].mean(axis=1)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(1 - kl.mean() / base.mean()), float(low), float(high)


def label(result: Distilled) -> str:
    """A short name: e.g. "vectors L15", "lowrank r4 L0-29", "lora r4 L15", "actadd L15"."""
    layers = result.layers
    where = f"L{layers[0]}" if len(layers) == 1 else f"L{','.join(map(str, layers))}"
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        where = f"L{layers[0]}-{layers[-1]}"
    rank = f" r{result.config['rank']}" if result.method in ("lowrank", "lora") else ""
    return f"{result.method}{rank} {where}"


def compare_methods(
    lm: LoadedModel,
    system_prompt: str,
    train: Targets,
    test: Targets,
    configs: Sequence[DistillConfig],
    progress: bool = True,
    out: Path | None = None,
) -> tuple[list[dict], list[Distilled]]:
    """Train (or, for "actadd", extract) each configured injection on `train` and measure it on `test`.

    An "actadd" vector is rescaled, layer by layer, to the norm of the last trained "vectors" result with
    the same layers (if any). With `out`, each result is saved there and training checkpoints (and
    resumes) in `out/checkpoints`. Rows: KL(prompted || student) on the test prompts with a bootstrap CI,
    the fraction of KL(prompted || unprompted) removed with its CI, norms, parameters, seconds.
    """
    from steerlab.evaluate import bootstrap_ci

    for config in configs:
        config.check(num_layers(lm.model))
    base = evaluate_kl(lm, test, None)
    mean, low, high = bootstrap_ci(base)
    rows = [{"method": "unprompted", "kl": mean, "kl_low": low, "kl_high": high, "removed": 0.0}]
    results: list[Distilled] = []
    trained_norms: dict[tuple[int, ...], dict[int, float]] = {}
    for config in configs:
        if config.method == "actadd":
            norms = trained_norms.get(tuple(config.layers))
            result = actadd_injection(lm, system_prompt, train.prompts, config.layers, norms, progress)
            result.config = {**vars(config), "layers": list(config.layers)}
        else:
            name = f"{config.method}-r{config.rank}-L{'_'.join(map(str, config.layers))}"
            checkpoint = out / "checkpoints" / name if out is not None else None
            result = distill(lm, train, config, progress, checkpoint)
            if config.method == "vectors":
                trained_norms[tuple(config.layers)] = result.norms()
        kls = evaluate_kl(lm, test, result)
        mean, low, high = bootstrap_ci(kls)
        removed, removed_low, removed_high = fraction_removed(base, kls)
        norms = result.norms()
        rows.append(
            {
                "method": label(result),
                "kl": mean,
                "kl_low": low,
                "kl_high": high,
                "removed": removed,
                "removed_low": removed_low,
                "removed_high": removed_high,
                "norm": float(np.sqrt(sum(n**2 for n in norms.values()))) if norms else None,
                "params": result.trainable_params,
                "steps": config.steps if config.method in TRAINED else 0,
                "seconds": result.seconds,
            }
        )
        result.extra["test_kl"] = kls
        if out is not None:
            result.save(out / label(result).replace(" ", "-").replace(",", "_"))
        results.append(result)
    return rows, results


def side_by_side(
    lm: LoadedModel,
    system_prompt: str,
    prompts: Sequence[str],
    results: Sequence[Distilled],
    tokens: int = 40,
) -> list[dict]:
    """Greedy replies to `prompts`: prompted (teacher), unprompted, and unprompted under each injection."""
    from steerlab.evaluate.generation import generate

    columns = {
        "prompt": list(prompts),
        "prompted": generate(lm, prompts, max_new_tokens=tokens, system_prompt=system_prompt),
        "unprompted": generate(lm, prompts, max_new_tokens=tokens),
    }
    for result in results:
        student, context = result.student(lm)
        with context():
            columns[label(result)] = generate(student, prompts, max_new_tokens=tokens)
    return [{key: values[i] for key, values in columns.items()} for i in range(len(prompts))]
