"""``bpjax plan`` against the compiled program: collectives parsed from the HLO, and memory_analysis()."""

import pytest

from bpjax import config as cfg_lib
from bpjax import hlo
from bpjax.cli import main
from bpjax.plan import compiled_report, make_plan
from bpjax.train import prepare

CASES = [
    ("single", {}),
    ("pmap", {"data": 8}),
    ("dp", {"data": 8}),
    ("fsdp", {"data": 8}),
    ("fsdp", {"data": 4}),
    ("tensor", {"model": 8}),
    ("tensor", {"model": 4}),
    ("hybrid", {"data": 2, "model": 4}),
    ("hybrid", {"data": 4, "model": 2}),
    ("dp", {"feature": 8, "partition": "feature"}),
    ("dp", {"data": 2, "feature": 4, "partition": "hybrid"}),
    ("local_sgd", {"data": 8, "local_steps": 4}),
    ("pipeline", {"stage": 2}),
    ("pipeline", {"stage": 4, "microbatches": 4}),
]


def make_config(name, mesh, **parallel):
    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 500
    c.data.num_features = 24
    c.model.hidden = (64, 48, 32)
    c.train.batch_size = 64
    c.parallel.strategy = name
    mesh = dict(mesh)
    if name == "local_sgd":
        c.optimizer.name = "momentum"
    for option in ("microbatches", "partition", "local_steps"):
        if option in mesh:
            c.parallel[option] = mesh.pop(option)
    c.parallel.mesh = mesh
    for k, v in parallel.items():
        c.parallel[k] = v
    return c


@pytest.mark.parametrize(("name", "mesh"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_plan_agrees_with_the_compiled_program(name, mesh):
    setup = prepare(make_config(name, mesh))
    plan = make_plan(setup.config, setup)
    compiled = compiled_report(setup)
    predicted = plan.totals["static_collective_bytes"]  # the HLO lists a loop body (pipeline ticks) once
    if name == "single":
        assert predicted == 0 and compiled["collective_bytes"] == 0
    else:
        assert predicted > 0
        assert compiled["collective_bytes"] == pytest.approx(predicted, rel=0.05), [
            (c.kind, c.array_bytes) for c in compiled["collectives"]
        ]
    assert compiled["argument_bytes"] == pytest.approx(plan.state_bytes + plan.batch_bytes, rel=0.05)
    assert not plan.notes or name in ("pipeline", "local_sgd")


def test_sharded_strategies_hold_their_share_of_state():
    """Per-device parameter + optimizer bytes are total / devices for fsdp and tensor (within 5%)."""
    total = make_plan(make_config("single", {})).totals
    full = total["param_bytes"] + total["opt_bytes"]
    for name, mesh, share in [("fsdp", {"data": 8}, 8), ("tensor", {"model": 8}, None)]:
        t = make_plan(make_config(name, mesh)).totals
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
        plan = make_plan(config, setup)
        assert plan.notes
        compiled = compiled_report(setup)["collective_bytes"]
        assert compiled >= plan.totals["collective_bytes"]


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
