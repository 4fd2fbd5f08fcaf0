"""A wide synthetic BP network where model parallelism matters: 512-2048-2048-2048-10 (9.4M parameters).

With Adam, one device holding everything (dp, pmap, single) needs about 150 MiB per step: parameters,
gradients and two moments. This experiment sets a per-device budget of 64 MiB, which dp exceeds and
tensor, fsdp and hybrid meet by splitting the layers, so `bpjax run` refuses dp before compiling:

  bpjax plan experiments/wide_synthetic.py                                   # tensor: fits
  bpjax plan experiments/wide_synthetic.py --set parallel.strategy=dp        # over the budget
  bpjax run  experiments/wide_synthetic.py --set parallel.strategy=fsdp

Run:      bpjax run experiments/wide_synthetic.py      (or: python experiments/wide_synthetic.py)
Expected: test accuracy about 0.5 after 100 steps (a 10-class teacher problem on 512 features);
          the point is the memory plan, not the accuracy.
"""

from bpjax.config import default


def get_config():
    c = default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 8192
    c.data.num_features = 512
    c.data.num_classes = 10
    c.model.hidden = (2048, 2048, 2048)
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-4
    c.train.steps = 100
    c.train.batch_size = 256
    c.train.eval_every = 50
    c.train.log_every = 10
    c.parallel.strategy = "tensor"
    c.parallel.mesh = {"model": -1}  # all devices; other strategies take them over their own axes
    c.parallel.cpu_devices = 8
    c.parallel.memory_budget_mb = 64.0
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
