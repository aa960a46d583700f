"""Model registry, architectures and weights I/O."""

from lungsight.models.registry import MODELS, ModelSpec, build_model, get_spec

__all__ = ["MODELS", "ModelSpec", "build_model", "get_spec"]
