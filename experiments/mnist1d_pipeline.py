"""MNIST-1D 40-100-100-10 as a GPipe pipeline: one layer per stage on 3 devices, 4 microbatches.

Run:      bpjax run experiments/mnist1d_pipeline.py      (plan: bpjax plan experiments/mnist1d_pipeline.py)
Expected: the numbers of mnist1d_single.py (test accuracy 0.66 after 3000 steps). Each step splits the
          batch of 128 into 4 microbatches of 32 that flow stage 0 -> 1 -> 2 and back over 6 ticks;
          each stage idles 2 of them, a bubble of (S-1)/(M+S-1) = 1/3.
          --set parallel.microbatches=1 is plain layer-wise model parallelism.
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.name = "mnist1d_pipeline"
    c.parallel.strategy = "pipeline"
    c.parallel.mesh = {"stage": 3}
    c.parallel.microbatches = 4
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
