"""MNIST-1D, a 40-100-100-10 ReLU BP network on one device: the reference run.

Run:      bpjax run experiments/mnist1d_single.py      (or: python experiments/mnist1d_single.py)
Expected: test accuracy 0.66 after 3000 steps (the MNIST-1D paper reports about 0.68 for an MLP),
          in about 10 s on 2 CPU cores. mnist1d_pmap.py and mnist1d_dp.py train the same network on
          8 devices and report the same losses and accuracy.
"""

from bpjax.config import default


def get_config():
    c = default()
    c.data.name = "mnist1d"
    c.data.num_samples = 5000  # 4000 train / 1000 test: the published data set
    c.model.hidden = (100, 100)  # the MNIST-1D paper's MLP
    c.model.activation = "relu"
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-2
    c.optimizer.schedule = "cosine"
    c.train.steps = 3000
    c.train.batch_size = 128
    c.train.eval_every = 250
    c.train.log_every = 50
    c.checkpoint.every = 500  # orbax, in the background; resume with --resume --workdir RUN
    c.parallel.strategy = "single"
    c.parallel.cpu_devices = 8  # unused by single; lets the pmap and dp runs share one process with it
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
