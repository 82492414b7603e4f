"""A local steering playground in the browser (`steerlab serve`): choose or extract a vector, set the
layer, strength and positions, and watch unsteered and steered generations stream side by side, with
metrics, sweeps and saved results. The web server needs the `serve` extra (starlette, uvicorn).

`Playground` (the model, its worker and the page's state) and `running` (serve on a background
thread) are imported on first use, so `steerlab --help` loads neither torch's generation code nor the
web stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Playground", "running"]


def __getattr__(name: str) -> Any:
    if name == "Playground":
        from steerlab.playground.core import Playground

        return Playground
    if name == "running":
        from steerlab.playground.server import running

        return running
    raise AttributeError(name)
