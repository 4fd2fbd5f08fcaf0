"""bpjax: train back-propagation networks (Flax MLPs) in parallel with JAX, every strategy checked
against one device.

    import bpjax
    bpjax.use_cpu_devices(8)                 # before any JAX work, on a CPU-only machine
    config = bpjax.load_config("experiments/mnist1d_dp.py", ["train.steps=200"])
    result = bpjax.run(config)
    steps, loss = result.series("train_loss")
    trained = bpjax.load_run(result.workdir)  # later: the config, history and parameters of a run
    trained.predict(x_BxD)

The public names are imported when first used (PEP 562), so that ``bpjax --help``, ``bpjax runs`` and
``bpjax config`` start without importing JAX.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = importlib.metadata.version("bpjax")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

# public name -> (module, attribute in it); a module itself where the attribute is None.
_PUBLIC = {
    "MLP": ("bpjax.models", "MLP"),
    "REGISTRY": ("bpjax.strategies", "REGISTRY"),
    "Batches": ("bpjax.data", "Batches"),
    "Dataset": ("bpjax.data", "Dataset"),
    "Problem": ("bpjax.step", "Problem"),
    "RunResult": ("bpjax.train", "RunResult"),
    "Setup": ("bpjax.preflight", "Setup"),
    "Strategy": ("bpjax.strategies", "Strategy"),
    "TrainState": ("bpjax.step", "TrainState"),
    "TrainedRun": ("bpjax.runs", "TrainedRun"),
    "UserError": ("bpjax.errors", "UserError"),
    "default_config": ("bpjax.config", "default"),
    "load_config": ("bpjax.config", "load"),
    "load_data": ("bpjax.data", "load"),
    "load_run": ("bpjax.runs", "load_run"),
    "logical_axes": ("bpjax.models", "logical_axes"),
    "make_mesh": ("bpjax.devices", "make_mesh"),
    "make_plan": ("bpjax.plan", "make_plan"),
    "Plan": ("bpjax.plan", "Plan"),
    "make_problem": ("bpjax.step", "make_problem"),
    "prepare": ("bpjax.preflight", "prepare"),
    "run": ("bpjax.train", "run"),
    "strategies": ("bpjax.strategies", None),
    "use_cpu_devices": ("bpjax.devices", "use_cpu_devices"),
}

__all__ = [
    "MLP",
    "REGISTRY",
    "Batches",
    "Dataset",
    "Problem",
    "RunResult",
    "Setup",
    "Strategy",
    "TrainState",
    "TrainedRun",
    "UserError",
    "default_config",
    "load_config",
    "load_data",
    "load_run",
    "logical_axes",
    "make_mesh",
    "make_plan",
    "Plan",
    "make_problem",
    "prepare",
    "run",
    "strategies",
    "use_cpu_devices",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'bpjax' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:  # what type checkers and editors see
    from bpjax import strategies
    from bpjax.config import default as default_config
    from bpjax.config import load as load_config
    from bpjax.data import Batches, Dataset
    from bpjax.data import load as load_data
    from bpjax.devices import make_mesh, use_cpu_devices
    from bpjax.errors import UserError
    from bpjax.models import MLP, logical_axes
    from bpjax.plan import Plan, make_plan
    from bpjax.preflight import Setup, prepare
    from bpjax.runs import TrainedRun, load_run
    from bpjax.step import Problem, TrainState, make_problem
    from bpjax.strategies import REGISTRY, Strategy
    from bpjax.train import RunResult, run
