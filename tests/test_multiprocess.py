"""Several processes on jax.distributed (gloo over loopback) give the results of one process.

Each case launches ``bpjax launch --processes 2`` (2 processes x 4 CPU devices) as a subprocess and
compares its losses and its final checkpoint with the same run in this process (1 x 8 devices). The
simulated update schemes and dp's feature partitions run as several runs in one launch (bpjax's
launcher, each process calling the `bpjax.train.run` that ``bpjax run`` calls), to start the processes
once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bpjax import config as cfg_lib
from bpjax import devices, distributed
from bpjax.checkpoint import restore_latest
from bpjax.metrics import read_jsonl
from bpjax.preflight import prepare
from bpjax.testing import assert_trees_close
from bpjax.train import run

SETTINGS = [
    "train.steps=24",
    "train.log_every=4",
    "train.eval_every=0",
    "train.progress=off",
    "model.hidden=(32, 24)",
    "checkpoint.every=12",
    "checkpoint.async_save=False",
    "distributed.heartbeat_timeout_s=5",
]
CASES = {
    "dp": ["parallel.strategy=dp"],
    "pipeline_1f1b": [  # 8 stages: 4 on each process
        "parallel.strategy=pipeline",
        "model.hidden=(32, 24, 24, 24, 16, 16, 16)",
        "parallel.mesh.stage=8",
        "parallel.schedule=1f1b",
        "parallel.microbatches=4",
    ],
    "tensor": ["parallel.strategy=tensor", "parallel.mesh.model=8"],
    "hybrid_fsdp": [
        "parallel.strategy=hybrid",
        "parallel.hybrid_data=fsdp",
        "parallel.mesh.data=4",
        "parallel.mesh.model=2",
    ],
    "pmap": ["parallel.strategy=pmap"],
}
TIMEOUT = 120


def launch(root, workdir, overrides, processes=2, extra=()):
    cmd = [sys.executable, "-m", "bpjax", "launch", "--processes", str(processes)]
    cmd += [str(root / "experiments/mnist1d_dp.py"), "--workdir", str(workdir), *extra]
    cmd += [f"--set={o}" for o in overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=root)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(root, tmp_path, case):
    overrides = SETTINGS + CASES[case]
    proc = launch(root, tmp_path / "run", overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'processes": 2' in proc.stdout

    config = cfg_lib.load(root / "experiments/mnist1d_dp.py", overrides)
    reference = run(config)
    steps, losses = reference.series("train_loss")
    rows = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in rows] == list(steps)
    np.testing.assert_allclose([r["train_loss"] for r in rows], losses, rtol=1e-5)

    # The final checkpoint, written by both processes, read back here onto one device.
    single = prepare(cfg_lib.apply_overrides(config, ["parallel.strategy=single"])).strategy
    step, state = restore_latest(tmp_path / "run/checkpoints", config, single)
    assert step == 24
    assert_trees_close(single.gather(state), reference.state, rtol=1e-5)
    # Only process 0 wrote the log: one row per logged step, not one per process.
    assert len(rows) == 24 // 4


def test_processes_must_divide_devices(root, tmp_path):
    proc = launch(root, tmp_path / "run", SETTINGS + ["parallel.strategy=dp"], processes=3)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: 3 processes cannot share parallel.cpu_devices=8 evenly; use --processes 1 or 2 or 4 or 8"
    )
    assert not (tmp_path / "run").exists()


# Several runs in each of the launched processes, one after the other: what ``bpjax run`` does per run.
WORKER = """
import json, sys
from bpjax import config as cfg_lib, distributed
from bpjax.train import run

with distributed.fail_fast():
    for workdir, overrides in json.loads(sys.argv[2]):
        run(cfg_lib.load(sys.argv[1], overrides), workdir)
"""
SCHEMES = {
    "async": ["parallel.strategy=async", "parallel.staleness=2", "parallel.random_staleness=True"],
    "param_server": ["parallel.strategy=param_server", "parallel.n_push=5", "parallel.n_fetch=3"],
    "local_sgd": ["parallel.strategy=local_sgd", "parallel.local_steps=5", "optimizer.name=momentum"],
    "diloco": ["parallel.strategy=diloco", "parallel.local_steps=5", "parallel.fragments=2"],
    "dp_feature": ["parallel.strategy=dp", "parallel.partition=feature", "parallel.mesh.feature=8"],
    "dp_hybrid": [
        "parallel.strategy=dp",
        "parallel.partition=hybrid",
        "parallel.mesh.data=2",
        "parallel.mesh.feature=4",
    ],
}
# The checkpoint (step 12) falls between local_sgd's averaging steps, DiLoCo's outer steps and the
# parameter server's pushes: the workers' own state is in it.
SCHEME_SETTINGS = [*SETTINGS, "train.steps=12"]


@pytest.mark.slow
def test_simulated_schemes_and_feature_partitions_two_processes_match_one(root, tmp_path):
    runs = [(str(tmp_path / name), SCHEME_SETTINGS + o) for name, o in SCHEMES.items()]
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ)
    env["XLA_FLAGS"] = devices.without_forced_cpu_devices(env.get("XLA_FLAGS", ""))  # 4 each, from config
    code = distributed.launch(
        [str(root / "experiments/mnist1d_dp.py"), json.dumps(runs)],
        2,
        grace_s=15,
        env=env,
        program=(sys.executable, str(tmp_path / "worker.py")),
    )
    assert code == 0

    for name, overrides in SCHEMES.items():
        overrides = SCHEME_SETTINGS + overrides
        config = cfg_lib.load(root / "experiments/mnist1d_dp.py", overrides)
        reference = run(config, tmp_path / f"{name}_one")
        assert json.loads((tmp_path / name / "summary.json").read_text())["processes"] == 2
        steps, losses = reference.series("train_loss")
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(steps), name
        np.testing.assert_allclose([r["train_loss"] for r in rows], losses, rtol=1e-5, err_msg=name)
        # The TrainState both processes saved, read back onto one device...
        single = prepare(cfg_lib.apply_overrides(config, ["parallel.strategy=single"])).strategy
        step, state = restore_latest(tmp_path / name / "checkpoints", config, single)
        assert step == 12
        assert_trees_close(single.gather(state), reference.state, rtol=1e-5, what=name)
        # ... and the whole state (the workers' copies, the history, the cache) in the scheme's own
        # layout, against the one-process run's checkpoint.
        own = prepare(config).strategy
        _, two = restore_latest(tmp_path / name / "checkpoints", config, own)
        _, one = restore_latest(tmp_path / f"{name}_one" / "checkpoints", config, own)
        assert_trees_close(jax.device_get(two), jax.device_get(one), rtol=1e-5, what=name)
