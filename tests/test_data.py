import gzip

import numpy as np
import pytest

from bpjax import config as cfg_lib
from bpjax import data
from bpjax.errors import UserError


def data_cfg(**kw):
    c = cfg_lib.default().data
    for k, v in kw.items():
        c[k] = v
    return c


def test_mnist1d_is_generated_offline_and_cached(tmp_path, monkeypatch):
    ds = data.load(data_cfg(name="mnist1d", num_samples=1000, cache_dir=str(tmp_path)), seed=0)
    assert ds.x_train.shape == (800, 40) and ds.x_test.shape == (200, 40)
    assert ds.num_outputs == 10 and ds.task == "classification"
    assert ds.y_train.dtype == np.int32 and ds.x_train.dtype == np.float32
    assert (tmp_path / "mnist1d-1000-42.npz").is_file()

    import mnist1d.data

    def no_regeneration(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_regeneration)
    again = data.load(data_cfg(name="mnist1d", num_samples=1000, cache_dir=str(tmp_path)), seed=0)
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_mnist1d_leaves_numpy_global_rng_alone(tmp_path):
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    data.mnist1d(200, 42, str(tmp_path))
    assert np.random.rand() == expected


def test_digits():
    ds = data.load(data_cfg(name="digits", test_fraction=0.2), seed=0)
    assert ds.num_features == 64 and ds.num_outputs == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == round(1797 * 0.2)


def test_standardised_on_the_training_split():
    ds = data.load(data_cfg(name="digits"), seed=0)
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
    std = ds.x_train.std(0)
    assert np.all((np.abs(std - 1) < 1e-4) | (std == 0))  # constant pixels stay constant, not NaN
    assert np.isfinite(ds.x_test).all()
    raw = data.load(data_cfg(name="digits", standardize=False), seed=0)
    assert raw.x_train.max() == 16


def test_synthetic_is_seeded_and_sized():
    a = data.load(
        data_cfg(name="synthetic_classification", num_samples=500, num_features=7, num_classes=3), seed=1
    )
    b = data.load(
        data_cfg(name="synthetic_classification", num_samples=500, num_features=7, num_classes=3), seed=1
    )
    c = data.load(
        data_cfg(name="synthetic_classification", num_samples=500, num_features=7, num_classes=3), seed=2
    )
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.num_features == 7 and a.num_outputs == 3 and len(a.x_train) + len(a.x_test) == 500
    r = data.load(
        data_cfg(name="synthetic_regression", num_samples=300, num_features=5, num_targets=2), seed=0
    )
    assert r.task == "regression" and r.y_train.shape == (240, 2) and r.y_train.dtype == np.float32


def test_batches_are_a_function_of_seed_and_step():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.int32)
    b = data.Batches(x, y, batch_size=3, seed=0)
    assert b.steps_per_epoch == 3
    epoch0 = np.concatenate([b.batch(s)["y"] for s in range(3)])
    assert len(set(epoch0)) == 9  # no repeats inside an epoch; one example dropped
    epoch1 = np.concatenate([b.batch(s)["y"] for s in range(3, 6)])
    assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch
    fresh = data.Batches(x, y, batch_size=3, seed=0)
    np.testing.assert_array_equal(fresh.batch(4)["y"], b.batch(4)["y"])  # random access, same answer
    stacked = b.stack(2, 3)
    assert stacked["x"].shape == (3, 3, 1)
    np.testing.assert_array_equal(stacked["y"][1], b.batch(3)["y"])
    assert not np.array_equal(data.Batches(x, y, 3, seed=1).batch(0)["y"], b.batch(0)["y"])


def test_batch_larger_than_data():
    with pytest.raises(
        UserError, match="train.batch_size=20 exceeds the 10 training examples; use at most 10"
    ):
        data.Batches(np.zeros((10, 2)), np.zeros(10), 20, 0)


def test_npz(tmp_path):
    p = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(p, x=rng.normal(size=(50, 3, 2)), y=rng.integers(0, 4, 50))
    ds = data.load(data_cfg(name="npz", path=str(p)), seed=0)
    assert ds.num_features == 6 and ds.num_outputs <= 4 and len(ds.x_test) == 10
    np.savez(
        p,
        x=rng.normal(size=(50, 3)),
        y=rng.integers(0, 4, 50),
        x_test=rng.normal(size=(7, 3)),
        y_test=np.arange(7) % 4,
    )
    ds = data.load(data_cfg(name="npz", path=str(p)), seed=0)
    assert len(ds.x_test) == 7 and len(ds.x_train) == 50


def test_csv_with_header_and_label_column(tmp_path):
    p = tmp_path / "d.csv"
    rows = ["label,a,b"] + [f"{i % 3},{i},{i * 2}" for i in range(20)]
    p.write_text("\n".join(rows) + "\n")
    ds = data.load(data_cfg(name="csv", path=str(p), label_column=0, standardize=False), seed=0)
    assert ds.num_features == 2 and ds.num_outputs == 3
    np.testing.assert_array_equal(ds.x_train[:, 1], 2 * ds.x_train[:, 0])
    reg = data.load(data_cfg(name="csv", path=str(p), label_column=-1, task="regression"), seed=0)
    assert reg.task == "regression" and reg.y_train.shape[1] == 1
    # The label column by its header name, as a --set or an experiment file gives it.
    by_name = data.load(data_cfg(name="csv", path=str(p), label_column="label", standardize=False), seed=0)
    np.testing.assert_array_equal(by_name.x_train, ds.x_train)
    np.testing.assert_array_equal(by_name.y_train, ds.y_train)
    c = cfg_lib.default()
    c.data.label_column = " label"  # set in a get_config(): no ml_collections type error
    c = cfg_lib.apply_overrides(cfg_lib.merge_into_default(c), ["data.name=csv", f"data.path={p}"])
    cfg_lib.validate(c)
    assert data.load(c.data, 0).num_outputs == 3


def write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_on_small_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 4, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, 30).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"img{suffix}", images, gz)
    write_idx(tmp_path / f"lab{suffix}", labels, gz)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / f"img{suffix}")), images)
    ds = data.load(
        data_cfg(
            name="idx",
            path=str(tmp_path / f"img{suffix}"),
            labels_path=str(tmp_path / f"lab{suffix}"),
            standardize=False,
        ),
        seed=0,
    )
    assert ds.num_features == 20 and len(ds.x_train) == 24
    write_idx(tmp_path / "timg", images[:5])
    write_idx(tmp_path / "tlab", labels[:5])
    ds = data.load(
        data_cfg(
            name="idx",
            path=str(tmp_path / f"img{suffix}"),
            labels_path=str(tmp_path / f"lab{suffix}"),
            test_path=str(tmp_path / "timg"),
            test_labels_path=str(tmp_path / "tlab"),
        ),
        seed=0,
    )
    assert len(ds.x_train) == 30 and len(ds.x_test) == 5
    f32 = rng.normal(size=(3, 2)).astype(np.float32)
    write_idx(tmp_path / "f32", f32)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "f32")), f32)


def test_bad_data_files_name_the_problem(tmp_path):
    cases = []
    cases.append((data_cfg(name="npz", path=str(tmp_path / "nope.npz")), "no such file; check the path"))
    cases.append((data_cfg(name="npz", path=""), "data.path is empty"))
    (tmp_path / "junk.npz").write_text("not a zip")
    cases.append((data_cfg(name="npz", path=str(tmp_path / "junk.npz")), "is not a readable .npz file"))
    np.savez(tmp_path / "nox.npz", a=np.zeros(3))
    cases.append((data_cfg(name="npz", path=str(tmp_path / "nox.npz")), "no array named 'x'"))
    np.savez(tmp_path / "len.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    cases.append((data_cfg(name="npz", path=str(tmp_path / "len.npz")), "5 inputs but 4 labels"))
    x = np.ones((10, 2))
    x[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(10) % 2)
    cases.append((data_cfg(name="npz", path=str(tmp_path / "nan.npz")), "NaN/Inf values in the"))
    np.savez(tmp_path / "float.npz", x=np.ones((10, 2)), y=np.linspace(0, 1, 10))
    cases.append((data_cfg(name="npz", path=str(tmp_path / "float.npz")), "set data.task=regression"))
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    cases.append((data_cfg(name="csv", path=str(tmp_path / "ragged.csv")), "line 2 has 2 columns"))
    (tmp_path / "text.csv").write_text("a,b\n1,2\nx,3\n")
    cases.append((data_cfg(name="csv", path=str(tmp_path / "text.csv")), "line 3, column 1 holds 'x'"))
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    cases.append(
        (
            data_cfg(name="idx", path=str(tmp_path / "bad.idx"), labels_path=str(tmp_path / "bad.idx")),
            "bad magic number",
        )
    )
    write_idx(tmp_path / "trunc.idx", np.zeros((4, 3), np.uint8))
    (tmp_path / "trunc.idx").write_bytes((tmp_path / "trunc.idx").read_bytes()[:-2])
    cases.append(
        (data_cfg(name="idx", path=str(tmp_path / "trunc.idx"), labels_path="x"), "truncated or corrupt")
    )
    for cfg, message in cases:
        with pytest.raises(UserError) as e:
            data.load(cfg, seed=0)
        assert message in str(e.value), (message, str(e.value))


def test_csv_with_a_byte_order_mark_equals_the_same_file_without(tmp_path):
    """Spreadsheet programs write UTF-8 with a byte-order mark; it must not eat the first example."""
    rows = "".join(f"{i},{(i * 7) % 5},{i % 3}\n" for i in range(30))
    (tmp_path / "plain.csv").write_text(rows, encoding="utf-8")
    (tmp_path / "bom.csv").write_text(rows, encoding="utf-8-sig")
    assert (tmp_path / "bom.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    plain = data.load(data_cfg(name="csv", path=str(tmp_path / "plain.csv")), seed=0)
    bom = data.load(data_cfg(name="csv", path=str(tmp_path / "bom.csv")), seed=0)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(bom, field), getattr(plain, field))
    assert len(bom.x_train) + len(bom.x_test) == 30
    x, y = data.read_csv(str(tmp_path / "bom.csv"))
    assert x[0].tolist() == [0, 0] and y[0] == 0


def test_csv_messages_count_lines_as_an_editor_does(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,label\n\n1,2,0\n3,4,1\n5,oops,0\n")
    with pytest.raises(UserError, match=r"line 5, column 2 holds 'oops', not a number"):
        data.read_csv(str(tmp_path / "d.csv"))


def test_idx_gzip_is_recognised_by_content(tmp_path):
    labels = np.arange(12, dtype=np.uint8) % 3
    write_idx(tmp_path / "labels-compressed", labels, gz=True)  # gzip without .gz
    write_idx(tmp_path / "labels.gz", labels)  # .gz that is not compressed
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "labels-compressed")), labels)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "labels.gz")), labels)


def test_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    np.savez(tmp_path / "d.npz", x=np.arange(20.0).reshape(10, 2), y=np.arange(10) % 2)
    ds = data.load(data_cfg(name="npz", path="~/d.npz"), seed=0)
    assert len(ds.x_train) + len(ds.x_test) == 10


def test_class_labels(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 2))

    def load(y, **kw):
        np.savez(tmp_path / "l.npz", x=x, y=y)
        return data.load(data_cfg(name="npz", path=str(tmp_path / "l.npz"), **kw), seed=0)

    assert load(np.array([0, 5, 9] * 10)).num_outputs == 10  # classes may be missing from the data
    column = load((np.arange(30) % 2)[:, None])  # a column of labels
    assert column.y_train.ndim == 1 and column.num_outputs == 2
    assert load(np.array([0, 1000] * 15)).num_outputs == 1001  # up to 1024 outputs, however sparse
    with pytest.raises(UserError, match="2 distinct labels but the largest is 5000"):
        load(np.array([0, 5000] * 15))
    with pytest.raises(UserError, match="found negative labels"):
        load(np.arange(30) % 3 - 1)
    with pytest.raises(UserError, match="all labels are class 4"):
        load(np.full(30, 4))
    reg = load(np.linspace(0, 1, 30), task="regression")
    assert reg.y_train.shape[1] == 1 and reg.y_train.dtype == np.float32


def test_generated_data_is_checked_against_memory_first(monkeypatch):
    monkeypatch.setattr(data, "_memory_bytes", lambda: 2**20)
    with pytest.raises(
        UserError, match=r"data.num_samples=5000, data.num_features=32 and data.num_classes=10"
    ):
        data.load(data_cfg(name="synthetic_classification"), seed=0)
    with pytest.raises(UserError, match="more than this machine's 0.0 GiB of memory; lower them"):
        data.load(data_cfg(name="synthetic_regression"), seed=0)


def test_label_noise_is_a_share():
    with pytest.raises(UserError, match=r"data.noise=1.5 is the share of labels redrawn"):
        data.load(data_cfg(name="synthetic_classification", noise=1.5), seed=0)
    assert data.load(data_cfg(name="synthetic_regression", noise=1.5), seed=0).task == "regression"
