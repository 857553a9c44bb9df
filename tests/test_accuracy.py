"""Accuracy where it is decided: each layer, each output and gradient, against float64.

Every backend path computes the same fp32 function as stock PyTorch (Conv2d(groups=C) + BatchNorm +
activation); what differs is rounding, above all in the per-channel reductions (dweight, dscale,
dshift, dgamma, dbeta, the batch statistics), sums over N*OH*OW terms. A path passes when, on the
same inputs, each of its results is within

    rel_err(path) <= 1.25 * rel_err(stock) + 2**-23

of the float64 truth (relative L2 error). 2**-23 is two units of fp32 rounding: no fp32
computation of these numbers can promise less, and the stock error itself is of that size where
stock sums well. A plain fp32 running sum over a 96x96 plane misses this by a factor of 10; the
two-level sums (fp32 blocks, double or TwoSum accumulation) meet it.

Paths: the CPU kernels at every ISA level this machine runs (forced through fastdw.set_cpu_isa,
so one machine tests the AVX2 and the AVX-512 code), the CUDA kernels' per-thread bodies (CPU
emulation), and the Triton kernels (interpreter without a GPU; smaller layers, it is slow).

`python tests/test_accuracy.py` prints the whole table (fused and stock error per result).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the table, outside pytest: same setup as conftest.py
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

import fastdw
import fastdw.ops
from fastdw.reference import activation

TOL_FACTOR, TOL_FLOOR = 1.25, 2.0 ** -23

# (N, C, H, kernel, stride): long planes (the 96x96 case), many images (NCHW image
# blocks), stride 2 (per-row segments), 5x5.
LAYERS = [(2, 16, 96, 3, 1), (8, 32, 28, 3, 1), (32, 8, 14, 3, 1), (4, 24, 56, 3, 2), (4, 16, 28, 5, 1)]
TRITON_LAYERS = [(2, 8, 48, 3, 1), (4, 8, 20, 3, 2)]
LAYOUTS = ["contiguous", "channels_last"]


def _layer_id(layer):
    N, C, H, k, s = layer
    return f"N{N}C{C}H{H}k{k}s{s}"


# ------------------------------------------------------------------------------------------
# Paths: (forward, backward, train forward, train backward) raw ops taking the schema arguments


def _cpu_isas():
    return fastdw.build_info().get("cpu_isas", ["default"])


def _triton_ops():
    T = fastdw.ops._triton_module()
    if T is None:
        return None
    ops = torch.ops.fastdw
    return (ops.dwconv_bn_act_triton.default, ops._dwconv_bn_act_backward_triton.default,
            ops.dwconv_bn_act_train_triton.default, ops._dwconv_bn_act_train_backward_triton.default)


def _paths():
    ops = torch.ops.fastdw
    cpu = (ops.dwconv_bn_act.default, ops._dwconv_bn_act_backward.default, ops.dwconv_bn_act_train.default,
           ops._dwconv_bn_act_train_backward.default)
    out = [pytest.param(("cpu", isa, cpu), id=f"cpu_{isa}") for isa in _cpu_isas()]
    out.append(pytest.param(("gpu_bodies", None, (ops._dwconv_bn_act_gpu_emulated.default,
                                                   ops._dwconv_bn_act_backward_gpu_emulated.default,
                                                   ops._dwconv_bn_act_train_gpu_emulated.default,
                                                   ops._dwconv_bn_act_train_backward_gpu_emulated.default)),
                            id="gpu_bodies"))
    out.append(pytest.param(("triton", None, _triton_ops()), id="triton"))
    return out


class _Isa:
    """Runs the body with the CPU kernels forced to one ISA level (None: leave it)."""

    def __init__(self, isa):
        self.isa, self.prev = isa, None

    def __enter__(self):
        if self.isa is not None:
            self.prev = fastdw.set_cpu_isa(self.isa)

    def __exit__(self, *exc):
        if self.prev is not None:
            fastdw.set_cpu_isa(self.prev)


# ------------------------------------------------------------------------------------------
# One layer: truth (float64, stock ops), stock (float32, stock ops), fused (float32, the path)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _inputs(layer, layout, gen):
    N, C, H, k, s = layer
    OH = (H + 2 * (k // 2) - k) // s + 1
    # fp32 values (held in float64): the truth sees exactly the inputs the fp32 runs see, so the
    # errors measure the computation, not the rounding of the inputs
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).float().double()  # noqa: E731
    t = dict(x=r(N, C, H, H), w=r(C, 1, k, k), a=r(C), b=r(C), G=r(N, C, OH, OH))
    t["w"], t["a"], t["b"] = (t["w"] * (1.5 / k)).float().double(), (1 + 0.2 * t["a"]).float().double(), \
        (0.1 * t["b"]).float().double()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    t["x"] = t["x"].contiguous(memory_format=fmt)
    t["G"] = t["G"].contiguous(memory_format=fmt)
    return t


def _stock(t, layer, dtype, train, act):
    """Stock PyTorch in `dtype` through autograd: (named results)."""
    _, C, _, k, s = layer
    x, w, a, b = (t[n].to(dtype).detach().requires_grad_() for n in ("x", "w", "a", "b"))
    z = F.conv2d(x, w, None, s, k // 2, 1, C)
    if train:
        y = activation(F.batch_norm(z, None, None, a, b, True, 0.1, 1e-5), act)
        var, mean = torch.var_mean(z.detach(), dim=(0, 2, 3), unbiased=False)
    else:
        y = activation(z * a.view(1, C, 1, 1) + b.view(1, C, 1, 1), act)
    (y * t["G"].to(dtype)).sum().backward()
    out = dict(y=y.detach(), dx=x.grad, dweight=w.grad)
    if train:
        out.update(mean=mean, var=var, dgamma=a.grad, dbeta=b.grad)
    else:
        out.update(dscale=a.grad, dshift=b.grad)
    return out


def _fused(t, layer, ops, train, act):
    """The path's raw ops in float32: the forward, then its backward with the same grad."""
    _, _, _, k, s = layer
    fwd, bwd, tfwd, tbwd = ops
    x, w, a, b, G = (t[n].float() for n in ("x", "w", "a", "b", "G"))
    st, pad, dil = [s, s], [k // 2, k // 2], [1, 1]
    mask = [True, True, True, True]
    if train:
        y, mean, var = tfwd(x, w, None, a, b, st, pad, dil, 1e-5, act)
        dx, dw, dg, db = tbwd(G, None, None, x, w, a, b, mean, var, st, pad, dil, 1e-5, act, mask, False)
        return dict(y=y, dx=dx, dweight=dw, mean=mean, var=var, dgamma=dg, dbeta=db)
    y = fwd(x, w, a, b, st, pad, dil, act)
    dx, dw, ds, db = bwd(G, x, w, a, b, st, pad, dil, act, mask, False)
    return dict(y=y, dx=dx, dweight=dw, dscale=ds, dshift=db)


def layer_errors(path, layer, layout, train, act="silu", seed=0):
    """{result: (fused error, stock error)} against the float64 truth."""
    kind, isa, ops = path
    gen = torch.Generator().manual_seed(seed)
    t = _inputs(layer, layout, gen)
    truth = _stock(t, layer, torch.float64, train, act)
    stock = _stock(t, layer, torch.float32, train, act)
    with _Isa(isa):
        fused = _fused(t, layer, ops, train, act)
    return {n: (_rel(fused[n], truth[n]), _rel(stock[n], truth[n])) for n in truth}


def _check(errs, what):
    bad = {n: (f, s) for n, (f, s) in errs.items() if not f <= TOL_FACTOR * s + TOL_FLOOR}
    table = "  ".join(f"{n}: {f:.2e} (stock {s:.2e})" for n, (f, s) in errs.items())
    assert not bad, f"{what}: less accurate than stock for {sorted(bad)}; {table}"


def _skip_missing(path):
    if path[2] is None:
        pytest.skip("Triton kernels not importable here")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layer", LAYERS, ids=_layer_id)
@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
@pytest.mark.parametrize("path", [p for p in _paths() if p.id != "triton"])
def test_as_accurate_as_stock(path, train, layer, layout):
    _check(layer_errors(path, layer, layout, train), f"{path[0]} {path[1] or ''} {_layer_id(layer)} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layer", TRITON_LAYERS, ids=_layer_id)
@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
def test_triton_as_accurate_as_stock(train, layer, layout):
    path = [p for p in _paths() if p.id == "triton"][0].values[0]
    _skip_missing(path)
    _check(layer_errors(path, layer, layout, train), f"triton {_layer_id(layer)} {layout}")


def test_the_bound_catches_a_plain_fp32_sum():
    """The bound is not vacuous: dshift summed in one fp32 running sum over a 96x96 plane (what
    the CPU kernels did before) fails it; the same fp32 terms summed in float64 pass."""
    layer = LAYERS[0]
    t = _inputs(layer, "contiguous", torch.Generator().manual_seed(0))
    truth = _stock(t, layer, torch.float64, False, "silu")["dshift"]
    stock = _stock(t, layer, torch.float32, False, "silu")["dshift"]
    x, w, a, b = (t[n].float() for n in ("x", "w", "a", "b"))
    z = F.conv2d(x, w, None, 1, 1, 1, x.shape[1])
    u = (z * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)).detach().requires_grad_()
    activation(u, "silu").backward(t["G"].float())
    terms = u.grad.transpose(0, 1).reshape(x.shape[1], -1)  # the fp32 terms of dshift, (C, N*H*W)
    seq = torch.zeros(x.shape[1], dtype=torch.float32)
    for i in range(terms.shape[1]):
        seq += terms[:, i]
    e_seq, e_f64, e_stock = _rel(seq, truth), _rel(terms.double().sum(1).float(), truth), _rel(stock, truth)
    assert e_seq > TOL_FACTOR * e_stock + TOL_FLOOR, (e_seq, e_stock)
    assert e_f64 <= TOL_FACTOR * e_stock + TOL_FLOOR, (e_f64, e_stock)


def test_cpu_isa_knob():
    isas = _cpu_isas()
    assert isas[0] == "default" and fastdw.cpu_isa() in isas
    prev = fastdw.set_cpu_isa("default")
    try:
        assert fastdw.cpu_isa() == "default"
        assert fastdw.set_cpu_isa("auto") == "default" and fastdw.cpu_isa() == isas[-1]
        with pytest.raises(ValueError, match="must be one of 'auto', 'default', 'avx2', 'avx512'"):
            fastdw.set_cpu_isa("sse9")
        missing = [i for i in ("avx2", "avx512") if i not in isas]
        for isa in missing:
            with pytest.raises(ValueError, match="not available here"):
                fastdw.set_cpu_isa(isa)
    finally:
        fastdw.set_cpu_isa(prev)


def test_cpu_isa_environment_variable():
    """FASTDW_CPU_ISA picks the level at the first call; a bad value is a clear error there."""
    import subprocess

    code = ("import torch, fastdw; x = torch.randn(1, 4, 5, 5); w = torch.randn(4, 1, 3, 3); "
            "fastdw.dwconv_bn_act(x, w, act='none', backend='cpu'); print(fastdw.cpu_isa())")
    env = dict(os.environ, FASTDW_CPU_ISA="default")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("default"), r.stderr[-2000:]
    env["FASTDW_CPU_ISA"] = "avx1024"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "ValueError" in r.stderr and "FASTDW_CPU_ISA must be one of" in r.stderr, \
        r.stderr[-2000:]


def test_every_cpu_isa_computes_the_same_function():
    """Different ISA levels round differently, never more than that."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 24, 17, 19, generator=gen).to(memory_format=torch.channels_last)
    w, a, b = torch.randn(24, 1, 3, 3, generator=gen), torch.rand(24, generator=gen) + .5, torch.randn(24, generator=gen)
    outs = []
    for isa in _cpu_isas():
        with _Isa(isa):
            for t in (x, x.contiguous()):
                y = fastdw.dwconv_bn_act(t, w, a, b, act="hardswish", backend="cpu")
                g = torch.ops.fastdw._dwconv_bn_act_backward(torch.ones_like(y), t, w, a, b, [1, 1], [1, 1], [1, 1],
                                                             "hardswish", [True, True, True, True], False)
                outs.append((isa, [y, *g]))
    ref = outs[0][1]
    for isa, o in outs[1:]:
        for r, v in zip(ref, o):
            torch.testing.assert_close(v, r, rtol=1e-5, atol=1e-5, msg=lambda m: f"{isa}: {m}")


def _table():
    rows = []
    for p in _paths():
        path = p.values[0]
        if path[2] is None:
            continue
        layers = TRITON_LAYERS if path[0] == "triton" else LAYERS
        for train in (False, True):
            for layer in layers:
                for layout in LAYOUTS:
                    errs = layer_errors(path, layer, layout, train)
                    name = f"{path[0]}{'_' + path[1] if path[1] else ''}"
                    cells = " ".join(f"{n} {f:.1e}/{s:.1e}" for n, (f, s) in errs.items())
                    worst = max(f / (TOL_FACTOR * s + TOL_FLOOR) for f, s in errs.values())
                    rows.append(f"| {name} | {'train' if train else 'inference'} | {_layer_id(layer)} | {layout} | "
                                f"{cells} | {worst:.2f} |")
                    print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    print("| path | mode | layer | layout | result fused/stock error vs float64 | worst / bound |")
    print("|---|---|---|---|---|---|")
    _table()
    sys.exit(0)
