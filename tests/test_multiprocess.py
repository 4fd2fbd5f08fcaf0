"""Several processes on jax.distributed (gloo over loopback) give the results of one process.

Each case launches ``bpjax launch --processes 2`` (2 processes x 4 CPU devices) as a subprocess and
compares its losses and its final checkpoint with the same run in this process (1 x 8 devices).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bpjax import config as cfg_lib
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
    "dp": ["parallel.strategy=dp", "checkpoint.keep_best=eval_loss"],  # both processes save the best
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
    assert len(list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))) == 1
    if "checkpoint.keep_best=eval_loss" in overrides:
        step, best = restore_latest(tmp_path / "run/best_checkpoint", config, single)
        assert step == 24  # the one evaluation
        assert_trees_close(single.gather(best), reference.state, rtol=1e-5)


def test_processes_must_divide_devices(root, tmp_path):
    proc = launch(root, tmp_path / "run", SETTINGS + ["parallel.strategy=dp"], processes=3)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: 3 processes cannot share parallel.cpu_devices=8 evenly; use --processes 1 or 2 or 4 or 8"
    )
    assert not (tmp_path / "run").exists()
