"""Model registry, architectures and weights I/O."""

from lungsight.models.registry import MODELS, ModelSpec, build_model, get_spec
from lungsight.models.view import ViewCNN  # registers "view-cnn"

__all__ = ["MODELS", "ModelSpec", "ViewCNN", "build_model", "get_spec"]
