"""`steerlab serve` as a library function over its argument dataclass."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from steerlab.errors import UserError
from steerlab.models import LoadedModel
from steerlab.options import ModelArgs, check_at_least, option

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServeArgs(ModelArgs):
    vectors: str | os.PathLike | None = field(
        default=None, metadata=option("folder of saved vectors (NAME.safetensors + NAME.json) to choose from")
    )
    results: str | os.PathLike | None = field(
        default=None, metadata=option("folder of steering runs and reports to browse in the page")
    )
    host: str = field(
        default="127.0.0.1",
        metadata=option("address to listen on; anything but a loopback address exposes the model to others"),
    )
    port: int = field(default=8765, metadata=option("TCP port"))

    def __post_init__(self) -> None:
        check_at_least(self.port, 1, "--port")
        if self.port > 65535:
            raise UserError(f"--port: at most 65535, got {self.port}")
        for name in ("vectors", "results"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise UserError(f"--{name}: {value} is not a folder")


def serve(args: ServeArgs, lm: LoadedModel | None = None) -> None:
    """Load the model (unless given), then serve the playground until interrupted."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"steerlab serve needs the serve extra ({error}): pip install 'steerlab[serve]'"
        ) from None
    from steerlab.playground.core import Playground
    from steerlab.playground.server import is_local, serve, url

    lm = lm or args.load()
    playground = Playground(lm, vectors_dir=args.vectors, results_dir=args.results)
    if not is_local(args.host):
        log.warning(
            "--host %s: the playground is reachable from other machines; anyone who can reach it can run "
            "the model and read the --results folder",
            args.host,
        )
    print(
        f"steerlab playground: {url(args.host, args.port)}  (model {lm.info.name}; Ctrl-C stops it)",
        flush=True,
    )
    try:
        serve(playground, args.host, args.port)
    finally:
        playground.close()
