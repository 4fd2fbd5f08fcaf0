"""The bad-input catalogue: every case is one actionable line on stderr, exit status 2, and not a byte
changed on disk: no results folder, no half-written file, an earlier run left exactly as it was.

Cases run in-process through ``bpjax.cli.main`` (what the console script calls): every check happens
before a process is started, anything is compiled, or a file is written. test_cli.py checks the exit
status in a fresh process.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bpjax.cli import main

EXP = "experiments/mnist1d_dp.py"
# A finished run with checkpoints, copied into every case's folder as ``old/``: the
# resume cases resume it; for the others it is earlier work that must survive untouched.
OLD_RUN = [
    "model.hidden=(32,)",
    "train.steps=8",
    "train.log_every=4",
    "train.eval_every=0",
    "checkpoint.every=4",
]


ASYNC = ["parallel.strategy=async", "parallel.staleness=2"]


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def resume(*changes: str) -> list[str]:
    """Resume ``old/`` (to step 16) with ``changes`` to its config."""
    return ["--workdir", "{tmp}/old", "--resume", *sets(*OLD_RUN, "train.steps=16", *changes)]


def files(tmp_path):
    """Data and experiment files a user might point bpjax at, most of them broken."""
    x = np.ones((40, 3))
    x[5, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(40) % 2)
    np.savez(tmp_path / "short.npz", x=np.ones((40, 3)), y=np.arange(30) % 2)
    np.savez(tmp_path / "noy.npz", x=np.ones((40, 3)))
    np.savez(tmp_path / "frac.npz", x=np.ones((40, 3)), y=np.linspace(0, 1, 40))
    (tmp_path / "bad.csv").write_text("1,2,3\n4,x,6\n")
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "notnpz.npz").write_text("not a zip file")
    with gzip.open(tmp_path / "images.idx.gz", "wb") as f:
        f.write(
            b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (4).to_bytes(4, "big") + (4).to_bytes(4, "big")
        )
    (tmp_path / "labels.idx").write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10))
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    (tmp_path / "named.csv").write_text(
        "x1,x2,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(20))
    )
    (tmp_path / "cmp").mkdir(exist_ok=True)
    (tmp_path / "cmp" / "comparison.md").write_text("an earlier comparison\n")
    # Labels and values no model can be built from.
    x = np.random.default_rng(0).normal(size=(40, 3))
    np.savez(tmp_path / "huge_labels.npz", x=x, y=np.array([0, 10**9] * 20))
    np.savez(tmp_path / "neg_labels.npz", x=x, y=np.arange(40) % 3 - 1)
    np.savez(tmp_path / "one_class.npz", x=x, y=np.full(40, 3))
    np.savez(tmp_path / "one_hot.npz", x=x, y=np.eye(2)[np.arange(40) % 2])
    targets = np.arange(40.0)
    targets[7] = np.nan
    np.savez(tmp_path / "nan_targets.npz", x=x, y=targets)
    np.savez(tmp_path / "scalar.npz", x=np.float64(3), y=np.int64(1))
    np.savez(tmp_path / "flat_x.npz", x=np.arange(40.0), y=np.arange(40) % 2)
    np.savez(tmp_path / "no_features.npz", x=np.zeros((40, 0)), y=np.arange(40) % 2)
    np.savez(tmp_path / "complex.npz", x=x + 1j, y=np.arange(40) % 2)
    np.savez(tmp_path / "text_labels.npz", x=x, y=np.array(["cat", "dog"] * 20))
    np.savez(tmp_path / "overflow.npz", x=x * 1e300, y=np.arange(40) % 2)
    np.savez(tmp_path / "objects.npz", x=np.array([[1, "a"]] * 40, dtype=object), y=np.arange(40) % 2)
    np.savez(tmp_path / "no_test.npz", x=x, y=np.arange(40) % 2, x_test=np.zeros((0, 3)), y_test=np.zeros(0))
    np.save(tmp_path / "array.npy", x)
    (tmp_path / "zero.npz").write_bytes(b"")
    # CSV files that are not numeric CSV.
    (tmp_path / "good.csv").write_text("".join(f"{i},{i * 2},{i % 2}\n" for i in range(20)))
    (tmp_path / "header.csv").write_text("name,age,label\nbob,3,1\nann,4,0\n")
    (tmp_path / "one_column.csv").write_text("1\n2\n3\n")
    (tmp_path / "semicolon.csv").write_text("1;2;0\n3;4;1\n")
    (tmp_path / "missing.csv").write_text("1,2,0\n3,,1\n")
    (tmp_path / "header_width.csv").write_text("a,b\n1,2,0\n3,4,1\n")
    (tmp_path / "latin1.csv").write_bytes("caf\xe9,b,c\n1,2,0\n3,4,1\n".encode("latin-1"))
    (tmp_path / "blank.csv").write_text("\n\n  \n")
    # IDX and gzip files that are not what their names say.
    (tmp_path / "zero_dim.idx").write_bytes(b"\x00\x00\x08\x00\x07")
    (tmp_path / "bad_magic.idx").write_bytes(b"\x01\x02\x03\x04" + bytes(8))
    (tmp_path / "fake.idx.gz").write_bytes(b"hello world, not gzip")
    whole = gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10))
    (tmp_path / "cut.idx.gz").write_bytes(whole[:-6])
    (tmp_path / "zero.idx").write_bytes(b"")
    dims = b"".join(n.to_bytes(4, "big") for n in (10, 2, 2))
    (tmp_path / "images.idx").write_bytes(b"\x00\x00\x08\x03" + dims + bytes(range(40)))
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "train.csv").write_text("1,2,0\n")
    if os.geteuid() != 0:
        (tmp_path / "locked.csv").write_text("1,2,0\n3,4,1\n")
        (tmp_path / "locked.csv").chmod(0)
    # Experiment files that are not experiments.
    header = '{"bpjax_events": 1, "strategy": "async", "workers": 8, "config": {"seed": 99}}\n'
    update = '{"step": 1, "worker": 0, "batch": 0, "read": 0}\n'
    (tmp_path / "trace.jsonl").write_text(header + update)
    (tmp_path / "rows.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "damaged.jsonl").write_text(header + update + update)
    (tmp_path / "nofn.py").write_text("x = 1\n")
    (tmp_path / "study.py").write_text("def get_configs():\n    return {}\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    raise RuntimeError('no GPU here')\n")
    (tmp_path / "multiline.py").write_text("def get_config():\n    raise ValueError('first\\nsecond')\n")
    (tmp_path / "needs_args.py").write_text("def get_config(size):\n    return size\n")
    (tmp_path / "returns_none.py").write_text("def get_config():\n    pass\n")
    (tmp_path / "returns_dict.py").write_text("def get_config():\n    return {'train': {'steps': 5}}\n")
    (tmp_path / "not_callable.py").write_text("get_config = 3\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(1)\n")
    (tmp_path / "imports.py").write_text("import no_such_module_for_bpjax\n")
    (tmp_path / "latin1.py").write_bytes("# caf\xe9\ndef get_config():\n    pass\n".encode("latin-1"))
    (tmp_path / "experiment.txt").write_text("train.steps = 5\n")
    (tmp_path / "builds_on_missing.py").write_text(
        "from bpjax.config import from_file\ndef get_config():\n    return from_file('no/such/base.py')\n"
    )
    (tmp_path / "typo.py").write_text(
        "from bpjax.config import default\n"
        "def get_config():\n"
        "    c = default()\n"
        "    c.unlock()\n"
        "    c.train.batchsize = 3\n"
        "    return c\n"
    )


def npz(name: str, *more: str) -> list[str]:
    return sets("data.name=npz", f"data.path={{tmp}}/{name}", *more)


def csv(name: str, *more: str) -> list[str]:
    return sets("data.name=csv", f"data.path={{tmp}}/{name}", *more)


def idx(images: str, labels: str = "{tmp}/labels.idx", *more: str) -> list[str]:
    return sets("data.name=idx", f"data.path={images}", f"data.labels_path={labels}", *more)


TENSOR = ("parallel.strategy=tensor", "parallel.mesh.model=4")
PIPELINE = ("parallel.strategy=pipeline", "parallel.mesh.stage=3")


CASES = {
    # ------------------------------------------------------------------ config keys, types and values
    "unknown key": (
        sets("train.batchsize=64"),
        "unknown config key 'train.batchsize'; did you mean 'train.batch_size'?",
    ),
    "unknown strategy": (
        sets("parallel.strategy=tensr"),
        "unknown strategy 'tensr'; did you mean 'tensor'?",
    ),
    "wrong type": (sets("train.steps=many"), "train.steps must be of type int (like 3000), got 'many'"),
    "not a bool": (
        sets("parallel.random_staleness=3"),
        "parallel.random_staleness must be True or False",
    ),
    "a section": (sets("train=5"), "'train' is a section; set one of its keys"),
    "no equals sign": (sets("train.steps"), "--set takes key=value, got 'train.steps'"),
    "negative width": (
        sets("model.hidden=(100,-5)"),
        "model.hidden[1]=-5 must be >= 1 (layer widths)",
    ),
    "negative lr": (
        sets("optimizer.learning_rate=-0.1"),
        "optimizer.learning_rate=-0.1 must be > 0",
    ),
    "unknown choice": (sets("train.nonfinite=ignore"), "train.nonfinite='ignore' is not known"),
    "steps per call": (sets("train.steps_per_call=7"), "train.steps=3000 is not a multiple of"),
    "checkpoint interval": (
        sets("train.steps_per_call=2", "checkpoint.every=5"),
        "checkpoint.every=5 is not a multiple of train.steps_per_call=2",
    ),
    "heartbeat": (
        sets("distributed.heartbeat_timeout_s=0"),
        "distributed.heartbeat_timeout_s=0 must be >= 1",
    ),
    "memory budget": (sets("parallel.memory_budget_mb=0.01"), "dp needs 0.2 MiB per device"),
    # Optimizer values out of range.
    "b1 of 1": (sets("optimizer.b1=1.0"), "optimizer.b1=1.0 must be in [0, 1)"),
    "b1 negative": (sets("optimizer.b1=-0.1"), "optimizer.b1=-0.1 must be in [0, 1)"),
    "b2 above 1": (sets("optimizer.b2=1.5"), "optimizer.b2=1.5 must be in [0, 1)"),
    "eps of 0": (sets("optimizer.eps=0"), "optimizer.eps=0.0 must be > 0"),
    "eps negative": (sets("optimizer.eps=-1e-8"), "optimizer.eps=-1e-08 must be > 0"),
    "weight decay negative": (sets("optimizer.weight_decay=-1"), "optimizer.weight_decay=-1.0 must be >= 0"),
    "momentum of 1": (sets("optimizer.momentum=1.0"), "optimizer.momentum=1.0 must be in [0, 1)"),
    "momentum negative": (sets("optimizer.momentum=-0.5"), "optimizer.momentum=-0.5 must be in [0, 1)"),
    "clip norm negative": (sets("optimizer.clip_norm=-1"), "optimizer.clip_norm=-1.0 must be >= 0"),
    "lr infinite": (
        sets("optimizer.learning_rate=1e999"),
        "optimizer.learning_rate=inf must be a finite number",
    ),
    "lr nan": (sets("optimizer.learning_rate=nan"), "optimizer.learning_rate must be of type float"),
    "lr zero": (sets("optimizer.learning_rate=0"), "optimizer.learning_rate=0.0 must be > 0"),
    "lr a word": (sets("optimizer.learning_rate=fast"), "got 'fast'"),
    "warmup as long as training": (
        sets("optimizer.warmup_steps=3000"),
        "optimizer.warmup_steps=3000 must be in [0, train.steps=3000)",
    ),
    "warmup negative": (sets("optimizer.warmup_steps=-1"), "optimizer.warmup_steps=-1 must be >= 0"),
    "end value fraction": (
        sets("optimizer.end_value_fraction=1.5"),
        "optimizer.end_value_fraction=1.5 must be in [0, 1]",
    ),
    "decay rate 0": (sets("optimizer.decay_rate=0"), "optimizer.decay_rate=0.0 must be in (0, 1]"),
    "decay rate above 1": (sets("optimizer.decay_rate=1.5"), "optimizer.decay_rate=1.5 must be in (0, 1]"),
    "decay steps negative": (sets("optimizer.decay_steps=-1"), "optimizer.decay_steps=-1 must be >= 0"),
    "decay steps beyond int32": (
        sets("optimizer.decay_steps=2147483648"),
        "optimizer.decay_steps=2147483648 is out of range: whole numbers in a config must fit in 32 bits",
    ),
    "schedule misspelt": (sets("optimizer.schedule=cosin"), "did you mean 'cosine'?"),
    "schedule unknown": (
        sets("optimizer.schedule=step"),
        "choose one of constant, cosine, warmup_cosine, linear, exponential",
    ),
    "optimizer misspelt": (
        sets("optimizer.name=adamm"),
        "optimizer.name='adamm' is not known; did you mean 'adam'?",
    ),
    # Data sizes.
    "one sample": (sets("data.num_samples=1"), "data.num_samples=1 must be >= 2"),
    "no features": (sets("data.num_features=0"), "data.num_features=0 must be >= 1"),
    "one class": (sets("data.num_classes=1"), "data.num_classes=1 must be >= 2"),
    "no targets": (sets("data.num_targets=0"), "data.num_targets=0 must be >= 1"),
    "noise negative": (sets("data.noise=-0.1"), "data.noise=-0.1 must be >= 0"),
    "label noise above 1": (
        sets("data.name=synthetic_classification", "data.noise=1.5"),
        "data.noise=1.5 is the share of labels redrawn at random for synthetic_classification",
    ),
    "test fraction 0": (sets("data.test_fraction=0"), "data.test_fraction=0.0 must be in (0, 1)"),
    "test fraction 1": (sets("data.test_fraction=1"), "data.test_fraction=1.0 must be in (0, 1)"),
    "synthetic bigger than memory": (
        sets("data.name=synthetic_classification", "data.num_features=1000000000"),
        "data.num_features=1000000000",
    ),
    "synthetic classes bigger than memory": (
        sets("data.name=synthetic_classification", "data.num_classes=1000000000"),
        "data.num_classes=1000000000 needs",
    ),
    "network bigger than memory": (
        sets("model.hidden=(2000000000,2000000000)"),
        "GiB of memory; use smaller model.hidden widths",
    ),
    # Seeds.
    "seed negative": (sets("seed=-1"), "seed=-1 must be in [0, 2147483647]"),
    "seed 2**31": (sets("seed=2147483648"), "seed=2147483648 must be in [0, 2147483647]"),
    "seed 2**40": (sets("seed=1099511627776"), "seed=1099511627776 must be in [0, 2147483647]"),
    "seed fractional": (sets("seed=1.5"), "seed must be a whole number, got 1.5"),
    "seed a word": (sets("seed=abc"), "seed must be of type int (like 0), got 'abc'"),
    "seed None": (sets("seed=None"), "seed=None is not a value; give a whole number like 0"),
    "seed True": (sets("seed=True"), "seed must be a number, got True"),
    # Train keys.
    "steps 0": (sets("train.steps=0"), "train.steps=0 must be >= 1"),
    "steps fractional": (sets("train.steps=2.5"), "train.steps must be a whole number, got 2.5"),
    "steps beyond int32": (sets("train.steps=1e30"), "is out of range: whole numbers in a config must fit"),
    "batch 0": (sets("train.batch_size=0"), "train.batch_size=0 must be >= 1"),
    "batch larger than the data": (
        sets("train.batch_size=8000"),
        "train.batch_size=8000 exceeds the 4000 training examples; use at most 4000",
    ),
    "eval every negative": (sets("train.eval_every=-1"), "train.eval_every=-1 must be >= 0"),
    "log every negative": (sets("train.log_every=-1"), "train.log_every=-1 must be >= 0"),
    "eval between calls": (
        sets("train.steps_per_call=2", "train.eval_every=25"),
        "train.eval_every=25 is not a multiple of train.steps_per_call=2",
    ),
    "steps per call 0": (sets("train.steps_per_call=0"), "train.steps_per_call=0 must be >= 1"),
    "sync every 0": (sets("train.sync_every=0"), "train.sync_every=0 must be >= 1"),
    "max skipped 0": (sets("train.max_skipped=0"), "train.max_skipped=0 must be >= 1"),
    "progress unknown": (sets("train.progress=fancy"), "choose one of auto, bar, lines, off"),
    "loss misspelt": (sets("train.loss=mae"), "train.loss='mae' is not known; did you mean 'mse'?"),
    "mse on labels": (sets("train.loss=mse"), "has class labels; set train.loss=cross_entropy"),
    # Model keys.
    "activation misspelt": (sets("model.activation=relu6"), "did you mean 'relu'?"),
    "dtype not a float": (sets("model.dtype=int32"), "model.dtype='int32' is not known"),
    "param dtype unknown": (sets("model.param_dtype=float8"), "model.param_dtype='float8' is not known"),
    "init unknown": (sets("model.kernel_init=xavier"), "model.kernel_init='xavier' is not known"),
    "width 0": (sets("model.hidden=(100,0)"), "model.hidden[1]=0 must be >= 1 (layer widths)"),
    "width fractional": (sets("model.hidden=(100,50.5)"), "model.hidden[1]=50.5 must be a whole number"),
    "widths a word": (sets("model.hidden=wide"), "model.hidden[0]='wide' must be a whole number"),
    # Every strategy's settings.
    "partition unknown": (sets("parallel.partition=rows"), "choose one of sample, feature, hybrid"),
    "staleness negative": (
        sets("parallel.staleness=-3"),
        "parallel.staleness=-3 must be >= -1 (0 is synchronous; -1 (unbounded) needs threads execution)",
    ),
    "n_push 0": (sets("parallel.n_push=0"), "parallel.n_push=0 must be >= 1"),
    "n_fetch 0": (sets("parallel.n_fetch=0"), "parallel.n_fetch=0 must be >= 1"),
    "local steps 0": (sets("parallel.local_steps=0"), "parallel.local_steps=0 must be >= 1"),
    "microbatches 0": (sets("parallel.microbatches=0"), "parallel.microbatches=0 must be >= 1"),
    "stage 0": (sets(*PIPELINE, "parallel.stages=(0,2)"), "parallel.stages[0]=0 must be >= 1"),
    "stage negative": (sets(*PIPELINE, "parallel.stages=(2,-1)"), "parallel.stages[1]=-1 must be >= 1"),
    "stages decreasing": (sets(*PIPELINE, "parallel.stages=(2,1)"), "must be strictly increasing"),
    "stage fractional": (sets(*PIPELINE, "parallel.stages=(1.5,)"), "parallel.stages[0]=1.5 must be a whole"),
    "replicate a number": (
        sets(*TENSOR, "parallel.replicate=(3,)"),
        "parallel.replicate[0]=3 must be a name in quotes (layer names)",
    ),
    "replicate no such layer": (
        sets(*TENSOR, "parallel.replicate=('layer_9',)"),
        "parallel.replicate names 'layer_9', not a layer",
    ),
    "hybrid data unknown": (sets("parallel.hybrid_data=zero"), "choose one of dp, fsdp"),
    "outer lr 0": (sets("parallel.outer_learning_rate=0"), "parallel.outer_learning_rate=0.0 must be > 0"),
    "outer lr negative": (
        sets("parallel.outer_learning_rate=-1"),
        "parallel.outer_learning_rate=-1.0 must be > 0",
    ),
    "outer momentum 1": (sets("parallel.outer_momentum=1"), "parallel.outer_momentum=1.0 must be in [0, 1)"),
    "fragments 0": (sets("parallel.fragments=0"), "parallel.fragments=0 must be >= 1"),
    "fragments beyond the layers": (
        sets("parallel.strategy=diloco", "parallel.fragments=5"),
        "parallel.fragments=5 but the net has 3 layers",
    ),
    "cpu devices negative": (sets("parallel.cpu_devices=-1"), "parallel.cpu_devices=-1 must be in [0, 1024]"),
    "cpu devices absurd": (
        sets("parallel.cpu_devices=100000"),
        "parallel.cpu_devices=100000 must be in [0, 1024] (more take JAX minutes to start)",
    ),
    "budget negative": (sets("parallel.memory_budget_mb=-1"), "parallel.memory_budget_mb=-1.0 must be >= 0"),
    "strategy None": (sets("parallel.strategy=None"), "parallel.strategy=None is not a value"),
    # Mesh sizes and names.
    "mesh size a string": (sets("parallel.mesh.data='2'"), "parallel.mesh.data must be of type int"),
    "mesh size fractional": (
        sets("parallel.mesh.data=2.5"),
        "parallel.mesh.data must be a whole number, got 2.5",
    ),
    "mesh size 0": (sets("parallel.mesh.data=0"), "parallel.mesh.data=0 must be a positive integer or -1"),
    "mesh size negative": (
        sets("parallel.mesh.data=-2"),
        "parallel.mesh.data=-2 must be a positive integer or -1",
    ),
    "mesh size None": (
        sets("parallel.mesh.data=None"),
        "parallel.mesh.data=None is not a value; give a whole number",
    ),
    "mesh size a tuple": (sets("parallel.mesh.data=(2,)"), "parallel.mesh.data must be of type int"),
    "mesh axis misspelt": (
        sets("parallel.mesh.Data=2"),
        "parallel.mesh.Data: no strategy lays out over an axis named 'Data'; did you mean parallel.mesh.data?",
    ),
    "mesh as a number": (sets("parallel.mesh=4"), "'parallel.mesh' is a section"),
    "two free mesh axes": (
        sets("parallel.strategy=hybrid", "parallel.mesh.model=-1"),
        "parallel.mesh may use -1 for one axis only",
    ),
    # Checkpoint and distributed keys.
    "checkpoint every negative": (sets("checkpoint.every=-1"), "checkpoint.every=-1 must be >= 0"),
    "keep 0": (sets("checkpoint.keep=0"), "checkpoint.keep=0 must be >= 1"),
    "async save a number": (sets("checkpoint.async_save=2"), "checkpoint.async_save must be True or False"),
    "shutdown timeout 0": (
        sets("distributed.shutdown_timeout_s=0"),
        "distributed.shutdown_timeout_s=0 must be >= 1",
    ),
    "init timeout negative": (
        sets("distributed.init_timeout_s=-5"),
        "distributed.init_timeout_s=-5 must be >= 1",
    ),
    # Wrong types.
    "string for an int": (sets("train.batch_size='big'"), "train.batch_size must be of type int"),
    "tuple for a float": (
        sets("optimizer.learning_rate=(0.1,0.2)"),
        "optimizer.learning_rate must be of type float",
    ),
    "dict for a number": (sets("train.steps={'a':1}"), "train.steps must be of type int"),
    "None for a float": (sets("optimizer.learning_rate=None"), "optimizer.learning_rate=None is not a value"),
    "bool for a number": (sets("train.steps=True"), "train.steps must be a number, got True"),
    "number for a name": (sets("name=3"), "name must be of type str"),
    "number for a bool": (sets("data.standardize=1"), "data.standardize must be True or False"),
    "name with a slash": (sets("name='a/b'"), "name='a/b' must work as a folder name"),
    "set without a key": (sets("=5"), "--set =5 names no key; give key=value"),
    # --------------------------------------------------------------------------- the experiment file
    "missing experiment": ("run no/such/experiment.py", "experiment file 'no/such/experiment.py' not found"),
    "misspelt experiment": ("run {tmp}/brokn.py", "not found; did you mean '{tmp}/broken.py'?"),
    "misspelt example name": ("run mnist1d_dpp", "not found; did you mean the example 'mnist1d_dp'?"),
    "broken experiment": ("run {tmp}/broken.py", "broken.py failed to load: SyntaxError"),
    "experiment a folder": ("run {tmp}", "is a folder; pass one .py file"),
    "experiment with a slash": ("run {tmp}/broken.py/", "ends with a slash but is a file"),
    "experiment a text file": ("run {tmp}/experiment.txt", "experiment.txt' is not a .py file"),
    "experiment a config.json": ("run {tmp}/old/config.json", "(a run's config.json is not an experiment)"),
    "experiment not utf-8": ("run {tmp}/latin1.py", "is not UTF-8 text (byte 0xe9 at offset 5)"),
    "experiment without get_config": ("run {tmp}/nofn.py", "has no get_config(); define one"),
    "study file to run": (
        "run {tmp}/study.py",
        "is a study file (get_configs(): several runs); run it with bpjax compare",
    ),
    "get_config raises": ("run {tmp}/raises.py", "get_config() failed: RuntimeError: no GPU here (line 2)"),
    "get_config raises two lines": (
        "run {tmp}/multiline.py",
        "get_config() failed: ValueError: first second",
    ),
    "get_config takes arguments": (
        "run {tmp}/needs_args.py",
        "get_config() must take no arguments, but requires size",
    ),
    "get_config returns None": (
        "run {tmp}/returns_none.py",
        "get_config() returned NoneType, not an ml_collections.ConfigDict",
    ),
    "get_config returns a dict": (
        "run {tmp}/returns_dict.py",
        "get_config() returned dict, not an ml_collections.ConfigDict",
    ),
    "get_config not callable": ("run {tmp}/not_callable.py", "get_config must be a function, found int"),
    "experiment exits": ("run {tmp}/exits.py", "exits while it loads (SystemExit(1))"),
    "experiment import fails": (
        "run {tmp}/imports.py",
        "ModuleNotFoundError: No module named 'no_such_module_for_bpjax'",
    ),
    "experiment builds on a missing file": ("run {tmp}/builds_on_missing.py", "'no/such/base.py' not found"),
    "experiment with a misspelt key": ("run {tmp}/typo.py", "unknown config key 'train.batchsize'"),
    "plan a broken experiment": ("plan {tmp}/nofn.py", "has no get_config()"),
    "config of a study": ("config {tmp}/study.py", "run it with bpjax compare"),
    # ------------------------------------------------------------------------------------ data files
    "missing file": (
        sets("data.name=npz", "data.path=/no/such/file.npz"),
        "data.path='/no/such/file.npz': no such file; check the path",
    ),
    "not an npz": (
        sets("data.name=npz", "data.path={tmp}/notnpz.npz"),
        "is not a readable .npz",
    ),
    "npz without y": (sets("data.name=npz", "data.path={tmp}/noy.npz"), "no array named 'y'"),
    "labels short": (
        sets("data.name=npz", "data.path={tmp}/short.npz"),
        "40 inputs but 30 labels",
    ),
    "fractional labels": (
        sets("data.name=npz", "data.path={tmp}/frac.npz"),
        "for real-valued targets set data.task=regression",
    ),
    "nan input": (
        sets("data.name=npz", "data.path={tmp}/nan.npz"),
        "1 NaN/Inf values in the inputs",
    ),
    "csv not numeric": (
        sets("data.name=csv", "data.path={tmp}/bad.csv"),
        "line 2, column 2 holds 'x', not a number",
    ),
    "csv ragged": (sets("data.name=csv", "data.path={tmp}/ragged.csv"), "line 2 has 2 columns"),
    "csv empty": (sets("data.name=csv", "data.path={tmp}/empty.csv"), "the CSV file is empty"),
    "idx truncated": (
        sets("data.name=idx", "data.path={tmp}/images.idx.gz", "data.labels_path={tmp}/labels.idx"),
        "holds 0 data bytes but its header (10, 4, 4) needs 160",
    ),
    "loss for the data": (
        sets("data.name=synthetic_regression"),
        "synthetic_regression needs train.loss=mse",
    ),
    # Labels and values no model can be built from: refused before anything is allocated from them.
    "labels far above the classes": (
        npz("huge_labels.npz"),
        "2 distinct labels but the largest is 1000000000",
    ),
    "negative labels": (npz("neg_labels.npz"), "found negative labels (e.g. -1)"),
    "one class only": (npz("one_class.npz"), "all labels are class 3; classification needs at least two"),
    "one-hot labels": (npz("one_hot.npz"), "it looks one-hot: save y.argmax(axis=1)"),
    "nan targets": (
        npz("nan_targets.npz", "data.task=regression", "train.loss=mse"),
        "1 NaN/Inf values in the targets (first in example 7",
    ),
    "text labels": (npz("text_labels.npz"), "inputs and labels must be numeric, got y of dtype <U3"),
    "complex inputs": (npz("complex.npz"), "got x of dtype complex128"),
    "inputs beyond float32": (npz("overflow.npz"), "exceed float32's range"),
    "0-d arrays": (npz("scalar.npz"), "x has shape () and y (); x needs one row per example"),
    "one feature unshaped": (npz("flat_x.npz"), "x must have one row per example, got shape (40,)"),
    "zero features": (npz("no_features.npz"), "x has no features (shape (40, 0))"),
    "object arrays": (npz("objects.npz"), "Object arrays cannot be loaded when allow_pickle=False"),
    "empty test split": (npz("no_test.npz"), "the test split (x_test) holds no examples"),
    # The wrong reader for a file.
    "npz reader on a csv": (npz("good.csv"), "it is text (a CSV file?): set data.name=csv"),
    "npz reader on an npy": (npz("array.npy"), "a single .npy array: save x and y together with np.savez"),
    "empty npz file": (npz("zero.npz"), "the NPZ file is empty (0 bytes)"),
    "csv reader on an npz": (csv("short.npz"), "is a binary file, not CSV text; it is a zip archive"),
    "csv reader on an npy": (csv("array.npy"), "is a binary file, not CSV text; it is a single .npy array"),
    "csv reader on gzip": (csv("cut.idx.gz"), "it is gzip-compressed"),
    # CSV files that are not numeric CSV.
    "csv with a header and text rows": (csv("header.csv"), "line 2, column 1 holds 'bob', not a number"),
    "csv with one column": (csv("one_column.csv"), "found 1 column; add the label column"),
    "csv with semicolons": (csv("semicolon.csv"), "its values seem to be separated by ';'"),
    "csv missing value": (csv("missing.csv"), "line 2, column 2 is empty; fill in or drop missing values"),
    "csv header width": (csv("header_width.csv"), "the header (line 1) has 2 columns but the data has 3"),
    "csv not utf-8": (csv("latin1.csv"), "is not UTF-8 text (byte 0xe9 at offset 3)"),
    "csv blank lines only": (csv("blank.csv"), "the CSV file is empty"),
    "label column too large": (
        csv("good.csv", "data.label_column=3"),
        "data.label_column=3 is outside the 3 columns",
    ),
    "label column too negative": (
        csv("good.csv", "data.label_column=-4"),
        "data.label_column=-4 is outside the 3 columns",
    ),
    "label column misspelt": (
        csv("named.csv", "data.label_column=lable"),
        "data.label_column='lable' is not a column of {tmp}/named.csv; did you mean 'label'?",
    ),
    "label name without a header": (
        csv("good.csv", "data.label_column=label"),
        "data.label_column='label' names a column, but {tmp}/good.csv has no header row",
    ),
    "label column a fraction": (
        csv("good.csv", "data.label_column=1.5"),
        "data.label_column=1.5 must be a whole number or a name in quotes",
    ),
    # IDX and gzip files.
    "idx of 0 dimensions": (idx("{tmp}/zero_dim.idx"), "holds a 0-dimensional IDX array (one number)"),
    "idx bad magic": (idx("{tmp}/bad_magic.idx"), "is not an IDX file (bad magic number)"),
    "gzip that is not gzip": (idx("{tmp}/fake.idx.gz"), "although its name ends in .gz, not gzip-compressed"),
    "gzip cut short": (idx("{tmp}/cut.idx.gz"), "is a damaged gzip file"),
    "empty idx file": (idx("{tmp}/zero.idx"), "the IDX file is empty (0 bytes)"),
    "idx without labels": (
        sets("data.name=idx", "data.path={tmp}/images.idx"),
        "data.labels_path is empty",
    ),
    "idx test images without labels": (
        idx("{tmp}/images.idx", "{tmp}/labels.idx", "data.test_path={tmp}/images.idx"),
        "data.test_labels_path is empty",
    ),
    # Paths.
    "data path a folder": (npz("data"), "data.path='{tmp}/data' is a folder (it holds train.csv)"),
    "labels path a folder": (
        idx("{tmp}/images.idx", "{tmp}/data"),
        "data.labels_path='{tmp}/data' is a folder",
    ),
    "test path a folder": (
        idx("{tmp}/images.idx", "{tmp}/labels.idx", "data.test_path={tmp}/data"),
        "data.test_path='{tmp}/data' is a folder",
    ),
    "data path with a slash": (
        csv("good.csv/"),
        "ends with a slash but is a file; remove the trailing slash",
    ),
    "data path misspelt": (npz("shrt.npz"), "no such file; check the path; did you mean '{tmp}/short.npz'?"),
    "data path with ~": (
        ["ENV:HOME={tmp}", *sets("data.name=npz", "data.path=~/short.npz")],
        "40 inputs but 30 labels",
    ),
    "data path empty": (sets("data.name=csv"), "data.path is empty; set it to your data file"),
    "cache folder a file": (
        sets("data.cache_dir={tmp}/good.csv", "data.num_samples=300"),
        "cannot hold the MNIST-1D cache",
    ),
    # ------------------------------------------------------------------- mesh shapes against devices
    "batch split": (
        sets("train.batch_size=100"),
        "train.batch_size=100 is not divisible by 8 data-parallel devices; use a multiple of 8 such as 96",
    ),
    "mesh too big": (sets("parallel.mesh.data=16"), "parallel.mesh {'data': 16} needs 16 devices but 8"),
    "mesh not filling": (
        sets("parallel.strategy=hybrid", "parallel.mesh.model=3"),
        "cannot fill 8 devices: 8 is not divisible by 3",
    ),
    "axis not used": (sets("parallel.mesh.model=2"), "dp lays out over mesh axes ('data',); remove"),
    "axis missing": (sets("parallel.strategy=hybrid"), "hybrid needs the size of mesh axes ['model']"),
    "width vs model axis": (
        sets("parallel.strategy=tensor", "parallel.mesh.model=8"),
        "layer_0.kernel: hidden_a width 100 is not divisible by the model axis of size 8; keep every layer "
        "that uses such a width whole (--set parallel.replicate=\"('layer_0', 'layer_1')\")",
    ),
    "width vs model axis, some kept whole": (
        sets("parallel.strategy=tensor", "parallel.mesh.model=8", "parallel.replicate=('layer_2',)"),
        "(--set parallel.replicate=\"('layer_0', 'layer_1', 'layer_2')\")",
    ),
    "width vs hybrid model axis": (
        sets("parallel.strategy=hybrid", "parallel.mesh.model=8"),
        "(--set parallel.replicate=\"('layer_0', 'layer_1')\")",
    ),
    "too many stages": (
        sets("parallel.strategy=pipeline", "parallel.mesh.stage=4"),
        "4 pipeline stages for a net of 3 layers",
    ),
    "microbatches": (
        sets("parallel.strategy=pipeline", "parallel.mesh.stage=3", "parallel.microbatches=5"),
        "train.batch_size=128 is not divisible by parallel.microbatches=5",
    ),
    # Gradient accumulation and mixed precision (docs/gpu.md).
    "accumulate 0": (sets("train.accumulate=0"), "train.accumulate=0 must be >= 1"),
    "accumulate vs batch": (
        sets("train.accumulate=3"),
        "train.accumulate=3 does not divide train.batch_size=128",
    ),
    "accumulate vs device share": (
        sets("train.accumulate=32"),
        "train.accumulate=32 does not divide the 16 examples each of 8 data-parallel devices",
    ),
    "accumulate pipeline": (
        sets("parallel.strategy=pipeline", "parallel.mesh.stage=3", "train.accumulate=2"),
        "pipeline cannot accumulate gradients (train.accumulate=2); a pipeline already sums",
    ),
    "fp16 pipeline": (
        sets("parallel.strategy=pipeline", "parallel.mesh.stage=3", "model.precision=fp16"),
        "pipeline computes its gradients its own way, without the loss scaling float16 needs",
    ),
    "precision and dtype": (
        sets("model.precision=bf16", "model.dtype=float16"),
        "model.precision=bf16 sets the compute and parameter dtypes itself",
    ),
    "unknown precision": (sets("model.precision=tf32"), "model.precision='tf32' is not known"),
    "loss scale below 1": (sets("model.loss_scale=0.5"), "model.loss_scale=0.5 must be >= 1"),
    "matmul precision": (
        sets("train.matmul_precision=fastest"),
        "train.matmul_precision='fastest' is not known",
    ),
    "device data": (sets("train.device_data=yes"), "train.device_data='yes' is not known"),
    # XLA_FLAGS device counts XLA would crash on, refused before JAX starts.
    "device flag not a number": (
        "env XLA_FLAGS=--xla_force_host_platform_device_count=abc",
        "XLA_FLAGS has --xla_force_host_platform_device_count=abc; give a whole number in [1, 1024]",
    ),
    "device flag absurd": (
        "env XLA_FLAGS=--xla_force_host_platform_device_count=100000",
        "give a whole number in [1, 1024] or remove it",
    ),
    # ------------------------------------------------------------------------- command-line usage
    "no command": ("", "no command given; use one of run, launch, plan, config, compare"),
    "command misspelt": ("rnu EXP", "unknown command 'rnu'; did you mean 'run'? (see bpjax --help)"),
    "command unknown": ("xyz EXP", "unknown command 'xyz'; choose one of run, launch"),
    "no experiment": ("run", "bpjax run needs an experiment file, e.g. bpjax run experiments/mnist1d_dp.py"),
    "launch without processes": ("launch EXP", "bpjax launch needs --processes"),
    "option misspelt": (
        "run EXP --workdri {tmp}/x",
        "unknown option --workdri for bpjax run; did you mean --workdir?",
    ),
    "option of another command": ("plan EXP --resume", "unknown option --resume for bpjax plan"),
    "processes not a number": (
        "launch --processes two EXP",
        "argument --processes: takes a whole number, got 'two'",
    ),
    "processes absurd": ("launch --processes 5000 EXP", "argument --processes: 5000 is more than the 1024"),
    "set without a value": ("run EXP --set", "argument --set: expected one argument (see bpjax run --help)"),
    "two experiments to run": ("run EXP EXP", "bpjax run does not take"),
    "compare nothing": ("compare", "bpjax compare needs experiment or study files"),
    "target loss nan": ("compare EXP --target-loss nan", "argument --target-loss: takes a finite number"),
    "schema misspelt": (
        "config --schemaa",
        "unknown option --schemaa for bpjax config; did you mean --schema?",
    ),
    # ------------------------------------------------------------------- checkpoints and earlier runs
    "run exists": (
        "run EXP --workdir {tmp}/old",
        "already holds a run (config.json); choose another --workdir",
    ),
    "different model": (
        resume("model.hidden=(64,)"),
        "was written with model.hidden=[32], this run has [64]; resume with the same model.hidden",
    ),
    "different data": (
        resume("data.num_samples=3000"),
        "was written with data.num_samples=5000, this run has 3000",
    ),
    "already complete": (
        resume("train.steps=8"),
        "the run in {tmp}/old is complete at step 8; raise train.steps",
    ),
    "no checkpoints": (["--workdir", "{tmp}", "--resume"], "holds no checkpoints; run without --resume"),
    "resume and overwrite": (["--workdir", "{tmp}/old", "--resume", "--overwrite"], "pass one of them"),
    "resume without workdir": (["--resume"], "--resume needs the --workdir of the run to continue"),
    # ------------------------------------------------------------------------------------- processes
    "processes vs devices": (
        "launch --processes 3 EXP",
        "3 processes cannot share parallel.cpu_devices=8 evenly",
    ),
    "no processes": ("launch --processes 0 EXP", "--processes 0 must be >= 1"),
    "one-process strategy": (
        "launch --processes 2 EXP --set parallel.strategy=single",
        "single runs in one process only; across processes use pmap, dp, fsdp, tensor, hybrid, pipeline, "
        "local_sgd, async",
    ),
    "threads across processes": (
        "launch --processes 2 EXP --set parallel.strategy=async --set parallel.execution=threads",
        "async runs across processes only with execution=simulated and no replay; across processes use",
    ),
    "half a cluster env": (
        "env JAX_COORDINATOR_ADDRESS=127.0.0.1:1",
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID not",
    ),
    # Workdirs, and bad input with --overwrite or --resume: the earlier run in old/ stays as it was.
    "workdir under a file": (["--workdir", "{tmp}/nan.npz/run"], "nan.npz is a file, not a folder"),
    "workdir is a file": (["--workdir", "{tmp}/nan.npz"], "is a file; give a folder"),
    "overwrite with a bad value": (
        ["--workdir", "{tmp}/old", "--overwrite", *sets("train.steps=0")],
        "train.steps=0 must be >= 1",
    ),
    "overwrite with a model too large": (
        ["--workdir", "{tmp}/old", "--overwrite", *sets("model.hidden=(30000, 30000)")],
        "dp needs about",
    ),
    "overwrite with a mesh too large": (
        ["--workdir", "{tmp}/old", "--overwrite", *sets("parallel.mesh.data=16")],
        "needs 16 devices but 8",
    ),
    "resume with a bad value": (resume("optimizer.b1=2.0"), "optimizer.b1=2.0 must be in [0, 1)"),
    "resume with a mesh too large": (resume("parallel.mesh.data=16"), "needs 16 devices but 8"),
    "resume into a model too large": (
        resume("parallel.strategy=async", "parallel.staleness=1000000"),
        "async needs about",
    ),
    # Tracking, keep-best, seeds (issue 13).
    "profile of one step": (sets("train.profile=(5,)"), "train.profile=(5,) must be (start, stop)"),
    "profile past the end": (sets("train.profile=(5, 5000)"), "start < stop <= train.steps=3000"),
    "profile backwards": (sets("train.profile=(20, 10)"), "must be (start, stop) with start < stop"),
    "keep_best of no metric": (sets("checkpoint.keep_best=train_loss"), "checkpoint.keep_best='train_loss'"),
    "negative patience": (sets("train.early_stop_patience=-1"), "train.early_stop_patience=-1 must be >= 0"),
    "seeds.split below -1": (sets("seeds.split=-2"), "seeds.split=-2 must be in [-1, 2147483647]"),
    "seeds.init not a number": (sets("seeds.init='a'"), "seeds.init must be of type int"),
    "compare seeds not numbers": ("compare EXP --seeds 0,x", "--seeds '0,x': give whole numbers"),
    "compare a seed twice": ("compare EXP --seeds 1,2,1", "names a seed twice"),
    "compare negative seed": ("compare EXP --seeds=-3", "seed -3 is outside [0, 2147483647]"),
    "compare into a comparison": (
        "compare EXP --workdir {tmp}/cmp",
        "{tmp}/cmp already holds a comparison (comparison.md); choose another --workdir or pass --overwrite",
    ),
    # bpjax runs and bpjax predict.
    "runs in no folder": ("runs {tmp}/nowhere", "bpjax runs: {tmp}/nowhere does not exist"),
    "runs in a file": ("runs {tmp}/good.csv", "is a file"),
    "predict from no folder": (
        "predict {tmp}/nowhere {tmp}/good.csv",
        "run folder {tmp}/nowhere does not exist",
    ),
    "predict from a non-run": ("predict {tmp}/data {tmp}/good.csv", "is not a bpjax run (no config.json)"),
    "predict without a best checkpoint": (
        "predict {tmp}/old {tmp}/good.csv --best",
        "holds no best checkpoint to load; train with --set checkpoint.keep_best=eval_loss",
    ),
    "predict missing input": ("predict {tmp}/old {tmp}/missing.npz", "no such file"),
    "predict text in the input": ("predict {tmp}/old {tmp}/bad.csv", "not a number"),
    "predict NaN input": ("predict {tmp}/old {tmp}/nan.npz", "example 5 holds a NaN or Inf"),
    "predict other file type": ("predict {tmp}/old {tmp}/experiment.txt", "must be an .npz file"),
    "predict wrong feature count": ("predict {tmp}/old {tmp}/good.csv", "the inputs have 3 features"),
    "predict output type": (
        "predict {tmp}/old {tmp}/good.csv --output {tmp}/p.txt",
        "must end in .csv or .npz",
    ),
    "predict output folder missing": (
        "predict {tmp}/old {tmp}/good.csv --output {tmp}/no/p.csv",
        "its folder does not exist",
    ),
    # Resources: a run that cannot fit in memory is refused before anything is allocated.
    "widths too large": (sets("model.hidden=(30000, 30000)"), "dp needs about"),
    "staleness too large": (sets(*ASYNC, "parallel.staleness=100000"), "async needs about"),
    "data set too large": (
        sets("data.name=synthetic_classification", "data.num_samples=2000000000"),
        "makes a data set of about",
    ),
    "pipeline too large": (
        sets("parallel.strategy=pipeline", "parallel.mesh.stage=3", "model.hidden=(60000, 60000)"),
        "pipeline needs about",
    ),
}
THREADS = ("parallel.strategy=async", "parallel.execution=threads")
TRACE = "parallel.replay={tmp}/"
CASES.update(
    {
        # ------------------------------------------------ real asynchrony: threads, stragglers, replay
        "stragglers in the simulation": (
            sets("parallel.strategy=async", "parallel.stragglers={3: 4.0}"),
            "parallel.stragglers needs parallel.execution=threads",
        ),
        "straggler out of range": (
            sets(*THREADS, "parallel.stragglers={9: 2.0}"),
            "parallel.stragglers names worker 9, but there are 8 workers (0 to 7)",
        ),
        "straggler faster": (
            sets(*THREADS, "parallel.stragglers={1: 0.5}"),
            "parallel.stragglers[1]=0.5 must be >= 1",
        ),
        "stragglers not a dict": (sets(*THREADS, "parallel.stragglers=4"), "must be a dict like {3: 4.0}"),
        "straggler named": (
            sets(*THREADS, "parallel.stragglers={'w3': 2.0}"),
            "key 'w3' must be a whole number",
        ),
        "straggler infinite": (
            sets(*THREADS, "parallel.stragglers={1: 1e999}"),
            "parallel.stragglers[1]=inf must be a finite number",
        ),
        "unbounded simulation": (
            sets("parallel.strategy=async", "parallel.staleness=-1"),
            "parallel.staleness=-1 (unbounded) needs parallel.execution=threads",
        ),
        "random staleness in threads": (
            sets(*THREADS, "parallel.random_staleness=True"),
            "parallel.random_staleness has no meaning here (in threads execution the delays are real)",
        ),
        "param_server push in threads": (
            sets("parallel.strategy=param_server", "parallel.execution=threads", "parallel.n_push=2"),
            "parallel.n_push=2: in threads execution every push is one update of one batch",
        ),
        "param_server staleness simulated": (
            sets("parallel.strategy=param_server", "parallel.staleness=2"),
            "bounds param_server's workers in threads execution",
        ),
        "replay in threads": (
            sets(*THREADS, TRACE + "trace.jsonl"),
            "parallel.replay applies a recorded trace in the simulation; set parallel.execution=simulated",
        ),
        "replay missing": (
            sets("parallel.strategy=async", TRACE + "no_trace.jsonl"),
            "no such file; give the staleness.jsonl of a threads run",
        ),
        "replay not json": (
            sets("parallel.strategy=async", TRACE + "good.csv"),
            "not a trace of JSON lines",
        ),
        "replay not a trace": (
            sets("parallel.strategy=param_server", TRACE + "rows.jsonl"),
            "not a bpjax trace (no header line)",
        ),
        "replay damaged": (
            sets("parallel.strategy=async", TRACE + "damaged.jsonl"),
            "line 3 is not update 2 of a trace",
        ),
        "replay of another config": (
            sets("parallel.strategy=async", TRACE + "trace.jsonl"),
            "the trace was recorded with seed=99, this run has 0",
        ),
        "replay a folder": (
            sets("parallel.strategy=async", "parallel.replay={tmp}/data"),
            "no such file",
        ),
    }
)
if os.geteuid() != 0:  # root reads any file, so a file without read permission is no error for root
    CASES["data file unreadable"] = (csv("locked.csv"), "cannot be read (permission denied)")


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, request):
    root = request.config.rootpath
    folder = tmp_path_factory.mktemp("old")
    assert main(["run", str(root / EXP), "--workdir", str(folder / "old"), *sets(*OLD_RUN)]) == 0
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    def digest(p: Path) -> str:
        if not p.is_file():
            return "dir"
        if not os.access(p, os.R_OK):  # the case of a file without read permission
            return f"unreadable {p.stat().st_size} {p.stat().st_mtime_ns}"
        return hashlib.sha256(p.read_bytes()).hexdigest()

    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*"))}


def argv(spec, root, tmp_path, monkeypatch):
    """A case's command line: a list is options of ``run EXP`` (its items ``ENV:NAME=VALUE`` set the
    environment instead), ``env NAME=VALUE ...`` runs EXP in that environment, any other string is the
    command line itself, EXP standing for the experiment."""
    if isinstance(spec, list):
        for item in [a for a in spec if a.startswith("ENV:")]:
            monkeypatch.setenv(*item[4:].replace("{tmp}", str(tmp_path)).split("=", 1))
        spec = [a for a in spec if not a.startswith("ENV:")]
        args = ["run", str(root / EXP), *spec]
        if "--workdir" not in spec and "--resume" not in spec:
            args += ["--workdir", "{tmp}/new"]
    elif spec.startswith("env "):
        for item in spec.split()[1:]:
            monkeypatch.setenv(*item.split("=", 1))
        args = ["run", str(root / EXP)] + (["--workdir", "{tmp}/new"] if "JAX_" in spec else [])
    else:
        args = spec.replace("EXP", str(root / EXP)).split()
    return [a.replace("{tmp}", str(tmp_path)) for a in args]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(root, tmp_path, monkeypatch, capsys, old_run, case):
    spec, message = CASES[case]
    files(tmp_path)
    shutil.copytree(old_run, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)  # a default workdir (runs/...) would land here, and fail the snapshot
    before = snapshot(tmp_path)
    code = main(argv(spec, root, tmp_path, monkeypatch))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert snapshot(tmp_path) == before


def test_catalogue_size():
    assert len(CASES) >= 150
