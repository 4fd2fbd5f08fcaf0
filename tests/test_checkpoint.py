"""Checkpoints: bit-identical resume after SIGKILL, a crash mid-save, resharding across strategies,
the simulated schemes' state of their own (restored, or started from a TrainState by their rules), and
NaN/Inf losses."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from bpjax import config as cfg_lib
from bpjax import strategies
from bpjax.checkpoint import Checkpointer, restore_latest
from bpjax.errors import TrainingStopped, UserError
from bpjax.metrics import read_jsonl
from bpjax.preflight import prepare
from bpjax.strategies.base import jit_checkpointing, to_host
from bpjax.train import run

EXPERIMENT = "experiments/mnist1d_dp.py"
BASE = [
    "model.hidden=(32, 24)",
    "train.log_every=8",
    "train.eval_every=0",
    "train.progress=off",
    "checkpoint.keep=2",
]


def config(root, *overrides):
    return cfg_lib.load(root / EXPERIMENT, [*BASE, *overrides])


def assert_trees_equal(actual, expected):
    a, a_def = jax.tree.flatten(actual)
    e, e_def = jax.tree.flatten(expected)
    assert a_def == e_def
    for x, y in zip(a, e, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def bpjax_run(root, cfg_overrides, workdir, env=None):
    """``bpjax run`` in a subprocess, its stderr in ``WORKDIR.err``."""
    cmd = [sys.executable, "-m", "bpjax", "run", str(root / EXPERIMENT), "--workdir", str(workdir)]
    cmd += [f"--set={o}" for o in [*BASE, *cfg_overrides]]
    with open(workdir.with_suffix(".err"), "w") as err:
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=root, env=env, start_new_session=True
        )


def stderr_of(workdir) -> str:
    return workdir.with_suffix(".err").read_text()[-2000:]


TIMING = ("samples_per_second", "train_seconds")


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_resume_after_sigkill_is_bit_identical(root, tmp_path):
    overrides = ["train.steps=1200", "checkpoint.every=48", "train.steps_per_call=4"]
    reference = run(config(root, *overrides), tmp_path / "whole")

    # Kill at a random moment of the run (seeded, so a failure can be replayed).
    proc = bpjax_run(root, overrides, tmp_path / "killed")
    ckpts = tmp_path / "killed/checkpoints"
    end = time.monotonic() + 90
    while not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert proc.poll() is None and time.monotonic() < end, stderr_of(tmp_path / "killed")
        time.sleep(0.02)
    time.sleep(np.random.default_rng(int(os.environ.get("BPJAX_TEST_SEED", "0"))).uniform(0.0, 0.5))
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    step, _ = restore_latest(ckpts, config(root, *overrides), prepare(config(root, *overrides)).strategy)
    assert 0 < step < 1200, f"killed at checkpoint {step}: not mid-run"

    resumed = run(config(root, *overrides), tmp_path / "killed", resume=True)
    assert resumed.summary["resumed_from_step"] == step
    assert_trees_equal(resumed.state, reference.state)
    # The log reads as one run: rows up to the checkpoint kept, the rest written again, same values.
    assert without_timing(read_jsonl(tmp_path / "killed/metrics.jsonl")) == without_timing(
        read_jsonl(tmp_path / "whole/metrics.jsonl")
    )


def test_crash_during_save_keeps_the_previous_checkpoint(root, tmp_path):
    overrides = ["train.steps=48", "checkpoint.every=16"]
    env = dict(os.environ, BPJAX_FAULT="kill_in_save:32")
    proc = bpjax_run(root, overrides, tmp_path / "run", env=env)
    assert proc.wait(timeout=90) == -signal.SIGKILL, stderr_of(tmp_path / "run")
    cfg = config(root, *overrides)
    ckpt = Checkpointer(tmp_path / "run/checkpoints", cfg, prepare(cfg).strategy, create=False)
    assert ckpt.latest_step() == 16  # step 32 was never completed
    ckpt.close()
    resumed = run(cfg, tmp_path / "run", resume=True)
    assert resumed.summary["resumed_from_step"] == 16
    assert_trees_equal(resumed.state, run(cfg).state)


# Every pair of these, saved by the first and restored by the second, gives the saved state bit-exactly.
LAYOUTS = {
    "single": ["parallel.strategy=single"],
    "pmap": ["parallel.strategy=pmap"],
    "dp4": ["parallel.strategy=dp", "parallel.mesh.data=4"],
    "fsdp": ["parallel.strategy=fsdp"],
    "tensor": ["parallel.strategy=tensor", "parallel.mesh.model=8"],
    "hybrid": ["parallel.strategy=hybrid", "parallel.mesh.data=2", "parallel.mesh.model=4"],
    "pipeline": ["parallel.strategy=pipeline", "parallel.mesh.stage=3", "parallel.microbatches=4"],
    # State of their own beside the TrainState (3 steps leave it different from the TrainState's rule):
    # restored under themselves, built by their rule under the others.
    "async": ["parallel.strategy=async", "parallel.staleness=2"],
    "param_server": ["parallel.strategy=param_server", "parallel.mesh.data=4", "parallel.n_push=2"],
    "diloco": ["parallel.strategy=diloco", "parallel.local_steps=2"],
}


@pytest.fixture(scope="module")
def targets(request):
    """Each layout's setup, built once (so that each compiles its step once)."""
    root = request.config.rootpath
    out = {}
    for name, overrides in LAYOUTS.items():
        cfg = cfg_lib.load(root / EXPERIMENT, [*BASE, *overrides])
        out[name] = (cfg, prepare(cfg))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, targets):
    """One checkpoint per layout, each after 3 steps, and its state in the reference layout."""
    out = {}
    for name, (cfg, setup) in targets.items():
        state = setup.strategy.init(jax.random.key(cfg.seed))
        for s in range(3):
            state, _ = setup.strategy.step(state, setup.strategy.shard_batch(setup.batches.stack(s, 1)))
        directory = tmp_path_factory.mktemp(name)
        ckpt = Checkpointer(
            directory, cfg_lib.apply_overrides(cfg, ["checkpoint.async_save=False"]), setup.strategy
        )
        ckpt.save(3, state)
        ckpt.wait()
        ckpt.close()
        out[name] = (directory, setup.strategy.gather(state), jax.device_get(state))
    return out


@pytest.mark.parametrize("target", list(LAYOUTS))
@pytest.mark.parametrize("source", list(LAYOUTS))
def test_restore_under_another_strategy(saved, targets, source, target):
    directory, expected, whole = saved[source]
    cfg, setup = targets[target]
    strategy = setup.strategy
    step, state = restore_latest(directory, cfg, strategy)
    assert step == 3
    assert_trees_equal(strategy.gather(state), expected)
    if source == target:  # all of it, the state of its own included (async's history, the server's cache)
        assert_trees_equal(jax.device_get(state), whole)
    # The restored state has the target's layout: it trains there.
    state, metrics = strategy.step(state, strategy.shard_batch(setup.batches.stack(3, 1)))
    assert np.isfinite(to_host(metrics)["loss"]).all()


def test_strategy_without_portable_checkpoints_restores_only_itself(root, saved, monkeypatch):
    # Every registered strategy saves portable checkpoints today; a strategy that did not (declared so
    # here) would resume only from its own.
    monkeypatch.setitem(
        strategies.REGISTRY,
        "async",
        dataclasses.replace(strategies.get("async"), portable_checkpoints=False),
    )
    directory, _, _ = saved["tensor"]
    cfg = cfg_lib.load(root / EXPERIMENT, [*BASE, "parallel.strategy=async", "parallel.staleness=1"])
    with pytest.raises(
        UserError, match=r"^async keeps state of its own .* holds tensor state: use a new --workdir$"
    ):
        restore_latest(directory, cfg, prepare(cfg).strategy)


def test_other_settings_start_the_state_of_its_own_by_the_rule(root, saved):
    # A staleness-2 history has 3 versions; under staleness 1 (2 versions) it is started afresh.
    directory, expected, _ = saved["async"]
    cfg = cfg_lib.load(root / EXPERIMENT, [*BASE, *LAYOUTS["async"], "parallel.staleness=1"])
    strategy = prepare(cfg).strategy
    ckpt = Checkpointer(directory, cfg, strategy, create=False)
    try:
        found = ckpt.newest_readable()
    finally:
        ckpt.close()
    assert found.fresh == (
        "checkpoint step 3 holds async state (mesh data=8, other settings): async resumes from its "
        "TrainState, and the parameter history starts with every slot holding the restored parameters"
    )
    state = jax.device_get(found.state)
    assert_trees_equal(state.train, expected)
    assert_trees_equal(state.history, jax.tree.map(lambda p: np.stack([p, p]), expected.params))


@pytest.mark.parametrize("scheme", ["async", "local_sgd"])
def test_checkpoint_of_another_format_is_one_line(root, tmp_path, scheme):
    # The whole state as one tree: how these schemes' checkpoints were written before they were portable
    # (local_sgd's has the TrainState's paths, with the workers' copies stacked).
    cfg = config(
        root, f"parallel.strategy={scheme}", "optimizer.name=momentum", "checkpoint.async_save=False"
    )
    strategy = prepare(cfg).strategy
    old = strategy._replace(checkpointing=jit_checkpointing(strategy.init))
    ckpt = Checkpointer(tmp_path, cfg, old)
    del ckpt._meta["extras"]  # their metadata had no "extras" key (a threads run's says: none)
    ckpt.save(3, strategy.init(jax.random.key(0)))
    ckpt.wait()
    ckpt.close()
    with pytest.raises(
        UserError,
        match=rf"holds no {scheme} state beside its TrainState: it was written in another format \(e\.g\. "
        rf"by a bpjax from before {scheme}'s checkpoints were portable\); resume with the bpjax that wrote it",
    ):
        restore_latest(tmp_path, cfg, strategy)


def test_async_resumes_bit_identically(root, tmp_path, monkeypatch):
    # async's state holds its parameter history; the run fails after step 13 and resumes from step 12.
    cfg = config(
        root, "parallel.strategy=async", "parallel.staleness=2", "parallel.random_staleness=True",
        "train.steps=24", "checkpoint.every=12",
    )  # fmt: skip
    whole = run(cfg)
    monkeypatch.setenv("BPJAX_FAULT", "raise:13:0")
    with pytest.raises(RuntimeError, match="fault injected"):
        run(cfg, tmp_path / "run")
    monkeypatch.delenv("BPJAX_FAULT")
    resumed = run(cfg, tmp_path / "run", resume=True)
    assert resumed.summary["resumed_from_step"] == 12
    assert_trees_equal(resumed.state, whole.state)


# The schemes with state of their own, each set so that its state is not the TrainState's rule at the
# checkpoint (a history of 3 versions, accumulated pushes, copies mid-round, outer momentum).
SCHEMES = {
    "async": ["parallel.staleness=2", "parallel.random_staleness=True"],
    "param_server": ["parallel.n_push=3", "parallel.n_fetch=2"],
    "local_sgd": ["parallel.local_steps=3"],
    "diloco": ["parallel.local_steps=3", "parallel.fragments=2"],
}
CHAIN = [
    "optimizer.name=momentum",
    "optimizer.schedule=constant",
    "checkpoint.every=4",
    "checkpoint.async_save=False",
]


def steps_from(strategy, batches, state, start: int, stop: int):
    for s in range(start, stop):
        state, _ = strategy.step(state, strategy.shard_batch(batches.stack(s, 1)))
    return state


def placed(strategy, reference):
    """A host TrainState in the reference structure, laid out as ``strategy`` restores one."""
    return jax.device_put(reference, jax.tree.map(lambda a: a.sharding, strategy.checkpointing.target()))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_resume_across_strategies_follows_the_rules(root, tmp_path, capfd, scheme):
    """dp (steps 0-4) -> the scheme (4-8) -> dp (8-12), each resuming the last one's checkpoint: the
    scheme starts from dp's TrainState by its rule, saves its own state beside its TrainState, and dp
    continues from that TrainState; all bit-exactly as predicted step by step here."""
    dp_cfg = config(root, *CHAIN, "parallel.strategy=dp", "parallel.mesh.data=4")
    cfg = config(root, *CHAIN, f"parallel.strategy={scheme}", *SCHEMES[scheme])
    run(cfg_lib.apply_overrides(dp_cfg, ["train.steps=4"]), tmp_path / "run")
    capfd.readouterr()
    run(cfg_lib.apply_overrides(cfg, ["train.steps=8"]), tmp_path / "run", resume=True)
    warning = capfd.readouterr().err
    final = run(cfg_lib.apply_overrides(dp_cfg, ["train.steps=12"]), tmp_path / "run", resume=True)

    dp_setup, setup = prepare(dp_cfg), prepare(cfg)
    dp, strategy, batches = dp_setup.strategy, setup.strategy, setup.batches
    at4 = dp.gather(steps_from(dp, batches, dp.init(jax.random.key(cfg.seed)), 0, 4))
    # The rule: the scheme's state from a TrainState alone.
    codec = strategy.checkpointing
    at8 = steps_from(strategy, batches, codec.load(placed(strategy, at4), None), 4, 8)
    assert warning == (
        f"warning: checkpoint step 4 holds dp state (mesh data=4, its TrainState only): {scheme} resumes "
        f"from its TrainState, and {codec.fresh}\n"
    )
    # Its checkpoint holds all of its state: restored under it, bit-exactly.
    ckpt = Checkpointer(tmp_path / "run/checkpoints", cfg, strategy, create=False)
    try:
        assert_trees_equal(jax.device_get(ckpt.restore(8)), jax.device_get(at8))
    finally:
        ckpt.close()
    expected = dp.gather(steps_from(dp, batches, placed(dp, strategy.gather(at8)), 8, 12))
    assert_trees_equal(final.state, expected)


# Settings under which a scheme's own state holds nothing beyond its TrainState after 3 steps: one
# version; fetched and pushed every step; right after averaging; one worker right after the outer step,
# without outer momentum.
WITHOUT_MEMORY = {
    "async": ["parallel.staleness=0"],
    "param_server": ["parallel.n_push=1", "parallel.n_fetch=1"],
    "local_sgd": ["parallel.local_steps=3"],
    "diloco": ["parallel.mesh.data=1", "parallel.local_steps=3", "parallel.outer_momentum=0"],
}


@pytest.mark.parametrize("scheme", list(WITHOUT_MEMORY))
def test_rule_rebuilds_a_state_without_memory_exactly(momentum_problem, scheme):
    """There a resume from any strategy's checkpoint continues exactly as the scheme itself would."""
    c, problem, batches = momentum_problem
    strategy = strategies.make(scheme, problem, cfg_lib.apply_overrides(c, WITHOUT_MEMORY[scheme]).parallel)
    state = steps_from(strategy, batches, strategy.init(jax.random.key(0)), 0, 3)
    codec = strategy.checkpointing
    assert_trees_equal(jax.device_get(codec.load(codec.save(state), None)), jax.device_get(state))


@pytest.fixture
def spiky(tmp_path):
    """A regression set whose one huge target overflows the float32 loss: one bad step per epoch."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = x @ rng.normal(size=(4, 1)).astype(np.float32)
    y[5] = 1e30
    path = tmp_path / "spiky.npz"
    np.savez(path, x=x, y=y)
    return [
        "data.name=npz",
        f"data.path={path}",
        "data.task=regression",
        "data.standardize=False",
        "train.loss=mse",
        "train.batch_size=8",
        "train.steps=48",
        "optimizer.learning_rate=1e-3",
    ]


def bad_steps(batches) -> list[int]:
    """The (0-based) steps whose batch holds the huge target."""
    return [s for s in range(48) if (batches.batch(s)["y"] > 1e29).any()]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(root, tmp_path, spiky):
    cfg = config(root, *spiky, "checkpoint.every=1", "train.sync_every=1", "checkpoint.async_save=False")
    first_bad = 1 + bad_steps(prepare(cfg).batches)[0]
    with pytest.raises(TrainingStopped) as e:
        run(cfg, tmp_path / "run")
    message = str(e.value)
    assert (
        f"the training loss became inf at step {first_bad}; stopped (the last good checkpoint is step "
        in message
    )
    assert "set train.nonfinite=skip to skip such steps" in message
    ckpt = Checkpointer(tmp_path / "run/checkpoints", cfg, prepare(cfg).strategy, create=False)
    assert ckpt.latest_step() == first_bad - 1
    ckpt.close()
    assert not (tmp_path / "run/summary.json").exists()


def test_nonfinite_skip_skips_those_steps(root, spiky):
    result = run(config(root, *spiky, "train.nonfinite=skip"))
    bad = bad_steps(prepare(config(root, *spiky)).batches)
    assert result.summary["nonfinite_steps"] == len(bad) > 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(result.state.params))
    assert result.summary["final_train_loss"] is not None


def test_checkpoints_record_the_dtypes_a_precision_resolves_to():
    from bpjax.checkpoint import _resolved

    def model(**keys):
        c = cfg_lib.default()
        for key, value in keys.items():
            c.model[key] = value
        return _resolved(c)["model"]

    # A config from before model.precision and model.loss_scale existed records the same model.
    old = cfg_lib.default().to_dict()
    del old["model"]["precision"], old["model"]["loss_scale"]
    assert _resolved(ml_collections.ConfigDict(old))["model"] == model()
    assert "precision" not in model() and "loss_scale" not in model()
    assert model() == model(precision="fp32")
    assert model(precision="bf16") == model(dtype="bfloat16")
    assert model(precision="fp16")["loss_scale"] == 1024.0
    assert model(precision="fp16", loss_scale=8.0) != model(precision="fp16")
    assert model(loss_scale=8.0) == model()  # unused without float16
