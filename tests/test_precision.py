"""The mixed-precision policy (``model.precision``, docs/gpu.md) as the compiled step sees it.

bf16 in every registered strategy: parameters and optimizer state float32, every matmul of the lowered
step (forward and backward) on bfloat16 operands, the loss float32; where gradients cross devices, the
compiled collectives carry float32. fp16: the static loss scale keeps small gradients from underflowing
and is divided out again. ``train.matmul_precision`` reaches the matmuls. (The equivalence tests keep
float32 at ``highest``: tests/test_equivalence.py.)
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_equivalence import make_config

from bpjax import data, strategies
from bpjax.step import make_problem

DOT = re.compile(r"dot_general.*: \((tensor<[^>]*>), (tensor<[^>]*>)\)")


@pytest.fixture(scope="module")
def dataset():
    return data.load(make_config().data, seed=0)


def build(dataset, name="single", mesh=None, settings=None, optimizer="adam", **keys):
    c = make_config(optimizer)
    c.parallel.strategy = name
    c.parallel.mesh = dict(mesh or {})
    for key, value in (settings or {}).items():
        c.parallel[key] = value
    for dotted, value in keys.items():
        section, key = dotted.split("__")
        c[section][key] = value
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    strategy = strategies.make(name, problem, c.parallel)
    batches = data.Batches(dataset.x_train, dataset.y_train, c.train.batch_size, c.seed)
    return problem, strategy, strategy.shard_batch(batches.stack(0, 1))


def floating_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_bf16_policy_in_every_strategy(name, dataset):
    example = strategies.REGISTRY[name].examples[0]
    opt = example.optimizers[0]
    _, strategy, batch = build(dataset, name, example.mesh, example.settings, opt, model__precision="bf16")
    state = jax.eval_shape(strategy.init, jax.random.key(0))
    assert floating_dtypes(state) == {"float32"}, f"{name}: state dtypes {floating_dtypes(state)}"
    lowered = strategy.step.lower(state, batch)
    dots = DOT.findall(lowered.as_text())
    assert dots, f"{name}: no matmul in the lowered step"
    wide = [d for d in dots if not all(t.endswith("xbf16>") for t in d)]
    assert not wide, f"{name}: matmuls not in bfloat16: {wide[:3]}"
    _, metrics = jax.eval_shape(strategy.step, state, batch)
    assert metrics["loss"].dtype == jnp.float32


@pytest.mark.parametrize(
    ("name", "mesh"), [("dp", {"data": 8}), ("fsdp", {"data": 8}), ("pmap", {"data": 8})]
)
def test_bf16_gradients_are_reduced_in_float32(name, mesh, dataset):
    _, strategy, batch = build(dataset, name, mesh, model__precision="bf16")
    state = strategy.init(jax.random.key(0))
    hlo = strategy.step.lower(state, batch).compile().as_text()
    collectives = [
        line for line in hlo.splitlines() if re.search(r" (all-reduce|reduce-scatter)(-start)?\(", line)
    ]
    assert collectives, f"{name}: no gradient reduction in the compiled step"
    low = [line.strip()[:160] for line in collectives if re.search(r"\b(bf16|f16)\[", line.split("=")[1])]
    assert not low, f"{name} reduces in low precision: {low}"


def test_fp16_loss_scale_keeps_small_gradients(dataset):
    """A loss 1e-5 times smaller sends cotangents of ~1e-7 through the float16 net, below float16's
    smallest normal number (6e-5): without scaling they lose most of their digits; scaled by 1024 they
    match float32's gradients to float16 rounding."""
    fp32, _, _ = build(dataset)
    fp16, _, _ = build(dataset, model__precision="fp16")
    assert fp16.loss_scale == 1024.0 and fp32.loss_scale == 1.0
    unscaled = type(fp16)(**{**fp16.__dict__, "loss_scale": 1.0})
    c = make_config()
    batches = data.Batches(dataset.x_train, dataset.y_train, c.train.batch_size, c.seed)
    batch = jax.tree.map(jnp.asarray, batches.batch(0))
    params = fp32.init(jax.random.key(0)).params

    def tiny(problem):
        loss_fn = lambda p, b: problem.loss_fn(p, b) * 1e-5  # noqa: E731
        return jax.jit(lambda p, b: problem.loss_and_grads(p, b, loss_fn))(params, batch)

    (loss32, g32), (loss16, g16), (_, g16_raw) = tiny(fp32), tiny(fp16), tiny(unscaled)
    assert floating_dtypes(g16) == {"float32"}
    np.testing.assert_allclose(loss16, loss32, rtol=1e-2)  # the scale is divided out of the loss too

    def error(g):
        return max(
            float(jnp.abs(a - b).max() / jnp.abs(b).max())
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g32), strict=True)
        )

    assert error(g16) < 0.02, error(g16)
    assert error(g16_raw) > 5 * error(g16), (error(g16_raw), error(g16))


def test_matmul_precision_reaches_the_matmuls(dataset):
    for value, expected in (("highest", "HIGHEST"), ("default", "DEFAULT")):
        _, strategy, batch = build(dataset, train__matmul_precision=value)
        state = jax.eval_shape(strategy.init, jax.random.key(0))
        text = strategy.step.lower(state, batch).as_text()
        found = set(re.findall(r"precision = \[(\w+), \w+\]", text))
        assert found == {expected}, (value, found)
