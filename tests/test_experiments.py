"""Every experiment file runs a few steps, with its own strategy, in this process (8 devices)."""

from pathlib import Path

import pytest

import bpjax
from bpjax import config as cfg_lib

# Study files (get_configs, for bpjax compare) are tested in tests/test_compare.py.
EXPERIMENTS = sorted(
    f
    for f in (Path(__file__).resolve().parents[1] / "experiments").glob("*.py")
    if "def get_configs" not in f.read_text()
)


def test_experiments_exist():
    names = {p.stem for p in EXPERIMENTS}
    assert {"mnist1d_single", "mnist1d_pmap", "mnist1d_dp", "digits_dp", "synthetic"} <= names
    assert {"mnist1d_tensor", "mnist1d_fsdp", "mnist1d_hybrid", "wide_synthetic"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_runs_a_few_steps(path):
    doc = path.read_text()
    assert '"""' in doc and "Run:" in doc and "Expected:" in doc, (
        f"{path.name}: docstring needs Run: and Expected:"
    )
    assert 'if __name__ == "__main__":' in doc, f"{path.name}: must run itself with python {path}"
    c = cfg_lib.load(path)
    k = c.train.steps_per_call
    c = cfg_lib.load(
        path, [f"train.steps={4 * k}", f"train.eval_every={2 * k}", "train.log_every=2", "train.progress=off"]
    )
    result = bpjax.run(c)
    assert result.summary["steps"] == 4 * k
    assert result.summary["strategy"] == c.parallel.strategy
    assert result.summary["eval_loss"] is not None


def test_mnist1d_data_parallel_curves_equal_single_over_200_steps():
    """The experiments' docstrings promise this; it also catches errors too small for 6 steps to show."""
    import numpy as np

    curves = {}
    for name in ("single", "pmap", "dp"):
        c = cfg_lib.load(
            EXPERIMENTS[0].with_name(f"mnist1d_{name}.py"),
            ["train.steps=200", "train.eval_every=200", "train.log_every=10", "train.progress=off"],
        )
        curves[name] = bpjax.run(c).series("train_loss")[1]
    for name in ("pmap", "dp"):
        np.testing.assert_allclose(curves[name], curves["single"], rtol=1e-5, err_msg=name)


def test_wide_synthetic_does_not_fit_under_dp():
    """The wide experiment's point: dp's memory plan exceeds the per-device budget; tensor's fits."""
    from bpjax.errors import UserError
    from bpjax.plan import check_memory_budget, make_plan, per_device_bytes
    from bpjax.preflight import prepare

    path = EXPERIMENTS[0].with_name("wide_synthetic.py")
    budget = cfg_lib.load(path).parallel.memory_budget_mb
    for name, fits in (("dp", False), ("pmap", False), ("tensor", True), ("fsdp", True)):
        plan = make_plan(
            prepare(cfg_lib.load(path, [f"parallel.strategy={name}", "parallel.memory_budget_mb=0"]))
        )
        assert (per_device_bytes(plan) <= budget * 2**20) == fits, name
        if not fits:
            with pytest.raises(UserError, match=f"{name} needs .* MiB per device"):
                check_memory_budget(plan, budget)
            with pytest.raises(
                UserError, match=f"{name} needs .* MiB per device"
            ):  # before anything is built
                prepare(cfg_lib.load(path, [f"parallel.strategy={name}"]))


def test_examples_are_found_by_name_from_any_folder(tmp_path, monkeypatch, root):
    """``bpjax run mnist1d_dp``: the examples ship in the package (bpjax.experiments in the wheel)."""
    monkeypatch.chdir(tmp_path)
    by_name = cfg_lib.load("mnist1d_dp", ["train.steps=5"])
    assert by_name.to_dict() == cfg_lib.load(root / "experiments/mnist1d_dp.py", ["train.steps=5"]).to_dict()
    assert {p.stem for p in EXPERIMENTS} <= set(cfg_lib.examples())
    assert "study_sync_async" in cfg_lib.examples()  # studies too, for bpjax compare NAME


def test_the_wheel_lists_every_package(root):
    """pyproject.toml names the packages (to map experiments/ to bpjax.experiments): none may be missing."""
    import tomllib

    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "bpjax").rglob("__init__.py")}
    assert found | {"bpjax.experiments"} == listed
