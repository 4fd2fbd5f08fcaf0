"""Several processes, one run: JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same program on its own devices; collectives cross processes (NCCL on GPUs,
gloo on CPUs). bpjax adds three things around ``jax.distributed.initialize``:

* **Detection.** ``bpjax run`` joins a multi-process run when the environment describes one:
  ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (set by ``bpjax launch``,
  or by hand), or a SLURM job step / Open MPI job with more than one task, whose parameters JAX
  detects itself. Otherwise the run is single-process and nothing is initialised.
* **Bounded failure.** A dead peer is noticed by the coordination service's heartbeat
  (``distributed.heartbeat_timeout_s``, not JAX's 100 s default); a Python exception on one rank ends
  that process at once with `fail_fast` instead of waiting in the shutdown barrier (where JAX would
  otherwise hang every rank).
* **A local launcher.** `launch` starts N processes on loopback for tests and single-node use,
  supervises them, and hard-kills the survivors of a failure after a bounded grace period.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bpjax.errors import Interrupted, OneLineError, UserError

_STARTED = False


@dataclass(frozen=True)
class Cluster:
    """How many processes the environment describes, and the arguments JAX needs (None: it detects)."""

    num_processes: int
    process_id: int | None
    source: str  # "environment", "SLURM" or "Open MPI"
    coordinator_address: str | None = None


def _int_env(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} must be an integer") from None


def detect() -> Cluster | None:
    """The multi-process run this process belongs to, from the environment; None when single-process."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise UserError(
                f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not; set all three, "
                f"or start the processes with bpjax launch"
            )
        n, pid = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
        if n < 1 or not 0 <= pid < n:
            raise UserError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={n})")
        return Cluster(n, pid, "environment", env["JAX_COORDINATOR_ADDRESS"])
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NUM_TASKS" in env and _int_env("SLURM_STEP_NUM_TASKS") > 1:
        return Cluster(_int_env("SLURM_STEP_NUM_TASKS"), None, "SLURM")
    if "OMPI_COMM_WORLD_SIZE" in env and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return Cluster(_int_env("OMPI_COMM_WORLD_SIZE"), None, "Open MPI")
    return None


def num_processes() -> int:
    """Processes in this run as the environment describes it (1 outside a multi-process run)."""
    cluster = detect()
    return cluster.num_processes if cluster else 1


def initialize(distributed_config) -> bool:
    """Join the multi-process run the environment describes, once; False when there is none.

    Must run before JAX's backend starts (the first array operation).
    """
    global _STARTED
    cluster = detect()
    if cluster is None:
        return False
    if _STARTED:
        return True
    import jax

    d = distributed_config
    timeouts = {
        "initialization_timeout": int(d.init_timeout_s),
        "heartbeat_timeout_seconds": int(d.heartbeat_timeout_s),
        "shutdown_timeout_seconds": int(d.shutdown_timeout_s),
    }
    known = inspect.signature(jax.distributed.initialize).parameters
    missing = [k for k in timeouts if k not in known]
    if missing:  # a JAX that renamed them: say so rather than silently wait for its defaults
        print(
            f"bpjax: this JAX's jax.distributed.initialize has no {missing}; using its defaults",
            file=sys.stderr,
        )
    jax.distributed.initialize(
        coordinator_address=cluster.coordinator_address,
        num_processes=cluster.num_processes if cluster.coordinator_address else None,
        process_id=cluster.process_id,
        **{k: v for k, v in timeouts.items() if k in known},
    )
    _STARTED = True
    return True


def process_index() -> int:
    """This process's rank, without starting JAX's backend outside a multi-process run."""
    if not _STARTED:
        return 0
    import jax

    return jax.process_index()


def is_leader() -> bool:
    """Process 0 writes results; the others compute the same run silently."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (a no-op in a single-process run)."""
    if _STARTED:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """In a multi-process run, end this process at once on any exception, with one line on stderr.

    Otherwise the failing rank would wait in JAX's shutdown barrier while still sending heartbeats, and
    every rank would hang. Exiting without that barrier makes the coordination service see the rank as
    dead, and the others abort within ``distributed.heartbeat_timeout_s``.
    """
    try:
        yield
    except BaseException as e:  # noqa: BLE001  (anything at all must end the process)
        if not _STARTED or (isinstance(e, SystemExit) and not e.code):
            raise
        one_line = isinstance(e, OneLineError)  # its message says it all: no traceback
        if not one_line and not isinstance(e, KeyboardInterrupt | SystemExit):
            traceback.print_exc()
        what = str(e) if one_line else f"{type(e).__name__}: {e}"
        if isinstance(e, Interrupted):  # every process stopped at the same step: one line says it
            if process_index() == 0:
                print(f"{e.prefix}: {what}", file=sys.stderr, flush=True)
        else:
            print(f"error: process {process_index()} failed: {what}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if one_line:
            os._exit(e.exit_code)
        os._exit(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code == _HUNG:
        return "stopped running (hung or stopped, not dead)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch(
    args: Sequence[str],
    processes: int,
    grace_s: float,
    env: dict | None = None,
    program: Sequence[str] = (sys.executable, "-m", "bpjax"),
) -> int:
    """Run ``python -m bpjax ARGS`` (``program`` + ARGS) as ``processes`` processes on loopback and
    supervise them.

    Returns 0 when every process succeeds. When one fails, the others get ``grace_s`` seconds to notice
    (through the heartbeat) and exit on their own, then are killed; one line per failed process says
    what happened, and the return value is the first failure's code (1 for a signal).
    """
    port = free_port()
    procs = []
    for rank in range(processes):
        child_env = dict(os.environ if env is None else env)
        child_env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(processes),
            JAX_PROCESS_ID=str(rank),
        )
        procs.append(subprocess.Popen([*program, *args], env=child_env, start_new_session=True))
    print(
        f"bpjax launch: {processes} processes, coordinator 127.0.0.1:{port}, pids "
        + " ".join(str(p.pid) for p in procs),
        file=sys.stderr,
        flush=True,
    )

    def kill_all(sig=signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)

    forwarded: list[int] = []

    def on_signal(signum, _frame):
        # A scheduler's SIGTERM (or Ctrl-C) is the workers' to act on: they save and stop together.
        nonlocal deadline
        if forwarded:  # a second signal: stop now
            kill_all()
            raise SystemExit(128 + signum)
        forwarded.append(signum)
        kill_all(signum)
        deadline = time.monotonic() + grace_s

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    first_failure: tuple[int, int] | None = None
    deadline = None
    try:
        while any(p.poll() is None for p in procs):
            failed = [(r, p.returncode) for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed and first_failure is None:
                # Several may be seen at once; one that JAX aborted (SIGABRT) is a consequence, not the
                # cause, and so is every failure while another process hangs (stopped, not dead).
                first_failure = min(failed, key=_consequence)
                hung = [r for r, p in enumerate(procs) if p.poll() is None and _stopped(p.pid)]
                if any(_consequence(first_failure)) and hung:
                    first_failure = (hung[0], _HUNG)
                deadline = time.monotonic() + grace_s
                rank, code = first_failure
                # After a signal every process saves and stops at the same step on its own: no news.
                if code not in (128 + signal.SIGINT, 128 + signal.SIGTERM):
                    print(
                        f"bpjax launch: process {rank} {_describe_exit(code)}; waiting up to {grace_s:g} s "
                        f"for the others to stop",
                        file=sys.stderr,
                        flush=True,
                    )
            if deadline is not None and time.monotonic() > deadline:
                print(
                    f"bpjax launch: processes still running after {grace_s:g} s; killing them",
                    file=sys.stderr,
                    flush=True,
                )
                kill_all()
            time.sleep(0.1)
    finally:
        kill_all()
        for s, handler in old.items():
            signal.signal(s, handler)
    codes = [p.wait() for p in procs]
    if all(c == 0 for c in codes):
        return 0
    stopped = [128 + s for s in (signal.SIGINT, signal.SIGTERM)]
    if all(c in stopped for c in codes):  # a signal: every process saved and stopped at the same step
        return codes[0]
    cause = first_failure or min(((r, c) for r, c in enumerate(codes) if c), key=_consequence)

    def what(rank: int, code: int) -> str:
        if rank == cause[0] and cause[1] == _HUNG:
            return f"process {rank} stopped running (hung or stopped, not dead) and was killed"
        if code == -signal.SIGABRT and rank != cause[0]:
            return f"process {rank} aborted (SIGABRT: JAX stops a process that loses a peer)"
        return f"process {rank} {_describe_exit(code)}"

    others = [what(r, c) for r, c in enumerate(codes) if r != cause[0]]
    print(
        f"error: the run failed: {what(*cause)}; then " + ", ".join(others),
        file=sys.stderr,
        flush=True,
    )
    return cause[1] if cause[1] > 0 else 1


_HUNG = -1000  # a cause that is no exit code: a process that stopped running but did not exit


def _consequence(failure: tuple[int, int]) -> tuple[bool, bool]:
    """How likely a failure seen at the same moment as others is a consequence rather than the cause:
    a process killed by a signal is the likeliest cause; one that exited with an error may have lost a
    peer inside a collective ("Connection reset by peer"); one JAX aborted (SIGABRT) lost a peer."""
    code = failure[1]
    return (code == -signal.SIGABRT, code > 0)


def _stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP, a debugger) rather than running: Linux's /proc state."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")
