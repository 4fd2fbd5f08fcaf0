import json

import jax
import numpy as np
import pytest

import bpjax
from bpjax import config as cfg_lib
from bpjax.errors import UserError
from bpjax.metrics import read_jsonl


def small_config(**overrides):
    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 400
    c.data.num_features = 12
    c.model.hidden = (32,)
    c.train.steps = 20
    c.train.batch_size = 32
    c.train.eval_every = 10
    c.train.log_every = 5
    c.train.progress = "off"
    return cfg_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])


def test_run_logs_evaluates_and_summarises(tmp_path):
    result = bpjax.run(small_config(), tmp_path / "run")
    steps, losses = result.series("train_loss")
    assert list(steps) == [5, 10, 15, 20]
    assert np.isfinite(losses).all()
    eval_steps, acc = result.series("eval_accuracy")
    assert list(eval_steps) == [10, 20]
    assert 0 <= acc.min() and acc.max() <= 1
    s = result.summary
    for key in (
        "strategy",
        "num_devices",
        "steps",
        "final_train_loss",
        "eval_loss",
        "eval_accuracy",
        "samples_per_second",
        "compile_seconds",
        "wall_seconds",
    ):
        assert s[key] is not None, key
    assert s["final_train_loss"] == losses[-1]
    assert s["model"] == "12-32-10 relu"
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows == result.history
    assert all(r["samples_per_second"] > 0 for r in rows)
    seconds = [r["train_seconds"] for r in rows]  # cumulative training time: loss against wall clock
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 20
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 20


def test_eval_metrics_are_exact(tmp_path):
    """The logged test loss and accuracy equal a direct computation on the final parameters."""
    result = bpjax.run(small_config(**{"data.num_samples": 20000}))  # 4000 test examples: one chunk
    setup = bpjax.prepare(result.config)
    ds = setup.dataset
    logits = np.asarray(setup.problem.predict(result.state.params, ds.x_test))
    acc = float(np.mean(np.argmax(logits, -1) == ds.y_test))
    assert result.summary["eval_accuracy"] == pytest.approx(acc, abs=1e-9)


def test_eval_in_chunks_equals_one_pass(monkeypatch):
    from bpjax import train

    c = small_config(**{"data.num_samples": 1000})
    whole = bpjax.run(c).summary
    monkeypatch.setattr(train, "EVAL_CHUNK", 64)  # 200 test examples in 4 chunks, the last one short
    chunked = bpjax.run(c).summary
    assert chunked["eval_accuracy"] == whole["eval_accuracy"]
    assert chunked["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-6)


def test_steps_per_call_logs_every_step_it_should():
    fused = bpjax.run(small_config(**{"train.steps_per_call": 5}))
    plain = bpjax.run(small_config())
    assert [r["step"] for r in fused.history] == [r["step"] for r in plain.history]
    np.testing.assert_allclose(fused.series("train_loss")[1], plain.series("train_loss")[1], rtol=1e-5)


def test_log_every_not_a_multiple_of_k_still_logs_each_window():
    r = bpjax.run(small_config(**{"train.steps_per_call": 10, "train.log_every": 3}))
    assert [row["step"] for row in r.history] == [10, 20]


@pytest.mark.parametrize("name", ["pmap", "dp"])
def test_data_parallel_runs_match_single(name):
    ref = bpjax.run(small_config())
    got = bpjax.run(small_config(**{"parallel.strategy": name}))
    assert got.summary["num_devices"] == 8
    np.testing.assert_allclose(got.series("train_loss")[1], ref.series("train_loss")[1], rtol=1e-5)
    assert got.summary["eval_accuracy"] == ref.summary["eval_accuracy"]


def test_regression_with_mse():
    r = bpjax.run(small_config(**{"data.name": "synthetic_regression", "train.loss": "mse"}))
    assert r.summary["eval_accuracy"] is None and r.summary["eval_loss"] > 0
    with pytest.raises(UserError, match="needs train.loss=mse"):
        bpjax.run(small_config(**{"data.name": "synthetic_regression"}))


@pytest.mark.parametrize("optimizer", sorted(cfg_lib.OPTIMIZERS))
def test_every_optimizer_trains(optimizer):
    lr = 0.05 if optimizer in ("sgd", "momentum", "nesterov", "adagrad") else 3e-3
    r = bpjax.run(
        small_config(
            **{
                "optimizer.name": optimizer,
                "optimizer.learning_rate": lr,
                "train.steps": 40,
                "optimizer.clip_norm": 1.0,
            }
        )
    )
    _, losses = r.series("train_loss_mean")
    assert losses[-1] < losses[0], f"{optimizer} did not reduce the loss: {losses}"


@pytest.mark.parametrize("schedule", sorted(cfg_lib.SCHEDULES))
def test_schedules_warm_up_then_decay(schedule):
    from bpjax.step import make_schedule

    c = small_config(
        **{"optimizer.schedule": schedule, "optimizer.warmup_steps": 5, "optimizer.end_value_fraction": 0.1}
    )
    lr = make_schedule(c.optimizer, 20)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(1e-3, rel=1e-5)
    if schedule == "constant":
        assert float(lr(20)) == pytest.approx(1e-3, rel=1e-5)
    else:
        assert float(lr(20)) < 1e-3


def test_constant_rate_is_a_plain_float():
    from bpjax.step import make_schedule

    assert make_schedule(small_config().optimizer, 20) == 1e-3


def test_clipping_bounds_the_update():
    from bpjax.step import make_optimizer

    c = small_config(
        **{
            "optimizer.name": "sgd",
            "optimizer.momentum": 0.0,
            "optimizer.learning_rate": 1.0,
            "optimizer.clip_norm": 0.5,
        }
    )
    tx = make_optimizer(c.optimizer, 10)
    g = {"w": jax.numpy.full((4,), 10.0)}
    updates, _ = tx.update(g, tx.init(g))
    assert float(jax.numpy.linalg.norm(updates["w"])) == pytest.approx(0.5, rel=1e-5)


def test_batch_not_divisible_fails_before_writing(tmp_path):
    c = small_config(**{"parallel.strategy": "dp", "train.batch_size": 30})
    with pytest.raises(
        UserError,
        match="train.batch_size=30 is not divisible by 8 data-parallel devices; "
        "use a multiple of 8 such as 24",
    ):
        bpjax.run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_workdir_is_not_overwritten_by_accident(tmp_path):
    bpjax.run(small_config(**{"train.steps": 5, "train.eval_every": 5}), tmp_path)
    with pytest.raises(UserError, match="already holds a run"):
        bpjax.run(small_config(**{"train.steps": 5, "train.eval_every": 5}), tmp_path)
    bpjax.run(small_config(**{"train.steps": 10, "train.eval_every": 5}), tmp_path, overwrite=True)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 10


def test_progress_lines(capsys):
    bpjax.run(small_config(**{"train.progress": "lines"}))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 5/20  loss ")
    assert "eval_acc" in out[1] and "samples/s" in out[1]
