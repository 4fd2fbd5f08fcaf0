"""A dead or failing process ends the whole multi-process run, non-zero, within a bound; nothing hangs.

Each case launches 2 processes x 4 CPU devices with a 5 s heartbeat, then kills process 0, kills
process 1 (SIGKILL, as the OOM killer or a node failure would), or makes process 1 raise (through
``BPJAX_FAULT``). The surviving process must notice by itself (JAX's coordination service), not be
killed by the launcher; the launcher must exit non-zero and say what happened.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

BOUND_S = 60  # the bound, from the fault to every process gone
HEARTBEAT_S = 5
SETTINGS = [
    "parallel.strategy=dp",
    "model.hidden=(32,)",
    "train.steps=200000",  # far more than the test waits for
    "train.log_every=16",
    "train.eval_every=0",
    "train.progress=off",
    f"distributed.heartbeat_timeout_s={HEARTBEAT_S}",
]


def start(root, workdir, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [
        sys.executable,
        "-m",
        "bpjax",
        "launch",
        "--processes",
        "2",
        str(root / "experiments/mnist1d_dp.py"),
    ]
    cmd += ["--workdir", str(workdir), *[f"--set={o}" for o in SETTINGS]]
    err = open(workdir.parent / "launch.err", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=root, start_new_session=True
    )
    return proc, err


def wait_for(predicate, timeout, proc):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the run to start training")


def finish(proc, err, started):
    """Wait for the launcher within the bound; on failure kill everything, so no test leaves a child."""
    try:
        code = proc.wait(timeout=max(BOUND_S - (time.monotonic() - started), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the run was still going {BOUND_S} s after the fault") from None
    finally:
        err.seek(0)
        text = err.read()
        err.close()
        for pid in worker_pids(text) or ():
            try:
                os.killpg(pid, signal.SIGKILL)  # nothing may survive the test, whatever it asserted
            except ProcessLookupError:
                pass
    return code, time.monotonic() - started, text


def worker_pids(launcher_stderr: str) -> list[int] | None:
    """The workers' pids, from the launcher's first line."""
    found = re.findall(r"pids (\d+) (\d+)", launcher_stderr)
    return [int(p) for p in found[0]] if found else None


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("victim", [0, 1])
def test_killed_process_ends_the_run(root, tmp_path, victim):
    proc, err = start(root, tmp_path / "run")
    metrics = tmp_path / "run/metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, 90, proc)
    assert proc.poll() is None, "the run ended before the fault"
    err.seek(0)
    workers = worker_pids(err.read())
    started = time.monotonic()
    os.kill(workers[victim], signal.SIGKILL)
    code, seconds, text = finish(proc, err, started)
    assert code != 0
    assert seconds < BOUND_S
    assert not any(alive(p) for p in workers)
    assert f"error: the run failed: process {victim} was killed by SIGKILL; then" in text
    survivor = 1 - victim
    # The survivor stopped by itself (JAX aborts it), not by the launcher's kill after the grace period.
    assert re.search(rf"process {survivor} (aborted \(SIGABRT|exited with code [1-9])", text), text[-2000:]
    assert "killing them" not in text


def test_exception_on_one_process_ends_the_run(root, tmp_path):
    proc, err = start(root, tmp_path / "run", {"BPJAX_FAULT": "raise:40:1"})
    started = time.monotonic()
    code, seconds, text = finish(proc, err, started)
    assert code != 0
    assert seconds < BOUND_S + 30  # the start-up, then the bound
    assert "error: process 1 failed: RuntimeError: fault injected by BPJAX_FAULT after step 40" in text
    assert "error: the run failed: process 1 exited with code 1; then process 0 aborted" in text
    assert re.search(r"process 0 (aborted \(SIGABRT|exited with code [1-9])", text), text[-2000:]
    assert "killing them" not in text


@pytest.mark.parametrize("victim", [0, 1])
def test_hung_process_is_named_as_the_cause(root, tmp_path, victim):
    """A process that stops (SIGSTOP) rather than dies: the other aborts through the heartbeat, and the
    launcher names the hung one, not the one that aborted, then kills it."""
    proc, err = start(root, tmp_path / "run")
    metrics = tmp_path / "run/metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, 90, proc)
    err.seek(0)
    workers = worker_pids(err.read())
    started = time.monotonic()
    os.kill(workers[victim], signal.SIGSTOP)
    code, seconds, text = finish(proc, err, started)
    assert code != 0 and seconds < BOUND_S
    assert f"error: the run failed: process {victim} stopped running (hung or stopped, not dead)" in text, (
        text[-2000:]
    )
    assert not any(alive(p) for p in workers)
