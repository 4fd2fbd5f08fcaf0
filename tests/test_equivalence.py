"""Every registered strategy against the one-device reference.

For each strategy in the registry and each of its mesh settings (including the degenerate one, a mesh
of size 1), over 6 steps: the initial state is bit-identical, and the per-step losses, the parameters
and the optimizer state agree with ``single`` within rtol 1e-5 in fp32 at ``highest`` matmul precision
(mixed precision is checked by its dtypes: tests/test_precision.py). ``single`` itself is checked
against a hand-written Flax + Optax loop that shares no code with bpjax's step.
"""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from bpjax import config as cfg_lib
from bpjax import data, strategies
from bpjax.step import make_problem
from bpjax.testing import assert_trees_close, train_steps

STEPS = 6
RTOL, ATOL = 1e-5, 1e-6  # ATOL is relative to each leaf's largest entry (a few float32 ulps of it)

# Every strategy's settings come from its own declaration (`Definition.examples`): mesh sizes, its own
# settings, and the optimizers for which it is exact. A strategy registered without examples fails
# test_every_strategy_declares_examples. Adam on every example; every optimizer on the first.
CASES = [
    (name, i, optimizer)
    for name, d in sorted(strategies.REGISTRY.items())
    for i, example in enumerate(d.examples)
    for optimizer in example.optimizers[: None if i == 0 else 1]
]
FIRST_OPTIMIZER = {name: d.examples[0].optimizers[0] for name, d in strategies.REGISTRY.items()}


def make_config(optimizer="adam", **parallel):
    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 600
    c.data.num_features = 24
    c.model.hidden = (64, 48, 32)  # 4 layers: pipelines of 2 and 4 stages
    c.optimizer.name = optimizer
    c.optimizer.learning_rate = 1e-3 if optimizer.startswith("adam") else 0.05
    # Adam divides each gradient entry by its own size: an entry that cancels to ~1e-9 (near eps=1e-8)
    # turns a float32 rounding difference of 1e-10 (another summation order) into a step of ~1% of the
    # learning rate. eps=1e-6 keeps that below the tolerance; a wrong layout still misses by far more.
    c.optimizer.eps = 1e-6
    c.train.batch_size = 64
    # Full float32 matmuls: on a GPU the default may use TF32, which is not the reference's arithmetic.
    c.train.matmul_precision = "highest"
    for axis, size in parallel.items():
        c.parallel.mesh[axis] = size
    return c


@pytest.fixture(scope="module")
def dataset():
    return data.load(make_config().data, seed=0)


def setup(dataset, optimizer="adam", mesh=None, settings=None):
    c = make_config(optimizer)
    for key, value in (settings or {}).items():
        c.parallel[key] = value
    c.parallel.mesh = dict(mesh or {"data": 1})
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    return c, problem, data.Batches(dataset.x_train, dataset.y_train, c.train.batch_size, c.seed)


@pytest.fixture(scope="module")
def references(dataset):
    out = {}
    for opt in ("adam", "momentum"):
        c, problem, batches = setup(dataset, opt)
        out[opt] = train_steps(strategies.make("single", problem, c.parallel), batches, STEPS)
    return out


def test_every_strategy_declares_examples():
    for name, d in strategies.REGISTRY.items():
        assert d.examples, f"{name} declares no examples (settings under which it equals single)"
        sizes = [int(np.prod(list(e.mesh.values()) or [1])) for e in d.examples]
        assert 1 in sizes, f"{name} declares no degenerate example (a mesh of size 1)"


def test_make_takes_exactly_the_declared_settings():
    strategies.check_make_signatures()


def _example(name, i):
    e = strategies.REGISTRY[name].examples[i]
    return f"{name}-{dict(e.mesh)}-{dict(e.settings)}"


@pytest.mark.parametrize(
    ("name", "i", "optimizer"), CASES, ids=[f"{_example(n, i)}-{o}" for n, i, o in CASES]
)
def test_matches_single_device(name, i, optimizer, dataset, references):
    example = strategies.REGISTRY[name].examples[i]
    c, problem, batches = setup(dataset, optimizer, example.mesh, example.settings)
    strategy = strategies.make(name, problem, c.parallel)
    assert strategy.num_devices == int(np.prod(list(example.mesh.values()) or [1]))
    init, final, losses = train_steps(strategy, batches, STEPS)
    ref_init, ref_final, ref_losses = references[optimizer]
    assert_trees_close(init, ref_init, rtol=0, atol=0, what=f"{name} init")
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, err_msg=f"{name} losses")
    assert_trees_close(final.params, ref_final.params, RTOL, ATOL, what=f"{name} params")
    assert_trees_close(final.opt_state, ref_final.opt_state, RTOL, ATOL, what=f"{name} opt_state")
    assert int(final.step) == STEPS


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_fused_steps_match_single_steps(name, dataset):
    """K steps per call (lax.scan) give the per-step results; K=1 is per-step training by construction."""
    example = strategies.REGISTRY[name].examples[0]
    c, problem, batches = setup(dataset, example.optimizers[0], example.mesh, example.settings)
    strategy = strategies.make(name, problem, c.parallel)
    _, per_step, per_step_losses = train_steps(strategy, batches, STEPS, k=1)
    _, fused, fused_losses = train_steps(strategy, batches, STEPS, k=3)
    np.testing.assert_allclose(fused_losses, per_step_losses, rtol=RTOL)
    assert_trees_close(fused, per_step, RTOL, ATOL, what=f"{name} K=3 vs K=1")


def test_single_matches_handwritten_flax_optax(dataset, references):
    """The reference itself, against a plain Flax + Optax loop written here from scratch."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(64, name="layer_0")(x))
            x = nn.relu(nn.Dense(48, name="layer_1")(x))
            x = nn.relu(nn.Dense(32, name="layer_2")(x))
            return nn.Dense(10, name="layer_3")(x)

    net, tx = Net(), optax.adam(1e-3, eps=1e-6)
    params = net.init(jax.random.key(0), np.zeros((1, dataset.num_features), np.float32))["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = net.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    _, _, batches = setup(dataset, "adam")
    losses = []
    for s in range(STEPS):
        b = batches.batch(s)
        params, opt_state, loss = step(params, opt_state, b["x"], b["y"])
        losses.append(float(loss))
    ref_init, ref_final, ref_losses = references["adam"]
    np.testing.assert_allclose(ref_losses, losses, rtol=RTOL)
    assert_trees_close(ref_final.params, params, RTOL, ATOL, what="single vs hand-written")


def test_equivalence_check_catches_a_wrong_gradient_reduction(dataset, references, monkeypatch):
    """Summing instead of averaging the gradients (N times too large an update) must fail the check."""
    monkeypatch.setattr(jax.lax, "pmean", jax.lax.psum)
    c, problem, batches = setup(dataset, "momentum", {"data": 8})
    _, final, _ = train_steps(strategies.make("pmap", problem, c.parallel), batches, STEPS)
    with pytest.raises(AssertionError):
        assert_trees_close(final.params, references["momentum"][1].params, RTOL, ATOL)


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("dp", {}),
        ("async", {"staleness": 3, "random_staleness": True}),
        ("param_server", {"n_push": 2, "n_fetch": 3}),
        ("local_sgd", {"local_steps": 3}),
    ],
)
def test_runs_are_bit_identical(dataset, name, settings):
    """Simulated asynchrony included: the same seed and settings give the same bits."""
    c, problem, batches = setup(dataset, FIRST_OPTIMIZER[name], {"data": 8}, settings)
    a = train_steps(strategies.make(name, problem, c.parallel), batches, STEPS)
    b = train_steps(strategies.make(name, problem, c.parallel), batches, STEPS)
    assert_trees_close(a, b, rtol=0, atol=0, what=f"two {name} runs")
