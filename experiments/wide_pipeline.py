"""A wide synthetic BP network on an interleaved pipeline: 512-1024x7-10, 8 layers (6.8M parameters).

With Adam, one device holding everything (dp, pmap, single) needs 105 MiB per step; this
experiment sets a per-device budget of 64 MiB, which dp exceeds and the pipeline meets: 4 stages x 2
chunks (`parallel.schedule=interleaved`, `virtual_stages=2`), so device d holds layers d and d+4 and each
microbatch goes round the ring of 4 devices twice. With 8 microbatches the table has 38 ticks of one
chunk each, 0.16 of them idle (gpipe on 4 stages: 22 ticks of a whole stage, 0.27 idle):

  bpjax plan experiments/wide_pipeline.py                                  # 34.5 MiB of 64 per device
  bpjax plan experiments/wide_pipeline.py --set parallel.strategy=dp --set parallel.mesh.stage=1  # 105 MiB: over
  bpjax run  experiments/wide_pipeline.py --set parallel.schedule=1f1b --set parallel.virtual_stages=1

Run:      bpjax run experiments/wide_pipeline.py      (or: python experiments/wide_pipeline.py)
Expected: test accuracy 0.38 after 100 steps in 90 s on 2 cores (2026-11-27, jax 0.10.2; a 10-class
          teacher problem on 512 features, the point is the layout). In float64 (--set
          model.dtype=float64 --set parallel.memory_budget_mb=0) its losses equal single's to 4e-16 over
          20 steps (tested); in float32 they part by 1e-3 by step 20, exactly as gpipe's do on this net
          (Adam magnifies the rounding of 8 microbatch gradients summed in another order).
"""

from bpjax.config import default


def get_config():
    c = default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 8192
    c.data.num_features = 512
    c.data.num_classes = 10
    c.model.hidden = (1024,) * 7
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-4
    c.train.steps = 100
    c.train.batch_size = 256
    c.train.eval_every = 50
    c.train.log_every = 10
    c.parallel.strategy = "pipeline"
    c.parallel.mesh = {"stage": 4}
    c.parallel.microbatches = 8
    c.parallel.schedule = "interleaved"
    c.parallel.virtual_stages = 2  # 8 chunks of one layer: device d holds layers d and d+4
    c.parallel.cpu_devices = 8
    c.parallel.memory_budget_mb = 64.0
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
