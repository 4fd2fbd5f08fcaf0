"""The bad-input catalogue: every case is one actionable line on stderr, exit status 2, and not a byte
changed on disk: no results folder, no half-written file, an earlier run left exactly as it was.

Cases run in-process through ``bpjax.cli.main`` (what the console script calls): every check happens
before a process is started, anything is compiled, or a file is written. test_cli.py checks the exit
status in a fresh process.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from bpjax.cli import main

EXP = "experiments/mnist1d_dp.py"
# Finished runs with checkpoints, copied into every case's folder as ``old/`` and ``old_async/``: the
# resume cases resume them; for the others they are earlier work that must survive untouched.
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
    """Data files a user might point bpjax at, most of them broken."""
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


CASES = {
    # Config keys, types and values.
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
    "missing experiment": ("run no/such/experiment.py", "experiment file 'no/such/experiment.py' not found"),
    "broken experiment": ("run {tmp}/broken.py", "broken.py failed to load: SyntaxError"),
    # Data files: missing, malformed, wrong shapes, NaN.
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
        "row 2 is not numeric",
    ),
    "csv ragged": (sets("data.name=csv", "data.path={tmp}/ragged.csv"), "row 2 has 2 columns"),
    "csv empty": (sets("data.name=csv", "data.path={tmp}/empty.csv"), "the CSV file is empty"),
    "idx truncated": (
        sets("data.name=idx", "data.path={tmp}/images.idx.gz", "data.labels_path={tmp}/labels.idx"),
        "holds 0 data bytes but its header (10, 4, 4) needs 160",
    ),
    "loss for the data": (
        sets("data.name=synthetic_regression"),
        "synthetic_regression needs train.loss=mse",
    ),
    # Mesh shapes against device counts.
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
        "layer_0.kernel: hidden_a width 100 is not divisible by the model axis of size 8",
    ),
    "too many stages": (
        sets("parallel.strategy=pipeline", "parallel.mesh.stage=4"),
        "4 pipeline stages for a net of 3 layers",
    ),
    "microbatches": (
        sets("parallel.strategy=pipeline", "parallel.mesh.stage=3", "parallel.microbatches=5"),
        "train.batch_size=128 is not divisible by parallel.microbatches=5",
    ),
    # Checkpoints and earlier runs.
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
    "staleness of a checkpoint": (
        [
            "--workdir",
            "{tmp}/old_async",
            "--resume",
            *sets(*OLD_RUN, "train.steps=16", *ASYNC, "parallel.staleness=1"),
        ],
        "holds state.history['layer_0']['bias'] of shape [3, 32] float32, this run needs [2, 32] float32",
    ),
    "strategy with own state": (
        resume("parallel.strategy=async"),
        "async keeps state of its own and resumes only from its own checkpoints",
    ),
    # Processes.
    "processes vs devices": (
        "launch --processes 3 EXP",
        "3 processes cannot share parallel.cpu_devices=8 evenly",
    ),
    "no processes": ("launch --processes 0 EXP", "--processes 0 must be >= 1"),
    "one-process strategy": (
        "launch --processes 2 EXP --set parallel.strategy=pipeline --set parallel.mesh.stage=2",
        "pipeline runs in one process only; across processes use pmap, dp (partition=sample), fsdp",
    ),
    "half a cluster env": (
        "env JAX_COORDINATOR_ADDRESS=127.0.0.1:1",
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID not",
    ),
}


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, request):
    root = request.config.rootpath
    folder = tmp_path_factory.mktemp("old")
    assert main(["run", str(root / EXP), "--workdir", str(folder / "old"), *sets(*OLD_RUN)]) == 0
    assert (
        main(["run", str(root / EXP), "--workdir", str(folder / "old_async"), *sets(*OLD_RUN, *ASYNC)]) == 0
    )
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def argv(spec, root, tmp_path, monkeypatch):
    if isinstance(spec, list):
        args = ["run", str(root / EXP), *spec]
        if "--workdir" not in spec and "--resume" not in spec:
            args += ["--workdir", "{tmp}/new"]
    elif spec.startswith("env "):
        for item in spec.split()[1:]:
            monkeypatch.setenv(*item.split("="))
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
    assert len(CASES) >= 25
