"""Quick GPU sweep: MobileNetV2's 17 depthwise layers, N=128, fp16, channels_last, inference and
backward; providers fastdw_cuda, eager, eager_folded, compile, compile_max, clone. Writes the
results JSON of the project's RESULTS spec (schema fastdw-results/1).

    python bench/gpu_quick.py --out results.json [--providers fastdw_cuda,eager,clone] [--N 128]

Timing: CUDA events around each call after warm-up, median / p20 / p80 of --repeats calls, the
input rotated over enough copies that L2 cannot hold them; torch.backends.cudnn.benchmark on.
Each provider's output (or gradients) is compared with the fp32 reference before it is timed; a
provider that fails the check gets no time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import copy

import torch
from torch import nn

import fastdw
from fastdw.layers import MOBILENET_V2
from fastdw.reference import dwconv_bn_act_ref
from fastdw.timing import time_cuda

ROOT = Path(__file__).resolve().parents[1]
ALL_PROVIDERS = ("fastdw_cuda", "eager", "eager_folded", "compile", "compile_max", "clone")
ROTATE_BYTES = 256 << 20  # rotate inputs over >= 256 MiB: far more than any L2


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def clone_gbps() -> float:
    x = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()  # 1 GiB
    t = time_cuda(lambda: x.clone(), repeats=20, warmup=3)
    return 2 * x.numel() * x.element_size() / (t.median_ms * 1e-3) / 1e9


def rotated(make, nbytes_each):
    copies = max(2, min(64, ROTATE_BYTES // max(1, nbytes_each)))
    items = [make() for _ in range(copies)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return nxt


def block_for(L, dtype):
    blk = nn.Sequential(nn.Conv2d(L.C, L.C, L.k, L.stride, L.padding, groups=L.C, bias=False),
                        nn.BatchNorm2d(L.C), nn.ReLU6())
    g = torch.Generator().manual_seed(L.index)
    with torch.no_grad():
        blk[1].weight.copy_(torch.rand(L.C, generator=g) + 0.5)
        blk[1].bias.copy_(torch.randn(L.C, generator=g) * 0.1)
        blk[1].running_mean.copy_(torch.randn(L.C, generator=g) * 0.1)
        blk[1].running_var.copy_(torch.rand(L.C, generator=g) + 0.5)
    return blk.eval().to(device="cuda", dtype=dtype, memory_format=torch.channels_last)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def run_layer(L, N, dtype, providers, repeats, tol):
    rows = []
    blk = block_for(L, dtype)
    conv, bn = blk[0], blk[1]
    scale, shift = fastdw.fold_bn(bn)
    w = conv.weight.detach()
    oh, ow = L.out_hw()
    esz = torch.finfo(dtype).bits // 8
    x_bytes, y_bytes = N * L.C * L.H * L.W * esz, N * L.C * oh * ow * esz
    w_bytes = L.C * L.k * L.k * esz + 2 * L.C * 4
    make_x = lambda: torch.randn(N, L.C, L.H, L.W, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)  # noqa: E731
    next_x = rotated(make_x, x_bytes)
    x0 = next_x()
    ref = dwconv_bn_act_ref(x0, w, scale, shift, L.stride, L.padding, 1, "relu6")
    folded = nn.Sequential(nn.Conv2d(L.C, L.C, L.k, L.stride, L.padding, groups=L.C, bias=True), nn.ReLU6())
    with torch.no_grad():
        folded[0].weight.copy_(w.float() * scale.view(-1, 1, 1, 1))
        folded[0].bias.copy_(shift)
    folded = folded.eval().to(device="cuda", dtype=dtype, memory_format=torch.channels_last)
    base = dict(net="mobilenet_v2", layer=L.index, N=N, C=L.C, H=L.H, W=L.W, k=L.k, stride=L.stride,
                dtype=str(dtype).replace("torch.", ""), layout="channels_last", act="relu6")

    def record(provider, mode, fn, check_out, nbytes, note=""):
        try:
            with torch.no_grad() if mode == "inference" else torch.enable_grad():
                out = check_out()
            err = rel_err(out[0], out[1])
            ok = err <= tol
            row = dict(base, mode=mode, provider=provider, bytes=nbytes, max_rel_err=err, checked=ok, note=note)
            if ok:
                with torch.no_grad() if mode == "inference" else torch.enable_grad():
                    t = time_cuda(fn, repeats=repeats, warmup=5)
                row.update(median_us=t.median_ms * 1e3, p20_us=t.p20_ms * 1e3, p80_us=t.p80_ms * 1e3)
            else:
                row.update(median_us=None, p20_us=None, p80_us=None, note=f"{note} check failed".strip())
        except Exception as e:  # a provider that cannot run is recorded, not fatal
            row = dict(base, mode=mode, provider=provider, bytes=nbytes, median_us=None, p20_us=None, p80_us=None,
                       max_rel_err=None, checked=False, note=f"error: {type(e).__name__}: {str(e)[:200]}")
        rows.append(row)

    inf_bytes = x_bytes + y_bytes + w_bytes
    fused = lambda x: fastdw.dwconv_bn_act(x, w, scale, shift, L.stride, L.padding, 1, "relu6", backend="cuda")  # noqa: E731
    eager_kind = "cudnn" if torch.backends.cudnn.is_acceptable(x0) else "native"
    compiled = {}
    if "compile" in providers:
        compiled["compile"] = torch.compile(blk)
    if "compile_max" in providers:
        compiled["compile_max"] = torch.compile(blk, mode="max-autotune-no-cudagraphs")
    for p in providers:
        if p == "fastdw_cuda":
            record(p, "inference", lambda: fused(next_x()), lambda: (fused(x0), ref), inf_bytes)
        elif p == "eager":
            record(p, "inference", lambda: blk(next_x()), lambda: (blk(x0), ref), inf_bytes, eager_kind)
        elif p == "eager_folded":
            record(p, "inference", lambda: folded(next_x()), lambda: (folded(x0), ref), inf_bytes, eager_kind)
        elif p in compiled:
            m = compiled[p]
            record(p, "inference", lambda: m(next_x()), lambda: (m(x0), ref), inf_bytes)
        elif p == "clone":
            record(p, "inference", lambda: next_x().clone(), lambda: (x0.clone(), x0), 2 * x_bytes)

    # backward: dx, dweight and the BN-parameter gradients, given a fixed dy
    bwd_bytes = 2 * x_bytes + y_bytes + w_bytes
    dy = torch.randn(N, L.C, oh, ow, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    xr = x0.detach().requires_grad_(True)
    params = [xr, conv.weight, bn.weight, bn.bias]
    ref_blk = copy.deepcopy(blk).float()
    xf = x0.detach().float().requires_grad_(True)
    want = torch.autograd.grad(ref_blk(xf), [xf], dy.float())
    bwd_op = torch.ops.fastdw._dwconv_bn_act_backward.default
    for p in providers:
        if p == "fastdw_cuda":
            def fn():
                return bwd_op(dy, x0, w, scale, shift, [L.stride] * 2, [L.padding] * 2, [1, 1], "relu6",
                              [True, True, True, True], False)

            def chk():
                dx, dw_, _, _ = fn()
                return dx, want[0]
            record(p, "backward", fn, chk, bwd_bytes)
        elif p in ("eager", "compile", "compile_max"):
            m = blk if p == "eager" else compiled.get(p)
            if m is None:
                continue
            y = m(xr)

            def fn(y=y):
                return torch.autograd.grad(y, params, dy, retain_graph=True)

            def chk(fn=fn):
                return fn()[0], want[0]
            record(p, "backward", fn, chk, bwd_bytes, eager_kind if p == "eager" else "")
        elif p == "clone":
            record(p, "backward", lambda: next_x().clone(), lambda: (x0.clone(), x0), 2 * x_bytes)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results JSON path")
    ap.add_argument("--N", type=int, default=128)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--providers", default=",".join(ALL_PROVIDERS))
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=240,
                    help="skip compile_max (slow to autotune) for the remaining layers once this much time has passed")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_quick: no CUDA GPU on this machine; this sweep needs one (the CPU comparison is "
              "bench/bench_cpu.py)")
        return 2
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(ALL_PROVIDERS)
    if unknown:
        ap.error(f"unknown providers {sorted(unknown)}; choose from {ALL_PROVIDERS}")
    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name} sm_{props.major}{props.minor}; torch {torch.__version__}; fastdw {fastdw.build_info()}")
    res = {
        "schema": "fastdw-results/1",
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "device": props.name,
        "sm": f"{props.major}.{props.minor}",
        "driver": driver_version(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": str(torch.backends.cudnn.version()),
                     "triton": getattr(__import__("triton"), "__version__", "") if _has_triton() else "",
                     "python": platform.python_version()},
        "date": dt.date.today().isoformat(),
        "clone_gbps": clone_gbps(),
        "layers": [],
        "models": [],
    }
    print(f"clone bandwidth {res['clone_gbps']:.0f} GB/s")
    t0 = time.time()
    for L in MOBILENET_V2:
        provs = [p for p in providers if p != "compile_max" or time.time() - t0 < args.budget_s]
        rows = run_layer(L, args.N, dtype, provs, args.repeats, tol)
        res["layers"] += rows
        summary = "  ".join(f"{r['provider']}/{r['mode'][:3]} {r['median_us']:.1f}" if r["median_us"] else
                            f"{r['provider']}/{r['mode'][:3]} -" for r in rows)
        print(f"L{L.index:02d} C{L.C} {L.H}x{L.W} s{L.stride}: {summary}", flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return out.splitlines()[0] if out else ""
    except (OSError, subprocess.CalledProcessError):
        return ""


def _has_triton():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
