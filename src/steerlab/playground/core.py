"""The playground's state, independent of HTTP: one loaded model behind a `ModelWorker`, the vectors the
page can choose from, extraction, side-by-side generation, metrics and background sweeps.

Everything that runs the model is a job on the worker, so requests queue and hooks never overlap.
"""

from __future__ import annotations

import itertools
import logging
import re
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerlab.errors import UserError
from steerlab.models import LoadedModel
from steerlab.models.architectures import num_layers
from steerlab.playground.settings import (
    MAX_NEW_TOKENS,
    Setting,
    SettingError,
    bool_field,
    int_field,
    parse_setting,
    text_field,
)
from steerlab.playground.streaming import Generation, stream_generation, token_logprobs
from steerlab.steering import SteeringVector

log = logging.getLogger(__name__)

SIDES = ("unsteered", "steered")
UPLOAD_SUFFIXES = (".json", ".jsonl", ".txt")
MAX_UPLOAD_CHARS = 5_000_000
EXTRACT_SOURCES = ("builtin:sentiment", "builtin:sentiment-ab")
METRIC_DATA = {
    "builtin:sentiment-prompts": "p(positive) over next-word sentiment words",
    "builtin:sentiment-ab": "p(cheerful answer) on A/B items",
}
NEUTRAL = "builtin:neutral-text"


@dataclass
class VectorEntry:
    id: str
    name: str
    vector: SteeringVector
    origin: str  # "folder" or "extracted"

    def describe(self) -> dict[str, Any]:
        v = self.vector
        meta = v.metadata
        return {
            "id": self.id,
            "name": self.name,
            "origin": self.origin,
            "method": str(meta.get("method", "")),
            "model": str((meta.get("model") or {}).get("name", "")),
            "source": str(meta.get("source", "")),
            "layers": v.layers,
            "norms": {str(layer): v.norm(layer) for layer in v.layers},
            "residual_norms": {str(layer): v.residual_norm(layer) for layer in v.layers},
        }


@dataclass
class SweepJob:
    """A sweep running in the background: progress, rows when done, or the error."""

    id: str
    total: int
    done: int = 0
    state: str = "queued"  # queued | running | done | error
    error: str = ""
    rows: list[dict] = field(default_factory=list)
    x: str = "fraction"
    images: dict[str, bytes] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "error": self.error,
        }


def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(name).stem).strip("-")
    return stem[:60] or "upload"


class Playground:
    """The model, its worker and the vectors, sweeps and results the page works with."""

    def __init__(
        self,
        lm: LoadedModel,
        vectors_dir: str | Path | None = None,
        results_dir: str | Path | None = None,
    ) -> None:
        from steerlab.playground.worker import ModelWorker

        self.lm = lm
        self.worker = ModelWorker(lm.model)
        self.vectors_dir = Path(vectors_dir) if vectors_dir else None
        self.results_dir = Path(results_dir).resolve() if results_dir else None
        self._tmp = tempfile.TemporaryDirectory(prefix="steerlab-playground-")
        self.workdir = Path(self._tmp.name)
        self.vectors: dict[str, VectorEntry] = {}
        self.unusable: list[dict[str, str]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._metric_cache: dict[tuple, Any] = {}
        self.sweeps: dict[str, SweepJob] = {}
        self.scan_vectors()

    def close(self) -> None:
        self.worker.close()
        self._tmp.cleanup()

    # --- vectors ---------------------------------------------------------------------------------------

    def _register(self, name: str, vector: SteeringVector, origin: str) -> VectorEntry:
        with self._lock:
            entry = VectorEntry(f"v{next(self._ids)}", name, vector, origin)
            self.vectors[entry.id] = entry
        return entry

    def scan_vectors(self) -> None:
        """(Re)load every `*.safetensors` + `.json` vector in the vectors folder; list the unusable ones."""
        if self.vectors_dir is None:
            return
        if not self.vectors_dir.is_dir():
            raise UserError(f"--vectors: {self.vectors_dir} is not a folder")
        known = {e.name for e in self.vectors.values() if e.origin == "folder"}
        self.unusable = []
        for path in sorted(self.vectors_dir.glob("*.safetensors")):
            name = path.stem
            try:
                vector = SteeringVector.load(path.with_suffix(""))
                vector.check_compatible(self.lm.model)
            except (UserError, OSError) as error:
                self.unusable.append({"name": name, "error": str(error)})
                continue
            if name not in known:
                self._register(name, vector, "folder")

    def lookup(self, vector_id: str, option: str = "vector") -> SteeringVector:
        entry = self.vectors.get(vector_id)
        if entry is None:
            raise SettingError(f"{option}: no vector {vector_id!r}; choose one from the list")
        return entry.vector

    def state(self) -> dict[str, Any]:
        return {
            "model": {"name": self.lm.info.name, "layers": num_layers(self.lm.model)},
            "vectors": [e.describe() for e in self.vectors.values()],
            "unusable": self.unusable,
            "extract_sources": list(EXTRACT_SOURCES),
            "metric_data": METRIC_DATA,
            "results": self.results_dir is not None,
            "queued": self.worker.pending,
        }

    def setting(self, data: Any) -> Setting:
        return parse_setting(data, self.lookup, self.lm)

    # --- extraction ------------------------------------------------------------------------------------

    def save_upload(self, upload: Any) -> Path:
        """Write an uploaded file {"filename", "content"} into the work folder (nothing is executed)."""
        if not isinstance(upload, dict):
            raise SettingError("upload: expected {filename, content}")
        filename = text_field(upload, "filename", "", limit=300)
        content = text_field(upload, "content", "", limit=MAX_UPLOAD_CHARS)
        suffix = Path(filename).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise SettingError(f"upload: {filename!r} should end in {', '.join(UPLOAD_SUFFIXES)}")
        folder = self.workdir / "uploads" / f"u{next(self._ids)}"
        folder.mkdir(parents=True)
        path = folder / f"{_safe_stem(filename)}{suffix}"
        path.write_text(content, encoding="utf-8")
        return path

    def extract(self, data: Any) -> Future:
        """Validate an extraction request now; queue the extraction. The future holds the new entry."""
        from steerlab.options import parse_layers
        from steerlab.steering.commands import METHODS, ExtractArgs
        from steerlab.steering.commands import extract as run_extract

        if not isinstance(data, dict):
            raise SettingError("extract: expected a JSON object")
        source = text_field(data, "source", "builtin:sentiment", limit=100)
        shown = source
        if source == "upload":
            upload = data.get("upload")
            path = self.save_upload(upload)
            shown = upload["filename"]
            spec: str | Path = path
        elif source in EXTRACT_SOURCES:
            spec = source
        else:
            raise SettingError(f"source: {source!r} is not one of {', '.join(EXTRACT_SOURCES)} or upload")
        layers = parse_layers(text_field(data, "layers", "", limit=200), "layers")
        if layers is None:
            raise SettingError("layers: give the layers to read, e.g. 2,3")
        method = text_field(data, "method", "mean-diff", limit=40)
        if method not in METHODS:
            raise SettingError(f"method: {method!r} is not one of {', '.join(METHODS)}")
        name = text_field(data, "name", "", limit=100) or f"{Path(str(shown)).stem}-{method}"
        out = self.workdir / "vectors" / f"x{next(self._ids)}"
        args = ExtractArgs(data=spec, layers=layers, out=out, method=method, progress=False)

        def job() -> VectorEntry:
            try:
                vector = run_extract(args, lm=self.lm)
            except UserError as error:
                if source != "upload":
                    raise
                raise UserError(str(error).replace(str(spec), str(shown))) from None
            return self._register(name, vector, "extracted")

        return self.worker.submit(job)

    # --- generation ------------------------------------------------------------------------------------

    def generation_request(self, data: Any) -> dict[str, Any]:
        """Validate a generation request: {setting, prompt, max_new_tokens, chat, system_prompt, sides}."""
        if not isinstance(data, dict):
            raise SettingError("request: expected a JSON object")
        prompt = text_field(data, "prompt", "")
        if not prompt.strip():
            raise SettingError("prompt: type a prompt")
        sides = data.get("sides", list(SIDES))
        if not isinstance(sides, list) or not sides or any(s not in SIDES for s in sides):
            raise SettingError(f"sides: expected a non-empty list of {', '.join(SIDES)}")
        system = text_field(data, "system_prompt", "") or None
        chat = bool_field(data, "chat", True)
        max_new_tokens = int_field(data, "max_new_tokens", 48, low=1)
        if max_new_tokens > MAX_NEW_TOKENS:
            raise SettingError(f"max_new_tokens: at most {MAX_NEW_TOKENS}, got {max_new_tokens}")
        if system and not chat:
            raise SettingError("system_prompt: only used with the chat template (tick chat)")
        return {
            "setting": self.setting(data.get("setting")),
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
            "chat": chat,
            "system_prompt": system,
            "sides": [s for s in SIDES if s in sides],
            "shading": bool_field(data, "shading", True),
        }

    def run_generation(
        self,
        request: dict[str, Any],
        emit: Callable[[dict], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> dict[str, Generation]:
        """The generations of `request` (from `generation_request`), side by side; runs on the worker.

        Emits {"side", "token", "piece"} per token, {"side", "done", "text", "ids"} per side, then
        {"shading": {side: [log p_steered - log p_unsteered per token]}}.
        """
        setting: Setting = request["setting"]
        results: dict[str, Generation] = {}
        for side in request["sides"]:
            emit({"side": side, "start": True})
            results[side] = stream_generation(
                self.lm,
                request["prompt"],
                setting.intervention(self.lm) if side == "steered" else None,
                max_new_tokens=request["max_new_tokens"],
                chat=request["chat"],
                system_prompt=request["system_prompt"],
                on_token=lambda token, piece, side=side: emit({"side": side, "token": token, "piece": piece}),
                cancelled=cancelled,
            )
            emit({"side": side, "done": True, "text": results[side].text, "ids": results[side].ids})
        if request["shading"]:
            shading = {}
            for side, result in results.items():
                plain = token_logprobs(self.lm, result.prompt_ids, result.ids)
                with setting.intervention(self.lm):
                    steered = token_logprobs(self.lm, result.prompt_ids, result.ids)
                shading[side] = [s - p for s, p in zip(steered, plain)]
            emit({"shading": shading})
        return results

    # --- metrics ---------------------------------------------------------------------------------------

    def _prepared(self, data: str, limit: int | None):
        """The behaviour metric and the neutral texts, tokenised (and scored unsteered) once per data."""
        from steerlab.data import load_builtin
        from steerlab.data.sources import load_dataset
        from steerlab.evaluate import prepare_neutral
        from steerlab.steering.metrics import behaviour_metric

        key = (data, limit)
        if key not in self._metric_cache:
            dataset = load_dataset(data, option="data")
            if limit is not None:
                dataset = dataset[:limit]
            words = load_builtin("sentiment-words") if data == "builtin:sentiment-prompts" else None
            metric = behaviour_metric(self.lm, dataset, words)
            if "neutral" not in self._metric_cache:
                self._metric_cache["neutral"] = prepare_neutral(self.lm, load_builtin("neutral-text"))
            self._metric_cache[key] = (metric, self._metric_cache["neutral"])
        return self._metric_cache[key]

    def metrics_request(self, data: Any) -> tuple[Setting, str, int | None]:
        if not isinstance(data, dict):
            raise SettingError("request: expected a JSON object")
        which = text_field(data, "data", "builtin:sentiment-prompts", limit=100)
        if which not in METRIC_DATA:
            raise SettingError(f"data: {which!r} is not one of {', '.join(METRIC_DATA)}")
        return self.setting(data.get("setting")), which, int_field(data, "limit", None, low=1)

    @torch.no_grad()
    def run_metrics(self, setting: Setting, data: str, limit: int | None) -> dict[str, Any]:
        """The behaviour score (with its 95% CI), perplexity and KL on neutral text, unsteered and steered."""
        from steerlab.evaluate import side_effects
        from steerlab.steering.metrics import summarise

        metric, neutral = self._prepared(data, limit)
        out: dict[str, Any] = {"data": data, "label": METRIC_DATA[data], **setting.describe()}
        for side in SIDES:
            if side == "steered":
                with setting.intervention(self.lm):
                    row, effects = summarise(metric(self.lm)), side_effects(self.lm, neutral)
            else:
                row, effects = summarise(metric(self.lm)), side_effects(self.lm, neutral)
            out[side] = {**row, "perplexity": effects.perplexity, "kl": effects.kl}
        return out

    # --- sweeps ----------------------------------------------------------------------------------------

    def start_sweep(self, data: Any) -> SweepJob:
        """Validate a sweep request and run it in the background, one layer per worker job (so generation
        requests are served between layers). Rows equal `steering.sweep.sweep` over the whole grid."""
        from steerlab.hooks import Positions
        from steerlab.options import parse_floats, parse_layers
        from steerlab.steering.sweep import Grid

        if not isinstance(data, dict):
            raise SettingError("sweep: expected a JSON object")
        vector = self.lookup(text_field(data, "vector", ""), "vector")
        layers_text = text_field(data, "layers", "", limit=200).strip()
        layers = parse_layers(layers_text, "layers") if layers_text else vector.layers
        layers = [vector.stored_layer(layer) for layer in layers]
        kind = text_field(data, "strengths_kind", "fraction", limit=20)
        if kind not in ("fraction", "multiplier"):
            raise SettingError("strengths_kind: fraction or multiplier")
        strengths = parse_floats(text_field(data, "strengths", "", limit=500), "strengths")
        grid = (
            Grid(layers, fractions=strengths) if kind == "fraction" else Grid(layers, multipliers=strengths)
        )
        settings = grid.settings(vector)
        positions = Positions.parse(text_field(data, "positions", "all", limit=200))
        which = text_field(data, "data", "builtin:sentiment-prompts", limit=100)
        if which not in METRIC_DATA:
            raise SettingError(f"data: {which!r} is not one of {', '.join(METRIC_DATA)}")
        limit = int_field(data, "limit", None, low=1)
        controls = bool_field(data, "controls", True)
        per_setting = 2 if controls else 1
        job = SweepJob(f"s{next(self._ids)}", total=len(layers) + per_setting * len(settings), x=kind)
        self.sweeps[job.id] = job
        chunks = [Grid([layer], **{f"{kind}s": strengths}) for layer in layers]

        def run_chunk(chunk: Grid) -> list[dict]:
            from steerlab.steering.sweep import sweep

            metric, neutral = self._prepared(which, limit)

            def counted(model):
                scores = metric(model)
                job.done += 1
                return scores

            job.state = "running"
            return sweep(
                self.lm,
                vector,
                counted,
                chunk,
                positions=positions,
                neutral=neutral,
                controls=controls,
                progress=False,
            )

        def drive() -> None:
            rows: list[dict] = []
            try:
                for chunk in chunks:
                    rows += self.worker.submit(run_chunk, chunk).result()
                job.rows = [r for r in rows if r["vector"] == "none"] + [
                    r for r in rows if r["vector"] != "none"
                ]
                job.images = sweep_images(job.rows, job.x)
                job.state = "done"
            except UserError as error:
                job.error, job.state = str(error), "error"
            except Exception as error:  # noqa: BLE001 - shown in the page, logged with its traceback
                log.exception("sweep %s failed", job.id)
                job.error, job.state = f"{type(error).__name__}: {error}", "error"

        threading.Thread(target=drive, name=f"sweep-{job.id}", daemon=True).start()
        return job

    # --- results folders -------------------------------------------------------------------------------

    def result_path(self, relative: str) -> Path:
        """A file under the results folder; anything outside it (.., links out, absolute paths) is refused."""
        if self.results_dir is None:
            raise SettingError("results: start the server with --results DIR to browse results")
        path = (self.results_dir / relative).resolve()
        if not path.is_relative_to(self.results_dir) or not path.is_file():
            raise SettingError(f"results: no file {relative!r} in the results folder")
        return path

    def list_results(self) -> list[dict[str, Any]]:
        """Folders under the results folder holding a report, tables or figures (at most 4 levels deep)."""
        if self.results_dir is None:
            return []
        kinds = (".html", ".csv", ".png", ".json")
        runs = []
        for folder in sorted({p.parent for p in self.results_dir.rglob("*") if p.suffix in kinds}):
            depth = len(folder.relative_to(self.results_dir).parts)
            if depth > 4 or not folder.resolve().is_relative_to(self.results_dir):
                continue
            files = sorted(
                str(p.relative_to(self.results_dir))
                for p in folder.iterdir()
                if p.is_file() and p.suffix in kinds and p.resolve().is_relative_to(self.results_dir)
            )
            if files:
                runs.append({"folder": str(folder.relative_to(self.results_dir)) or ".", "files": files})
        return runs


def sweep_images(rows: list[dict], x: str) -> dict[str, bytes]:
    """The sweep's curves (`steering.plots.score_vs_fraction`) and a layer x strength heat-map, as PNG."""
    from steerlab.report.figures import figure_png
    from steerlab.steering import plots
    from steerlab.steering.plots import score_heatmap

    split = rows[0]["split"]
    return {
        "curves": figure_png(plots.score_vs_fraction(rows, split, "score", x=x)),
        "heatmap": figure_png(score_heatmap(rows, x)),
    }
