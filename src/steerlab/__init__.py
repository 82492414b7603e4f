"""steerlab: steer, red-team and analyse language models through their internals."""

from steerlab.models import LoadedModel, load_model

__version__ = "0.1.0"
__all__ = ["LoadedModel", "__version__", "load_model"]
