"""The arguments of influence runs: one dataclass per command, shared by the Python API, the JSON saved
with a run (`RUN/config.json` holds the `FitArgs` that shape results) and argparse (options, defaults
and help come from the fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from functools import partial

from steerlab.errors import UserError
from steerlab.options import DTYPES, MODEL_HELP, check_at_least, check_choice, option, parse_layers

__all__ = [
    "STRATEGY_CHOICES",
    "FitArgs",
    "InfluenceArgumentError",
    "ReportArgs",
    "ScoreArgs",
    "SelfArgs",
]

STRATEGY_CHOICES = ("identity", "diagonal", "kfac", "ekfac", "block", "unit")


class InfluenceArgumentError(UserError):
    """An influence argument is out of range or names something that does not exist."""


_at_least = partial(check_at_least, error=InfluenceArgumentError)
_choice = partial(check_choice, error=InfluenceArgumentError)


@dataclass
class FitArgs:
    """What a fitted run is made of; every field but `checkpoint_every` is saved in `RUN/config.json`."""

    train: str = field(default="", metadata=option("plain-text training corpus (UTF-8)", required=True))
    model: str = field(default="smollm2-135m", metadata=option(MODEL_HELP))
    block_size: int = field(default=128, metadata=option("tokens per training sequence"))
    n_blocks: int | None = field(
        default=None, metadata=option("training sequences (default: every full block of the corpus)")
    )
    layers: list[int] | None = field(
        default=None, metadata=option("MLP layers to track, e.g. 24-29 (default: all)")
    )
    batch_size: int = field(default=8, metadata=option("sequences per batch"))
    model_dtype: str = field(default="float32", metadata=option("weights' dtype", choices=sorted(DTYPES)))
    seed: int = field(default=0, metadata=option("seed of the sampled labels (true Fisher)"))
    empirical: bool = field(default=False, metadata=option("empirical Fisher: use the data labels"))
    samples: int = field(
        default=1, metadata=option("sampled labels per token (true Fisher; more: less noise)")
    )
    capture_dtype: str | None = field(
        default=None, metadata=option("e.g. bfloat16 activations", choices=sorted(DTYPES))
    )
    diagonal: bool = field(default=False, metadata=option("also fit the diagonal Fisher"))
    block_max_params: int | None = field(
        default=None,
        metadata=option(
            "also fit the exact Fisher block of modules with at most this many weights "
            "(for --strategy block; p x p float64 each)"
        ),
    )
    unit_max_params: int | None = field(
        default=None,
        metadata=option(
            "also fit the per-output-unit Fisher blocks of modules with out x in^2 at most this "
            "(for --strategy unit)"
        ),
    )
    prefix_cache: bool = field(
        default=True,
        metadata=option(
            "recompute the layers below the first tracked one in every pass "
            "(default: cache their output on disk)",
            flag="--no-prefix-cache",
        ),
    )
    checkpoint_every: int = field(default=8, metadata=option("batches between checkpoints", saved=False))

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = parse_layers(self.layers)
        elif self.layers is not None:
            self.layers = [int(x) for x in self.layers]
        self.train = str(self.train)
        if not self.train:
            raise InfluenceArgumentError("--train: no training corpus given")
        _at_least(self.block_size, 2, "--block-size")
        _at_least(self.n_blocks, 1, "--n-blocks")
        _at_least(self.batch_size, 1, "--batch-size")
        _at_least(self.samples, 1, "--samples")
        if self.empirical and self.samples != 1:
            raise InfluenceArgumentError(
                f"--samples {self.samples}: several label draws need sampled labels; "
                "--empirical uses the data labels, the same in every draw"
            )
        _at_least(self.block_max_params, 1, "--block-max-params")
        _at_least(self.unit_max_params, 1, "--unit-max-params")
        _at_least(self.checkpoint_every, 1, "--checkpoint-every")
        _choice(self.model_dtype, DTYPES, "--model-dtype")
        _choice(self.capture_dtype, DTYPES, "--capture-dtype")

    def saved(self) -> dict:
        """The fields stored in `RUN/config.json`."""
        return {k: v for k, v in asdict(self).items() if _meta(type(self), k).get("saved", True)}

    @classmethod
    def from_saved(cls, saved: dict) -> FitArgs:
        """Read `RUN/config.json` (fields absent from older runs take their defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass
class ScoreArgs:
    """Scoring queries against a fitted run's corpus."""

    queries: str = field(default="", metadata=option("jsonl of {prompt, completion}", required=True))
    strategy: str = field(default="ekfac", metadata=option("preconditioner", choices=STRATEGY_CHOICES))
    damping: float | None = field(default=None, metadata=option("default: 0.1 x mean eigenvalue per module"))
    weight_decay: float = field(
        default=0.0, metadata=option("added to the damping: the curvature of an L2 regulariser (docs)")
    )
    rank: int | None = field(
        default=None, metadata=option("compress preconditioned query gradients to this rank")
    )
    top_k: int = field(default=10, metadata=option("keep this many highest and lowest sequences per query"))
    prefilter: int | None = field(
        default=None, metadata=option("score only this many TF-IDF candidates per query")
    )
    sample_stride: int = field(default=1, metadata=option("keep every n-th score for histograms"))
    full_scores: bool = field(
        default=False,
        metadata=option("also write every score to RUN/NAME/full.safetensors ([train, queries], streamed)"),
    )
    name: str = field(
        default="scores",
        metadata=option("stage name: score other queries or settings in the same run under another name"),
    )
    checkpoint_every: int = field(default=8, metadata=option("batches between checkpoints"))

    def __post_init__(self) -> None:
        if not str(self.queries):
            raise InfluenceArgumentError("--queries: no query file given")
        _choice(self.strategy, STRATEGY_CHOICES, "--strategy")
        _at_least(self.damping, 0.0, "--damping")
        _at_least(self.weight_decay, 0.0, "--weight-decay")
        _at_least(self.rank, 1, "--rank")
        _at_least(self.top_k, 1, "--top-k")
        _at_least(self.prefilter, 1, "--prefilter")
        if self.full_scores and self.prefilter:
            raise InfluenceArgumentError("--full-scores: not with --prefilter (it scores candidates only)")
        _at_least(self.sample_stride, 1, "--sample-stride")
        _at_least(self.checkpoint_every, 1, "--checkpoint-every")
        _stage_name(self.name)


@dataclass
class SelfArgs:
    """Self-influence of every training sequence of a fitted run."""

    strategy: str = field(default="ekfac", metadata=option("preconditioner", choices=STRATEGY_CHOICES))
    damping: float | None = field(default=None, metadata=option("default: 0.1 x mean eigenvalue per module"))
    weight_decay: float = field(
        default=0.0, metadata=option("added to the damping: the curvature of an L2 regulariser (docs)")
    )
    top_k: int = field(default=10, metadata=option("list this many highest sequences"))
    checkpoint_every: int = field(default=8, metadata=option("batches between checkpoints"))

    def __post_init__(self) -> None:
        _choice(self.strategy, STRATEGY_CHOICES, "--strategy")
        _at_least(self.damping, 0.0, "--damping")
        _at_least(self.weight_decay, 0.0, "--weight-decay")
        _at_least(self.top_k, 1, "--top-k")
        _at_least(self.checkpoint_every, 1, "--checkpoint-every")


@dataclass
class ReportArgs:
    """The HTML report of a scored run."""

    out: str | None = field(default=None, metadata=option("default: RUN/report.html"))
    show: int = field(default=3, metadata=option("sequences per sign and query"))
    png: bool = field(default=False, metadata=option("also write a static picture per query (for docs)"))
    name: str = field(default="scores", metadata=option("which score stage to report"))

    def __post_init__(self) -> None:
        _at_least(self.show, 1, "--show")
        _stage_name(self.name)


def _stage_name(name: str) -> None:
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise InfluenceArgumentError(
            f"--name: use letters, digits, '-' or '_' (a folder of the run), got {name!r}"
        )


def _meta(cls: type, name: str) -> dict:
    return next(f.metadata for f in fields(cls) if f.name == name)
