"""Fault injection for the fault tests: ``BPJAX_FAULT`` makes a run fail on purpose, at a chosen point.

  BPJAX_FAULT=raise:STEP:PROCESS     process PROCESS raises RuntimeError after training step STEP
  BPJAX_FAULT=kill_in_save:STEP      the process SIGKILLs itself while checkpoint STEP is being written

Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


def _fault() -> list[str]:
    return os.environ.get("BPJAX_FAULT", "").split(":")


def after_step_check(process: int) -> Callable[[int], None] | None:
    """What the train loop calls after each step on this process: None (read once, before the loop)
    unless ``BPJAX_FAULT`` asks this process to raise."""
    kind, *args = _fault()
    if kind != "raise" or int(args[1]) != process:
        return None
    first = int(args[0])

    def check(step: int) -> None:
        if step >= first:
            raise RuntimeError(f"fault injected by BPJAX_FAULT after step {step}")

    return check


def during_save(step: int) -> None:
    kind, *args = _fault()
    if kind == "kill_in_save" and int(args[0]) == step:
        os.kill(os.getpid(), signal.SIGKILL)
