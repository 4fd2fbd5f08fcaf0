"""A synthetic classification problem whose size is a knob: examples, features, widths, depth.

Labels come from a random teacher network (see bpjax.data.synthetic_classification). The defaults
are small; scale any of these from the command line:

  bpjax run experiments/synthetic.py --set data.num_samples=100000 --set data.num_features=256 \\
      --set model.hidden=(2048,2048,2048) --set parallel.strategy=dp

Run:      bpjax run experiments/synthetic.py      (or: python experiments/synthetic.py)
Expected: test accuracy about 0.75 after 500 steps at the default size (10% of the labels are
          redrawn at random, so 0.91 is the ceiling).
"""

from bpjax.config import default


def get_config():
    c = default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 20000
    c.data.num_features = 16
    c.data.num_classes = 10
    c.data.noise = 0.1
    c.model.hidden = (512, 512)
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.train.steps = 500
    c.train.batch_size = 256
    c.train.eval_every = 100
    c.train.log_every = 50
    c.parallel.strategy = "dp"
    c.parallel.cpu_devices = 8
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
