"""Model definitions. Models are plain Flax Linen modules and never mention a mesh."""

from bpjax.models.mlp import MLP, describe, layer_name, logical_axes

__all__ = ["MLP", "describe", "layer_name", "logical_axes"]
