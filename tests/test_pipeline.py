"""The ``pipeline`` strategy: stage assignment, its schedules, and heterogeneous nets against ``single``.

GPipe (the default schedule) on 40-512-256-128-10 (free widths, so stages hold parameters of different
shapes and the packed buffers are padded), over 2 and 4 stages with 1 and 4 microbatches; then the
scheduled engine (1f1b, interleaved, zero_bubble) on small nets of 5, 9 and 16 layers over 2, 4 and 8
stages, M in {1, S, 2S} and one M that is not a multiple of S, balanced and explicit splits, Adam and
SGD momentum; a 40-512-256-128-64-10 net (slow), 6 forced CPU devices in a subprocess, and the MNIST-1D
experiments over 20 steps. Each is compared with the one-device reference: the initial state bit for
bit, then the losses, parameters and optimizer state (rtol 1e-5). The tables themselves are tested in
``tests/test_schedules.py``.
"""

import itertools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import bpjax
from bpjax import config as cfg_lib
from bpjax import data, strategies
from bpjax.errors import UserError
from bpjax.step import make_problem
from bpjax.strategies import pipeline, schedules
from bpjax.strategies.pipeline import assign_stages, bubble_fraction, schedule
from bpjax.testing import assert_trees_close, train_steps

STEPS = 6
RTOL, ATOL = 1e-5, 1e-6
NET = [(40, 512), (512, 256), (256, 128), (128, 10)]  # (in, out) per layer


def make_config(optimizer="adam", stage=2, microbatches=1, **changes):
    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 400
    c.data.num_features = 40
    c.model.hidden = (512, 256, 128)
    c.optimizer.name = optimizer
    c.optimizer.learning_rate = 1e-3 if optimizer.startswith("adam") else 0.05
    c.train.batch_size = 32
    c.parallel.mesh = {"stage": stage}
    c.parallel.microbatches = microbatches
    for key, value in changes.items():
        cfg_lib.set_value(c, key, value)
    return c


@pytest.fixture(scope="module")
def dataset():
    return data.load(make_config().data, seed=0)


def run(dataset, strategy_name, c, k=1):
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    batches = data.Batches(dataset.x_train, dataset.y_train, c.train.batch_size, c.seed)
    strategy = strategies.make(strategy_name, problem, c.parallel)
    return strategy, train_steps(strategy, batches, STEPS, k=k)


@pytest.fixture(scope="module")
def references(dataset):
    return {opt: run(dataset, "single", make_config(opt))[1] for opt in ("adam", "momentum")}


def assert_matches(result, expected, what):
    init, final, losses = result
    ref_init, ref_final, ref_losses = expected
    assert_trees_close(init, ref_init, rtol=0, atol=0, what=f"{what} init")
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, err_msg=f"{what} losses")
    assert_trees_close(final.params, ref_final.params, RTOL, ATOL, what=f"{what} params")
    assert_trees_close(final.opt_state, ref_final.opt_state, RTOL, ATOL, what=f"{what} opt_state")
    assert int(final.step) == STEPS


# ------------------------------------------------------------------------------------- stages


def test_assign_stages_balances_kernel_flops():
    assert assign_stages(NET, 1) == [[0, 1, 2, 3]]
    assert assign_stages(NET, 2) == [[0, 1], [2, 3]]  # 151552 vs 34048 FLOPs beats 20480 vs 165120
    assert assign_stages(NET, 3) == [[0], [1], [2, 3]]
    assert assign_stages(NET, 4) == [[0], [1], [2], [3]]


def test_assign_stages_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 8))
        widths = rng.integers(1, 300, n + 1).tolist()
        layers = list(itertools.pairwise(widths))
        flops = [i * o for i, o in layers]
        for s in range(1, n + 1):
            got = assign_stages(layers, s)
            assert sorted(sum(got, [])) == list(range(n)) and all(got)
            best = min(
                max(sum(flops[a:b]) for a, b in itertools.pairwise((0, *cuts, n)))
                for cuts in itertools.combinations(range(1, n), s - 1)
            )
            assert max(sum(flops[i] for i in st) for st in got) == best


def test_assign_stages_explicit():
    assert assign_stages(NET, 2, (3,)) == [[0, 1, 2], [3]]
    assert assign_stages(NET, 3, (1, 3)) == [[0], [1, 2], [3]]


@pytest.mark.parametrize(
    ("num_stages", "explicit", "match"),
    [
        (5, (), "set parallel.mesh.stage to at most 4"),
        (3, (2,), r"makes 2 stages but parallel.mesh.stage=3; give 2 first-layer indices"),
        (3, (2, 2), "strictly increasing layer indices in 1..3"),
        (2, (0,), "strictly increasing"),
        (2, (4,), "strictly increasing"),
    ],
)
def test_assign_stages_errors(num_stages, explicit, match):
    with pytest.raises(UserError, match=match):
        assign_stages(NET, num_stages, explicit)


# ----------------------------------------------------------------------------------- schedule


def test_schedule_is_gpipe():
    np.testing.assert_array_equal(schedule(3, 2), [[0, 1, -1, -1], [-1, 0, 1, -1], [-1, -1, 0, 1]])
    for s, m in itertools.product(range(1, 6), range(1, 9)):
        table = schedule(s, m)
        assert table.shape == (s, m + s - 1)
        for stage, row in enumerate(table):
            # Every microbatch once, in order, starting at tick `stage` (one tick after the previous stage).
            np.testing.assert_array_equal(row[row >= 0], np.arange(m))
            assert np.argmax(row >= 0) == stage
        assert bubble_fraction(s, m) == pytest.approx((s - 1) / (m + s - 1))


# ---------------------------------------------------------------------------- against single


# With M > 1 the gradient is a mean of microbatch means, summed in another order than the reference's.
# Adam (eps=1e-8) divides each gradient by its own size, so where a gradient is ~1e-9 (a cancellation
# at fp32 rounding level, 1e-7 of the largest), that reordering moves the update by ~1% of the learning
# rate: a plain microbatched loop on one device does exactly the same. The M > 1 cases therefore use
# momentum, whose update is linear in the gradient; M = 1 sums as the reference does and uses Adam.
@pytest.mark.parametrize(
    ("stage", "microbatches", "optimizer"),
    [(2, 1, "adam"), (4, 1, "adam"), (2, 4, "momentum"), (4, 4, "momentum")],
)
def test_heterogeneous_net_matches_single(stage, microbatches, optimizer, dataset, references):
    c = make_config(optimizer, stage=stage, microbatches=microbatches)
    strategy, result = run(dataset, "pipeline", c)
    assert strategy.num_devices == stage and strategy.data_parallel == 1
    assert_matches(result, references[optimizer], f"pipeline S={stage} M={microbatches} {optimizer}")


def test_padding_stays_zero(dataset):
    """Padded entries of the packed buffers get exactly zero gradient, so they and Adam's moments stay 0."""
    c = make_config(stage=4, microbatches=2)
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    strategy = strategies.make("pipeline", problem, c.parallel)
    batches = data.Batches(dataset.x_train, dataset.y_train, c.train.batch_size, c.seed)
    state = strategy.init(jax.random.key(0))
    for s in range(3):
        state, _ = strategy.step(state, strategy.shard_batch(batches.stack(s, 1)))
    sizes = [i * o + o for i, o in NET]  # one layer per stage
    for packed in (state.params, state.opt_state[0].mu, state.opt_state[0].nu):
        packed = np.asarray(packed)
        assert packed.shape == (4, max(sizes))
        for row, size in zip(packed, sizes, strict=True):
            assert np.all(row[size:] == 0) and np.any(row[:size] != 0)


def test_fused_steps(dataset, references):
    """K=3 steps per call (a scan over steps around the scan over ticks) give the reference too."""
    _, result = run(dataset, "pipeline", make_config("momentum", stage=4, microbatches=2), k=3)
    assert_matches(result, references["momentum"], "pipeline K=3")


def test_clipping_matches_single(dataset):
    """Global-norm clipping: the norm of the packed gradients spans all stages (padding adds zero)."""
    c = make_config("momentum", stage=2, microbatches=2, **{"optimizer.clip_norm": 0.05})
    _, expected = run(dataset, "single", c)
    _, result = run(dataset, "pipeline", c)
    assert_matches(result, expected, "pipeline clip_norm")


def test_regression_targets_match_single():
    """mse with y[B, T]: the last stage splits targets into microbatches like inputs."""
    c = make_config("sgd", stage=3, microbatches=4, **{"data.name": "synthetic_regression"})
    c.data.num_targets = 3
    c.train.loss = "mse"
    dataset = data.load(c.data, seed=0)
    _, expected = run(dataset, "single", c)
    _, result = run(dataset, "pipeline", c)
    assert_matches(result, expected, "pipeline mse")


# -------------------------------------------------------------------------------------- errors


def test_batch_not_divisible_by_microbatches(dataset):
    c = make_config(stage=2, microbatches=5)
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    strategy = strategies.make("pipeline", problem, c.parallel)
    batch = data.Batches(dataset.x_train, dataset.y_train, 32, 0).stack(0, 1)
    with pytest.raises(UserError, match=r"train.batch_size=32 is not divisible by parallel.microbatches=5; "):
        strategy.shard_batch(batch)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"parallel.mesh.stage": 8}, "set parallel.mesh.stage to at most 4"),
        ({"parallel.stages": (1, 2)}, "give 1 first-layer indices"),
        ({"optimizer.name": "lamb"}, "use optimizer.name=sgd, momentum"),
        ({"parallel.mesh.data": 2}, "remove parallel.mesh.data=2 or set it to 1"),
    ],
)
def test_errors_before_compiling(changes, match, dataset):
    c = make_config(**changes)
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    with pytest.raises(UserError, match=match):
        strategies.make("pipeline", problem, c.parallel)


def test_measure_bubble_runs():
    c = make_config(stage=2)
    c.model.hidden = (16, 8)
    problem = make_problem(c, 12, 4)
    rows = pipeline.measure_bubble(problem, c.parallel, microbatch_size=4, microbatches=(1, 2), repeats=1)
    assert [r["microbatches"] for r in rows] == [1, 2]
    assert [r["formula_bubble"] for r in rows] == [1 / 2, 1 / 3]
    assert all(r["seconds"] > 0 for r in rows)


# ------------------------------------------------------------------- the other schedules against single

SMALL = (64, 48, 40, 32)  # 24-64-48-40-32-10: 5 layers
DEEP = (32, 24, 32, 16, 24, 16, 20, 12)  # 9 layers: 8 stages, or 4 stages x 2 chunks
DEEPEST = (16, 24, 12, 20, 16, 24, 12, 20, 16, 24, 12, 20, 16, 24, 16)  # 16 layers: 8 stages x 2 chunks
NETS = {4: SMALL, 8: DEEP}  # interleaved needs S*v layers


def schedule_config(optimizer, hidden, stage=2, **parallel):
    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 480
    c.data.num_features = 24
    c.model.hidden = hidden
    c.optimizer.name = optimizer
    c.optimizer.learning_rate = 1e-3 if optimizer == "adam" else 0.05
    # With M > 1 the gradient is summed in another order than the reference's; Adam's eps=1e-8 turns
    # that into ~1% of the learning rate where a gradient cancels to ~1e-9 (see above), eps=1e-6 not.
    c.optimizer.eps = 1e-6
    c.train.batch_size = 48  # divisible by every M below
    c.parallel.mesh = {"stage": stage}
    for key, value in parallel.items():
        c.parallel[key] = value
    return c


@pytest.fixture(scope="module")
def schedule_dataset():
    return data.load(schedule_config("adam", SMALL).data, seed=0)


@pytest.fixture(scope="module")
def schedule_references(schedule_dataset):
    cache = {}

    def get(optimizer, hidden):
        if (optimizer, hidden) not in cache:
            cache[optimizer, hidden] = run(schedule_dataset, "single", schedule_config(optimizer, hidden))[1]
        return cache[optimizer, hidden]

    return get


def _cases():
    """Every schedule at S = 2, 4, 8 with M = 1, S, 2S and one M that is not a multiple of S; explicit
    stage splits (`_explicit`) for M = 1 and the odd M, balanced ones for the others; Adam for M in
    {1, S}, momentum for the others."""
    odd = {2: 3, 4: 6, 8: 12}
    out = []
    for name in ("1f1b", "zero_bubble", "interleaved"):
        v = 2 if name == "interleaved" else 1
        for S in (2, 4, 8):
            hidden = SMALL if S * v <= 5 else DEEP if S * v <= 9 else DEEPEST
            for M, optimizer in ((1, "adam"), (S, "adam"), (2 * S, "momentum"), (odd[S], "momentum")):
                split = _explicit(S * v) if M in (1, odd[S]) else ()
                out.append((name, S, M, v, hidden, split, optimizer))
    return out


def _explicit(chunks: int) -> tuple[int, ...]:
    """``parallel.stages`` unlike the balanced split: every chunk but the last one layer, the last the rest."""
    return tuple(range(1, chunks))


CASES = _cases()


@pytest.mark.parametrize(
    ("name", "stage", "microbatches", "v", "hidden", "split", "optimizer"),
    CASES,
    ids=[f"{n}-S{s}-M{m}-v{v}-L{len(h) + 1}-{'x' if sp else 'b'}-{o}" for n, s, m, v, h, sp, o in CASES],
)
def test_schedule_matches_single(
    name, stage, microbatches, v, hidden, split, optimizer, schedule_dataset, schedule_references
):
    c = schedule_config(
        optimizer,
        hidden,
        stage,
        microbatches=microbatches,
        schedule=name,
        virtual_stages=v,
        stages=split,
    )
    strategy, result = run(schedule_dataset, "pipeline", c)
    assert strategy.num_devices == stage and strategy.data_parallel == 1
    assert name in strategy.layout
    assert_matches(result, schedule_references(optimizer, hidden), f"{name} S={stage} M={microbatches}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "stage", "microbatches", "v"),
    [("1f1b", 4, 8, 1), ("zero_bubble", 4, 6, 1), ("interleaved", 2, 4, 2)],
)
def test_schedules_on_the_wide_heterogeneous_net(name, stage, microbatches, v, dataset):
    """40-512-256-128-64-10: stages of very different sizes (padding), with momentum."""
    c = make_config("momentum", stage=stage, microbatches=microbatches)
    c.model.hidden = (512, 256, 128, 64)
    c.train.batch_size = 48
    _, expected = run(dataset, "single", c)
    c.parallel.schedule, c.parallel.virtual_stages = name, v
    _, result = run(dataset, "pipeline", c)
    assert_matches(result, expected, f"{name} on 40-512-256-128-64-10")


def test_scheduled_fused_steps(schedule_dataset, schedule_references):
    """K=3 steps per call: a scan over steps around the scan over ticks."""
    c = schedule_config("momentum", SMALL, 4, microbatches=6, schedule="zero_bubble")
    _, result = run(schedule_dataset, "pipeline", c, k=3)
    assert_matches(result, schedule_references("momentum", SMALL), "zero_bubble K=3")


@pytest.mark.parametrize("name", ["1f1b", "zero_bubble", "interleaved"])
def test_scheduled_regression_and_clipping_match_single(name):
    """mse with y[B, T] (the last chunk splits targets into microbatches) and global-norm clipping."""
    c = schedule_config("momentum", SMALL, 2, microbatches=4, schedule=name)
    c.parallel.virtual_stages = 2 if name == "interleaved" else 1
    c.data.name, c.data.num_targets, c.train.loss = "synthetic_regression", 3, "mse"
    c.optimizer.clip_norm = 0.05
    dataset = data.load(c.data, seed=0)
    _, expected = run(dataset, "single", c)
    _, result = run(dataset, "pipeline", c)
    assert_matches(result, expected, f"{name} mse clip_norm")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_float64_equals_single_to_1e_12(schedule):
    """In float64 the pipeline is the reference's arithmetic up to the order of the sums over
    microbatches, its loss included: equal to single to 1e-12, where float32 allows 1e-5."""
    c = schedule_config("momentum", SMALL, 4, microbatches=6, schedule=schedule)
    c.model.dtype = "float64"
    try:
        dataset = data.load(c.data, seed=0)
        _, expected = run(dataset, "single", c)
        _, result = run(dataset, "pipeline", c)
        init, final, losses = result
        assert final.params["layer_0"]["kernel"].dtype == np.float64
        np.testing.assert_allclose(losses, expected[2], rtol=1e-12)
        assert losses.dtype == np.float64
        assert_trees_close(final, expected[1], rtol=1e-12, atol=1e-14, what=f"{schedule} float64")
    finally:
        make_problem(schedule_config("momentum", SMALL), 24, 10)  # float32 again (turns x64 off)


def test_padding_stays_zero_under_zero_bubble(schedule_dataset):
    c = schedule_config("adam", SMALL, 4, microbatches=4, schedule="zero_bubble")
    problem = make_problem(c, schedule_dataset.num_features, schedule_dataset.num_outputs)
    strategy = strategies.make("pipeline", problem, c.parallel)
    batches = data.Batches(schedule_dataset.x_train, schedule_dataset.y_train, 48, c.seed)
    state = strategy.init(jax.random.key(0))
    for s in range(2):
        state, _ = strategy.step(state, strategy.shard_batch(batches.stack(s, 1)))
    widths = (24, *SMALL, 10)
    stages = assign_stages(list(itertools.pairwise(widths)), 4)
    sizes = [sum(widths[i] * widths[i + 1] + widths[i + 1] for i in st) for st in stages]
    for packed in (state.params, state.opt_state[0].mu, state.opt_state[0].nu):
        for row, size in zip(np.asarray(packed), sizes, strict=True):
            assert np.all(row[size:] == 0) and np.any(row[:size] != 0)


SIX_DEVICES = """
import numpy as np
import bpjax, jax
from bpjax import config as cfg_lib, data, strategies
from bpjax.step import make_problem
from bpjax.testing import assert_trees_close, train_steps

assert len(jax.devices()) == 6, jax.devices()
def config(**parallel):
    c = cfg_lib.default()
    c.data.name, c.data.num_samples, c.data.num_features = "synthetic_classification", 300, 12
    c.model.hidden = (16, 12, 20, 8, 16, 12, 20, 8, 16, 12, 8)  # 12 layers: 6 stages x 2 chunks
    c.optimizer.name, c.optimizer.learning_rate = "momentum", 0.05
    c.train.batch_size = 48
    for key, value in parallel.items():
        c.parallel[key] = value
    return c
ds = data.load(config().data, seed=0)
def run(name, c):
    problem = make_problem(c, ds.num_features, ds.num_outputs)
    batches = data.Batches(ds.x_train, ds.y_train, 48, 0)
    return train_steps(strategies.make(name, problem, c.parallel), batches, 4)
ref = run("single", config())
for schedule, M, v in (("1f1b", 8, 1), ("zero_bubble", 6, 1), ("interleaved", 8, 2)):
    got = run("pipeline", config(mesh={"stage": 6}, microbatches=M, schedule=schedule, virtual_stages=v))
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-5)
    assert_trees_close(got[1], ref[1], 1e-5, 1e-6, what=schedule)
    print(schedule, "ok")
"""


def test_schedules_on_six_forced_cpu_devices():
    """A host of 6 CPU devices, in a fresh process: 6 stages (12 chunks interleaved) against single."""
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=6",
    }
    out = subprocess.run(
        [sys.executable, "-c", SIX_DEVICES], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1f1b", "ok", "zero_bubble", "ok", "interleaved", "ok"], out.stdout


# ------------------------------------------------------------------- the experiments over 20 steps

TWENTY = ["train.steps=20", "train.eval_every=20", "train.log_every=1", "train.progress=off"]


def _losses(path, overrides):
    return bpjax.run(cfg_lib.load(path, [*TWENTY, *overrides])).series("train_loss")[1]


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.schedule=1f1b"],
        ["parallel.schedule=zero_bubble"],
        # Its 3 layers hold one chunk per device on 3 stages; interleaved needs S*v chunks: 3 on one
        # device, or with a fourth layer 2 devices x 2 chunks (and see the wide experiment below).
        ["parallel.schedule=interleaved", "parallel.mesh.stage=1", "parallel.virtual_stages=3"],
        [
            "parallel.schedule=interleaved",
            "parallel.mesh.stage=2",
            "parallel.virtual_stages=2",
            "model.hidden=(100, 100, 100)",
        ],
    ],
    ids=["1f1b", "zero_bubble", "interleaved-1x3", "interleaved-2x2"],
)
def test_mnist1d_pipeline_schedules_equal_single_over_20_steps(root, overrides):
    """``bpjax run experiments/mnist1d_pipeline.py --set parallel.schedule=...``: single's losses."""
    model = [o for o in overrides if o.startswith("model.")]
    single = _losses(root / "experiments/mnist1d_single.py", model)
    got = _losses(root / "experiments/mnist1d_pipeline.py", overrides)
    assert got.shape == (20,)
    np.testing.assert_allclose(got, single, rtol=1e-5)


def test_mnist1d_pipeline_1f1b_equals_single_over_20_steps(root):
    single = _losses(root / "experiments/mnist1d_single.py", [])
    np.testing.assert_allclose(_losses(root / "experiments/mnist1d_pipeline_1f1b.py", []), single, rtol=1e-5)


@pytest.mark.slow
def test_wide_interleaved_pipeline_equals_single_over_20_steps(root):
    """``bpjax run experiments/wide_pipeline.py`` (interleaved, 4 stages x 2 chunks, M=8) in float64
    equals single to 1e-12 (3.9e-16 measured). In float32 with Adam (eps=1e-8) its curve parts from
    single's by 1e-3 at step 20, exactly as gpipe's does on this net (both sum 8 microbatch gradients
    in another order; Adam magnifies the ~1e-9 entries, see above)."""
    path = root / "experiments/wide_pipeline.py"
    f64 = ["model.dtype=float64", "parallel.memory_budget_mb=0"]
    try:
        single = _losses(path, ["parallel.strategy=single", *f64])
        np.testing.assert_allclose(_losses(path, f64), single, rtol=1e-12)
    finally:
        make_problem(schedule_config("momentum", SMALL), 24, 10)  # float32 again (turns x64 off)


# ---------------------------------------------------------------- settings, plan and viz

LAYERS_5 = {"model.hidden": SMALL}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"parallel.schedule": "interleaved"},
            r"needs? parallel.virtual_stages >= 2|set parallel.virtual_stages=2",
        ),
        (
            {"parallel.schedule": "1f1b", "parallel.virtual_stages": 2},
            "set parallel.schedule=interleaved, or parallel.virtual_stages=1",
        ),
        (
            {"parallel.virtual_stages": 3},
            "parallel.virtual_stages=3 is for parallel.schedule=interleaved, not gpipe",
        ),
        (
            {"parallel.schedule": "interleaved", "parallel.virtual_stages": 2, "parallel.mesh.stage": 4},
            r"4 x 2 = 8 chunks, but it has 5 layers and every chunk needs one; set parallel.mesh.stage=2",
        ),
        (
            {"parallel.schedule": "interleaved", "parallel.virtual_stages": 3, "parallel.mesh.stage": 2},
            r"2 x 3 = 6 chunks, but it has 5 layers .*; set parallel.virtual_stages=2",
        ),
        (
            {"parallel.schedule": "interleaved", "parallel.virtual_stages": 2, "parallel.stages": (2,)},
            "parallel.stages=.2,. makes 2 chunks but interleaved needs .* = 4; give 3 first-layer indices",
        ),
        (
            {"parallel.schedule": "zero_bubble", "parallel.mesh.stage": 6},
            "set parallel.mesh.stage to at most 5",
        ),
        (
            {"parallel.schedule": "1f1b_flush"},
            "parallel.schedule='1f1b_flush' is not known; did you mean '1f1b'",
        ),
    ],
)
def test_bad_schedule_settings_fail_before_compiling(changes, match, schedule_dataset, monkeypatch):
    c = schedule_config("adam", SMALL, 2)
    for key, value in changes.items():
        cfg_lib.set_value(c, key, value)
    compiled = []
    monkeypatch.setattr(pipeline, "_scheduled_grads", lambda *a, **k: compiled.append(1))
    problem = make_problem(c, schedule_dataset.num_features, schedule_dataset.num_outputs)
    with pytest.raises(UserError, match=match) as err:
        strategies.make("pipeline", problem, c.parallel)
    assert "\n" not in str(err.value) and not compiled


def test_schedule_settings_are_checked_with_the_config():
    c = schedule_config("adam", SMALL, 2)
    c.parallel.strategy = "pipeline"
    c.parallel.schedule = "interleaved"
    with pytest.raises(UserError, match="set parallel.virtual_stages=2"):
        cfg_lib.validate(c)


@pytest.mark.parametrize("name", schedules.NAMES)
def test_timeline_cost_and_activation_memory(name, schedule_dataset):
    """viz draws the chosen schedule's table; the cost names its ticks, idle share and the
    activations it keeps: 1f1b at most S of gpipe's M microbatches."""
    from bpjax.strategies.base import CostInput

    v = 2 if name == "interleaved" else 1
    c = schedule_config("adam", SMALL, 2, microbatches=8, schedule=name, virtual_stages=v)
    problem = make_problem(c, schedule_dataset.num_features, schedule_dataset.num_outputs)
    strategy = strategies.make("pipeline", problem, c.parallel)
    table = schedules.build(name, 2, 8, v)
    grid = pipeline.DEFINITION.timeline(c.parallel, 2)
    np.testing.assert_array_equal(grid, table.grid())
    params = strategies.placement(problem, strategy, c.parallel)
    opt = jax.eval_shape(problem.init, jax.random.key(0)).opt_state
    inp = CostInput(problem, strategy, c.parallel, params, opt, 48, (24, *SMALL, 10))
    cost = pipeline.DEFINITION.cost(inp)
    assert f"{table.ticks} ticks" in cost.notes[0] and f"{table.idle_fraction:.2f}" in cost.notes[0]
    permutes = [x for x in cost.collectives if x.kind == "collective-permute"]
    assert [x.count for x in permutes] == ([9, 9] if name == "gpipe" else [table.ticks] * 2)
    acts = pipeline.activation_bytes(inp)
    full = {f"layer_{i}": 48 * w * 4 for i, w in enumerate((*SMALL, 10))}
    if name == "gpipe":
        assert acts == full  # all M microbatches: the whole batch
    elif name == "1f1b":
        assert all(acts[k] <= full[k] * 2 / 8 for k in full)  # at most S = 2 of M = 8


def test_activation_memory_plan_and_compiled_program_agree():
    """1f1b keeps at most S microbatches' activations where gpipe keeps all M. With the microbatch
    size fixed and M growing 4 -> 16 on 4 stages, the plan predicts 1f1b's kept activations constant
    and gpipe's 4x; the compiled programs' temporary memory follows: flat for 1f1b, growing for gpipe."""
    from bpjax.plan import compiled_report, make_plan

    def measure(schedule_name, M):
        c = schedule_config("adam", (100, 100, 100), 4, schedule=schedule_name, microbatches=M)
        c.train.batch_size = 16 * M
        c.parallel.strategy = "pipeline"
        setup = bpjax.prepare(c)
        return make_plan(setup).totals["act_bytes"], compiled_report(setup)["temp_bytes"]

    (g4, g4_temp), (g16, g16_temp) = measure("gpipe", 4), measure("gpipe", 16)
    (o4, o4_temp), (o16, o16_temp) = measure("1f1b", 4), measure("1f1b", 16)
    assert g16 == 4 * g4 and o16 == o4 == g4  # predicted: gpipe keeps M, 1f1b at most S (= M at M=4)
    assert o16_temp < 1.25 * o4_temp, (o4_temp, o16_temp)  # compiled: 1f1b stays flat
    assert g16_temp > 2 * g4_temp, (g4_temp, g16_temp)  # gpipe grows with M
    assert o16_temp < g16_temp / 2
