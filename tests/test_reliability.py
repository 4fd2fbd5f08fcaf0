"""Nothing lost: signals save and stop, a workdir in use is refused, a damaged checkpoint falls back to
an intact one, --overwrite and a failed --resume never destroy a run, and a full disk is one line."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_checkpoint import BASE, EXPERIMENT, assert_trees_equal, config, without_timing

from bpjax import workdir as workdir_lib
from bpjax.checkpoint import restore_latest
from bpjax.errors import UserError
from bpjax.metrics import read_jsonl
from bpjax.preflight import prepare
from bpjax.train import run

LONG = ["train.steps=1200", "checkpoint.every=400", "train.steps_per_call=4"]


def bpjax(root, args, workdir, overrides, env=None, err=None) -> subprocess.Popen:
    """``bpjax ARGS`` in a subprocess, its stderr in ``err`` (default ``WORKDIR.err``)."""
    cmd = [sys.executable, "-m", "bpjax", *args, "--workdir", str(workdir)]
    cmd += [f"--set={o}" for o in [*BASE, *overrides]]
    with open(err or Path(str(workdir) + ".err"), "w") as err:
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=root, env=env, start_new_session=True
        )


def stderr_of(workdir) -> str:
    return Path(str(workdir) + ".err").read_text()


def wait_for_rows(proc, workdir, rows=1, limit=90):
    """Until the run has logged ``rows`` rows (it is training, past compilation)."""
    log, end = Path(workdir) / "metrics.jsonl", time.monotonic() + limit
    while not (log.exists() and len(log.read_text().splitlines()) >= rows):
        assert proc.poll() is None and time.monotonic() < end, stderr_of(workdir)
        time.sleep(0.02)


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
        if p.name != ".lock"
    }


def random_delay() -> float:
    return np.random.default_rng(int(os.environ.get("BPJAX_TEST_SEED", "0"))).uniform(0.0, 0.5)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_and_resume_is_bit_identical(root, tmp_path, signum, code):
    reference = run(config(root, *LONG), tmp_path / "whole")
    proc = bpjax(root, ["run", str(root / EXPERIMENT)], tmp_path / "run", LONG)
    wait_for_rows(proc, tmp_path / "run")
    time.sleep(random_delay())
    os.killpg(proc.pid, signum)
    assert proc.wait(timeout=60) == code, stderr_of(tmp_path / "run")
    lines = stderr_of(tmp_path / "run").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stopped: {signal.Signals(signum).name} at step "), lines
    step = int(lines[0].split(" at step ")[1].split(";")[0])
    assert 0 < step < 1200 and f"--resume --workdir {tmp_path / 'run'}" in lines[0]
    assert (tmp_path / "run/checkpoints" / str(step)).is_dir()

    resumed = run(config(root, *LONG), tmp_path / "run", resume=True)
    assert resumed.summary["resumed_from_step"] == step
    assert_trees_equal(resumed.state, reference.state)
    assert without_timing(read_jsonl(tmp_path / "run/metrics.jsonl")) == without_timing(
        read_jsonl(tmp_path / "whole/metrics.jsonl")
    )


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_process_at_one_step(root, tmp_path):
    """Two processes: the launcher forwards SIGTERM; both stop at the same step with one checkpoint, and
    resuming in two processes equals the uninterrupted run."""
    overrides = [
        "train.steps=240",
        "checkpoint.every=80",
        "train.steps_per_call=4",
        "distributed.heartbeat_timeout_s=5",
    ]
    launch = ["launch", "--processes", "2", str(root / EXPERIMENT)]
    whole = bpjax(root, launch, tmp_path / "whole", overrides)
    assert whole.wait(timeout=180) == 0, stderr_of(tmp_path / "whole")
    proc = bpjax(root, ["launch", "--processes", "2", str(root / EXPERIMENT)], tmp_path / "run", overrides)
    wait_for_rows(proc, tmp_path / "run", limit=120)
    time.sleep(random_delay())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 143, stderr_of(tmp_path / "run")
    stopped = [line for line in stderr_of(tmp_path / "run").splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1, stderr_of(tmp_path / "run")
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert (tmp_path / "run/checkpoints" / str(step)).is_dir()
    resume = bpjax(
        root, ["launch", "--processes", "2", str(root / EXPERIMENT), "--resume"], tmp_path / "run", overrides
    )
    assert resume.wait(timeout=180) == 0, stderr_of(tmp_path / "run")
    assert without_timing(read_jsonl(tmp_path / "run/metrics.jsonl")) == without_timing(
        read_jsonl(tmp_path / "whole/metrics.jsonl")
    )
    assert_trees_equal(
        final_state(root, overrides, tmp_path / "run"), final_state(root, overrides, tmp_path / "whole")
    )


def final_state(root, overrides, workdir):
    cfg = config(root, *overrides)
    step, state = restore_latest(workdir / "checkpoints", cfg, prepare(cfg).strategy)
    assert step == cfg.train.steps
    return prepare(cfg).strategy.gather(state)


def test_a_workdir_in_use_is_refused_and_a_killed_run_leaves_no_lock(root, tmp_path):
    long = [
        "train.steps=40000",
        "checkpoint.every=400",
        "train.steps_per_call=4",
    ]  # killed long before its end
    proc = bpjax(root, ["run", str(root / EXPERIMENT)], tmp_path / "run", long)
    wait_for_rows(proc, tmp_path / "run")
    for extra in (["--overwrite"], ["--resume"], []):
        second = bpjax(root, ["run", str(root / EXPERIMENT), *extra], tmp_path / "run", long)
        assert second.wait(timeout=60) == 2
        lines = stderr_of(tmp_path / "run").strip().splitlines()
        assert len(lines) == 1 and "is in use by another bpjax run" in lines[0], lines
    assert proc.poll() is None  # the first run trains on, untouched
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The kernel released the lock with the process: the run can be resumed at once.
    resumed = run(config(root, *LONG), tmp_path / "run", overwrite=True)
    assert resumed.summary["steps"] == 1200


def test_only_one_process_of_a_run_probes_the_workdir_lock(tmp_path):
    # A probe takes the lock for an instant: the processes of one run probing at once (all of them
    # resume at the same moment) would take each other's probe for a run in use. Here a probe is
    # under way while process 1 checks.
    (tmp_path / "checkpoints").mkdir()
    probe = workdir_lib._lock(tmp_path)
    probe.acquire()
    try:
        with pytest.raises(UserError, match="is in use by another bpjax run"):
            workdir_lib.check(tmp_path, overwrite=False, resume=True)
        assert workdir_lib.check(tmp_path, overwrite=False, resume=True, probe_lock=False) == tmp_path
    finally:
        probe.release()


def test_a_damaged_checkpoint_falls_back_to_an_intact_one(root, tmp_path, capfd):
    overrides = ["train.steps=96", "checkpoint.every=32", "checkpoint.keep=3"]
    reference = run(config(root, *overrides), tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "run")
    # Damage the last two checkpoints' arrays (a truncated copy, a half-deleted folder) and resume the
    # run from before them, to its end.
    for f in (tmp_path / "run/checkpoints/96/state").rglob("*"):
        if f.is_file() and "ocdbt" in str(f):
            f.write_bytes(f.read_bytes()[:5])
    for f in (tmp_path / "run/checkpoints/64/state").rglob("*"):  # every array file gone, metadata kept
        if f.is_file() and f.parent.name == "d":
            f.unlink()
    (tmp_path / "run/summary.json").unlink()
    capfd.readouterr()
    resumed = run(config(root, *overrides), tmp_path / "run", resume=True)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 2 and all(w.startswith("warning: checkpoint") for w in warnings), err
    assert all("cannot be read" in w and "resuming from step 32" in w for w in warnings)
    assert resumed.summary["resumed_from_step"] == 32
    assert_trees_equal(resumed.state, reference.state)
    assert (tmp_path / "run/damaged-checkpoints").is_dir()  # kept for inspection, out of the way


def test_no_readable_checkpoint_is_one_line_and_leaves_the_run_as_it_was(root, tmp_path):
    overrides = ["train.steps=64", "checkpoint.every=32"]
    run(config(root, *overrides), tmp_path / "run")
    for f in (tmp_path / "run/checkpoints").rglob("*"):
        if f.is_file() and "ocdbt" in str(f):
            f.unlink()
    before = snapshot(tmp_path / "run")
    proc = bpjax(
        root, ["run", str(root / EXPERIMENT), "--resume"], tmp_path / "run", ["train.steps=96", overrides[1]]
    )
    assert proc.wait(timeout=60) == 2
    lines = stderr_of(tmp_path / "run").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume: no checkpoint in"), lines
    assert snapshot(tmp_path / "run") == before


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_a_checkpoint(root, tmp_path):
    overrides = ["train.steps=64", "checkpoint.every=32"]
    old = run(config(root, *overrides), tmp_path / "run")
    before = snapshot(tmp_path / "run")
    # A new run that fails before its first checkpoint (a NaN at once) puts the earlier run back.
    with pytest.raises(Exception, match="non-finite|became"):
        run(config(root, *overrides, "optimizer.learning_rate=1e30"), tmp_path / "run", overwrite=True)
    assert snapshot(tmp_path / "run") == before
    # A new run that gets there replaces it, and leaves nothing of it behind.
    new = run(config(root, *overrides, "seed=1"), tmp_path / "run", overwrite=True)
    assert new.summary["final_train_loss"] != old.summary["final_train_loss"]
    assert not [p for p in tmp_path.joinpath("run").iterdir() if p.name.startswith(".replaced")]
    assert read_jsonl(tmp_path / "run/metrics.jsonl")[-1]["train_loss"] == new.summary["final_train_loss"]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only; elsewhere the test is skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(root, small_disk, tmp_path):
    # 40-256-256-10 with Adam: ~1 MiB per checkpoint on a 3 MiB disk; a later one cannot fit.
    overrides = ["model.hidden=(256, 256)", "train.steps=64", "checkpoint.every=16", "checkpoint.keep=5"]
    proc = bpjax(root, ["run", str(root / EXPERIMENT)], small_disk / "run", overrides, err=tmp_path / "err")
    code = proc.wait(timeout=120)
    err = (tmp_path / "err").read_text()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err[-3000:]
    assert (
        len(lines) == 1
        and lines[0].startswith("error: cannot write")
        and "no space left on device" in lines[0]
    ), lines
    steps = sorted(int(p.name) for p in (small_disk / "run/checkpoints").iterdir() if p.name.isdigit())
    assert steps, "the first checkpoint fitted"
    assert f"checkpoint {steps[-1]} is intact" in lines[0]


def test_resume_mid_window_logs_the_same_rows(root, tmp_path):
    """A checkpoint between two logged rows (a signal's, or checkpoint.every not a multiple of
    train.log_every) carries the losses since the last row: the resumed run logs the same means."""
    overrides = ["train.steps=48", "checkpoint.every=20", "checkpoint.keep=3", "train.steps_per_call=4"]
    reference = run(config(root, *overrides), tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "run")
    for step in ("40", "48"):
        shutil.rmtree(tmp_path / "run/checkpoints" / step)
    resumed = run(config(root, *overrides), tmp_path / "run", resume=True)
    assert resumed.summary["resumed_from_step"] == 20  # between the rows at 16 and 24
    assert_trees_equal(resumed.state, reference.state)
    assert without_timing(read_jsonl(tmp_path / "run/metrics.jsonl")) == without_timing(
        read_jsonl(tmp_path / "whole/metrics.jsonl")
    )
