"""bpjax: train back-propagation networks (Flax MLPs) in parallel with JAX, every strategy checked
against one device.

    import bpjax
    bpjax.use_cpu_devices(8)                 # before any JAX work, on a CPU-only machine
    config = bpjax.load_config("experiments/mnist1d_dp.py", ["train.steps=200"])
    result = bpjax.run(config)
    steps, loss = result.series("train_loss")
"""

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
from bpjax.step import Problem, TrainState, make_problem
from bpjax.strategies import REGISTRY, Strategy
from bpjax.train import RunResult, run

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
    "UserError",
    "default_config",
    "load_config",
    "load_data",
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
