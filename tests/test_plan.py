"""``bpjax plan`` against the compiled program: collectives parsed from the HLO, and memory_analysis()."""

import json
import re

import numpy as np
import pytest

from bpjax import config as cfg_lib
from bpjax import hlo, strategies, viz
from bpjax.cli import main
from bpjax.plan import compiled_report, make_plan, to_json
from bpjax.preflight import prepare

# Every strategy's declared examples on more than one device, and settings that are not equivalent to
# single but change what moves (local SGD's period, async's history, the parameter server's schedule).
CASES = [
    (name, dict(e.mesh), dict(e.settings), e.optimizers[0])
    for name, d in sorted(strategies.REGISTRY.items())
    for e in d.examples
    if int(np.prod(list(e.mesh.values()) or [1])) > 1 or name == "single"
] + [
    ("local_sgd", {"data": 8}, {"local_steps": 4}, "momentum"),
    ("async", {"data": 8}, {"staleness": 2}, "adam"),
    ("param_server", {"data": 8}, {"n_push": 2, "n_fetch": 3}, "adam"),
]


def make_config(name, mesh, optimizer="adam", **parallel):
    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 500
    c.data.num_features = 24
    c.model.hidden = (64, 48, 32)
    c.train.batch_size = 64
    c.optimizer.name = optimizer
    c.parallel.strategy = name
    c.parallel.mesh = dict(mesh)
    for k, v in parallel.items():
        c.parallel[k] = v
    return c


@pytest.mark.parametrize(
    ("name", "mesh", "settings", "optimizer"), CASES, ids=[f"{n}-{m}-{s}" for n, m, s, _ in CASES]
)
def test_plan_agrees_with_the_compiled_program(name, mesh, settings, optimizer):
    """Predicted and compiled collective bytes within 5%, or the plan says why not; argument bytes
    (state as stored plus the batch) within 5%; and the layout can be drawn."""
    setup = prepare(make_config(name, mesh, optimizer, **settings))
    plan = make_plan(setup)
    compiled = compiled_report(setup)
    predicted = plan.totals["static_collective_bytes"]  # the HLO lists a loop body (pipeline ticks) once
    if setup.strategy.num_devices == 1:
        assert predicted == 0 and compiled["collective_bytes"] == 0
    else:
        assert predicted > 0
        close = compiled["collective_bytes"] == pytest.approx(predicted, rel=0.05)
        assert close or plan.notes, [(c.kind, c.array_bytes) for c in compiled["collectives"]]
    assert compiled["argument_bytes"] == pytest.approx(plan.state_bytes + plan.batch_bytes, rel=0.05)
    blocks = viz.kernel_blocks(setup)
    assert list(blocks) == [layer.name for layer in plan.layers]
    for layer, kernel_blocks in zip(plan.layers, blocks.values(), strict=True):
        assert {d for devices, _, _ in kernel_blocks for d in devices} == set(layer.devices)
    grid = viz.timeline(setup)
    assert grid is None or grid.shape[0] == setup.strategy.num_devices


def test_sharded_strategies_hold_their_share_of_state():
    """Per-device parameter + optimizer bytes are total / devices for fsdp and tensor (within 5%)."""
    total = make_plan(prepare(make_config("single", {}))).totals
    full = total["param_bytes"] + total["opt_bytes"]
    for name, mesh, share in [("fsdp", {"data": 8}, 8), ("tensor", {"model": 8}, None)]:
        t = make_plan(prepare(make_config(name, mesh))).totals
        local = t["param_bytes"] + t["opt_bytes"]
        if share:
            assert local == pytest.approx(full / share, rel=0.05), name
        else:  # tensor keeps the output layer (hidden_b x output) whole: between 1/8 and 1
            assert full / 8 < local < full


def test_plan_reports_the_excess_it_does_not_model():
    """Replicating a layer inside a column/row pair, and hybrid with fsdp: the plan gives the minimum
    (the compiler never moves less) and says that the compiler may move more."""
    for config in (
        make_config("tensor", {"model": 8}, replicate=("layer_1",)),
        make_config("hybrid", {"data": 2, "model": 4}, hybrid_data="fsdp"),
    ):
        setup = prepare(config)
        plan = make_plan(setup)
        assert plan.notes
        compiled = compiled_report(setup)["collective_bytes"]
        assert compiled >= plan.totals["collective_bytes"]


def test_plan_json(root, capsys):
    """``bpjax plan --json``: one JSON object whose numbers are the plan's and the compiler's."""
    argv = ["plan", str(root / "experiments/mnist1d_dp.py"), "--set", "parallel.strategy=fsdp", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"] == "fsdp" and out["mesh"] == {"data": 8}
    predicted = out["predicted"]
    for key in ("collective_bytes", "state_bytes_per_device", "activation_bytes_per_device"):
        assert predicted[key] > 0, key
    assert "compiled" not in out
    assert main([*argv, "--compiled"]) == 0
    out = json.loads(capsys.readouterr().out)
    compiled = out["compiled"]
    assert compiled["collective_bytes"] == pytest.approx(predicted["static_collective_bytes"], rel=0.05)
    for key in ("temp_bytes_per_device", "argument_bytes_per_device"):
        assert compiled[key] > 0, key
    setup = prepare(cfg_lib.load(root / "experiments/mnist1d_dp.py", ["parallel.strategy=fsdp"]))
    assert to_json(make_plan(setup))["predicted"] == predicted


def test_plan_and_viz_know_no_strategy(root):
    """Nothing outside bpjax/strategies/ compares a strategy's name (``== "tensor"``, ``in ("pmap",
    ...)``), and plan and viz do not import the train loop."""
    names = "|".join(re.escape(n) for n in strategies.REGISTRY)
    quoted = rf"""["']({names})["']"""
    compare = re.compile(rf"(==|!=)\s*{quoted}|{quoted}\s*(==|!=)|\bin\s*[(\[{{][^)\]}}]*{quoted}")
    for path in sorted((root / "bpjax").rglob("*.py")):
        if "strategies" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not compare.search(line), (
                f"{path.name}:{number} compares a strategy's name: {line.strip()}"
            )
    for name in ("plan.py", "viz.py"):
        text = (root / "bpjax" / name).read_text()
        assert "bpjax.train" not in text and "from bpjax import train" not in text, name
    assert compare.search('if strategy.name == "pipeline":') and compare.search("x in ('pmap', 'dp')")


def test_hlo_parser_formats():
    text = "\n".join(
        [
            "%a = f32[64,48]{1,0} all-reduce(%x), channel_id=1, replica_groups=mesh['axis_0'=1,'axis_1'=8] {'axis_1'}",
            "%b = (f32[16]{0}, f32[]) all-reduce(%y, %z), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}",
            "%c = f32[8,48]{1,0} reduce-scatter(%w), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}",
            "%d = f32[12,64]{0,1} all-gather(%v), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}",
            "%e = bf16[4]{0} collective-permute(%u), source_target_pairs={{0,1}}",
            "%f = f32[4]{0} add(%p, %q)",
        ]
    )
    got = [(c.kind, c.array_bytes, c.group) for c in hlo.collectives(text)]
    assert got == [
        ("all-reduce", 64 * 48 * 4, 8),
        ("all-reduce", 16 * 4 + 4, 2),
        ("reduce-scatter", 8 * 48 * 4 * 4, 4),
        ("all-gather", 12 * 64 * 4, 2),
        ("collective-permute", 8, 1),
    ]


def test_plan_command(root, capsys):
    code = main(
        [
            "plan",
            str(root / "experiments/mnist1d_dp.py"),
            "--set",
            "parallel.strategy=tensor",
            "--set",
            "parallel.mesh.model=4",
            "--compiled",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "layer_0" in out and "P(None, 'model')" in out
    assert "compiled / predicted collective bytes" in out and "= 1.000" in out
