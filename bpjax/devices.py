"""Devices and meshes.

The number of CPU devices is fixed when JAX's backend starts (the first array op, not ``import jax``).
`use_cpu_devices` sets it before that moment and refuses, with the fix, once it is too late; a count
the user set explicitly with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` wins over the
config's (`cpu_device_count`, the one place that decides). Meshes are
built from ``{axis: size}`` dicts where one size may be -1, "all remaining devices" (as in MaxText).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import jax

from bpjax.errors import UserError, warn

FORCE_FLAG = "--xla_force_host_platform_device_count"
_FORCE = re.compile(rf"(?:^|\s){FORCE_FLAG}=(\S*)")


def forced_cpu_devices(xla_flags: str | None = None) -> int | None:
    """The CPU device count an explicit ``--xla_force_host_platform_device_count=N`` in ``XLA_FLAGS``
    (default: this process's environment) sets, or None. The last one counts, as in XLA; a value XLA
    would crash on is a one-line error."""
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    found = _FORCE.findall(flags)
    if not found:
        return None
    text = found[-1]
    from bpjax.config import MAX_CPU_DEVICES

    if not text.isdigit() or not 1 <= int(text) <= MAX_CPU_DEVICES:
        raise UserError(
            f"XLA_FLAGS has {FORCE_FLAG}={text}; give a whole number in [1, {MAX_CPU_DEVICES}] or remove it"
        )
    return int(text)


def without_forced_cpu_devices(xla_flags: str) -> str:
    """``xla_flags`` without any ``--xla_force_host_platform_device_count``: for processes that must
    simulate the count they are told (e.g. the workers of ``bpjax launch``), not an inherited one."""
    return " ".join(_FORCE.sub(" ", xla_flags).split())


def cpu_device_count(n: int) -> int:
    """How many CPU devices to simulate when ``n`` are asked for: ``n``, unless ``XLA_FLAGS`` sets
    another count explicitly; then the user's flag wins, with a one-line warning naming both."""
    forced = forced_cpu_devices()
    if forced is not None and forced != n:
        warn(
            f"XLA_FLAGS sets {FORCE_FLAG}={forced}, which wins over the {n} CPU devices asked for "
            f"(parallel.cpu_devices); remove the flag or set parallel.cpu_devices={forced} to silence this"
        )
        return forced
    return n


def use_cpu_devices(n: int) -> int:
    """Simulate ``n`` CPU devices. Call before any JAX computation; a no-op if JAX already has ``n``.
    Returns the count simulated: an explicit count in ``XLA_FLAGS`` wins (`cpu_device_count`).

    On a machine with an accelerator this only changes the CPU platform, which strategies do not use.
    """
    if n < 1:
        raise UserError(f"cpu_devices={n} must be >= 1")
    n = cpu_device_count(n)
    try:
        # JAX refuses this option once its backends exist; that refusal is how we detect "too late"
        # without reaching into JAX's private modules.
        jax.config.update("jax_num_cpu_devices", n)
        return n
    except RuntimeError:
        pass
    if jax.default_backend() != "cpu":
        return n
    have = len(jax.devices("cpu"))
    if have != n:
        raise UserError(
            f"JAX already started with {have} CPU devices and cannot switch to {n} in this process; "
            f"call bpjax.use_cpu_devices({n}) before any JAX work, or run in a fresh process (bpjax run)"
        )
    return n


def mesh_axes(mesh_cfg: Mapping[str, int], axes: Sequence[str], strategy: str) -> dict[str, int]:
    """The sizes a strategy lays out over, from ``parallel.mesh``.

    Axes the strategy does not use are ignored when their size is 1 or -1 (so ``--set
    parallel.strategy=tensor`` works on a data-parallel experiment) and an error when larger. One
    missing axis takes the remaining devices unless another axis already does.
    """
    for axis, size in mesh_cfg.items():
        if axis not in axes and size not in (1, -1):
            raise UserError(
                f"{strategy} lays out over mesh axes {tuple(axes)}; remove parallel.mesh.{axis}={size} "
                f"or set it to 1"
            )
    sizes = {a: mesh_cfg[a] for a in axes if a in mesh_cfg}
    missing = [a for a in axes if a not in sizes]
    if len(missing) == 1 and -1 not in sizes.values():
        sizes[missing[0]] = -1
    elif missing:
        example = " ".join(f"--set parallel.mesh.{a}=2" for a in missing)
        raise UserError(f"{strategy} needs the size of mesh axes {missing}; e.g. {example}")
    return {a: sizes[a] for a in axes}


def resolve_mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Replace a -1 size by what the other axes leave of ``num_devices``; check the product fits."""
    axes = dict(axes)
    fixed = math.prod(s for s in axes.values() if s != -1)
    free = [a for a, s in axes.items() if s == -1]
    if len(free) > 1:
        raise UserError("parallel.mesh may use -1 for one axis only; give the other sizes explicitly")
    if free:
        if num_devices % fixed:
            raise UserError(
                f"parallel.mesh {axes} cannot fill {num_devices} devices: {num_devices} is not divisible "
                f"by {fixed}; choose sizes whose product divides {num_devices}"
            )
        axes[free[0]] = num_devices // fixed
    need = math.prod(axes.values())
    if need > num_devices:
        hint = "use a smaller mesh"
        if jax.default_backend() == "cpu":
            forced = forced_cpu_devices()
            hint = (
                f"set parallel.cpu_devices={need} to simulate them"
                if forced is None
                else f"set {FORCE_FLAG}={need} in XLA_FLAGS (it wins over parallel.cpu_devices) or remove it"
            )
        raise UserError(f"parallel.mesh {axes} needs {need} devices but {num_devices} are present; {hint}")
    return axes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh over the first ``prod(sizes)`` devices, with Auto axes so the compiler may partition."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(axes, len(devices))
    n = math.prod(shape.values())
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=auto, devices=devices[:n])


def fit_mesh(mesh: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """A mesh written for simulated CPU devices, fitted to the ``num_devices`` accelerators present.

    Sizes that fit stay as they are (8 simulated devices, 8 GPUs; 3 pipeline stages on 8). Otherwise each axis, in order, keeps
    the largest size that divides both its own and what the axes before it leave of the devices (a
    ``data=8`` run on one GPU becomes ``data=1``; ``data=2 x model=4`` on 2 GPUs ``data=2 x model=1``),
    and a ``-1`` axis takes the rest, as always.
    """
    fixed = math.prod(s for s in mesh.values() if s != -1)
    if fixed <= num_devices and (-1 not in mesh.values() or num_devices % fixed == 0):
        return dict(mesh)
    left, out = num_devices, {}
    for axis, size in mesh.items():
        if size == -1:
            out[axis] = -1
            continue
        out[axis] = math.gcd(size, left)
        left //= out[axis]
    return out


def use_accelerators(config) -> str | None:
    """On an accelerator, a config that asks for simulated CPU devices (``parallel.cpu_devices``) runs
    on the accelerators present instead: its mesh is fitted to them (`fit_mesh`) in place. Returns a
    note of the change for the run's first line, or None (on CPU, or when nothing changes). Call after
    JAX's backends may start (after `use_cpu_devices` and ``jax.distributed.initialize``)."""
    if not config.parallel.cpu_devices or jax.default_backend() == "cpu":
        return None
    mesh = dict(config.parallel.mesh)
    fitted = fit_mesh(mesh, len(jax.devices()))
    if fitted == mesh:
        return None
    with config.parallel.unlocked():
        config.parallel.mesh = type(config.parallel.mesh)(fitted)
    return (
        f"parallel.cpu_devices={config.parallel.cpu_devices} simulates CPU devices; on {len(jax.devices())} "
        f"{jax.default_backend()} device(s) parallel.mesh {mesh} becomes {fitted}"
    )


def describe(devices: Sequence[jax.Device]) -> str:
    """``gpu backend (jax 0.10.2): 2 of 8 devices (NVIDIA H100 80GB HBM3 x2)``, for a run's first line."""
    kinds: dict[str, int] = {}
    for d in devices:
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    what = ", ".join(f"{kind} x{n}" for kind, n in kinds.items())
    total = jax.device_count()
    return (
        f"{jax.default_backend()} backend (jax {jax.__version__}): {len(devices)} of {total} devices ({what})"
    )
