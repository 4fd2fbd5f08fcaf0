"""The command line in fresh processes: ``bpjax run`` writes its three files; bad input exits with 2.

The full bad-input catalogue is tests/test_bad_input.py."""

import json
import os
import subprocess
import sys

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
    # Not a terminal: plain lines, no progress bar; first, on stderr, what runs where.
    assert "step 5/10  loss" in out.stdout
    assert (
        out.stderr.startswith("bpjax: cpu backend (jax ") and "8 of 8 devices (cpu x8); dp over" in out.stderr
    )


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


def test_usage_errors_are_one_line_and_help_still_works():
    """argparse's usage block becomes one ``error:`` line naming the fix; ``--help`` is unchanged."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    bpjax = [sys.executable, "-m", "bpjax"]
    out = subprocess.run([*bpjax, "rnu", "x.py"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert out.stderr == "error: unknown command 'rnu'; did you mean 'run'? (see bpjax --help)\n"
    assert out.stdout == ""
    out = subprocess.run([*bpjax, "run", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.startswith("usage: bpjax run") and out.stderr == ""


def test_help_and_version_start_without_jax(tmp_path):
    """``bpjax --help``, ``--version`` and ``runs`` import no JAX, Flax or orbax (``--help`` took 1.5-1.9 s
    when it did)."""
    code = (
        "import sys\n"
        "from bpjax.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['--version'], ['runs', sys.argv[1]]):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'orbax', 'optax'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout and f"no runs under {tmp_path}" in out.stdout, out.stdout[-500:]
    assert "usage: bpjax" in out.stdout
    from importlib.metadata import version

    assert f"bpjax {version('bpjax')}" in out.stdout
