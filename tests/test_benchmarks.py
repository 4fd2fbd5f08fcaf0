"""``benchmarks/accelerator.py --quick`` runs here, on the suite's 8 CPU devices, so that it cannot rot:
every section produces its rows as positive, finite ratios and the JSON matches the table. Nothing here
asserts a time (the numbers on simulated devices say nothing about accelerators)."""

import importlib.util
import json
import math
import sys

import pytest


@pytest.mark.slow
def test_accelerator_benchmark_quick(root, tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("accelerator", root / "benchmarks" / "accelerator.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "accelerator", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(out.splitlines()[-1])
    rows = result["rows"]
    sections = {r["section"].split()[0] for r in rows}
    assert sections == {"wide", "small", "input", "overhead,", "scaling"}, sections
    assert {r["contender"] for r in rows if r["section"].startswith("scaling")} == {
        "bpjax dp (8 devices)",
        "bpjax fsdp (8 devices)",
        "bpjax tensor (8 devices)",
        "bpjax pipeline (4 devices)",
    }
    for r in rows:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert f"**{r['ratio']:.3f}**" in out
    meta = result["meta"]
    assert meta["command"] == "python benchmarks/accelerator.py --quick" and meta["devices"] == 8
    assert meta["peak_bf16_tflops"] is None  # no datasheet peak for a CPU
    assert bench.peak_tflops(type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3"})()) == 989.0
    assert bench.peak_tflops(type("D", (), {"device_kind": "NVIDIA H100 PCIe"})()) == 756.0
