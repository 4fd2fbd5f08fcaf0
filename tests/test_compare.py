"""bpjax compare: a table, a CSV and two plots from several runs; the study file loads."""

import csv
import json

import numpy as np
import pytest
from ml_collections import ConfigDict

import bpjax
from bpjax import config as cfg_lib
from bpjax.cli import main
from bpjax.compare import human_bytes, load_runs, parse_seeds, steps_to
from bpjax.errors import UserError
from bpjax.metrics import read_jsonl

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
    for name in (
        "comparison.md",
        "comparison.csv",
        "loss_vs_step.png",
        "loss_vs_bytes.png",
        "loss_vs_time.png",
    ):
        assert (out / name).stat().st_size > 0, name
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["sync", "local_H4"]
    assert all(r["steps_to_target"] == "4" for r in rows)  # target 100: reached at the first log
    sync, local = (float(r["bytes_per_step"]) for r in rows)
    assert local == pytest.approx(sync * 2 / 4, rel=0.01)  # params + momentum, one step in four
    assert (out / "runs" / "local_H4" / "summary.json").is_file()
    # Wall clock: the training time at the first row under the target, and in all (metrics.jsonl's).
    for r in rows:
        logged = read_jsonl(out / "runs" / r["run"] / "metrics.jsonl")
        assert float(r["seconds_to_target"]) == pytest.approx(logged[0]["train_seconds"])
        assert float(r["train_seconds"]) == pytest.approx(logged[-1]["train_seconds"])
        assert float(r["train_seconds"]) > 0
    printed = capsys.readouterr().out
    assert "| sync | dp |" in printed and "time to target (s)" in printed
    # A second comparison into the same folder is refused, and nothing changes; --overwrite replaces it.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["compare", str(study), "--workdir", str(out)]) == 2
    assert "already holds a comparison (comparison.md)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_default_target_is_reached_by_every_run_and_seeds_give_mean_and_std(tmp_path, capsys):
    study = tmp_path / "study.py"
    study.write_text(STUDY)
    out = tmp_path / "cmp"
    assert main(["compare", str(study), "--workdir", str(out), "--seeds", "0,1"]) == 0
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["steps_to_target"] and r["seconds_to_target"] for r in rows)
    assert "± " in (out / "comparison.md").read_text()
    for r in rows:
        runs = [out / "runs" / r["run"] / f"seed_{s}" for s in (0, 1)]
        summaries = [json.loads((p / "summary.json").read_text()) for p in runs]
        losses = [s["eval_loss"] for s in summaries]
        assert losses[0] != losses[1]  # another initialisation and batch order
        assert float(r["eval_loss"]) == pytest.approx(np.mean(losses))
        assert float(r["eval_loss_std"]) == pytest.approx(np.std(losses))
        # ... on the same data: seeds.split stays fixed while seed changes.
        configs = [
            cfg_lib.merge_into_default(ConfigDict(json.loads((p / "config.json").read_text()))) for p in runs
        ]
        assert [c.seed for c in configs] == [0, 1] and configs[0].seeds == configs[1].seeds
        data = [bpjax.load_data(c.data, cfg_lib.seeds(c)["split"]) for c in configs]
        np.testing.assert_array_equal(data[0].x_test, data[1].x_test)


def test_progress_lines_name_their_run(capsys):
    from bpjax.metrics import Progress

    Progress(12, "lines", desc="sync [dp]").log({"step": 4, "train_loss": 1.5})
    assert capsys.readouterr().out == "sync: step 4/12  loss 1.5000\n"  # compare prints runs in turn


def test_seed_lists_and_byte_units():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5") == [3, 4, 5]
    for bad, message in [("a", "whole numbers"), ("1,1", "twice"), ("-1", "outside"), ("", "whole numbers")]:
        with pytest.raises(UserError, match=message):
            parse_seeds(bad)
    assert [human_bytes(n) for n in (512, 12_500, 3.2e6, 1e10)] == ["512 B", "12.5 KB", "3.2 MB", "10 GB"]


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
