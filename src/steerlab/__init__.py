"""steerlab: steer, red-team and analyse language models through their internals."""

import importlib

from steerlab import organisms as _organisms  # noqa: F401  (registers the organisms with load_model)
from steerlab.models import LoadedModel, load_model

__version__ = "0.1.0"
__all__ = ["LoadedModel", "__version__", "load_model"]

_SUBPACKAGES = {
    "data",
    "evaluate",
    "hessian",
    "hooks",
    "influence",
    "models",
    "organisms",
    "report",
    "steering",
}


def __getattr__(name: str):
    """`steerlab.steering`, `steerlab.evaluate`, ... are imported on first use."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f"steerlab.{name}")
    raise AttributeError(f"module 'steerlab' has no attribute {name!r}")
