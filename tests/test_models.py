import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpjax.models import MLP, describe, logical_axes
from bpjax.models.mlp import ACTIVATIONS, INITIALIZERS


def init(model, d=40):
    return model.init(jax.random.key(0), jnp.zeros((1, d)))["params"]


def test_free_widths_and_shapes():
    model = MLP((512, 256, 10))
    params = init(model)
    assert jax.tree.map(jnp.shape, params) == {
        "layer_0": {"kernel": (40, 512), "bias": (512,)},
        "layer_1": {"kernel": (512, 256), "bias": (256,)},
        "layer_2": {"kernel": (256, 10), "bias": (10,)},
    }
    assert model.apply({"params": params}, jnp.ones((7, 40))).shape == (7, 10)
    assert describe(model, 40) == "40-512-256-10 relu"


@pytest.mark.parametrize("widths", [(10,), (8, 3), (16, 8, 4, 2)])
def test_logical_axes_name_every_dimension_of_every_parameter(widths):
    model = MLP(widths)
    params = init(model, 5)
    axes = logical_axes(model)
    is_names = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_names) == jax.tree.structure(params)
    for names, p in zip(jax.tree.leaves(axes, is_leaf=is_names), jax.tree.leaves(params), strict=True):
        assert len(names) == p.ndim
    # Parameters stay plain arrays: no boxing.
    assert all(isinstance(p, jax.Array) for p in jax.tree.leaves(params))


def test_logical_axes_alternate_for_megatron_pairs():
    axes = logical_axes(MLP((8, 8, 8, 3)))
    assert axes["layer_0"]["kernel"] == ("input", "hidden_a")
    assert axes["layer_1"]["kernel"] == ("hidden_a", "hidden_b")
    assert axes["layer_2"]["kernel"] == ("hidden_b", "hidden_a")
    assert axes["layer_3"]["kernel"] == ("hidden_a", "output")
    assert axes["layer_3"]["bias"] == ("output",)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activations(activation):
    model = MLP((4, 2), activation=activation)
    out = model.apply({"params": init(model, 3)}, jnp.linspace(-2, 2, 6).reshape(2, 3))
    assert out.shape == (2, 2) and bool(jnp.isfinite(out).all())


def test_activation_is_applied_between_layers_only():
    # With identity, a 2-layer net is linear; with relu it is not.
    x = jnp.array([[1.0, -1.0]])
    lin = MLP((3, 2), activation="identity")
    p = init(lin, 2)
    out = lin.apply({"params": p}, x) + lin.apply({"params": p}, -x)
    np.testing.assert_allclose(out, 2 * lin.apply({"params": p}, 0 * x), atol=1e-6)
    relu = MLP((3, 2), activation="relu")
    out = relu.apply({"params": p}, x) + relu.apply({"params": p}, -x)
    assert not np.allclose(out, 2 * relu.apply({"params": p}, 0 * x), atol=1e-6)


def test_dtypes():
    model = MLP((8, 2), dtype="bfloat16", param_dtype="float32")
    params = init(model, 4)
    assert params["layer_0"]["kernel"].dtype == jnp.float32
    assert model.apply({"params": params}, jnp.ones((1, 4))).dtype == jnp.bfloat16
    half = MLP((8, 2), param_dtype="bfloat16")
    assert init(half, 4)["layer_0"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("scheme", sorted(INITIALIZERS))
def test_init_schemes(scheme):
    k = init(MLP((256, 2), kernel_init=scheme), 64)["layer_0"]["kernel"]
    if scheme == "zeros":
        assert not k.any()
    else:
        std = float(k.std())
        expected = {"normal": 0.01}.get(scheme, None)
        assert std > 0 and (expected is None or abs(std - expected) < 0.002)
    if scheme.startswith("he"):
        assert abs(float(k.std()) - np.sqrt(2 / 64)) < 0.02


def test_init_depends_only_on_the_key():
    a = init(MLP((16, 4)))
    b = init(MLP((16, 4)))
    c = MLP((16, 4)).init(jax.random.key(1), jnp.zeros((1, 40)))["params"]
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
    assert not bool((a["layer_0"]["kernel"] == c["layer_0"]["kernel"]).all())
