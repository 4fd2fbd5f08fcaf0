"""scikit-learn's digits (8x8 images, 1797 examples), a 64-128-10 tanh BP network, data-parallel (dp).

Run:      bpjax run experiments/digits_dp.py      (or: python experiments/digits_dp.py)
Expected: test accuracy about 0.97 after 1000 steps of SGD with momentum, 8 (simulated) devices.
"""

from bpjax.config import default


def get_config():
    c = default()
    c.data.name = "digits"
    c.data.test_fraction = 0.2
    c.model.hidden = (128,)
    c.model.activation = "tanh"
    c.model.kernel_init = "glorot_uniform"
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.eval_every = 200
    c.train.log_every = 50
    c.parallel.strategy = "dp"
    c.parallel.cpu_devices = 8
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
