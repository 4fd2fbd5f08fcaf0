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
        ("parallel.staleness=-2", "parallel.staleness=-2 must be >= 0 (0 is synchronous dp)"),
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
