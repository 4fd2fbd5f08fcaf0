"""Using finished runs: TensorBoard events, keep-best, early stopping, ``bpjax.load_run``, ``bpjax runs``,
``bpjax predict``. One small run (trained once for the module) serves most tests."""

import json

import numpy as np
import pytest

import bpjax
from bpjax import config as cfg_lib
from bpjax.cli import main
from bpjax.metrics import read_jsonl
from bpjax.tracking import read_scalars


def small_config(*overrides: str):
    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 300
    c.data.num_features = 8
    c.data.noise = 0.3
    c.model.hidden = (32,)
    c.optimizer.learning_rate = 0.03
    c.optimizer.schedule = "cosine"
    c.train.steps = 60
    c.train.batch_size = 32
    c.train.eval_every = 10
    c.train.log_every = 10
    c.train.progress = "off"
    c.checkpoint.every = 20
    c.checkpoint.keep_best = "eval_loss"
    c.name = "small"
    return cfg_lib.apply_overrides(c, list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "small"
    result = bpjax.run(small_config(), workdir)
    return workdir, result


def test_tensorboard_events_hold_the_logged_values(trained):
    workdir, result = trained
    scalars = read_scalars(workdir / "tensorboard")
    rows = read_jsonl(workdir / "metrics.jsonl")
    for key, tag in [
        ("train_loss", "train/loss"),
        ("eval_loss", "eval/loss"),
        ("eval_accuracy", "eval/accuracy"),
        ("samples_per_second", "perf/samples_per_second"),
    ]:
        expected = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6, err_msg=tag)
    # The cosine schedule as optax applied it in each row's last step: decaying from 0.03 towards 0.
    lr = dict(scalars["train/learning_rate"])
    assert list(lr) == [10, 20, 30, 40, 50, 60]
    assert lr[10] == pytest.approx(0.03 * 0.5 * (1 + np.cos(np.pi * 9 / 60)), rel=1e-5)
    assert all(a > b for a, b in zip(list(lr.values()), list(lr.values())[1:], strict=False))


def test_keep_best_keeps_the_best_evaluation(trained):
    workdir, result = trained
    rows = [r for r in result.history if r.get("eval_loss") is not None]
    best = min(rows, key=lambda r: r["eval_loss"])
    assert [p.name for p in (workdir / "best_checkpoint").iterdir() if p.name.isdigit()] == [
        str(best["step"])
    ]
    assert result.summary["best_step"] == best["step"]
    assert result.summary["best_eval_loss"] == pytest.approx(best["eval_loss"])
    # Its parameters give that test loss again.
    run = bpjax.load_run(workdir, best=True)
    assert run.step == best["step"]
    assert run.evaluate()["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-6)


def test_load_run_predicts_as_the_run_evaluated(trained):
    workdir, result = trained
    run = bpjax.load_run(workdir)
    assert run.step == 60 and run.config.train.steps == 60 and len(run.history) == 6
    ds = run.dataset
    accuracy = float(np.mean(run.predict(ds.x_test, standardized=True) == ds.y_test))
    assert accuracy == pytest.approx(result.summary["eval_accuracy"], abs=1e-9)
    assert run.evaluate() == pytest.approx(
        {k: result.summary[k] for k in ("eval_loss", "eval_accuracy")}, rel=1e-6
    )
    # Raw inputs, as a data file holds them, are standardized as in training.
    raw = run.config.copy_and_resolve_references()
    raw.data.standardize = False
    raw_ds = bpjax.load_data(raw.data, 0)
    np.testing.assert_array_equal(run.predict(raw_ds.x_test), run.predict(ds.x_test, standardized=True))
    assert run.evaluate((raw_ds.x_test, raw_ds.y_test)) == pytest.approx(run.evaluate(), rel=1e-6)


def test_bpjax_predict_writes_csv_and_npz(trained, tmp_path, capsys, monkeypatch):
    workdir, result = trained
    run = bpjax.load_run(workdir)
    raw = run.config.copy_and_resolve_references()
    raw.data.standardize = False
    x = bpjax.load_data(raw.data, 0).x_test
    np.savez(tmp_path / "inputs.npz", x=x)
    np.savetxt(tmp_path / "inputs.csv", x, delimiter=",", header=",".join(f"f{i}" for i in range(8)))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(workdir), "inputs.csv"]) == 0
    assert "wrote 60 predictions" in capsys.readouterr().out
    lines = (tmp_path / "inputs.predictions.csv").read_text().splitlines()
    assert lines[0] == "prediction,p0,p1,p2,p3,p4,p5,p6,p7,p8,p9"
    from_csv = np.array([int(line.split(",")[0]) for line in lines[1:]])
    np.testing.assert_array_equal(from_csv, run.predict(x))
    assert main(["predict", str(workdir), "inputs.npz", "--output", "p.npz", "--best"]) == 0
    with np.load(tmp_path / "p.npz") as f:
        np.testing.assert_array_equal(f["prediction"], bpjax.load_run(workdir, best=True).predict(x))
        np.testing.assert_allclose(f["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


def test_bpjax_runs_lists_finished_and_unfinished_runs(trained, tmp_path, capsys):
    workdir, result = trained
    unfinished = workdir.parent / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((workdir / "config.json").read_text())
    (unfinished / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "train_loss": 2.5, "samples_per_second": 1234.0}) + "\n"
    )
    assert main(["runs", str(workdir.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run",
        "strategy",
        "mesh",
        "steps",
        "train_loss",
        "eval_loss",
        "eval_accuracy",
        "samples/s",
        "status",
    ]
    small = lines[1].split()
    assert small[:4] == ["small", "single", "data=-1", "60/60"] and small[-1] == "finished"
    assert float(small[6]) == pytest.approx(result.summary["eval_accuracy"], abs=1e-3)
    assert lines[2].split() == [
        "unfinished",
        "single",
        "data=-1",
        "10/60",
        "2.5",
        "-",
        "-",
        "1,234",
        "unfinished",
    ]


def test_early_stopping_and_a_profile_trace(tmp_path):
    # A large learning rate on noisy labels: the test loss rises after its best early on.
    c = small_config(
        "optimizer.learning_rate=0.3",
        "optimizer.schedule='constant'",
        "train.steps=200",
        "train.eval_every=5",
        "train.log_every=5",
        "train.early_stop_patience=2",
        "checkpoint.every=0",
        "checkpoint.keep_best=''",
        "train.profile=(5, 10)",
    )
    result = bpjax.run(c, tmp_path / "r")
    evals = [r["eval_loss"] for r in result.history if r.get("eval_loss") is not None]
    stop = result.summary["steps"]
    assert result.summary["stopped_early"] and stop < 200
    assert result.history[-1]["step"] == stop
    # It stopped at the second evaluation in a row without a new best, and not before.
    best = np.minimum.accumulate(evals)
    assert evals[-1] > best[-3] and evals[-2] > best[-3] and evals[-3] == best[-3]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["stopped_early"] is True
    # train.profile: a jax.profiler trace for TensorBoard (xplane) and Perfetto (trace.json.gz).
    traces = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "r" / "tensorboard").rglob("*.*.*"))
    assert "xplane.pb" in traces and "trace.json.gz" in traces, traces


def test_resume_keeps_the_schedule_unless_asked(tmp_path, capsys):
    """Raising train.steps on --resume keeps the cosine schedule of the first start (one line says so);
    optimizer.schedule_steps re-stretches it."""
    first = small_config("train.steps=20", "checkpoint.every=10", "checkpoint.keep_best=''")
    bpjax.run(first, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["optimizer"]["schedule_steps"] == 20
    capsys.readouterr()
    import shutil

    shutil.rmtree(tmp_path / "r" / "checkpoints" / "20")  # as if stopped before it was saved
    longer = small_config("train.steps=40", "checkpoint.every=10", "checkpoint.keep_best=''")
    bpjax.run(longer, tmp_path / "r", resume=True)
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line == (
        "resuming at step 10 of 40: the learning-rate schedule spans 20 steps, as when the run started; "
        "--set optimizer.schedule_steps=N re-stretches it"
    )
    # TensorBoard drops the first run's step 20 (purge_step), as metrics.jsonl drops its row.
    losses = read_scalars(tmp_path / "r" / "tensorboard")["train/loss"]
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [s for s, _ in losses] == [r["step"] for r in rows] == [10, 20, 30, 40]
    np.testing.assert_allclose([v for _, v in losses], [r["train_loss"] for r in rows], rtol=1e-6)
    lr = dict(read_scalars(tmp_path / "r" / "tensorboard")["train/learning_rate"])
    assert lr[30] == pytest.approx(0.0, abs=1e-9) and lr[40] == pytest.approx(0.0, abs=1e-9)  # decayed at 20
    # Asked: the schedule spans 60 steps from the start, so it is part-way down at step 40.
    restretch = cfg_lib.apply_overrides(longer, ["train.steps=60", "optimizer.schedule_steps=60"])
    bpjax.run(restretch, tmp_path / "r", resume=True)
    assert "spans 60 steps, as asked (optimizer.schedule_steps)" in capsys.readouterr().out
    lr = dict(read_scalars(tmp_path / "r" / "tensorboard")["train/learning_rate"])
    assert lr[50] == pytest.approx(0.03 * 0.5 * (1 + np.cos(np.pi * 49 / 60)), rel=1e-5)


def test_a_run_from_before_seeds_and_schedule_steps_resumes(tmp_path, capsys):
    """Checkpoints and config.json written before seeds.* and optimizer.schedule_steps existed."""
    c = small_config("train.steps=20", "checkpoint.every=10", "checkpoint.keep_best=''", "seed=3")
    bpjax.run(c, tmp_path / "r")
    for meta_file in (tmp_path / "r" / "checkpoints").glob("*/meta/metadata"):
        meta = json.loads(meta_file.read_text())
        assert meta["config"]["seeds"] == {"init": 3, "data_order": 3, "split": 0}  # as used
        del meta["config"]["seeds"], meta["config"]["optimizer"]["schedule_steps"]
        meta["config"]["seed"] = 0  # then seed was all three; split 0 is what this run used too
        meta_file.write_text(json.dumps(meta))
    old = json.loads((tmp_path / "r" / "config.json").read_text())
    del old["seeds"], old["optimizer"]["schedule_steps"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(old))
    capsys.readouterr()
    resumed = small_config("train.steps=30", "checkpoint.every=10", "checkpoint.keep_best=''", "seed=0")
    resumed = cfg_lib.apply_overrides(resumed, ["seeds.init=3", "seeds.data_order=3"])
    with pytest.raises(bpjax.UserError, match="written with seeds.data_order=0, this run has 3"):
        bpjax.run(resumed, tmp_path / "r", resume=True)
    same = small_config("train.steps=30", "checkpoint.every=10", "checkpoint.keep_best=''", "seed=0")
    bpjax.run(same, tmp_path / "r", resume=True)
    assert "spans 20 steps, as when the run started" in capsys.readouterr().out


def test_load_run_of_a_strategy_with_state_of_its_own(tmp_path):
    """async's checkpoint holds its delayed gradients beside the TrainState: one device gets the TrainState."""
    c = small_config(
        "train.steps=20",
        "checkpoint.keep_best=''",
        "parallel.strategy=async",
        "parallel.staleness=1",
        "parallel.mesh.data=2",
    )
    result = bpjax.run(c, tmp_path / "r")
    run = bpjax.load_run(tmp_path / "r")
    assert run.step == 20 and run.config.parallel.strategy == "async"
    assert run.evaluate()["eval_accuracy"] == pytest.approx(result.summary["eval_accuracy"], abs=1e-9)
    from bpjax.testing import assert_trees_close

    assert_trees_close(run.params, result.state.params, rtol=0, atol=0)  # bit for bit


def test_predict_a_regression_run(tmp_path, monkeypatch, capsys):
    c = small_config(
        "data.name=synthetic_regression",
        "data.num_targets=2",
        "train.loss=mse",
        "train.steps=10",
        "train.eval_every=10",
        "checkpoint.every=10",
        "checkpoint.keep_best=''",
    )
    result = bpjax.run(c, tmp_path / "r")
    run = bpjax.load_run(tmp_path / "r")
    assert run.evaluate()["eval_loss"] == pytest.approx(result.summary["eval_loss"], rel=1e-6)
    x = run.dataset.x_test  # standardized already: predict with standardized=True equals outputs
    assert run.predict(x, standardized=True).shape == (len(x), 2)
    np.savez(tmp_path / "in.npz", x=np.ones((3, 8)))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(tmp_path / "r"), "in.npz"]) == 0
    lines = (tmp_path / "in.predictions.csv").read_text().splitlines()
    assert lines[0] == "target0,target1" and len(lines) == 4
    np.testing.assert_allclose(
        np.array([[float(v) for v in line.split(",")] for line in lines[1:]]),
        run.predict(np.ones((3, 8))),
        rtol=1e-6,
    )
