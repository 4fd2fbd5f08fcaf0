import pytest

from bpjax import config as cfg_lib
from bpjax import strategies
from bpjax.errors import UserError


def test_default_config_is_valid():
    cfg_lib.validate(cfg_lib.default())


def test_every_experiment_file_loads(root):
    # Study files (get_configs, for bpjax compare) are loaded in tests/test_compare.py.
    files = sorted(f for f in (root / "experiments").glob("*.py") if "def get_configs" not in f.read_text())
    assert len(files) >= 5
    for f in files:
        c = cfg_lib.load(f)
        assert c.name == f.stem
        assert c.parallel.strategy in strategies.REGISTRY


def test_overrides_parse_literals_and_coerce_types(root):
    c = cfg_lib.load(
        root / "experiments/mnist1d_single.py",
        [
            "train.steps=50",
            "optimizer.learning_rate=3e-3",
            "model.hidden=(32, 16)",
            "model.activation=tanh",
            "optimizer.clip_norm=1",
            "data.standardize=False",
            "parallel.mesh.data=4",
        ],
    )
    assert c.train.steps == 50
    assert c.optimizer.learning_rate == pytest.approx(3e-3)
    assert c.model.hidden == (32, 16)
    assert c.model.activation == "tanh"
    assert isinstance(c.optimizer.clip_norm, float) and c.optimizer.clip_norm == 1.0
    assert c.data.standardize is False
    assert c.parallel.mesh.data == 4


def test_single_width_becomes_a_tuple():
    c = cfg_lib.apply_overrides(cfg_lib.default(), ["model.hidden=64"])
    assert c.model.hidden == (64,)


def test_overrides_do_not_change_the_input_config():
    base = cfg_lib.default()
    cfg_lib.apply_overrides(base, ["train.steps=7"])
    assert base.train.steps == 1000


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.setps=5", "unknown config key 'train.setps'; did you mean 'train.steps'?"),
        ("optimzer.name=sgd", "did you mean 'optimizer.name'?"),
        ("train=5", "'train' is a section"),
        ("train.steps=many", "train.steps must be of type int"),
        ("train.steps=2.5", "train.steps must be a whole number"),
        ("data.standardize=1", "data.standardize must be True or False"),
        ("trainsteps", "--set takes key=value"),
        ("train.steps=None", "train.steps=None is not a value; give a whole number like 1000"),
        ("parallel.strategy=None", "parallel.strategy=None is not a value; give a string like 'single'"),
        ("optimizer.learning_rate=" + "9" * 400, "optimizer.learning_rate must be of type float"),
    ],
)
def test_bad_overrides_name_the_fix(override, message):
    with pytest.raises(UserError, match=None) as e:
        cfg_lib.apply_overrides(cfg_lib.default(), [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.hidden=(64, 0)", "model.hidden[1]=0 must be >= 1 (layer widths)"),
        ("model.hidden=(64, 'a')", "model.hidden[1]='a' must be a whole number (layer widths)"),
        ("optimizer.learning_rate=-1.0", "optimizer.learning_rate=-1.0 must be > 0"),
        ("optimizer.learning_rate=0.0", "optimizer.learning_rate=0.0 must be > 0"),
        ("optimizer.learning_rate=1e999", "optimizer.learning_rate=inf must be a finite number"),
        ("optimizer.b2=1.0", "optimizer.b2=1.0 must be in [0, 1)"),
        ("data.test_fraction=1.0", "data.test_fraction=1.0 must be in (0, 1)"),
        ("seed=-1", "seed=-1 must be in [0, 2147483647]"),
        ("parallel.staleness=-2", "parallel.staleness=-2 must be >= -1 (0 is synchronous; -1 (unbounded)"),
        (
            "parallel.partition=features",
            "parallel.partition='features' is not known; did you mean 'feature'?",
        ),
        ("optimizer.name=adamm", "optimizer.name='adamm' is not known; did you mean 'adam'?"),
        ("model.activation=relu6", "did you mean 'relu'?"),
        ("data.name=mnist", "did you mean 'mnist1d'?"),
        ("train.loss=xent", "train.loss='xent' is not known"),
        ("train.steps=0", "train.steps=0 must be >= 1"),
        (
            "train.steps_per_call=3",
            "train.steps=1000 is not a multiple of train.steps_per_call=3; use steps=999",
        ),
        ("train.eval_every=30", "train.eval_every=30 is not a multiple of train.steps_per_call=20"),
        ("parallel.mesh.data=0", "parallel.mesh.data=0 must be a positive integer or -1"),
        ("parallel.mesh.model=-1", "-1 for one axis only"),
        ("parallel.memory_budget_mb=-1", "parallel.memory_budget_mb=-1.0 must be >= 0"),
        ("optimizer.warmup_steps=5000", "optimizer.warmup_steps=5000 must be in [0, train.steps=1000)"),
        ("train.steps=2147483648", "train.steps=2147483648 is out of range: whole numbers in a config must"),
        ("model.hidden=(64, 2147483648)", "model.hidden[1]=2147483648 is out of range"),
        ("data.label_column=-2147483649", "data.label_column=-2147483649 is out of range"),
        ("parallel.local_steps=4294967296", "parallel.local_steps=4294967296 is out of range"),
        ("parallel.cpu_devices=1025", "parallel.cpu_devices=1025 must be in [0, 1024]"),
        ("name='../elsewhere'", "name='../elsewhere' must work as a folder name"),
        ("name='" + "x" * 101 + "'", "at most 100 characters"),
        (
            "parallel.mesh.modle=4",
            "no strategy lays out over an axis named 'modle'; did you mean parallel.mesh.model?",
        ),
        ("parallel.mesh.rows=4", "the axes are data, feature, model, stage"),
    ],
)
def test_bad_values_name_the_fix(override, message):
    overrides = [override]
    if "eval_every" in override:
        overrides = ["train.steps_per_call=20", override]
    c = cfg_lib.apply_overrides(cfg_lib.default(), overrides)
    with pytest.raises(UserError) as e:
        cfg_lib.validate(c)
    assert message in str(e.value)


def test_experiment_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        cfg_lib.load(tmp_path / "missing.py")
    no_fn = tmp_path / "nofn.py"
    no_fn.write_text("x = 1\n")
    with pytest.raises(UserError, match="has no get_config"):
        cfg_lib.load(no_fn)
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(UserError, match="failed to load: SyntaxError"):
        cfg_lib.load(broken)
    typo = tmp_path / "typo.py"
    typo.write_text(
        "from bpjax.config import default\n"
        "def get_config():\n"
        "    c = default()\n"
        "    c.unlock()\n"
        "    c.train.batchsize = 3\n"
        "    return c\n"
    )
    with pytest.raises(
        UserError, match="typo.py: unknown config key 'train.batchsize'; did you mean 'train.batch_size'"
    ):
        cfg_lib.load(typo)


def test_experiment_can_build_on_another(root):
    c = cfg_lib.load(root / "experiments/mnist1d_pmap.py")
    base = cfg_lib.load(root / "experiments/mnist1d_single.py")
    assert c.name == "mnist1d_pmap"
    assert c.parallel.strategy == "pmap"
    assert c.model.hidden == base.model.hidden and c.train.steps == base.train.steps


def test_whole_numbers_at_the_int32_limit_are_accepted():
    c = cfg_lib.apply_overrides(
        cfg_lib.default(), ["train.steps=2147483647", "data.label_column=-2147483648"]
    )
    cfg_lib.validate(c)


def test_param_dtype_follows_the_model_dtype_by_default():
    c = cfg_lib.default()
    assert c.model.param_dtype == "auto"
    cfg_lib.validate(cfg_lib.apply_overrides(c, ["model.dtype=float64"]))
    cfg_lib.validate(cfg_lib.apply_overrides(c, ["model.dtype=float64", "model.param_dtype=float32"]))


def test_numpy_scalars_from_an_experiment_file(tmp_path):
    f = tmp_path / "np_values.py"
    f.write_text(
        "import numpy as np\n"
        "from bpjax.config import default\n"
        "def get_config():\n"
        "    c = default()\n"
        "    c.unlock()\n"
        "    c.optimizer.learning_rate = np.float64(0.5)\n"
        "    c.model.hidden = tuple(np.array([32, 16]))\n"
        "    c.parallel.mesh = {'data': np.int64(4)}\n"
        "    return c\n"
    )
    c = cfg_lib.load(f)
    assert c.optimizer.learning_rate == 0.5 and type(c.optimizer.learning_rate) is float
    assert c.model.hidden == (32, 16) and all(type(w) is int for w in c.model.hidden)
    assert c.parallel.mesh.data == 4 and type(c.parallel.mesh.data) is int


def test_experiment_paths(tmp_path, monkeypatch, root):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "exp.py").write_text((root / "experiments/mnist1d_single.py").read_text())
    assert cfg_lib.load("~/exp.py").name == "exp"
    with pytest.raises(UserError, match=r"is a folder; pass one .py file, e.g. .*exp.py"):
        cfg_lib.load(tmp_path)
    (tmp_path / "exp.json").write_text("{}")
    with pytest.raises(UserError, match="is not a .py file"):
        cfg_lib.load(tmp_path / "exp.json")
    with pytest.raises(UserError, match=r"not found; did you mean '.*exp.py'\?"):
        cfg_lib.load(tmp_path / "exq.py")


def test_get_config_failures_are_one_line_naming_the_file_and_line(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def helper():\n    return {}['missing']\n\ndef get_config():\n    return helper()\n")
    with pytest.raises(UserError) as e:
        cfg_lib.load(f)
    assert str(e.value) == f"{f}: get_config() failed: KeyError: 'missing' (line 2)"
    f.write_text("def get_config(*args, scale=2, **kw):\n    raise SystemExit(3)\n")  # optional args are fine
    with pytest.raises(UserError, match=r"get_config\(\) exits \(SystemExit\(3\)\)"):
        cfg_lib.load(f)


def test_study_files(tmp_path, root):
    runs = cfg_lib.from_study(root / "experiments/study_sync_async.py")
    assert "sync" in runs and all(isinstance(c, cfg_lib.mlc.ConfigDict) for c in runs.values())
    assert list(cfg_lib.from_study(root / "experiments/mnist1d_dp.py")) == ["mnist1d_dp"]
    for body, message in [
        (
            "def get_configs():\n    raise RuntimeError('boom')\n",
            "get_configs() failed: RuntimeError: boom (line 2)",
        ),
        (
            "def get_configs():\n    return 3\n",
            "get_configs() returned int; return a dict of run name -> config",
        ),
        ("def get_configs():\n    return {}\n", "get_configs() returned dict with no runs"),
        ("def get_configs():\n    return {'a': None}\n", "get_configs()['a'] returned NoneType, not an"),
        ("get_configs = {}\n", "get_configs must be a function, found dict"),
    ]:
        (tmp_path / "study.py").write_text(body)
        with pytest.raises(UserError) as e:
            cfg_lib.from_study(tmp_path / "study.py")
        assert message in str(e.value)
