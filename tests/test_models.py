import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpjax import config as cfg_lib
from bpjax import strategies
from bpjax.errors import UserError
from bpjax.models import MLP, describe, logical_axes
from bpjax.models.mlp import ACTIVATIONS, INITIALIZERS, resolve_param_dtype
from bpjax.step import make_problem


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


def test_param_dtype_auto():
    assert resolve_param_dtype("float64", "auto") == "float64"
    assert resolve_param_dtype("float32", "auto") == "float32"
    assert resolve_param_dtype("bfloat16", "auto") == "float32"  # float32 master weights
    assert resolve_param_dtype("float64", "float32") == "float32"  # an explicit value wins
    assert init(MLP((8, 2), dtype="bfloat16"), 4)["layer_0"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize(("dtype", "loss_dtype"), [("bfloat16", jnp.float32), ("float16", jnp.float32)])
def test_loss_is_computed_in_at_least_float32(dtype, loss_dtype):
    c = cfg_lib.default()
    c.model.hidden = (8,)
    c.model.dtype = dtype
    problem = make_problem(c, 4, 3)
    state = problem.init(jax.random.key(0))
    batch = {"x": jnp.ones((5, 4)), "y": jnp.arange(5) % 3}
    assert problem.loss_dtype == loss_dtype
    assert problem.loss_fn(state.params, batch).dtype == loss_dtype
    assert not jax.config.jax_enable_x64  # only a float64 model turns on JAX's 64-bit mode


FLOAT64 = """
import jax, numpy as np
import bpjax
from bpjax import config as cfg_lib, data, strategies
from bpjax.step import make_problem
from bpjax.testing import assert_trees_close, train_steps

bpjax.use_cpu_devices(8)
assert not jax.config.jax_enable_x64
c = cfg_lib.default()
c.data.name = "synthetic_classification"
c.data.num_samples = 600
c.data.num_features = 24
c.model.hidden = (64, 32)
c.model.dtype = "float64"  # alone: parameters and optimizer state follow (param_dtype auto)
c.optimizer.learning_rate = 1e-2
c.train.batch_size = 64
ds = data.load(c.data, 0)
problem = make_problem(c, ds.num_features, ds.num_outputs)
assert jax.config.jax_enable_x64
batches = data.Batches(ds.x_train, ds.y_train, 64, 0)
runs = {}
for name, mesh in (("single", {"data": 1}), ("dp", {"data": 8})):
    c.parallel.mesh = mesh
    strategy = strategies.make(name, problem, c.parallel)
    init, final, losses = train_steps(strategy, batches, 5)
    floats = [x for x in jax.tree.leaves(final.opt_state) if np.issubdtype(x.dtype, np.floating)]
    assert floats and all(x.dtype == np.float64 for x in floats), [x.dtype for x in floats]
    assert all(x.dtype == np.float64 for x in jax.tree.leaves(final.params))
    assert losses.dtype == np.float64, losses.dtype
    runs[name] = final, losses
(single, single_losses), (dp, dp_losses) = runs["single"], runs["dp"]
np.testing.assert_allclose(dp_losses, single_losses, rtol=1e-12)
assert_trees_close(dp.params, single.params, rtol=1e-12, atol=1e-13, what="params")
assert_trees_close(dp.opt_state, single.opt_state, rtol=1e-12, atol=1e-13, what="opt_state")
assert abs(dp_losses[-1] - single_losses[-1]) < 1e-12
c.model.param_dtype = "float32"  # an explicit param_dtype wins
explicit = make_problem(c, ds.num_features, ds.num_outputs)
shapes = jax.eval_shape(explicit.init, jax.random.key(0))
assert all(x.dtype == np.float32 for x in jax.tree.leaves(shapes.params))
c.model.dtype, c.model.param_dtype = "float32", "auto"
make_problem(c, ds.num_features, ds.num_outputs)
assert not jax.config.jax_enable_x64  # a float32 problem after it: 64-bit mode off again
print("float64 ok")
"""


def test_float64_end_to_end_and_single_equals_dp_to_1e_12():
    """``model.dtype=float64`` alone gives float64 parameters, optimizer state and losses (JAX's 64-bit
    mode turned on by `make_problem`), and dp on 8 devices then equals single to ~1e-12. In a fresh
    process, so that the 64-bit mode never leaks into this one."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", FLOAT64], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "float64 ok"


def tensor_setup(hidden, strategy="tensor", mesh=None, replicate=()):
    c = cfg_lib.default()
    c.model.hidden = hidden
    c.parallel.strategy = strategy
    c.parallel.mesh = mesh or {"model": 6}
    c.parallel.replicate = replicate
    return c, make_problem(c, 40, 10)


def follow_the_hint(c, problem):
    """The ``parallel.replicate`` the error suggests, checked to be accepted when followed once."""
    with pytest.raises(UserError) as e:
        strategies.make(c.parallel.strategy, problem, c.parallel)
    hint = re.search(r'--set parallel.replicate="(.*?)"', str(e.value)).group(1)
    c.parallel.replicate = cfg_lib.parse_value(hint)
    strategies.make(c.parallel.strategy, problem, c.parallel)  # accepted
    return c.parallel.replicate, str(e.value)


@pytest.mark.parametrize(
    ("hidden", "strategy", "mesh", "replicate", "keep"),
    [
        # 50 is written by layer_0 and read by layer_1: both must stay whole, named at once.
        ((50, 36), "tensor", {"model": 6}, (), ("layer_0", "layer_1")),
        ((50, 36), "tensor", {"model": 6}, ("layer_1",), ("layer_0", "layer_1")),
        ((50, 36, 48), "tensor", {"model": 6}, (), ("layer_0", "layer_1")),
        ((48, 36, 50), "tensor", {"model": 6}, ("layer_3",), ("layer_2", "layer_3")),
        ((50, 36), "hybrid", {"data": 1, "model": 6}, ("layer_2",), ("layer_0", "layer_1", "layer_2")),
        ((50, 36), "hybrid", {"data": 2, "model": 4}, (), ("layer_0", "layer_1")),
    ],
)
def test_the_width_hint_is_a_fixed_point(hidden, strategy, mesh, replicate, keep):
    c, problem = tensor_setup(hidden, strategy, mesh, replicate)
    followed, message = follow_the_hint(c, problem)
    assert followed == keep, message
    assert "\n" not in message and message.startswith("layer_")


def test_a_mesh_axis_that_splits_nothing_warns_in_one_line(capsys):
    c, problem = tensor_setup((50, 36))  # following the hint keeps every layer that uses model whole
    follow_the_hint(c, problem)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: tensor: the model axis of size 6 splits no"), err
    assert "no parallelism over it" in err and "parallel.mesh.model=1" in err
    c, problem = tensor_setup((48, 36, 50))
    follow_the_hint(c, problem)  # layers 0 and 1 stay split: no warning
    assert capsys.readouterr().err == ""
    c, problem = tensor_setup((48, 36), mesh={"model": 1})
    strategies.make("tensor", problem, c.parallel)  # an axis of size 1 is no parallelism to miss
    assert capsys.readouterr().err == ""
