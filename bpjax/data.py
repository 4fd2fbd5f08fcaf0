"""Data sets as host arrays, and the deterministic stream of global batches a run trains on.

Sources (``data.name``), none of which downloads anything:
  mnist1d                    MNIST-1D regenerated offline by the ``mnist1d`` package, cached on disk
  digits                     scikit-learn's 8x8 digits (1797 examples, shipped with the package)
  synthetic_classification   seeded teacher-network labels, any size
  synthetic_regression       seeded teacher-network targets, any size
  npz / csv / idx            a user's file: ``.npz`` (x, y[, x_test, y_test]), ``.csv`` (one label
                             column), or MNIST / Fashion-MNIST IDX files (optionally ``.gz``)

Every source goes through the same checks (finite values, labels fit the task), the same seeded
train/test split where it has none of its own, and the same standardisation fitted on the training split.
`Batches` turns the training split into global batches: the batch of step ``s`` depends only on the
seed and ``s``, so every strategy and every resumed run sees the same examples in the same order.
"""

from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bpjax.errors import UserError


@dataclass(frozen=True)
class Dataset:
    """Host arrays. ``x_*`` are float32 ``[N, D]``; ``y_*`` int32 ``[N]`` (classes) or float32 ``[N, T]``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str  # "classification" or "regression"
    num_outputs: int  # classes, or regression targets

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, {self.task}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"outputs={self.num_outputs})"
        )


# --------------------------------------------------------------------------------------------- sources


def cache_dir(configured: str = "") -> Path:
    return Path(configured or os.environ.get("BPJAX_CACHE") or Path.home() / ".cache" / "bpjax")


def mnist1d(num_samples: int = 5000, seed: int = 42, cache: str = ""):
    """MNIST-1D (Greydanus 2020), regenerated offline: 40 features, 10 classes, its own 80/20 split.

    ``seed`` is the generator's seed (42 reproduces the published data set for 5000 samples).
    The result is cached as ``mnist1d-{num_samples}-{seed}.npz`` under `cache_dir`.
    """
    path = cache_dir(cache) / f"mnist1d-{num_samples}-{seed}.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["x"], f["y"], f["x_test"], f["y_test"]
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    state = np.random.get_state()  # noqa: NPY002 -- mnist1d seeds numpy's global generator; leave it as we found it
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    arrays = dict(x=d["x"].astype(np.float32), y=d["y"].astype(np.int32))
    arrays.update(x_test=d["x_test"].astype(np.float32), y_test=d["y_test"].astype(np.int32))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: concurrent runs never read a half-written cache file
    return arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"]


def digits():
    """scikit-learn's digits: 1797 examples of 64 features (8x8 pixels, 0..16), 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int32)


def _teacher(num_samples, num_features, num_outputs, seed, width=64):
    """Inputs ``x ~ N(0, I)`` and the outputs of a random one-hidden-layer tanh network on them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, num_features), dtype=np.float32)
    w1 = rng.standard_normal((num_features, width), dtype=np.float32) / np.sqrt(num_features)
    w2 = rng.standard_normal((width, num_outputs), dtype=np.float32) / np.sqrt(width)
    return rng, x, np.tanh(x @ w1) @ w2


def synthetic_classification(num_samples, num_features, num_classes, noise=0.1, seed=0):
    """Labels are the argmax of a random teacher network; a share ``noise`` of them is redrawn at random."""
    if num_classes < 2:
        raise UserError(f"data.num_classes={num_classes} must be >= 2")
    rng, x, logits = _teacher(num_samples, num_features, num_classes, seed)
    y = logits.argmax(axis=1).astype(np.int32)
    flip = rng.random(num_samples) < noise
    y[flip] = rng.integers(0, num_classes, flip.sum())
    return x, y


def synthetic_regression(num_samples, num_features, num_targets=1, noise=0.1, seed=0):
    """Targets are a random teacher network's outputs plus Gaussian noise of std ``noise``."""
    rng, x, y = _teacher(num_samples, num_features, num_targets, seed)
    y = y + noise * rng.standard_normal(y.shape, dtype=np.float32)
    return x, y.astype(np.float32)


def _need_file(path: str, key: str) -> Path:
    if not path:
        raise UserError(f"{key} is empty; set it to your data file, e.g. --set {key}=/path/to/file")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{key}={path!r}: no such file; check the path")
    return p


def read_npz(path: str):
    """``x`` and ``y`` arrays, optionally ``x_test`` and ``y_test``; ``x`` of any rank is flattened."""
    p = _need_file(path, "data.path")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise UserError(f"data.path={path!r} is not a readable .npz file ({type(e).__name__}: {e})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(
                f"{path}: no array named {key!r} (found {sorted(arrays)}); save with np.savez(path, x=..., y=...)"
            )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise UserError(f"{path}: has only one of x_test / y_test; save both or neither")
    return arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test")


def read_csv(path: str, label_column: int = -1):
    """Numeric CSV, one example a row, a header row allowed; ``label_column`` holds the label."""
    p = _need_file(path, "data.path")
    with open(p, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{path}: the CSV file is empty")
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        rows = rows[1:]  # a header
    if not rows:
        raise UserError(f"{path}: the CSV file has a header but no data rows")
    width = len(rows[0])
    if width < 2:
        raise UserError(
            f"{path}: a CSV row needs at least one feature and one label column, found {width} column"
        )
    table = np.empty((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        if len(r) != width:
            raise UserError(f"{path}: row {i + 1} has {len(r)} columns, the first has {width}; fix the file")
        try:
            table[i] = [float(c) for c in r]
        except ValueError as e:
            raise UserError(
                f"{path}: row {i + 1} is not numeric ({e}); bpjax reads numeric CSV only"
            ) from None
    if not -width <= label_column < width:
        raise UserError(f"data.label_column={label_column} is outside the {width} columns of {path}")
    label_column %= width
    return np.delete(table, label_column, axis=1), table[:, label_column]


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str, key: str = "data.path") -> np.ndarray:
    """An IDX file (the MNIST / Fashion-MNIST format), plain or gzipped, as a numpy array."""
    p = _need_file(path, key)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{key}={path!r} could not be read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise UserError(f"{key}={path!r} is not an IDX file (bad magic number); give MNIST-format idx files")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{key}={path!r} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise UserError(
            f"{key}={path!r} holds {len(raw) - header} data bytes but its header {shape} needs {expected}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


# --------------------------------------------------------------------------------------- preparation


def split(x, y, test_fraction: float, seed: int):
    """A seeded shuffle-split: ``round(N * test_fraction)`` examples (at least one) go to the test set."""
    n = len(x)
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    perm = np.random.default_rng([seed, 0x5B117]).permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def standardize(x_train, x_test):
    """Zero mean, unit variance per feature, fitted on the training split (constant features stay 0)."""
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _check_finite(source: str, **arrays) -> None:
    """NaN or Inf anywhere is an error, reported with the example's index in the source's own order."""
    for label, arr in arrays.items():
        if arr is None or not np.issubdtype(np.asarray(arr).dtype, np.number):
            continue
        bad = ~np.isfinite(np.asarray(arr, np.float64))
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise UserError(
                f"{source}: {int(bad.sum())} NaN/Inf values in the {label.replace('_', ' ')} "
                f"(first in example {row}, counting from 0); clean or impute them first"
            )


def _prepare(name, task, x, y, x_test, y_test, source: str) -> Dataset:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2:
        raise UserError(f"{source}: x must have one row per example, got shape {x.shape}")
    x = x.reshape(len(x), -1)
    x_test = np.asarray(x_test).reshape(len(x_test), -1)
    if len(x) != len(y) or len(x_test) != len(y_test):
        raise UserError(
            f"{source}: {len(x)} inputs but {len(y)} labels (test: {len(x_test)} / {len(y_test)}); "
            "each example needs one label"
        )
    if x.shape[1] != x_test.shape[1]:
        raise UserError(f"{source}: train has {x.shape[1]} features but test has {x_test.shape[1]}")
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise UserError(f"{source}: inputs and labels must be numeric, got {x.dtype} and {y.dtype}")
    if task == "classification":
        ys = np.concatenate([y.reshape(-1), np.asarray(y_test).reshape(-1)]).astype(np.float64)
        if y.ndim != 1 or (ys != np.round(ys)).any() or (ys < 0).any():
            raise UserError(
                f"{source}: classification needs one non-negative integer class id per example; "
                "for real-valued targets set data.task=regression"
            )
        num_outputs = int(ys.max()) + 1
        if num_outputs < 2:
            raise UserError(f"{source}: all labels are class 0; classification needs at least two classes")
        y, y_test = y.astype(np.int32), np.asarray(y_test).astype(np.int32)
    else:
        y = y.reshape(len(y), -1).astype(np.float32)
        y_test = np.asarray(y_test).reshape(len(y_test), -1).astype(np.float32)
        num_outputs = y.shape[1]
    return Dataset(name, x.astype(np.float32), y, x_test.astype(np.float32), y_test, task, num_outputs)


def load(cfg, seed: int) -> Dataset:
    """Build the data set a config's ``data`` section names (``seed`` is the config's top-level seed)."""
    name = cfg.name
    task = cfg.task
    x_test = y_test = None
    if name == "mnist1d":
        # The generator's seed stays at the published 42: the run's seed shuffles, it does not redraw data.
        x, y, x_test, y_test = mnist1d(cfg.num_samples, 42, cfg.cache_dir)
        task = "classification"
    elif name == "digits":
        x, y = digits()
        task = "classification"
    elif name == "synthetic_classification":
        x, y = synthetic_classification(cfg.num_samples, cfg.num_features, cfg.num_classes, cfg.noise, seed)
        task = "classification"
    elif name == "synthetic_regression":
        x, y = synthetic_regression(cfg.num_samples, cfg.num_features, cfg.num_targets, cfg.noise, seed)
        task = "regression"
    elif name == "npz":
        x, y, x_test, y_test = read_npz(cfg.path)
    elif name == "csv":
        x, y = read_csv(cfg.path, cfg.label_column)
    elif name == "idx":
        x = read_idx(cfg.path, "data.path")
        y = read_idx(cfg.labels_path, "data.labels_path")
        if cfg.test_path or cfg.test_labels_path:
            x_test = read_idx(cfg.test_path, "data.test_path")
            y_test = read_idx(cfg.test_labels_path, "data.test_labels_path")
    else:
        raise UserError(f"data.name={name!r} is not known")
    source = f"data.path={cfg.path!r}" if name in ("npz", "csv", "idx") else f"data {name}"
    if len(x) != len(y):
        raise UserError(f"{source}: {len(x)} inputs but {len(y)} labels; each example needs one label")
    _check_finite(source, inputs=x, labels=y, test_inputs=x_test, test_labels=y_test)
    if len(x) < 2:
        raise UserError(f"{source}: needs at least 2 examples, found {len(x)}")
    if x_test is None:
        x, y, x_test, y_test = split(np.asarray(x), np.asarray(y), cfg.test_fraction, seed)
    ds = _prepare(name, task, x, y, x_test, y_test, source)
    if cfg.standardize:
        x_train, x_test = standardize(ds.x_train, ds.x_test)
        ds = Dataset(ds.name, x_train, ds.y_train, x_test, ds.y_test, ds.task, ds.num_outputs)
    return ds


# ---------------------------------------------------------------------------------------------- batches


class Batches:
    """Global training batches, ``{"x": [B, D], "y": [B] or [B, T]}``, a pure function of (seed, step).

    Each epoch is a fresh seeded permutation of the training split; the last incomplete batch of an
    epoch is dropped so that every step has exactly ``batch_size`` examples.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
        if batch_size > len(x):
            raise UserError(
                f"train.batch_size={batch_size} exceeds the {len(x)} training examples; use at most {len(x)}"
            )
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.steps_per_epoch = len(x) // batch_size
        self._epoch, self._perm = -1, None

    def _indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The global batch of training step ``step`` (0-based)."""
        idx = self._indices(step)
        return {"x": self.x[idx], "y": self.y[idx]}

    def stack(self, start: int, k: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Batches of steps ``start .. start+k-1`` stacked on a leading axis: ``{"x": [K, B, D], ...}``.

        ``rows``: only these rows of every batch (a process's share in a multi-process run).
        """
        idx = np.stack([self._indices(s)[rows] for s in range(start, start + k)])
        return {"x": self.x[idx], "y": self.y[idx]}
