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
import difflib
import gzip
import io
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bpjax.errors import UserError, one_line, warn


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
    folder = cache_dir(cache)
    path = folder / f"mnist1d-{num_samples}-{seed}.npz"
    which = "data.cache_dir" if cache else "$BPJAX_CACHE" if os.environ.get("BPJAX_CACHE") else "the cache"
    if path.is_file():
        try:
            with np.load(path) as f:
                return f["x"], f["y"], f["x_test"], f["y_test"]
        except Exception as e:  # a damaged cache file is regenerated, not an error
            warn(f"the MNIST-1D cache {path} cannot be read ({one_line(e, 100)}); generating it again")
    try:  # before the generation, not after: a cache that cannot be written is one line, at once
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError("permission denied")
    except OSError as e:
        raise UserError(
            f"{which}={str(folder)!r} cannot hold the MNIST-1D cache ({one_line(e, 100)}); set "
            "data.cache_dir (or $BPJAX_CACHE) to a writable folder"
        ) from None
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


def _memory_bytes() -> int:
    """This machine's physical memory (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_memory(what: str, nbytes: int, fix: str) -> None:
    """Refuse, before allocating, what cannot fit in this machine's memory."""
    total = _memory_bytes()
    if total and nbytes > total:
        raise UserError(
            f"{what} needs {nbytes / 2**30:.1f} GiB, more than this machine's {total / 2**30:.1f} GiB of "
            f"memory; {fix}"
        )


def _check_teacher(name, num_samples, num_features, num_outputs, width=64):
    """The synthetic generators' arrays (inputs, teacher weights, hidden units, outputs), checked first."""
    elements = num_samples * (num_features + width + num_outputs) + width * (num_features + num_outputs)
    outputs = "num_targets" if name == "synthetic_regression" else "num_classes"
    _check_memory(
        f"{name} with data.num_samples={num_samples}, data.num_features={num_features} and "
        f"data.{outputs}={num_outputs}",
        4 * elements,
        "lower them",
    )


def synthetic_classification(num_samples, num_features, num_classes, noise=0.1, seed=0):
    """Labels are the argmax of a random teacher network; a share ``noise`` of them is redrawn at random."""
    if num_classes < 2:
        raise UserError(f"data.num_classes={num_classes} must be >= 2")
    if not 0 <= noise <= 1:
        raise UserError(
            f"data.noise={noise} is the share of labels redrawn at random for synthetic_classification, "
            "so it must be in [0, 1]"
        )
    _check_teacher("synthetic_classification", num_samples, num_features, num_classes)
    rng, x, logits = _teacher(num_samples, num_features, num_classes, seed)
    y = logits.argmax(axis=1).astype(np.int32)
    flip = rng.random(num_samples) < noise
    y[flip] = rng.integers(0, num_classes, flip.sum())
    return x, y


def synthetic_regression(num_samples, num_features, num_targets=1, noise=0.1, seed=0):
    """Targets are a random teacher network's outputs plus Gaussian noise of std ``noise``."""
    _check_teacher("synthetic_regression", num_samples, num_features, num_targets)
    rng, x, y = _teacher(num_samples, num_features, num_targets, seed)
    y = y + noise * rng.standard_normal(y.shape, dtype=np.float32)
    return x, y.astype(np.float32)


# ------------------------------------------------------------------------------------------ user files

# What a file's first bytes say it is, for messages that name the right reader.
_SIGNATURES = (
    (b"PK", "a zip archive (an .npz file?): set data.name=npz"),
    (b"\x93NUMPY", "a single .npy array: save x and y together with np.savez(path, x=..., y=...)"),
    (b"\x1f\x8b", "gzip-compressed: decompress it first, or for MNIST IDX files set data.name=idx"),
    (b"\x00\x00\x08", "an IDX file: set data.name=idx"),
    (b"\x00\x00\x0d", "an IDX file: set data.name=idx"),
)


def _looks_like(head: bytes) -> str:
    return next((what for magic, what in _SIGNATURES if head.startswith(magic)), "")


def _need_file(path: str, key: str, kind: str = "data") -> Path:
    """``path`` (``~`` expanded) if it names a readable, non-empty regular file; else one line naming
    ``key`` and the fix."""
    if not path:
        raise UserError(f"{key} is empty; set it to your data file, e.g. --set {key}=/path/to/file")
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            inside = sorted(c.name for c in p.iterdir() if c.is_file())[:3]
            hint = f" (it holds {', '.join(inside)})" if inside else ""
            raise UserError(f"{key}={path!r} is a folder{hint}; give the data file itself")
        if not p.exists():
            near = []
            if p.parent.is_dir():
                names = [c.name for c in p.parent.iterdir()]
                near = difflib.get_close_matches(p.name, names, n=1, cutoff=0.6)
            hint = f"; did you mean {str(p.parent / near[0])!r}?" if near else ""
            raise UserError(f"{key}={path!r}: no such file; check the path{hint}")
        if path.endswith(("/", os.sep)):
            raise UserError(f"{key}={path!r} ends with a slash but is a file; remove the trailing slash")
        if not p.is_file():
            raise UserError(f"{key}={path!r} is not a regular file; give the data file itself")
        if not os.access(p, os.R_OK):
            raise UserError(
                f"{key}={path!r} cannot be read (permission denied); make it readable, e.g. chmod +r {path}"
            )
        if p.stat().st_size == 0:
            raise UserError(f"{key}={path!r}: the {kind} file is empty (0 bytes); check that it was written")
    except OSError as e:
        raise UserError(f"{key}={path!r} cannot be read ({one_line(e)})") from None
    return p


def _read_bytes(p: Path, path: str, key: str) -> bytes:
    try:
        _check_memory(f"reading {key}={path!r}", p.stat().st_size, "use a smaller file")
        return p.read_bytes()
    except OSError as e:
        raise UserError(f"{key}={path!r} cannot be read ({one_line(e)})") from None


def read_npz(path: str):
    """``x`` and ``y`` arrays, optionally ``x_test`` and ``y_test``; ``x`` of any rank is flattened."""
    p = _need_file(path, "data.path", "NPZ")
    with open(p, "rb") as f:
        head = f.read(8)
    if not head.startswith(b"PK"):
        text = head and all(32 <= b < 127 or b in b"\t\r\n" for b in head)
        what = _looks_like(head) or ("text (a CSV file?): set data.name=csv" if text else "")
        raise UserError(
            f"data.path={path!r} is not a readable .npz file (not a zip archive)"
            + (f"; it is {what}" if what else "; write one with np.savez(path, x=..., y=...)")
        )
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # a damaged archive, pickled objects: numpy's own words, in one line
        raise UserError(
            f"data.path={path!r} is not a readable .npz file ({type(e).__name__}: {one_line(e)}); "
            "write it with np.savez(path, x=..., y=...) from numeric arrays"
        ) from None
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(
                f"{path}: no array named {key!r} (found {sorted(arrays)}); save with np.savez(path, x=..., y=...)"
            )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise UserError(f"{path}: has only one of x_test / y_test; save both or neither")
    return arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test")


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_csv(path: str, label_column: int | str = -1):
    """Numeric CSV, one example a row, at most one header row; ``label_column`` holds the label: its
    index (-1: the last) or its name in the header.

    Read as UTF-8 with an optional byte-order mark (as spreadsheet programs write it). Messages count
    lines as an editor does, from 1, header included.
    """
    p = _need_file(path, "data.path", "CSV")
    raw = _read_bytes(p, path, "data.path")
    what = _looks_like(raw[:8])
    if what or b"\x00" in raw[:65536]:
        raise UserError(
            f"data.path={path!r} is a binary file, not CSV text"
            + (f"; it is {what}" if what else "; bpjax reads comma-separated numbers")
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"data.path={path!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "save the CSV as UTF-8"
        ) from None
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV file ({one_line(e)})") from None
    if not rows:
        raise UserError(f"{path}: the CSV file is empty")
    header = None
    if any(c.strip() and not _number(c) for c in rows[0][1]):
        header, rows = rows[0], rows[1:]
    if not rows:
        raise UserError(f"{path}: the CSV file has a header but no data rows")
    width = len(rows[0][1])
    if width < 2:
        sep = next((s for s in (";", "\t", "|", " ") if s in rows[0][1][0].strip()), None)
        hint = (
            f"; its values seem to be separated by {sep!r}: bpjax reads comma-separated values"
            if sep
            else "; add the label column"
        )
        raise UserError(
            f"{path}: a CSV row needs at least one feature and one label column, found {width} column{hint}"
        )
    if header is not None and len(header[1]) != width:
        raise UserError(
            f"{path}: the header (line {header[0]}) has {len(header[1])} columns but the data has {width}; "
            "fix the header"
        )
    table = np.empty((len(rows), width), np.float64)
    for i, (line, r) in enumerate(rows):
        if len(r) != width:
            raise UserError(
                f"{path}: line {line} has {len(r)} columns, the first data row has {width}; fix the file"
            )
        for j, cell in enumerate(r):
            if not cell.strip():
                raise UserError(
                    f"{path}: line {line}, column {j + 1} is empty; fill in or drop missing values first"
                )
            try:
                table[i, j] = float(cell)
            except ValueError:
                raise UserError(
                    f"{path}: line {line}, column {j + 1} holds {one_line(cell, 40)!r}, not a number; bpjax "
                    "reads numeric CSV with at most one header row (encode text columns as numbers first)"
                ) from None
    if isinstance(label_column, str):
        names = [c.strip() for c in header[1]] if header is not None else []
        if label_column.strip() not in names:
            if not names:
                raise UserError(
                    f"data.label_column={label_column!r} names a column, but {path} has no header row; "
                    f"give the column's index (0..{width - 1}, or -1 for the last)"
                )
            match = difflib.get_close_matches(label_column.strip(), names, n=1, cutoff=0.5)
            hint = (
                f"did you mean {match[0]!r}?" if match else f"the columns are {', '.join(map(repr, names))}"
            )
            raise UserError(f"data.label_column={label_column!r} is not a column of {path}; {hint}")
        label_column = names.index(label_column.strip())
    if not -width <= label_column < width:
        raise UserError(
            f"data.label_column={label_column} is outside the {width} columns of {path}; "
            f"use 0..{width - 1}, or -1 for the last"
        )
    label_column %= width
    return np.delete(table, label_column, axis=1), table[:, label_column]


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str, key: str = "data.path") -> np.ndarray:
    """An IDX file (the MNIST / Fashion-MNIST format), plain or gzipped, as a numpy array.

    Compression is recognised by content (gzip's magic bytes), not by the name.
    """
    p = _need_file(path, key, "IDX")
    raw = _read_bytes(p, path, key)
    gz = raw[:2] == b"\x1f\x8b"
    if gz:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(
                f"{key}={path!r} is a damaged gzip file ({one_line(e)}); download or compress it again"
            ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        said = (
            " and, although its name ends in .gz, not gzip-compressed" if p.suffix == ".gz" and not gz else ""
        )
        raise UserError(
            f"{key}={path!r} is not an IDX file (bad magic number){said}; give MNIST-format idx files"
        )
    ndim = raw[3]
    if ndim == 0:
        raise UserError(
            f"{key}={path!r} holds a 0-dimensional IDX array (one number); IDX data needs one entry per "
            "example along its first dimension"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{key}={path!r} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
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


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_finite(source: str, **arrays) -> None:
    """NaN or Inf anywhere is an error, reported with the example's index in the source's own order;
    so is a value float32 cannot hold (it would become Inf)."""
    for label, arr in arrays.items():
        if arr is None or not np.issubdtype(np.asarray(arr).dtype, np.number):
            continue
        a = np.asarray(arr, np.float64)
        what = label.replace("_", " ")
        bad = ~np.isfinite(a)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise UserError(
                f"{source}: {int(bad.sum())} NaN/Inf values in the {what} "
                f"(first in example {row}, counting from 0); clean or impute them first"
            )
        big = np.abs(a) > _FLOAT32_MAX
        if big.any() and "labels" not in label:
            row = int(np.argwhere(big)[0][0])
            raise UserError(
                f"{source}: {int(big.sum())} values in the {what} exceed float32's range (3.4e38; first "
                f"in example {row}); rescale them"
            )


def _check_arrays(source: str, x, y, part: str = "") -> None:
    """Shapes and kinds, before anything takes ``len`` of them or casts them."""
    xs, ys = f"x{part}", f"y{part}"
    if y.ndim == 0 or x.ndim == 0:
        raise UserError(
            f"{source}: {xs} has shape {x.shape} and {ys} {y.shape}; {xs} needs one row per example and "
            f"{ys} one label per example"
        )
    if x.ndim < 2:
        raise UserError(
            f"{source}: x must have one row per example, got shape {x.shape}; for one feature per "
            "example reshape it to (N, 1)"
        )
    for name, a in ((xs, x), (ys, y)):
        kind = a.dtype.kind
        if kind not in "biuf":  # bool, int, unsigned, float; not complex, text or objects
            raise UserError(
                f"{source}: inputs and labels must be numeric, got {name} of dtype {a.dtype}; "
                "convert it to numbers first"
            )
    if len(x) and math.prod(x.shape[1:]) == 0:
        raise UserError(f"{source}: {xs} has no features (shape {x.shape}); each example needs at least one")
    if len(x) != len(y):
        raise UserError(f"{source}: {len(x)} inputs but {len(y)} labels; each example needs one label")


def _class_labels(source: str, y, y_test):
    """Class ids ``0..K-1`` as int32, and K; anything else is one line naming the fix, decided before
    anything is allocated from the labels' values (a one-hot, an output layer of max+1 units)."""
    if y.ndim == 2 and y.shape[1] == 1:  # a column vector of labels
        y, y_test = y[:, 0], y_test.reshape(len(y_test), -1)[:, 0]
    if y.ndim != 1:
        one_hot = y.ndim == 2 and set(np.unique(y)) <= {0, 1}
        hint = "; it looks one-hot: save y.argmax(axis=1)" if one_hot else ""
        raise UserError(
            f"{source}: classification needs one non-negative integer class id per example, y has shape "
            f"{y.shape}{hint}; for real-valued targets set data.task=regression"
        )
    ys = np.concatenate([y.reshape(-1), np.asarray(y_test).reshape(-1)]).astype(np.float64)
    if (ys != np.round(ys)).any():
        raise UserError(
            f"{source}: classification needs one non-negative integer class id per example; "
            "for real-valued targets set data.task=regression"
        )
    classes = np.unique(ys)
    if classes[0] < 0:
        raise UserError(
            f"{source}: class ids must be 0..K-1, found negative labels (e.g. {int(classes[0])}); "
            "map them to 0..K-1 first, e.g. np.unique(y, return_inverse=True)[1]"
        )
    if len(classes) < 2:
        raise UserError(
            f"{source}: all labels are class {int(classes[0])}; classification needs at least two classes"
        )
    top = int(classes[-1])
    if top + 1 > max(2 * len(classes), 1024):
        raise UserError(
            f"{source}: the labels are not class ids 0..K-1: {len(classes)} distinct labels but the largest "
            f"is {top}, which would make a {top + 1}-way output layer; map them to 0..{len(classes) - 1} "
            "first, e.g. np.unique(y, return_inverse=True)[1]"
        )
    return y.astype(np.int32), np.asarray(y_test).astype(np.int32), top + 1


def _prepare(name, task, x, y, x_test, y_test, source: str) -> Dataset:
    x, y = np.asarray(x), np.asarray(y)
    x_test, y_test = np.asarray(x_test), np.asarray(y_test)
    _check_arrays(source, x, y)
    _check_arrays(source, x_test, y_test, "_test")
    if len(x_test) == 0:
        raise UserError(f"{source}: the test split (x_test) holds no examples; save at least one")
    x = x.reshape(len(x), -1)
    x_test = x_test.reshape(len(x_test), -1)
    if x.shape[1] != x_test.shape[1]:
        raise UserError(f"{source}: train has {x.shape[1]} features but test has {x_test.shape[1]}")
    if task == "classification":
        y, y_test, num_outputs = _class_labels(source, y, y_test)
    else:
        y = y.reshape(len(y), -1).astype(np.float32)
        y_test = y_test.reshape(len(y_test), -1).astype(np.float32)
        if y.shape[1] != y_test.shape[1]:
            raise UserError(f"{source}: train has {y.shape[1]} targets but test has {y_test.shape[1]}")
        num_outputs = y.shape[1]
    return Dataset(name, x.astype(np.float32), y, x_test.astype(np.float32), y_test, task, num_outputs)


def load(cfg, seed: int) -> Dataset:
    """Build the data set a config's ``data`` section names (``seed``: the run's ``seeds.split``)."""
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
    x, y = np.asarray(x), np.asarray(y)
    _check_arrays(source, x, y)
    if x_test is not None:
        x_test, y_test = np.asarray(x_test), np.asarray(y_test)
        _check_arrays(source, x_test, y_test, "_test")
    labels = "targets" if task == "regression" else "labels"
    _check_finite(source, inputs=x, test_inputs=x_test, **{labels: y, f"test_{labels}": y_test})
    if len(x) < 2:
        raise UserError(f"{source}: needs at least 2 examples, found {len(x)}")
    if x_test is None:
        x, y, x_test, y_test = split(x, y, cfg.test_fraction, seed)
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
        # (epoch, its permutation), replaced as one value: the prefetching thread (bpjax.feed) and the
        # loop may both read it.
        self._epoch_perm: tuple[int, np.ndarray | None] = (-1, None)

    def indices(self, step: int) -> np.ndarray:
        """The training-set rows of step ``step``'s batch, ``[B]``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        cached, perm = self._epoch_perm
        if epoch != cached:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
            self._epoch_perm = (epoch, perm)
        return perm[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The global batch of training step ``step`` (0-based)."""
        idx = self.indices(step)
        return {"x": self.x[idx], "y": self.y[idx]}

    def stack(self, start: int, k: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Batches of steps ``start .. start+k-1`` stacked on a leading axis: ``{"x": [K, B, D], ...}``.

        ``rows``: only these rows of every batch (a process's share in a multi-process run).
        """
        idx = np.stack([self.indices(s)[rows] for s in range(start, start + k)])
        return {"x": self.x[idx], "y": self.y[idx]}
