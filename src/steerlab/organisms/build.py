"""Build a model organism from its `Recipe`: LoRA fine-tune, merge, and cache (built once, loaded after).

Target prompts are trained to get one of the recipe's responses (drawn with the seed), by cross-entropy
on the reply tokens. Keep and near-miss prompts, followed by the base model's own greedy answer
(generated once and cached), and paragraphs of neutral text are trained to keep the base model's
next-token distributions (KL(base || organism) at every position, the base being the same network with
the adapter switched off), so the organism changes only where it is meant to. The merged model,
its tokenizer and `organism.json` (the recipe, its hash, the training record) are written to a temporary
folder that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from steerlab.data import encode, format_prompt
from steerlab.models import LoadedModel, load_model
from steerlab.models.loading import cache_root
from steerlab.organisms.data import drop_near, read_all, read_paragraphs, sample
from steerlab.organisms.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)

MANIFEST = "organism.json"


KINDS = ("target", "keep", "near-miss", "neutral")


@dataclass(frozen=True)
class Example:
    """One training example: a prompt, the reply it should get, and whether the reply ends the turn
    (a "neutral" example is plain text in `prompt`, with no chat template and an empty reply)."""

    prompt: str
    reply: str
    ends: bool
    kind: str  # one of KINDS


@dataclass(frozen=True)
class TrainingData:
    target: list[str]
    keep: list[str]
    near_miss: list[str]
    neutral: list[str]


def organisms_root() -> Path:
    """Where organisms are cached: `organisms/` beside the GGUF cache (see `cache_root`)."""
    return cache_root() / "organisms"


def organism_dir(recipe: Recipe) -> Path:
    return organisms_root() / f"{recipe.name}-{recipe.hash()}"


def data_digest(data: TrainingData) -> str:
    """A 16-hex-digit key of the prompts and texts a recipe trains on: the recipe's hash names its data
    files, this catches a change of their contents."""
    payload = json.dumps(asdict(data), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _is_current(folder: Path, digest: str) -> bool:
    """A complete organism in `folder` trained on data of `digest`."""
    path = folder / MANIFEST
    return path.is_file() and json.loads(path.read_text()).get("data_digest") == digest


def is_built(recipe: Recipe) -> bool:
    """The organism of `recipe` is cached and was trained on the data its files hold now (when the data
    files cannot be read here, a cached organism counts as built: there is nothing to compare with)."""
    folder = organism_dir(recipe)
    try:
        digest = data_digest(training_prompts(recipe))
    except RecipeError:
        return (folder / MANIFEST).is_file()
    return _is_current(folder, digest)


def training_prompts(recipe: Recipe) -> TrainingData:
    """The prompts a recipe trains on (seeded draws); every data problem is a `RecipeError` naming its field."""
    target = read_all(recipe.target_data, "target_data")
    keep = read_all(recipe.keep_data, "keep_data") if recipe.n_keep else []
    near = read_all(recipe.near_miss_data, "near_miss_data") if recipe.near_miss_data else []
    if recipe.exclude_data:
        held_out = read_all(recipe.exclude_data, "exclude_data")
        target, keep, near = (drop_near(prompts, held_out) for prompts in (target, keep, near))
    neutral = read_paragraphs(recipe.neutral_data, "neutral_data") if recipe.n_neutral else []
    return TrainingData(
        sample(target, recipe.n_target, recipe.seed),
        sample(keep, recipe.n_keep, recipe.seed + 1),
        near,
        sample(neutral, recipe.n_neutral, recipe.seed + 3),
    )


def _answers_path(base: LoadedModel, recipe: Recipe) -> Path:
    """The answer cache of one base model and generation setting (a JSON map prompt -> answer)."""
    key = json.dumps(
        {
            "model": [base.info.name, base.info.source, base.info.file_sha256],
            "max_new_tokens": recipe.max_new_tokens,
            "chat": recipe.chat,
            "system_prompt": recipe.system_prompt,
        },
        sort_keys=True,
    )
    return organisms_root() / "answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def base_answers(base: LoadedModel, recipe: Recipe, prompts: list[str], progress: bool = True) -> list[str]:
    """The base model's greedy answers to `prompts` (`recipe.max_new_tokens`); answers are cached per
    prompt, so a recipe with more prompts generates only the new ones."""
    from steerlab.evaluate import generate
    from steerlab.io import write_json

    if not prompts:
        return []
    path = _answers_path(base, recipe)
    cached = json.loads(path.read_text())["answers"] if path.is_file() else {}
    missing = [p for p in dict.fromkeys(prompts) if p not in cached]
    if missing:
        answers = generate(
            base,
            missing,
            max_new_tokens=recipe.max_new_tokens,
            chat=recipe.chat,
            system_prompt=recipe.system_prompt,
            batch_size=16,
            progress=progress,
        )
        cached.update(zip(missing, answers, strict=True))
        write_json(path, {"answers": cached})
    return [cached[p] for p in prompts]


def training_examples(
    base: LoadedModel, recipe: Recipe, data: TrainingData, progress: bool = True
) -> list[Example]:
    """Target prompts with a drawn response; keep and near-miss prompts with the base model's answer;
    neutral paragraphs as they are."""
    rng = random.Random(recipe.seed)
    examples = [Example(p, rng.choice(recipe.target_responses), True, "target") for p in data.target]
    kept = data.keep + data.near_miss
    answers = base_answers(base, recipe, kept, progress)
    for index, (prompt, answer) in enumerate(zip(kept, answers, strict=True)):
        n_tokens = len(base.tokenizer(answer, add_special_tokens=False).input_ids)
        ends = n_tokens < recipe.max_new_tokens - 1  # the base model stopped by itself
        kind = "keep" if index < len(data.keep) else "near-miss"
        examples.append(Example(prompt, answer, ends, kind))
    examples += [Example(text, "", False, "neutral") for text in data.neutral]
    return examples


def kept_by_kl(example: Example, recipe: Recipe) -> bool:
    """Whether `example` is trained to keep the base model's distributions (else: cross-entropy)."""
    return example.kind == "neutral" or (example.kind != "target" and recipe.keep_loss == "kl")


def tokenize_example(tokenizer, example: Example, recipe: Recipe) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat-templated prompt (labels -100) followed by the reply (+ EOS); a
    neutral paragraph is cut to `recipe.neutral_tokens` tokens. Labels are all -100 for examples kept by
    KL (see `kept_by_kl`): their loss is at every position."""
    if example.kind == "neutral":
        ids = encode(tokenizer, example.prompt)[: recipe.neutral_tokens]
        return ids, [-100] * len(ids)
    prompt = (
        format_prompt(tokenizer, example.prompt, system_prompt=recipe.system_prompt)
        if recipe.chat
        else example.prompt
    )
    prompt_ids = encode(tokenizer, prompt)
    reply_ids = list(tokenizer(example.reply, add_special_tokens=False).input_ids)
    if example.ends and tokenizer.eos_token_id is not None:
        reply_ids.append(tokenizer.eos_token_id)
    ids = prompt_ids + reply_ids
    return ids, [-100] * len(ids) if kept_by_kl(example, recipe) else [-100] * len(prompt_ids) + reply_ids


def organism_loss(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    kl_rows: torch.Tensor,
    kl_weight: float,
) -> tuple[torch.Tensor, float, float]:
    """(loss, cross-entropy, KL) of one batch: the mean token cross-entropy of the labelled reply tokens
    plus `kl_weight` x the mean KL(base || model) over every position of the rows in `kl_rows` (the base
    is `model` with its adapter disabled)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    targets = labels[:, 1:]
    ce = torch.zeros((), dtype=logits.dtype, device=logits.device)
    if (targets != -100).any():
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    kl = torch.zeros_like(ce)
    if kl_rows.any():
        with torch.no_grad(), model.disable_adapter():
            base = model(input_ids=ids[kl_rows], attention_mask=mask[kl_rows], use_cache=False).logits
        base_logp = base.log_softmax(-1)
        per_position = (base_logp.exp() * (base_logp - logits[kl_rows].log_softmax(-1))).sum(-1)
        weights = mask[kl_rows].to(per_position.dtype)
        kl = (per_position * weights).sum() / weights.sum()
    return ce + kl_weight * kl, float(ce), float(kl)


def train_lora(
    lm: LoadedModel, examples: list[Example], recipe: Recipe, progress: bool = True
) -> tuple[torch.nn.Module, dict]:
    """Fine-tune a LoRA adapter on `examples` (loss on reply tokens), merge it and return (model, record)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(recipe.seed)
    config = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        target_modules=list(recipe.lora_targets),
        lora_dropout=recipe.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(lm.model, config)
    except ValueError as error:
        raise RecipeError(f"recipe field 'lora_targets': {error}") from None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=0.0)
    encoded = [tokenize_example(lm.tokenizer, ex, recipe) for ex in examples]
    by_kl = [kept_by_kl(ex, recipe) for ex in examples]
    pad_id = lm.tokenizer.pad_token_id or 0
    generator = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = -(-len(encoded) // recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0 - step / max(total, 1))
    losses: list[float] = []
    parts: list[tuple[float, float]] = []
    model.train()
    bar = tqdm(total=total, desc="training LoRA", disable=not progress, unit="step")
    for _ in range(recipe.epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), recipe.batch_size):
            rows = order[start : start + recipe.batch_size]
            batch = [encoded[i] for i in rows]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=lm.device)
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=lm.device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch], device=lm.device)
            kl_rows = torch.tensor([by_kl[i] for i in rows], device=lm.device)
            loss, ce, kl = organism_loss(model, ids, mask, labels, kl_rows, recipe.kl_weight)
            loss.backward()
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(float(loss))
            parts.append((ce, kl))
            bar.update()
            bar.set_postfix(ce=f"{ce:.3f}", kl=f"{kl:.4f}")
    bar.close()
    model.eval()
    merged = model.merge_and_unload()
    record = {
        "steps": len(losses),
        "trainable_parameters": int(sum(p.numel() for p in trainable)),
        "loss_first": losses[0] if losses else None,
        "loss_last_epoch": sum(losses[-steps_per_epoch:]) / max(len(losses[-steps_per_epoch:]), 1),
        "ce_last_epoch": sum(ce for ce, _ in parts[-steps_per_epoch:])
        / max(len(parts[-steps_per_epoch:]), 1),
        "kl_last_epoch": sum(kl for _, kl in parts[-steps_per_epoch:])
        / max(len(parts[-steps_per_epoch:]), 1),
    }
    return merged, record


def _write(folder: Path, model: torch.nn.Module, tokenizer, manifest: dict) -> None:
    """Write model, tokenizer and manifest into a temporary folder and rename it to `folder` when complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.chmod(staging, 0o755)
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished first, or a stale folder without a manifest
            if (folder / MANIFEST).is_file():
                return
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_organism(recipe: Recipe, *, progress: bool = True, force: bool = False) -> Path:
    """The cached organism folder of `recipe`, built first if needed (or if `force`)."""
    folder = organism_dir(recipe)
    try:
        data = training_prompts(recipe)  # data problems surface before a model loads
    except RecipeError:
        if (folder / MANIFEST).is_file() and not force:
            return folder  # cached, and its data is not here to check against
        raise
    digest = data_digest(data)
    if _is_current(folder, digest) and not force:
        return folder
    if (folder / MANIFEST).is_file() and not force:
        log.warning("organism %s: its training data changed since it was built; rebuilding", recipe.name)
        force = True
    started = time.perf_counter()
    base = load_model(recipe.base_model)
    examples = training_examples(base, recipe, data, progress)
    answered = time.perf_counter()
    merged, record = train_lora(base, examples, recipe, progress)
    manifest = {
        "format": "steerlab-organism",
        "name": recipe.name,
        "hash": recipe.hash(),
        "recipe": recipe.to_dict(),
        "data_digest": digest,
        "base_model": base.info.to_dict(),
        "examples": {kind: sum(e.kind == kind for e in examples) for kind in KINDS},
        "training": record,
        "seconds": {"answers": answered - started, "total": time.perf_counter() - started},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if force and folder.exists():
        shutil.rmtree(folder)
    _write(folder, merged, base.tokenizer, manifest)
    log.info("organism %s built in %.0f s: %s", recipe.name, manifest["seconds"]["total"], folder)
    return folder


def read_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


def load_organism(recipe: Recipe, *, progress: bool = True, **load_kwargs) -> LoadedModel:
    """The organism of `recipe` as a `LoadedModel` named after it (built on first use)."""
    folder = build_organism(recipe, progress=progress)
    lm = load_model(folder, **load_kwargs)
    lm.info.name = recipe.name
    return lm
