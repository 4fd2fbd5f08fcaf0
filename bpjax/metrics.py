"""What a run writes and shows: ``config.json``, ``metrics.jsonl``, ``summary.json``, and progress.

``metrics.jsonl`` holds one JSON object per logged step: ``step`` (training steps completed),
``train_loss`` (the loss of that step's batch), ``train_loss_mean`` (mean since the previous line),
``samples_per_second`` (since the previous line, evaluation excluded), ``train_seconds`` (training
time since the run began, the x axis of loss against wall clock), ``eval_loss`` /
``eval_accuracy`` on the lines where the test set was evaluated, and a strategy's own metrics as
``NAME_per_step`` means since the previous line (param_server: ``bytes_pushed_per_step``,
``bytes_pulled_per_step``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")


def _clean(value: Any) -> Any:
    """JSON has no NaN: non-finite floats are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, obj: dict) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: _clean(v) for k, v in obj.items()}, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Collects logged rows in memory and, with a workdir, appends them to ``metrics.jsonl`` (or to
    ``name``; ``keep=False`` keeps no rows in memory, for long per-step records)."""

    def __init__(self, workdir: Path | None, append: bool = False, name: str = "metrics.jsonl", keep=True):
        self.rows: list[dict] = []
        self.keep = keep
        self._file = open(workdir / name, "a" if append else "w") if workdir else None  # noqa: SIM115
        self.empty = self._file is None or self._file.tell() == 0

    def write(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        if self.keep:
            self.rows.append(row)
        if self._file:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


class Progress:
    """A tqdm bar on a terminal, one plain line per logged step otherwise (``mode``: auto/bar/lines/off)."""

    def __init__(self, total: int, mode: str = "auto", desc: str = ""):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.name = mode, total, desc.split(" [")[0]
        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True) if mode == "bar" else None

    def advance(self, n: int) -> None:
        if self.bar:
            self.bar.update(n)

    def note(self, text: str) -> None:
        """One line on stderr before training starts (what runs where), unless the mode is off."""
        if self.mode != "off":
            (self.bar.write if self.bar else print)(text, file=sys.stderr)

    def log(self, row: dict) -> None:
        if self.bar:
            self.bar.set_postfix(
                {k: f"{row[k]:.4g}" for k in ("train_loss", "eval_accuracy") if row.get(k) is not None}
            )
        elif self.mode == "lines":
            # The run's name first: a comparison's runs print one after another.
            parts = [
                f"{self.name}: step {row['step']}/{self.total}"
                if self.name
                else f"step {row['step']}/{self.total}"
            ]
            for key, fmt in (
                ("train_loss", "loss {:.4f}"),
                ("eval_loss", "eval_loss {:.4f}"),
                ("eval_accuracy", "eval_acc {:.4f}"),
                ("samples_per_second", "{:,.0f} samples/s"),
            ):
                if row.get(key) is not None:
                    parts.append(fmt.format(row[key]))
            print("  ".join(parts), flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
