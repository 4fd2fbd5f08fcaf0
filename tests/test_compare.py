"""bpjax compare: a table, a CSV and two plots from several runs; the study file loads."""

import csv

import numpy as np
import pytest

from bpjax.cli import main
from bpjax.compare import load_runs, steps_to
from bpjax.errors import UserError

STUDY = """
from bpjax.config import default

def base(strategy, **parallel):
    c = default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 400
    c.data.num_features = 16
    c.model.hidden = (16,)
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.train.steps = 12
    c.train.batch_size = 32
    c.train.log_every = 4
    c.train.eval_every = 12
    c.train.progress = "off"
    c.parallel.strategy = strategy
    c.parallel.mesh = {"data": 8}
    for k, v in parallel.items():
        c.parallel[k] = v
    return c

def get_configs():
    return {"sync": base("dp"), "local_H4": base("local_sgd", local_steps=4)}
"""


def test_compare_writes_table_csv_and_plots(tmp_path, capsys):
    study = tmp_path / "study.py"
    study.write_text(STUDY)
    out = tmp_path / "cmp"
    assert main(["compare", str(study), "--workdir", str(out), "--target-loss", "100"]) == 0
    for name in ("comparison.md", "comparison.csv", "loss_vs_step.png", "loss_vs_bytes.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["sync", "local_H4"]
    assert all(r["steps_to_target"] == "4" for r in rows)  # target 100: reached at the first log
    sync, local = (float(r["bytes_per_step"]) for r in rows)
    assert local == pytest.approx(sync * 2 / 4, rel=0.01)  # params + momentum, one step in four
    assert (out / "runs" / "local_H4" / "summary.json").is_file()
    assert "| sync | dp |" in capsys.readouterr().out


def test_steps_to_target():
    steps, losses = np.array([10, 20, 30]), np.array([2.0, 0.9, 0.4])
    assert steps_to(1.0, steps, losses) == 20
    assert steps_to(0.1, steps, losses) is None


def test_the_study_file_loads(root):
    runs = load_runs([str(root / "experiments/study_sync_async.py")], ["train.steps=10"])
    assert list(runs) == [
        "sync",
        "async_tau1",
        "async_tau2",
        "async_tau4",
        "async_tau8",
        "param_server",
        "local_sgd_H4",
        "local_sgd_H16",
        "diloco_H16",
    ]
    assert all(c.train.steps == 10 for c in runs.values())


def test_duplicate_run_names(root):
    path = str(root / "experiments/mnist1d_dp.py")
    with pytest.raises(UserError, match="two runs are named 'mnist1d_dp'"):
        load_runs([path, path], [])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def get_configs():\n    raise KeyError('x')\n", "get_configs() failed"),
        ("def get_configs():\n    return [1, 2]\n", "get_configs() returned list"),
        ("def get_configs():\n    return {}\n", "with no runs"),
    ],
)
def test_a_broken_study_file_is_one_line(tmp_path, body, message):
    study = tmp_path / "study.py"
    study.write_text(body)
    with pytest.raises(UserError) as e:
        load_runs([str(study)], [])
    assert message in str(e.value) and "\n" not in str(e.value)
