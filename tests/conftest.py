"""Test setup: 8 simulated CPU devices, forced before JAX starts and checked.

Every test runs on the CPU, also on machines with an accelerator: the equivalence suite is defined on
8 CPU devices. Tests that need another device count run it in a subprocess.
"""

import os
import re
import tempfile
from pathlib import Path

NUM_DEVICES = 8

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
# The MNIST-1D cache goes to a shared temporary folder, not the user's home.
os.environ.setdefault("BPJAX_CACHE", str(Path(tempfile.gettempdir()) / "bpjax-test-cache"))
# JAX's persistent compilation cache, for every program however fast it compiles: the suite compiles
# the same small programs many times over (each strategy's reference run, and the subprocesses of the
# multi-process, checkpoint and fault tests), and reusing them cuts about a fifth of its time. The
# environment carries it into the subprocesses. A cached program is the same executable, bit for bit.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(os.environ["BPJAX_CACHE"]) / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402  (after XLA_FLAGS, on purpose)

# Raises if JAX's backend already started (then something imported before conftest used JAX).
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
assert len(jax.devices()) == NUM_DEVICES, f"expected {NUM_DEVICES} CPU devices, got {jax.devices()}"

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def momentum_problem():
    """``(config, problem, batches)``: a small synthetic classification net trained with SGD momentum,
    whose update is linear in the gradient (what the simulations of the update schemes assume)."""
    from bpjax import config as cfg_lib
    from bpjax import data
    from bpjax.step import make_problem

    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 600
    c.data.num_features = 24
    c.model.hidden = (32, 16)
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.1
    c.lock()
    ds = data.load(c.data, 0)
    return c, make_problem(c, ds.num_features, ds.num_outputs), data.Batches(ds.x_train, ds.y_train, 64, 0)
