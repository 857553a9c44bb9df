"""pytest-benchmark latency suite: fastdw's fused layer vs cuDNN / PyTorch's kernels / torch.compile.

    pytest bench/bench_dwconv_bn_act.py                               # GPU: the quick sweep
    FASTDW_BENCH_SWEEP=standard pytest bench/bench_dwconv_bn_act.py   # GPU: the standard sweep
    pytest bench/bench_dwconv_bn_act.py -k "xception and fastdw_cuda" --benchmark-json=out.json
    pytest bench/bench_dwconv_bn_act.py --benchmark-disable           # smoke: check every case once

Cases come from fastdw.bench (the layer registry in fastdw/layers.py x N x dtype x layout x
provider x mode; see `python -m fastdw.bench --help`). Each case is checked against the fp32
reference before it is timed. pytest-benchmark times the call plus a device synchronize (host-
inclusive); the GPU-only CUDA-event median / p20 / p80 of the same call go to extra_info
(`median_us`, `p20_us`, `p80_us`, `bytes`, `gbps`), which is what results files record.

Without a GPU the suite runs the CPU-capable providers (fastdw's CPU kernels, eager,
eager_folded, clone) at N=1 on every layer of the registry, so CI catches a harness that rots.
"""
import os

import pytest
import torch

from fastdw.bench import QUICK, STANDARD, LayerBench, LayerCase, Sweep, layer_cases

HAS_GPU = torch.cuda.is_available()
if HAS_GPU:
    SWEEP = STANDARD if os.environ.get("FASTDW_BENCH_SWEEP") == "standard" else QUICK
    PROVIDERS = SWEEP.providers
else:
    SWEEP = Sweep(nets=STANDARD.nets, Ns=(1,), dtypes=("float32",), layouts=("channels_last",),
                  providers=(), modes=STANDARD.modes, model_nets=(), model_Ns=(), model_providers=(),
                  model_modes=())
    PROVIDERS = ("fastdw_cpu", "eager", "eager_folded", "clone")
DEVICE = "cuda" if HAS_GPU else "cpu"
CASES = layer_cases(SWEEP)

_benches = {}


def _bench(case: LayerCase) -> LayerBench:
    if case not in _benches:
        _benches.clear()  # one case's tensors at a time
        if HAS_GPU:
            torch.cuda.empty_cache()
        _benches[case] = LayerBench(case, device=DEVICE)
    return _benches[case]


@pytest.mark.parametrize("mode", SWEEP.modes)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer(benchmark, case, provider, mode):
    if provider == "fastdw_triton":
        import fastdw

        if "triton" not in fastdw.available_backends():
            pytest.skip("no Triton backend here")
    lb = _bench(case)
    try:
        fn, check, _ = lb.runner(provider, mode)
    except NotImplementedError:
        pytest.skip(f"{provider} has no {mode} mode")
    grad = torch.enable_grad() if mode != "inference" else torch.no_grad()
    with grad:
        err = check()
    assert err <= lb.tol, f"{provider} {mode}: max_rel_err {err:.3g} > {lb.tol:g}"
    benchmark.extra_info.update(provider=provider, mode=mode, bytes=lb.bytes(mode), max_rel_err=err)
    if HAS_GPU and not getattr(benchmark, "disabled", False):
        row = lb.measure(provider, mode)
        benchmark.extra_info.update({k: row[k] for k in ("median_us", "p20_us", "p80_us", "note")})
        if row["median_us"]:
            benchmark.extra_info["gbps"] = lb.bytes(mode) / (row["median_us"] * 1e-6) / 1e9

    def synced():
        with grad:
            fn()
        if HAS_GPU:
            torch.cuda.synchronize()
    benchmark.pedantic(synced, rounds=50 if HAS_GPU else 5, warmup_rounds=3, iterations=1)
