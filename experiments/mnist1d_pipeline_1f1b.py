"""MNIST-1D 40-100-100-10 as a 1F1B pipeline: one layer per stage on 3 devices, 8 microbatches.

Run:      bpjax run experiments/mnist1d_pipeline_1f1b.py   (plan: bpjax plan experiments/mnist1d_pipeline_1f1b.py)
Expected: the numbers of mnist1d_single.py: test accuracy 0.656 after 3000 steps, 18 s on 2 cores
          (2026-11-27, jax 0.10.2); over the first 20 steps the losses equal single's to 1e-5 (tested),
          after which Adam's rounding drift parts the curves as for every pipeline (docs/experiments.md).
          Each step splits the batch of 128 into 8 microbatches of 16 over 20 ticks of one forward or
          backward each; each stage idles 4 of them (0.20, gpipe's share), but keeps at most 3
          microbatches' activations where gpipe keeps all 8 (`bpjax plan` notes: 19,200 against 51,200
          bytes on the busiest device). --set parallel.schedule=zero_bubble splits the backward and
          fills the bubble with weight gradients: 26 ticks of F, B or W (a third of an F+BW pair), 0.08 idle, the same
          losses (0.656 too; it sums the microbatch gradients in the same order).
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_pipeline.py"))
    c.name = "mnist1d_pipeline_1f1b"
    c.parallel.schedule = "1f1b"
    c.parallel.microbatches = 8
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
