"""The benchmark runner's command line and the report script (their logic, not any timing).

The report is fed a synthetic results file written here (made-up times, never committed): the
tests check that the ratios and sums it prints are computed from the raw times correctly.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdw.bench as fb
from fastdw.layers import MOBILENET_V2, NETWORKS, unique_layers

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("fastdw_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweeps():
    quick = fb.layer_cases(fb.QUICK)
    assert {c.layer.net for c in quick} == {"mobilenet_v2"} and len(quick) == len(unique_layers(MOBILENET_V2))
    std = fb.layer_cases(fb.STANDARD)
    n_unique = sum(len(unique_layers(v)) for v in NETWORKS.values())
    assert len(std) == n_unique * 3 * 3 * 2
    assert {c.layer.net for c in std} == set(NETWORKS)
    assert set(fb.STANDARD.providers) == {"fastdw_cuda", "fastdw_triton", "eager", "eager_folded", "compile",
                                          "compile_max", "clone"}


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fastdw.bench", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_list_help_and_no_gpu_message():
    r = _run("--list", "--net", "xception", "--N", "1", "--dtype", "float16", "--layout", "nchw")
    assert r.returncode == 0, r.stderr
    assert "9 layer cases" in r.stdout and "xception.07-c728-19x19-k3s1-N1-float16-nchw" in r.stdout
    r = _run("--help")
    assert r.returncode == 0 and "--quick" in r.stdout and "--provider" in r.stdout
    r = _run("--net", "resnet")
    assert r.returncode != 0 and "unknown network ['resnet']" in r.stderr + r.stdout
    if not torch.cuda.is_available():
        r = _run("--quick")
        assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["--N", "0", "--list"], "bad N in '0': must be at least 1, got 0"),
    (["--N", "1,x", "--list"], "bad N in '1,x': expected a positive integer, got 'x'"),
    (["--model-N", "-2", "--list"], "must be at least 1, got -2"),
    (["--repeats", "0", "--list"], "argument --repeats: must be at least 1, got 0"),
    (["--budget-s", "nan", "--list"], "argument --budget-s: must be a finite number > 0, got nan"),
])
def test_cli_rejects_bad_numbers(argv, message):
    r = _run(*argv)
    assert r.returncode != 0 and message in r.stderr + r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["--batch", "-8"], "argument --batch: must be at least 1, got -8"),
    (["--repeats", "-1"], "argument --repeats: must be at least 1, got -1"),
    (["--resolution", "big"], "argument --resolution: expected a positive integer, got 'big'"),
])
def test_main_job_rejects_bad_numbers(argv, message):
    """python -m fastdw: a batch of 0 once ran N=8 silently, negative numbers gave tracebacks."""
    r = subprocess.run([sys.executable, "-m", "fastdw", *argv], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_report_rejects_other_files(tmp_path):
    rep = _report()
    cases = {"notes.json": '{"hello": 1}', "list.json": "[1, 2]", "text.json": "not json at all",
             "partial.json": '{"schema": "fastdw-results/1"}'}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match=rf"report: .*{name}"):
            rep.main([str(tmp_path / name)])
    with pytest.raises(SystemExit, match="cannot read"):
        rep.main([str(tmp_path / "missing.json")])
    p, _ = _synthetic(tmp_path)
    assert rep.load_results(p)["schema"] == "fastdw-results/1"


@pytest.mark.parametrize("mode", ["inference", "backward", "train"])
def test_layer_bench_cpu_checks_every_provider(mode):
    """The harness's check path on the CPU: each provider's output against the fp32 reference."""
    case = fb.LayerCase(MOBILENET_V2[1], 1, "float32", "channels_last")
    lb = fb.LayerBench(case, device="cpu")
    for p in ("fastdw_cpu", "eager", "eager_folded", "clone"):
        row = lb.measure(p, mode, repeats=2, warmup=1)
        if row is None:
            assert p in ("clone", "eager_folded") and mode != "inference"
            continue
        assert row["checked"], row
        assert row["median_us"] > 0 and row["bytes"] == lb.bytes(mode)


def test_layer_bench_wrong_provider_gets_no_time(monkeypatch):
    case = fb.LayerCase(MOBILENET_V2[0], 1, "float32", "nchw")
    lb = fb.LayerBench(case, device="cpu")
    monkeypatch.setattr(lb, "ref", lb.ref * 1.5)  # any provider now disagrees with the "reference"
    row = lb.measure("eager", "inference", repeats=2, warmup=1)
    assert not row["checked"] and row["median_us"] is None and "check failed" in row["note"]


def _synthetic(tmp_path):
    L = MOBILENET_V2
    rows = []
    for layer in (L[0], L[2]):  # L[2] (144, 56, s1) appears once; L[0] once
        for prov, t in (("fastdw_cuda", 10.0), ("fastdw_triton", 11.0), ("eager", 30.0), ("eager_folded", 20.0),
                        ("compile", 16.0), ("compile_max", 15.0), ("clone", 9.0)):
            rows.append(dict(net="mobilenet_v2", layer=layer.index, N=128, C=layer.C, H=layer.H, W=layer.W, k=3,
                             stride=layer.stride, dtype="float16", layout="channels_last", act="relu6",
                             mode="inference", provider=prov, bytes=2_000_000_000 // 1000, median_us=t, p20_us=t,
                             p80_us=t, max_rel_err=1e-3, checked=True, note="cudnn" if prov == "eager" else ""))
    L5 = L[4]  # (192, 28, s1): the registry has it twice (layers 5 and 6)
    for prov, t in (("fastdw_cuda", 5.0), ("eager", 10.0)):
        rows.append(dict(net="mobilenet_v2", layer=L5.index, N=128, C=L5.C, H=L5.H, W=L5.W, k=3, stride=1,
                         dtype="float16", layout="channels_last", act="relu6", mode="inference", provider=prov,
                         bytes=1000, median_us=t, p20_us=t, p80_us=t, max_rel_err=1e-3, checked=True, note=""))
    res = dict(schema="fastdw-results/1", commit="0" * 40, dirty=False, device="Test GPU", sm="9.0", driver="1",
               versions=dict(torch="x", cuda="13.0", cudnn="1", triton="3.6.0", python="3.12"), clone_gbps=400.0,
               layers=rows, models=[dict(model="mobilenet_v2", N=128, H=224, dtype="float16", layout="channels_last",
                                         mode="inference", provider="stock_eager", median_ms=13.0),
                                    dict(model="mobilenet_v2", N=128, H=224, dtype="float16", layout="channels_last",
                                         mode="inference", provider="fastdw_eager", median_ms=10.0)])
    p = tmp_path / "2026-01-01-test-0000000.json"
    p.write_text(json.dumps(res))
    return p, res


def test_report_tables(tmp_path):
    rep = _report()
    p, res = _synthetic(tmp_path)
    text = rep.render(res, p)
    # layer 1: 2e6 bytes in 10 us = 200 GB/s = 50% of 400; eager 30/10 = 3.00x; compile 16/10
    assert "| 1 | 32 | 112x112 | 3/1 | 10.0 | 200 | 50% | 3.00x | 2.00x | 1.60x | 1.50x | 9.0 | cudnn |" in text
    # the (192, 28) shape is counted twice in the network sum: compile/eager sums only where present
    assert "| 5 (x2) | 192 | 28x28" in text
    # the network line: eager is timed on every layer -> (30+30+2*10) / (10+10+2*5) = 80/30
    assert "| mobilenet_v2 | 128 | float16 | channels_last | inference | 30 |" in text
    assert "| 2.67x |" in text
    assert "| 1.30x |" in text  # whole network 13 / 10
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{rep.BEGIN}\nPLACEHOLDER\n{rep.END}\nb\n")
    rep.replace_block(readme, text)
    s = readme.read_text()
    assert "PLACEHOLDER" not in s and s.startswith("a\n") and s.endswith("b\n") and "2.67x" in s
    assert rep.newest(tmp_path) == p


def test_report_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rep = _report()
    p, res = _synthetic(tmp_path)
    out = tmp_path / "bw.png"
    rep.plot(res, out)
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


def test_model_rows_cpu():
    """The whole-network path of the runner on the CPU: stock vs converted MobileNetV2, inference
    and a training step, checked against stock before timing."""
    pytest.importorskip("torchvision")
    rows = fb.model_rows("mobilenet_v2", 1, "float32", "channels_last", ["stock_eager", "fastdw_eager"],
                         ["inference", "train_step"], repeats=2, device="cpu")
    assert len(rows) == 4, rows
    for r in rows:
        assert r["median_ms"] and r["median_ms"] > 0 and not r["note"], r
        assert r["max_rel_err"] < 1e-3, r


def test_grad_err_allows_kink_flips_not_wrong_kernels():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 32, 112, 112, generator=g)
    flipped = ref.clone()
    flipped[0, 3, 50:53, 60:63] += 2.0  # one relu6 kink flip: a 3x3 patch of dx moves by dy*w
    assert fb.rel_err(flipped, ref) > 0.1 and fb.grad_err(flipped, ref) == 0.0
    assert fb.grad_err(ref * 1.01, ref) > 5e-3  # wrong everywhere: caught
    wrong_channel = ref.clone()
    wrong_channel[0, 5] = 0  # a whole channel wrong: caught
    assert fb.grad_err(wrong_channel, ref) > 0.1


def _cpu_compare():
    spec = importlib.util.spec_from_file_location("fastdw_cpu_compare", ROOT / "bench" / "cpu_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_compare_times_and_report(tmp_path, capsys):
    """One small layer, both modes: the cases are checked against stock, interleaved rounds stop
    at the interval or the round cap, and the report's sums and ratios come from the samples."""
    cc = _cpu_compare()
    out = tmp_path / "cpu.json"
    cc.main(["--layers", "15", "--batch", "1", "--layouts", "channels_last", "--no-callgrind", "--min-rounds", "5",
             "--max-rounds", "10", "--sample-ms", "1", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["kind"] == "fastdw-cpu-compare" and set(data["cases"]) == {
        "forward/channels_last/N1/L15", "backward/channels_last/N1/L15"}
    for r in data["cases"].values():
        t = r["time"]
        assert 5 <= t["rounds"] <= 10 and 0 < t["ci95"][0] <= t["ci95"][1]
        assert t["speedup"] == pytest.approx(t["torch_ms"] / t["fastdw_ms"])
    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- cpu:begin -->\nold\n<!-- cpu:end -->\ntail\n")
    capsys.readouterr()
    cc.main(["--report", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("head\n<!-- cpu:begin -->\nfp32, 1 threads") and text.endswith("<!-- cpu:end -->\ntail\n")
    assert "old" not in text and "| forward | channels_last | 1 |" in text and "L15 " in capsys.readouterr().out


def test_cpu_compare_rejects_other_files(tmp_path):
    cc = _cpu_compare()
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(SystemExit, match="is not a cpu_compare results file"):
        cc.main(["--report", str(bad)])
    with pytest.raises(SystemExit):
        cc.main(["--batch", "0", "--no-callgrind"])


def test_cpu_compare_callgrind_totals(tmp_path):
    """The instruction total of a callgrind dump file (its 'totals:' or 'summary:' line)."""
    cc = _cpu_compare()
    f = tmp_path / "cg.out.1"
    f.write_text("version: 1\nevents: Ir\nfn=(1) f\n0 5\ntotals: 12345\n")
    assert cc._dump_total(str(f)) == 12345
    f.write_text("events: Ir\nsummary: 77\n")
    assert cc._dump_total(str(f)) == 77


def test_host_overhead_script(tmp_path):
    """bench/host_overhead.py runs and reports a positive host time for every case and layer (the
    numbers themselves are a benchmark, not checked)."""
    pytest.importorskip("triton")
    out = tmp_path / "host.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "host_overhead.py"), "--calls", "50", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 3
    for row in data["rows"]:
        assert set(row) == {"layer", "launcher", "op", "public", "public_grad", "backward", "train_fwd",
                            "train_bwd"}
        assert all(v > 0 for k, v in row.items() if k != "layer")
    assert "| layer | launcher |" in r.stdout
