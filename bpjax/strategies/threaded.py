"""Real asynchrony: one Python thread per worker, a parameter server that applies updates as they
arrive, a stale-synchronous-parallel (SSP) bound, stragglers, and a trace that replays bit for bit.

``parallel.execution = "threads"`` runs ``async`` and ``param_server`` this way; ``"simulated"`` (the
default) keeps their deterministic lockstep simulation. ``parallel.replay = PATH`` makes the simulation
apply exactly the updates a threads run recorded, in the same order.

Layout: ``server W[D, F] on device 0; worker w: In[B, D] · W_(v_w)[D, F] on device w``, where ``v_w`` is
the version it last fetched.

The threads run (`make_threads`):
  * A version is the number of updates the server has applied; the server's TrainState has step = its
    version. A *step* of the train loop is one update: one worker's gradient of one whole batch of
    ``train.batch_size``, so ``train.steps`` counts updates, a learning-rate schedule counts updates, and
    checkpoints fall between updates. Batch ``t`` of the usual data stream feeds the ``t``-th claimed
    piece of work.
  * Each of the W workers is a thread driving its own device. It claims the next batch, fetches the
    server's current parameters (``async``: before every batch; ``param_server``: every ``n_fetch`` of its
    batches, its cache in between), computes the loss and gradient there, and pushes the gradient; the
    server applies each push at once, under one lock, in arrival order, with no barrier.
  * SSP (Ho et al. 2013): worker w may start a batch only while it is at most ``s = parallel.staleness``
    batches ahead of the slowest worker (its *clock*: batches it finished). s = 0 is bulk-synchronous;
    s = -1 is unbounded (fully asynchronous).
  * Stragglers: ``parallel.stragglers = {w: f}`` makes worker w take f times as long per gradient: after
    its computation (timed) it sleeps (f - 1) times that long, so the delay is around its own work.
  * Each call of the loop's step is a pause point: the workers finish the batches of the call, then all
    start the next call from the server's current parameters. The loop logs, evaluates and saves
    between calls, so ``train.steps_per_call`` is how often the workers pause (use 50 or more).
  * Everything is compiled before the first batch (the gradient program once per worker device, the
    server's update once); the threads only dispatch compiled programs and share no traced values.

Every applied update is recorded: ``{"step": v, "worker": w, "batch": t, "read": r, "staleness": v-1-r,
"loss": ...}`` (the version it produced, who computed it on which batch, the version it read); the loop
writes these to ``staleness.jsonl`` in the run's workdir. `make_replay` applies such a trace: update v is
the gradient of batch t at version r, computed by the same compiled program on the same kind of
device, applied by the same server program, so the replay ends bit-identical to the real run in
parameters, optimizer state and every logged loss.

Across processes this would take a server process (or one process's device) that the workers reach
without JAX collectives: collectives are SPMD and every process must join each one, which is exactly
the barrier asynchrony removes. It would need point-to-point transfers (e.g. gRPC, or
``jax.experimental.transfer``) and is not built: threads runs are single-process.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np

from bpjax.config import with_schedule_steps
from bpjax.devices import make_mesh, mesh_axes
from bpjax.errors import UserError
from bpjax.schema import Choice, Dict, Int, Str
from bpjax.step import Problem, TrainState
from bpjax.strategies.base import EVENTS_FORMAT, Checkpointing, Cost, CostInput, Strategy
from bpjax.workdir import TRACE

AXIS = "data"
EVENTS = TRACE  # the trace a threads run writes into its workdir
# Config sections a replay must share with the run that recorded the trace (as a resume must).
MUST_MATCH = ("seed", "data", "model", "optimizer", "train.batch_size", "train.loss", "train.steps_per_call")

UNBOUNDED = (
    "parallel.staleness=-1 (unbounded) needs parallel.execution=threads; the simulation needs a fixed bound"
)

# The settings `async` and `param_server` share (one declaration, as the registry requires).
SETTINGS = {
    "execution": Choice(
        "simulated",
        ("simulated", "threads"),
        "simulated: deterministic lockstep; threads: one thread per worker, no barrier, SSP bound "
        "parallel.staleness",
    ),
    "staleness": Int(
        0,
        "simulated async: the gradient delay tau (or its bound with random_staleness); threads: SSP's "
        "bound s, how many batches a worker may run ahead of the slowest (-1: unbounded)",
        min=-1,
        note="0 is synchronous; -1 (unbounded) needs threads execution",
    ),
    "stragglers": Dict(
        {},
        "worker -> slowdown, e.g. {3: 4.0}: worker 3 takes 4x as long per gradient (threads execution)",
        min=1.0,
    ),
    "replay": Str("", "a staleness.jsonl trace of a threads run: apply exactly its updates, in its order"),
}


# --------------------------------------------------------------------------------------- checks


def multi_process(parallel) -> bool:
    """Threads runs and replays dispatch to devices of one process (the module docstring says why)."""
    return parallel.execution == "simulated" and not parallel.replay


MULTI_PROCESS_WHEN = "execution=simulated and no replay"


def check(config) -> None:
    """The combinations of execution, staleness, stragglers and replay that mean something."""
    p = config.parallel
    threads = p.execution == "threads"
    if p.stragglers and not threads:
        raise UserError("parallel.stragglers needs parallel.execution=threads (real workers to slow down)")
    if p.replay and threads:
        raise UserError(
            "parallel.replay applies a recorded trace in the simulation; set parallel.execution=simulated"
        )
    if p.get("random_staleness") and (threads or p.replay):
        what = "in threads execution the delays are real" if threads else "the trace fixes every delay"
        raise UserError(f"parallel.random_staleness has no meaning here ({what}); set it to False")
    if p.staleness == -1 and not threads:
        raise UserError(UNBOUNDED)
    if p.replay:
        check_trace(read_trace(p.replay), config)


def read_trace(path: str | Path) -> tuple[dict, list[dict]]:
    """``(header, updates)`` of a ``staleness.jsonl``; one-line errors for anything else."""
    where = f"parallel.replay={str(path)!r}"
    p = Path(path).expanduser()
    if p.is_dir() and (p / EVENTS).is_file():
        p = p / EVENTS  # a run's workdir names its trace
    if not p.is_file():
        raise UserError(f"{where}: no such file; give the staleness.jsonl of a threads run (or its workdir)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{where}: not a trace of JSON lines ({type(e).__name__}); give a staleness.jsonl"
        ) from None
    if not rows or not isinstance(rows[0], dict) or rows[0].get("bpjax_events") != EVENTS_FORMAT:
        raise UserError(
            f"{where}: not a bpjax trace (no header line); give the staleness.jsonl of a threads run"
        )
    header, updates = dict(rows[0]), rows[1:]
    keys = ("step", "worker", "batch", "read")
    for i, u in enumerate(updates):
        ok = isinstance(u, dict) and all(isinstance(u.get(k), int) and u[k] >= 0 for k in keys)
        if ok and u["step"] > i + 1:  # a resume under simulated execution recorded nothing for a while
            header["gap"] = (i, u["step"])
            return header, updates[:i]
        if not ok or u["step"] != i + 1 or u["read"] >= u["step"]:
            raise UserError(
                f"{where}: line {i + 2} is not update {i + 1} of a trace (step, worker, batch, read); the "
                "file is damaged"
            )
    return header, updates


def check_trace(trace: tuple[dict, list[dict]], config) -> None:
    """The trace was recorded under this config (data, model, optimizer, batches) and covers its steps."""
    header, updates = trace
    # Copies (JSON-normalised) whose optimizer.schedule_steps is compared apart, after the length.
    recorded = json.loads(json.dumps(with_schedule_steps(header.get("config", {}))))
    ours = json.loads(json.dumps(with_schedule_steps(config.to_dict())))
    schedule = []
    for d in (recorded, ours):
        opt = d.get("optimizer")
        schedule.append(opt.pop("schedule_steps", None) if isinstance(opt, dict) else None)
    for key in MUST_MATCH:
        a, b = _get(recorded, key), _get(ours, key)
        if a != b:
            raise UserError(
                f"parallel.replay: the trace was recorded with {key}={a!r}, this run has {b!r}; replay it "
                "under the config that recorded it"
            )
    if len(updates) < config.train.steps:
        gap = header.get("gap")
        then = (
            f" (then it jumps to update {gap[1]}: the run went on under simulated execution)" if gap else ""
        )
        raise UserError(
            f"parallel.replay: the trace holds {len(updates)} updates{then}; set train.steps <= {len(updates)}"
        )
    if schedule[0] is not None and schedule[0] != schedule[1]:
        raise UserError(
            f"parallel.replay: the trace was recorded with a learning-rate schedule over {schedule[0]} steps, "
            f"this run's spans {schedule[1]}; set optimizer.schedule_steps={schedule[0]}"
        )


def _get(d: Mapping, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, Mapping) else None
    return d


def stragglers_of(stragglers: Mapping, workers: int) -> np.ndarray:
    """Slowdown per worker, from ``{worker: slowdown}`` (checked against the worker count)."""
    slow = np.ones(workers)
    for w, f in dict(stragglers).items():
        w = int(w)
        if not 0 <= w < workers:
            raise UserError(
                f"parallel.stragglers names worker {w}, but there are {workers} workers (0 to {workers - 1})"
            )
        slow[w] = float(f)
    return slow


# --------------------------------------------------------------------------------- the programs


class _Programs:
    """The compiled programs a threads run and its replay share: the loss and gradient on each worker's
    device, and the server's update on device 0. Built (compiled) once, before any thread starts."""

    def __init__(self, problem: Problem, devices, state, batch):
        self.devices, self.server = tuple(devices), devices[0]
        on = lambda tree, d: jax.device_put(tree, d)  # noqa: E731
        one = jax.tree.map(lambda x: x[0], batch)
        grad = jax.jit(problem.loss_and_grads)  # with train.accumulate's microbatches, as every strategy
        self.grad = [grad.lower(on(state.params, d), on(one, d)).compile() for d in self.devices]
        # The server keeps every version it made (no donation): a version a worker is still copying
        # stays valid, and a replay can read old versions.
        apply = jax.jit(problem.apply_gradients)
        self.apply = apply.lower(on(state, self.server), on(state.params, self.server)).compile()

    def as_text(self) -> str:
        return self.grad[0].as_text() + "\n" + self.apply.as_text()

    def memory_analysis(self):
        return self.grad[0].memory_analysis()

    def gradient(self, w: int, params, batch_t):
        """``(loss, grads)`` of one batch on worker w's device (params already there)."""
        d = self.devices[w % len(self.devices)]
        return self.grad[w % len(self.devices)](params, jax.device_put(batch_t, d))

    def to_server(self, grads):
        return jax.device_put(grads, self.server)

    def fetch(self, w: int, params):
        return jax.device_put(params, self.devices[w % len(self.devices)])


class HostStep:
    """A step driven from the host (threads, or a replay) that looks like a jitted one to the loop:
    ``step.lower(state, batch).compile()`` compiles every program up front and returns the runner;
    calling ``step(state, batch)`` directly compiles on first use."""

    def __init__(self, problem: Problem, devices, make_run: Callable[[_Programs], Callable]):
        # make_run(programs) -> run(state, batch) -> (state, losses, staleness, events) for K updates
        self._problem, self._devices, self._make_run = problem, tuple(devices), make_run
        self._runner = None

    def lower(self, state, batch):
        return _Lowered(self, state, batch)

    def __call__(self, state, batch):
        if self._runner is None:
            self.lower(state, batch).compile()
        return self._runner(state, batch)


class _Lowered:
    def __init__(self, step: HostStep, state, batch):
        self.step, self.args = step, (state, batch)

    def compile(self):
        s = self.step
        if s._runner is None:
            programs = _Programs(s._problem, s._devices, *self.args)
            s._runner = _Runner(programs, s._make_run(programs))
        return s._runner


class _Runner:
    """A compiled host step: callable, and answers ``as_text``/``memory_analysis`` like a compiled
    program (``bpjax plan --compiled`` reads the worker's and the server's programs). Its metrics:
    each update's loss and staleness, and the events (the trace's lines, each with its loss)."""

    def __init__(self, programs: _Programs, run: Callable):
        self.programs, self.run = programs, run

    def __call__(self, state, batch):
        state, losses, stale, events = self.run(state, batch)
        losses = [float(x) for x in jax.device_get(losses)]
        for e, loss in zip(events, losses, strict=True):
            e["loss"] = loss
        metrics = {
            "loss": np.asarray(losses, np.float32),
            "staleness": np.asarray(stale, np.float32),
            "events": events,
        }
        return state, metrics

    def as_text(self) -> str:
        return self.programs.as_text()

    def memory_analysis(self):
        return self.programs.memory_analysis()


def _host_strategy(name: str, layout: str, problem: Problem, mesh, step: HostStep) -> Strategy:
    """The Strategy around a host-driven step: state is a plain TrainState on the server's device
    (device 0), batches stay on the host until a worker takes one."""
    server = jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])
    init = jax.jit(problem.init, out_shardings=server)
    return Strategy(
        name=name,
        layout=layout,
        devices=tuple(mesh.devices.flat),
        data_parallel=1,  # every worker takes whole batches
        init=init,
        shard_batch=lambda batch: jax.tree.map(np.asarray, batch),
        step=step,
        gather=lambda state: jax.tree.map(np.asarray, jax.device_get(state)),
        checkpointing=Checkpointing(lambda: jax.eval_shape(init, jax.random.key(0))),
        mesh=mesh,
        events=EVENTS,
    )


# ------------------------------------------------------------------------------------ threads run


def host_driven(
    problem: Problem,
    mesh: dict,
    *,
    name: str,
    execution: str,
    replay: str,
    staleness: int,
    fetch_every: int,
    stragglers: Mapping,
) -> Strategy | None:
    """The threads run or the replay that these settings ask for; None: the strategy's own simulation."""
    if execution == "threads":
        return make_threads(
            problem, mesh, name=name, staleness=staleness, fetch_every=fetch_every, stragglers=stragglers
        )
    if replay:
        return make_replay(problem, mesh, name=name, path=replay)
    return None


def make_threads(
    problem: Problem,
    mesh: dict,
    *,
    name: str,
    staleness: int,
    fetch_every: int,
    stragglers: Mapping,
) -> Strategy:
    """W worker threads and a server, as the module docstring says; ``fetch_every`` batches between
    a worker's fetches (1: before every batch)."""
    mesh = make_mesh(mesh_axes(dict(mesh), (AXIS,), name))
    W = mesh.shape[AXIS]
    slow = stragglers_of(stragglers, W)
    bound = None if staleness == -1 else staleness

    def make_run(programs: _Programs):
        return lambda state, batch: _Call(programs, state, batch, W, bound, fetch_every, slow).run()

    s = "unbounded" if bound is None else f"<= {bound}"
    fetch = "before every batch" if fetch_every == 1 else f"every {fetch_every} batches"
    layout = (
        f"server W[D, F] on device 0; {W} worker threads In[B, D] · W_(v_w)[D, F], fetched {fetch}; "
        f"SSP staleness {s}"
    )
    return _host_strategy(name, layout, problem, mesh, HostStep(problem, mesh.devices.flat, make_run))


class _Call:
    """One call of a threads step: K batches, W workers, one server; returns when all K are applied."""

    def __init__(self, programs: _Programs, state: TrainState, batch, W, bound, fetch_every, slow):
        self.p, self.state, self.batch = programs, state, batch
        self.W, self.bound, self.fetch_every, self.slow = W, bound, fetch_every, slow
        self.K = jax.tree.leaves(batch)[0].shape[0]
        self.start = self.version = int(state.step)
        self.next = 0  # the next batch of the call to claim
        self.clock = [0] * W  # batches each worker finished in this call
        self.cond = threading.Condition()
        self.losses, self.stale, self.events = [None] * self.K, [0] * self.K, [None] * self.K
        self.error: BaseException | None = None
        # Every worker starts claiming batches at once (not the first thread started before the last).
        self.ready = threading.Barrier(W)

    def run(self):
        threads = [threading.Thread(target=self.worker, args=(w,), daemon=True) for w in range(self.W)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.error is not None:
            raise self.error
        return self.state, self.losses, self.stale, self.events

    def _may_start(self, w: int) -> bool:
        return self.bound is None or self.clock[w] - min(self.clock) <= self.bound

    def worker(self, w: int) -> None:
        try:
            self.ready.wait()
            params, read, done = None, 0, 0
            while True:
                fetched = None
                with self.cond:
                    self.cond.wait_for(lambda: self.next >= self.K or self.error or self._may_start(w))
                    if self.next >= self.K or self.error:
                        return
                    j = self.next
                    self.next += 1
                    if done % self.fetch_every == 0:  # the first batch of a call always fetches
                        fetched, read = self.state.params, self.version
                # Versions are never changed in place (no donation), so copies happen outside the lock.
                if fetched is not None:
                    params = self.p.fetch(w, fetched)
                batch_t = {k: v[j] for k, v in self.batch.items()}
                began = time.perf_counter()
                loss, grads = self.p.gradient(w, params, batch_t)
                jax.block_until_ready(grads)
                if self.slow[w] > 1:  # a straggler: its own work takes slow[w] times as long
                    time.sleep((self.slow[w] - 1) * (time.perf_counter() - began))
                grads = self.p.to_server(grads)
                with self.cond:  # the server: one update at a time, in arrival order
                    self.state = self.p.apply(self.state, grads)
                    self.version += 1
                    i = self.version - self.start - 1
                    self.losses[i], self.stale[i] = loss, self.version - 1 - read
                    self.events[i] = {
                        "step": self.version,
                        "worker": w,
                        "batch": self.start + j,
                        "read": read,
                        "staleness": self.version - 1 - read,
                    }
                    self.clock[w] += 1
                    done += 1
                    self.cond.notify_all()
        except BaseException as e:  # reported by the caller's thread, once every worker has stopped
            with self.cond:
                self.error = self.error or e
                self.cond.notify_all()


# ------------------------------------------------------------------------------------------ replay


def make_replay(problem: Problem, mesh: dict, *, name: str, path: str) -> Strategy:
    """Apply a threads run's recorded updates in order: update v is the gradient of batch t at version
    r, from worker w's program; bit-identical to the run that recorded them."""
    mesh = make_mesh(mesh_axes(dict(mesh), (AXIS,), name))
    header, updates = read_trace(path)

    def make_run(programs: _Programs):
        def run(state: TrainState, batch):
            K = jax.tree.leaves(batch)[0].shape[0]
            start = int(state.step)
            versions = {start: state}  # this call's versions (reads never reach before the call)
            mine = updates[start : start + K]
            last_read = {u["read"]: i for i, u in enumerate(mine)}  # a version goes after its last read
            losses, stale, events = [], [], []
            for i, u in enumerate(mine):
                t, r = u["batch"] - start, u["read"]
                if r not in versions or not 0 <= t < K:
                    raise UserError(
                        f"parallel.replay: update {u['step']} reads version {r} or batch {u['batch']} "
                        f"outside the call that starts at step {start}; the trace was recorded with "
                        f"train.steps_per_call={_get(header.get('config', {}), 'train.steps_per_call')}"
                    )
                params = programs.fetch(u["worker"], versions[r].params)
                loss, grads = programs.gradient(u["worker"], params, {k: v[t] for k, v in batch.items()})
                state = versions[u["step"]] = programs.apply(state, programs.to_server(grads))
                for v in [v for v in versions if v != u["step"] and last_read.get(v, -1) <= i]:
                    del versions[v]
                losses.append(loss)
                stale.append(u["step"] - 1 - r)
                events.append(
                    {k: u[k] for k in ("step", "worker", "batch", "read")} | {"staleness": stale[-1]}
                )
            return state, losses, stale, events

        return run

    layout = f"replay of {len(updates)} recorded updates from {header.get('workers', '?')} workers, in order"
    return _host_strategy(name, layout, problem, mesh, HostStep(problem, mesh.devices.flat, make_run))


def cost(inp: CostInput) -> Cost:
    """No collectives: each update copies the parameters to the worker (a fetch) and its gradient to
    the server (a push), host-driven transfers between devices."""
    param_bytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(inp.params))
    return Cost(
        [],
        [
            f"{inp.strategy.name} runs real worker threads: per update, a push of {param_bytes:,} bytes "
            "(the gradient, to the server on device 0) and at most one fetch of as many (the parameters, "
            "to the worker); host-driven copies, no collectives"
        ],
    )
