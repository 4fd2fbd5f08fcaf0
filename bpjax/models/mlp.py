"""The BP network: a Flax Linen MLP with free layer widths, and its logical axis names.

Shapes: ``x_BxD -> layer_0 -> ... -> layer_{L-1} -> y_BxO`` where layer ``i`` holds ``kernel[W_i, W_{i+1}]``
and ``bias[W_{i+1}]``. The model never mentions a mesh. `logical_axes` names every parameter dimension
with a *logical* axis, kept beside the parameters (never boxed into them); a strategy's rule table maps
those names to mesh axes.

Logical axis names (the vocabulary the rule tables use):
  batch      examples in a batch (activations only)
  input      the input features, dimension D
  hidden_a   outputs of layers 0, 2, 4, ... (inputs of layers 1, 3, ...)
  hidden_b   outputs of layers 1, 3, 5, ...
  output     the network's output (classes or regression targets), dimension O

Alternating ``hidden_a``/``hidden_b`` is what lets one rule (``hidden_a -> model``) lay out Megatron-style
column-parallel then row-parallel pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "elu": nn.elu,
    "leaky_relu": nn.leaky_relu,
    "identity": lambda x: x,
}

INITIALIZERS = {
    "lecun_normal": nn.initializers.lecun_normal(),
    "lecun_uniform": nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
    "glorot_normal": nn.initializers.glorot_normal(),
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "he_normal": nn.initializers.he_normal(),
    "he_uniform": nn.initializers.he_uniform(),
    "normal": nn.initializers.normal(stddev=0.01),
    "zeros": nn.initializers.zeros,
}


class MLP(nn.Module):
    """A fully connected BP network.

    Attributes:
      widths: output widths of every layer, hidden ones then the output, e.g. ``(512, 256, 10)`` for a
        40-512-256-10 net (the input width comes from the data).
      activation: name in `ACTIVATIONS`, applied after every layer but the last.
      dtype: computation dtype; param_dtype: storage dtype of the parameters, ``auto`` (float64 for a
        float64 model, else float32; see `resolve_param_dtype`) or a dtype name.
      kernel_init, bias_init: names in `INITIALIZERS`.
    """

    widths: Sequence[int]
    activation: str = "relu"
    dtype: str = "float32"
    param_dtype: str = "auto"
    kernel_init: str = "lecun_normal"
    bias_init: str = "zeros"

    @nn.compact
    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h = x_BxD
        for i, width in enumerate(self.widths):
            h = nn.Dense(
                width,
                dtype=jnp.dtype(self.dtype),
                param_dtype=jnp.dtype(resolve_param_dtype(self.dtype, self.param_dtype)),
                kernel_init=INITIALIZERS[self.kernel_init],
                bias_init=INITIALIZERS[self.bias_init],
                name=layer_name(i),
            )(h)
            if i < len(self.widths) - 1:
                h = act(h)
        return h


def resolve_param_dtype(dtype: str, param_dtype: str) -> str:
    """The parameters' dtype: ``param_dtype``, or for ``auto`` float64 when the model computes in
    float64 and float32 otherwise (so ``model.dtype=float64`` alone gives a float64 run end to end,
    while bfloat16 and float16 models keep float32 master weights)."""
    if param_dtype != "auto":
        return param_dtype
    return "float64" if jnp.dtype(dtype) == jnp.float64 else "float32"


def layer_name(i: int) -> str:
    return f"layer_{i}"


def activation_axis(i: int, num_layers: int) -> str:
    """Logical name of the output dimension of layer ``i`` (``-1`` names the input)."""
    if i < 0:
        return "input"
    if i == num_layers - 1:
        return "output"
    return "hidden_a" if i % 2 == 0 else "hidden_b"


def logical_axes(model: MLP) -> dict:
    """Logical axis names of every parameter, a tree shaped like ``params``: tuples of names.

    >>> logical_axes(MLP((512, 256, 10)))["layer_1"]
    {'kernel': ('hidden_a', 'hidden_b'), 'bias': ('hidden_b',)}
    """
    n = len(model.widths)
    return {
        layer_name(i): {
            "kernel": (activation_axis(i - 1, n), activation_axis(i, n)),
            "bias": (activation_axis(i, n),),
        }
        for i in range(n)
    }


def describe(model: MLP, input_dim: int) -> str:
    """``40-512-256-10 relu``: the network in the notation of the BP literature."""
    return "-".join(str(w) for w in (input_dim, *model.widths)) + f" {model.activation}"
