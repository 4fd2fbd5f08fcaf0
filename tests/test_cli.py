"""The command line: ``bpjax run`` writes its three files; bad input is one line, exit 2, nothing written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bpjax.cli import main

FAST = [
    "--set",
    "train.steps=10",
    "--set",
    "train.eval_every=5",
    "--set",
    "train.log_every=5",
    "--set",
    "data.num_samples=1000",
]


def test_bpjax_run_writes_config_metrics_summary(root, tmp_path):
    """The installed console script, in a fresh process, as a user types it."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the experiment's parallel.cpu_devices=8 must do this on its own
    cmd = [
        sys.executable,
        "-m",
        "bpjax",
        "run",
        str(root / "experiments/mnist1d_dp.py"),
        *FAST,
        "--workdir",
        str(tmp_path / "run"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == "dp" and summary["num_devices"] == 8 and summary["steps"] == 10
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]
    assert {"step", "train_loss", "eval_loss", "eval_accuracy", "samples_per_second"} <= set(rows[-1])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["steps"] == 10 and config["parallel"]["strategy"] == "dp"
    # Not a terminal: plain lines, no progress bar.
    assert "step 5/10  loss" in out.stdout


def test_experiment_file_runs_itself(root, tmp_path):
    cmd = [
        sys.executable,
        str(root / "experiments/mnist1d_single.py"),
        *FAST,
        "--workdir",
        str(tmp_path / "r"),
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "summary.json").is_file()


def test_bad_input_exit_code_in_a_fresh_process(root, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "bpjax",
        "run",
        str(root / "experiments/mnist1d_dp.py"),
        "--set",
        "train.setps=5",
        "--workdir",
        str(tmp_path / "r"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: unknown config key 'train.setps'; did you mean 'train.steps'?"
    assert not (tmp_path / "r").exists()


def _bad_files(tmp_path):
    x = np.ones((40, 3))
    x[5, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(40) % 2)
    (tmp_path / "bad.csv").write_text("1,2,3\n4,x,6\n")


BAD_INPUT = [
    (
        ["--set", "train.batchsize=64"],
        "unknown config key 'train.batchsize'; did you mean 'train.batch_size'?",
    ),
    (["--set", "parallel.strategy=tensr"], "unknown strategy 'tensr'"),
    (
        ["--set", "train.batch_size=100"],
        "train.batch_size=100 is not divisible by 8 data-parallel devices; use a multiple of 8",
    ),
    (["--set", "parallel.mesh.data=16"], "parallel.mesh {'data': 16} needs 16 devices but 8 are present"),
    (["--set", "model.hidden=(100,-5)"], "model.hidden[1]=-5: layer widths must be positive integers"),
    (
        ["--set", "optimizer.learning_rate=-0.1"],
        "optimizer.learning_rate=-0.1 must be a positive finite number",
    ),
    (
        ["--set", "data.name=npz", "--set", "data.path=/no/such/file.npz"],
        "data.path='/no/such/file.npz': no such file",
    ),
    (["--set", "data.name=csv", "--set", "data.path={tmp}/bad.csv"], "row 2 is not numeric"),
    (
        ["--set", "data.name=npz", "--set", "data.path={tmp}/nan.npz"],
        "1 NaN/Inf values in the inputs (first in example 5, counting from 0)",
    ),
    (["--set", "train.steps_per_call=7"], "train.steps=3000 is not a multiple of train.steps_per_call=7"),
    (["--set", "parallel.mesh.model=2"], "dp lays out over mesh axes ('data',); remove parallel.mesh.model"),
    (
        [
            "--set",
            "parallel.strategy=pipeline",
            "--set",
            "parallel.mesh.stage=3",
            "--set",
            "parallel.microbatches=5",
        ],
        "train.batch_size=128 is not divisible by parallel.microbatches=5",
    ),
    (
        ["--set", "parallel.strategy=tensor", "--set", "parallel.mesh.model=8"],
        "layer_0.kernel: hidden_a width 100 is not divisible by the model axis of size 8",
    ),
    (["--set", "parallel.strategy=hybrid"], "hybrid needs the size of mesh axes ['model']"),
    (
        ["--set", "parallel.strategy=pipeline", "--set", "parallel.mesh.stage=4"],
        "4 pipeline stages for a net of 3 layers",
    ),
    (
        [
            "--set",
            "parallel.strategy=pipeline",
            "--set",
            "parallel.mesh.stage=3",
            "--set",
            "optimizer.name=lamb",
        ],
        "lamb's per-layer trust ratio",
    ),
    (["--set", "parallel.memory_budget_mb=0.01"], "dp needs 0.2 MiB per device"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[m.split(";")[0][:40] for _, m in BAD_INPUT])
def test_bad_input_is_one_clear_line_and_writes_nothing(root, tmp_path, capsys, args, message):
    _bad_files(tmp_path)
    workdir = tmp_path / "run"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["run", str(root / "experiments/mnist1d_dp.py"), *args, "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not workdir.exists()
