"""Experiment tracking beside ``metrics.jsonl``: TensorBoard event files and a profiler trace.

Every run with a workdir writes ``WORKDIR/tensorboard/events.out.tfevents.*`` (tensorboardX) from the
leader process, one point per logged row, under these tags:

  train/loss, train/loss_mean       the step's batch loss, the mean since the previous row
  train/learning_rate               the optimizer's schedule at that step
  eval/loss, eval/accuracy          on rows where the test set was evaluated
  perf/samples_per_second           since the previous row; perf/train_seconds, training time so far
  strategy/NAME                     a strategy's own metrics (param_server: bytes_pushed_per_step, ...)

``train.profile = (start, stop)`` also writes a ``jax.profiler`` trace of steps [start, stop) into
``WORKDIR/tensorboard/plugins/profile/``: TensorBoard's profile tab reads it, and so does Perfetto
(https://ui.perfetto.dev, the ``*.trace.json.gz`` file). Open either with
``tensorboard --logdir WORKDIR/tensorboard``.

The train loop calls a `Tracker` at three points: before a call (`before_call`), when it logs a row
(`log`), and at the end (`close`); it needs nothing else of the loop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bpjax.errors import UserError
from bpjax.workdir import TENSORBOARD

# metrics.jsonl key -> TensorBoard tag; a strategy's own ``*_per_step`` metrics go under strategy/.
TAGS = {
    "train_loss": "train/loss",
    "train_loss_mean": "train/loss_mean",
    "learning_rate": "train/learning_rate",
    "eval_loss": "eval/loss",
    "eval_accuracy": "eval/accuracy",
    "samples_per_second": "perf/samples_per_second",
    "train_seconds": "perf/train_seconds",
}


def check(config, workdir) -> None:
    """``train.profile``: two steps, start < stop <= train.steps, and a workdir to write the trace to."""
    profile = tuple(config.train.profile)
    if not profile:
        return
    steps = config.train.steps
    if len(profile) != 2 or not profile[0] < profile[1] <= steps:
        raise UserError(
            f"train.profile={profile} must be (start, stop) with start < stop <= train.steps={steps}, "
            f"e.g. train.profile=({min(10, steps - 1)}, {min(20, steps)})"
        )
    if workdir is None:
        raise UserError("train.profile writes a trace into the run's workdir; give a --workdir (or workdir=)")


class Tracker:
    """TensorBoard events (leader only) and the ``train.profile`` trace of one run."""

    def __init__(self, config, out: Path | None, leader: bool, purge_from: int = 0):
        from bpjax.config import schedule_steps
        from bpjax.step import make_schedule

        self.dir = out / TENSORBOARD if out is not None else None
        self.writer = None
        if self.dir is not None and leader:
            from tensorboardX import SummaryWriter

            # purge_from: a resumed run trains the steps from there again; TensorBoard drops the earlier
            # run's points from that step on (purge_step), as metrics.jsonl drops its rows.
            # tensorboardX names the file by the second and the host: a run resumed within the same
            # second would overwrite the first's. Nanoseconds keep names unique and in order (TensorBoard
            # reads a folder's files in name order, as `read_scalars` does).
            self.writer = SummaryWriter(
                str(self.dir),
                flush_secs=30,
                purge_step=purge_from or None,
                filename_suffix=f".{time.time_ns()}",
            )
            self.writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```", 0)
        self.schedule = make_schedule(config.optimizer, schedule_steps(config))
        self.profile = tuple(config.train.profile) if self.dir is not None else ()
        self.tracing = False

    def learning_rate(self, step: int) -> float:
        """The learning rate the optimizer used for the step after ``step`` steps."""
        return float(self.schedule(step) if callable(self.schedule) else self.schedule)

    def before_call(self, first_step: int, last_step: int) -> None:
        """A call is about to run steps ``first_step`` .. ``last_step - 1``: start the trace if it covers
        ``train.profile``'s start."""
        if self.profile and not self.tracing and first_step <= self.profile[0] < last_step:
            import jax

            # Several processes on one host would write the same file name: one folder each.
            where = self.dir if jax.process_count() == 1 else self.dir / f"process_{jax.process_index()}"
            where.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(where))
            self.tracing = True

    def wants_sync(self, done: int) -> bool:
        """Whether the loop should block now, so that the trace stops at ``train.profile``'s stop."""
        return self.tracing and done >= self.profile[1]

    def after_sync(self, done: int) -> None:
        if self.wants_sync(done):
            self._stop_trace()

    def _stop_trace(self) -> None:
        import jax

        self.tracing = False
        jax.profiler.stop_trace()

    def log(self, row: dict) -> None:
        """One logged row (a ``metrics.jsonl`` line) as scalars at its step."""
        if self.writer is None:
            return
        step = row["step"]
        for key, value in row.items():
            if key == "step" or value is None or isinstance(value, bool):
                continue
            tag = TAGS.get(key) or (f"strategy/{key}" if key.endswith("_per_step") else None)
            if tag is not None:
                self.writer.add_scalar(tag, float(value), step)
        # The rate the optimizer applied in the last step of the row.
        self.writer.add_scalar(TAGS["learning_rate"], self.learning_rate(max(step - 1, 0)), step)

    def close(self) -> None:
        if self.tracing:
            self._stop_trace()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``folder``: tag -> [(step, value)], in the
    order written, as TensorBoard shows them (a resume's restart purges the later points). Reads the
    TFRecord framing directly with tensorboardX's protobuf (no TensorBoard needed)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            record = data[i + 12 : i + 12 + length]  # after the length and its CRC
            i += 12 + length + 4  # and the record's CRC
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                # A resumed run (purge_step): TensorBoard drops the points from that step on.
                out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out
