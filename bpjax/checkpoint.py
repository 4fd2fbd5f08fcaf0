"""Checkpoints with orbax-checkpoint: saved in the background, the last K kept, resumed bit-identically,
restored under another strategy.

A checkpoint is a folder ``WORKDIR/checkpoints/STEP/`` with two or three items:
  state   the strategy's state as `Strategy.checkpointing` says: for the strategies whose definition
          says ``portable_checkpoints``, a TrainState in the reference structure, whose arrays orbax
          writes shard by shard from every process and reads back into any other layout (resharding);
  extras  the rest of the state of a strategy with state of its own (async's parameter history, the
          parameter server's cache, the workers' copies of local SGD and DiLoCo): restored under the
          same strategy, mesh and shapes; otherwise the strategy builds it from the TrainState by its
          documented rule (`Checkpointing.fresh`), and a resume says so in one warning line;
  meta    JSON: the step, the strategy and its mesh, and the config sections that must match to resume.

Nothing else is needed to resume bit-identically: the data order and every random draw are pure
functions of (seed, step). orbax writes into a temporary folder and renames it when complete, so a
process killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from bpjax import faults, strategies
from bpjax.errors import UserError, quiet_stderr
from bpjax.models.mlp import resolve_param_dtype
from bpjax.step import PRECISIONS
from bpjax.strategies.base import Strategy
from bpjax.workdir import CHECKPOINTS  # noqa: F401  (re-exported: the folder inside a run's workdir)

# Config sections (or keys) a resumed run must share with the run that saved: they fix the model, the
# optimizer, the data and its order. Steps, strategy, mesh, logging and checkpoint settings may change.
MUST_MATCH = (
    "seed",
    "seeds",
    "data",
    "model",
    "optimizer",
    "train.batch_size",
    "train.loss",
    "train.nonfinite",
)
# Of those, what a resume may change on purpose: re-stretching the learning-rate schedule.
MAY_CHANGE = ("optimizer.schedule_steps",)


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else None
    return config


def _options(config, create: bool, keep: int | None = None) -> ocp.CheckpointManagerOptions:
    c = config.checkpoint
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep or c.keep, enable_async_checkpointing=c.async_save, create=create
    )


def _signature(abstract) -> list[list]:
    """``[path, shape, dtype]`` of every leaf: what a restore needs to find."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return [[jax.tree_util.keystr(path), list(x.shape), str(x.dtype)] for path, x in leaves]


def _ignore_closed_loop_callbacks() -> None:
    """After a failed read or write, tensorstore's callbacks reach orbax's closed event loop and
    Python reports each as an unraisable ``RuntimeError: Event loop is closed`` traceback, from a
    thread no caller sees. Those (only those) are dropped; the failure itself is reported in one line."""
    previous = sys.unraisablehook
    if getattr(previous, "_bpjax", False):
        return

    def hook(unraisable):
        if (
            isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
        ):
            return
        previous(unraisable)

    hook._bpjax = True
    sys.unraisablehook = hook


class Found(NamedTuple):
    """A checkpoint a resume starts from: its step, the restored state, the train loop's host-side
    state saved with it, the newer checkpoints that could not be read, with why, and (empty when the
    checkpoint held all of it) how the strategy's extras were built instead of restored."""

    step: int
    state: Any
    loop: dict
    skipped: list[tuple[int, str]]
    fresh: str = ""


class Unreadable(Exception):
    """A checkpoint whose files cannot be read (truncated, half-deleted, corrupt): a resume falls back
    to an older one. Its message is one short line."""


def _reason(e: BaseException) -> str:
    """The first line of what went wrong, short: orbax and tensorstore errors run to many lines."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full ")[0]
    text = text if len(text) <= 90 else text[:87] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Checkpointer:
    """Saves a strategy's state every ``checkpoint.every`` steps into ``directory``; restores it."""

    def __init__(
        self,
        directory: str | Path,
        config,
        strategy: Strategy,
        *,
        create: bool = True,
        keep: int | None = None,
    ):
        self.directory = Path(directory).absolute()
        self.failed = False  # a read or write failed (and was reported): shut down quietly
        # orbax logs a failed background write through absl, many lines per array, from its own
        # threads; bpjax reports it in one line (`bpjax.train`), so only orbax's fatal messages show.
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        _ignore_closed_loop_callbacks()
        self.codec = strategy.checkpointing
        # keep: how many to keep, if not checkpoint.keep (the best checkpoint's folder keeps one).
        self.manager = ocp.CheckpointManager(self.directory, options=_options(config, create, keep))
        # What every checkpoint of this run says about itself, bar its step (traced once, not per save).
        self._meta = {
            "strategy": strategy.name,
            "portable": strategies.get(strategy.name).portable_checkpoints,
            "mesh": dict(strategy.mesh.shape) if strategy.mesh is not None else {},
            "num_devices": strategy.num_devices,
            "config": {key: _to_json(_get(_resolved(config), key)) for key in MUST_MATCH},
            "shapes": _signature(self.codec.target()),
            "extras": _signature(self.codec.extras()) if self.codec.extras else [],
        }

    def meta(self, step: int) -> dict[str, Any]:
        return {"step": step, **self._meta}

    def save(self, step: int, state, loop: dict | None = None) -> None:
        """Start saving ``state`` as step ``step``; returns once the arrays are copied off the devices.

        ``loop``: the train loop's host-side state at that step (JSON), given back on resume.
        """
        items = {"state": ocp.args.StandardSave(self.codec.save(state))}
        if self.codec.extras:
            items["extras"] = ocp.args.StandardSave(self.codec.save_extras(state))
        self.manager.save(
            step,
            args=ocp.args.Composite(**items, meta=ocp.args.JsonSave({**self.meta(step), "loop": loop or {}})),
            force=True,
        )
        faults.during_save(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete checkpoint's step, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check(self, step: int) -> dict[str, Any]:
        """Raise a one-line `UserError` if checkpoint ``step`` belongs to another run or layout, and
        `Unreadable` if its metadata cannot be read."""
        where = self.directory / str(step)
        try:
            meta = self.read_meta(step)
            meta["config"], meta["shapes"], meta["strategy"], meta["mesh"], meta["portable"]  # noqa: B018
        except Exception as e:  # noqa: BLE001  (a damaged folder: the caller falls back to another)
            raise Unreadable(_reason(e)) from None
        ours = self.meta(step)
        theirs = meta["config"]
        if "seeds" not in theirs and "seed" in theirs:  # from before seeds.*: seed was all three
            theirs = {**theirs, "seeds": dict.fromkeys(("init", "data_order", "split"), theirs["seed"])}
        theirs_flat, ours_flat = _flat(theirs), _flat(ours["config"])
        for key in sorted((set(theirs_flat) | set(ours_flat)) - set(MAY_CHANGE)):
            if theirs_flat.get(key) != ours_flat.get(key):
                raise UserError(
                    f"checkpoint {where} was written with {key}={_short(theirs_flat.get(key))}, this run has "
                    f"{_short(ours_flat.get(key))}; resume with the same {key}, or start a new --workdir"
                )
        same_layout = meta["strategy"] == ours["strategy"] and meta["mesh"] == ours["mesh"]
        if meta["portable"] and not ours["portable"] and not same_layout:
            raise UserError(
                f"{ours['strategy']} keeps state of its own and resumes only from its own checkpoints with the "
                f"same mesh; {where} holds {meta['strategy']} state: use a new --workdir"
            )
        if not (meta["portable"] and ours["portable"]) and not same_layout:
            mesh = ",".join(f"{a}={n}" for a, n in meta["mesh"].items())
            raise UserError(
                f"checkpoint {where} holds {meta['strategy']} state (mesh {mesh}), which restores only under "
                f"{meta['strategy']} with that mesh; resume with --set parallel.strategy={meta['strategy']}, "
                f"or train the portable strategies "
                f"({strategies.names(lambda d: d.portable_checkpoints)})"
            )
        if self.codec.extras and meta["strategy"] == ours["strategy"] and "extras" not in meta:
            # Checkpoints since portable extras say what extras they hold (none: a TrainState only, as
            # a threads run saves); one without the key holds the whole state in the older format.
            raise UserError(
                f"checkpoint {where} holds no {meta['strategy']} state beside its TrainState: it was written in "
                f"another format (e.g. by a bpjax from before {meta['strategy']}'s checkpoints were portable); "
                "resume with the bpjax that wrote it, or start a new --workdir"
            )
        for theirs, mine in zip(meta["shapes"], ours["shapes"], strict=False):
            if theirs != mine:
                raise UserError(
                    f"checkpoint {where} holds state{theirs[0]} of shape {theirs[1]} {theirs[2]}, this run "
                    f"needs {mine[1]} {mine[2]}; resume with the settings that saved it, or start a new --workdir"
                )
        if len(meta["shapes"]) != len(ours["shapes"]):
            raise UserError(
                f"checkpoint {where} holds {len(meta['shapes'])} arrays, this run's state has "
                f"{len(ours['shapes'])}; resume with the settings that saved it, or start a new --workdir"
            )
        return meta

    def fresh(self, meta: dict[str, Any]) -> str:
        """Empty when checkpoint ``meta`` holds this run's extras (same strategy, mesh and shapes);
        otherwise one line saying what they start as (`Checkpointing.fresh`)."""
        ours = self._meta
        if not self.codec.extras:
            return ""
        same = (meta["strategy"], meta["mesh"], meta.get("extras")) == (
            ours["strategy"],
            ours["mesh"],
            ours["extras"],
        )
        if same:
            return ""
        mesh = ",".join(f"{a}={n}" for a, n in meta["mesh"].items())
        held = "other settings" if meta["strategy"] == ours["strategy"] else "its TrainState only"
        return (
            f"checkpoint step {meta['step']} holds {meta['strategy']} state (mesh {mesh}, {held}): "
            f"{ours['strategy']} resumes from its TrainState, and {self.codec.fresh}"
        )

    def restore(self, step: int):
        """The state saved at ``step``, laid out for this run's strategy (resharded as needed).

        Raises `UserError` for a checkpoint of another run or layout, `Unreadable` for damaged files.
        """
        return self._restore_checked(step, self.check(step))

    def _restore_checked(self, step: int, meta: dict[str, Any]):
        """`restore` of a checkpoint whose metadata `check` has already accepted (and returned)."""
        items = {"state": ocp.args.StandardRestore(self.codec.target())}
        with_extras = self.codec.extras is not None and not self.fresh(meta)
        if with_extras:
            items["extras"] = ocp.args.StandardRestore(self.codec.extras())
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001  (tensorstore and orbax raise many kinds for damaged files)
            raise Unreadable(_reason(e)) from None
        if self.codec.extras is None:
            return self.codec.load(restored["state"])
        return self.codec.load(restored["state"], restored["extras"] if with_extras else None)

    def newest_readable(self, restore: bool = True) -> Found:
        """The newest checkpoint that can be read (and restored, with ``restore``; otherwise its
        ``state`` is None), and the newer ones that could not, with why."""
        skipped: list[tuple[int, str]] = []
        for step in self.all_steps():
            try:
                with quiet_stderr():
                    meta = self.check(step)
                    state = self._restore_checked(step, meta) if restore else None
            except Unreadable as e:
                skipped.append((step, str(e)))
                self.failed = True
                # asyncio logs the same failure again for each array's unfinished read.
                logging.getLogger("asyncio").setLevel(logging.CRITICAL)
                continue
            return Found(step, state, meta.get("loop", {}), skipped, self.fresh(meta))
        if not skipped:
            raise UserError(f"--resume: {self.directory} holds no complete checkpoint; run without --resume")
        step, why = skipped[0]
        raise UserError(
            f"--resume: no checkpoint in {self.directory} can be read (the latest, step {step}: {why}); "
            "start a new --workdir"
        )

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        if self.failed:
            with quiet_stderr():  # a failed read's or write's callbacks fire as the manager shuts down
                self.manager.close()
        else:
            self.manager.close()


def _resolved(config) -> dict:
    """The config as a checkpoint records it: the model's compute and parameter dtypes as they resolve
    (``model.precision`` and ``param_dtype=auto`` replaced by the dtypes they stand for, the loss scale
    only where float16 uses it), so that equivalent spellings match, and so do checkpoints written
    before those keys existed."""
    from bpjax.config import seeds

    d = config.to_dict()
    if "seeds" in d:  # the seeds used (-1 is the top-level seed), so that old and new spellings match
        d["seeds"] = seeds(config)
    model = d.get("model", {})
    if "param_dtype" in model:
        precision = model.pop("precision", "auto")
        if precision == "auto":
            dtype = model.get("dtype", "float32")
            model["param_dtype"] = resolve_param_dtype(dtype, model["param_dtype"])
        else:
            model["dtype"], model["param_dtype"] = PRECISIONS[precision]
        scale = model.pop("loss_scale", None)
        if model.get("dtype") == "float16" and scale is not None:
            model["loss_scale"] = scale
    return d


def _to_json(value):
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def _flat(tree, prefix: str = "") -> dict:
    """``{"model": {"hidden": [32]}}`` -> ``{"model.hidden": [32]}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def restore_latest(directory: str | Path, config, strategy: Strategy):
    """``(step, state)`` of the newest readable checkpoint in ``directory``, laid out for ``strategy``."""
    ckpt = Checkpointer(directory, config, strategy, create=False)
    try:
        found = ckpt.newest_readable()
        return found.step, found.state
    finally:
        ckpt.close()
