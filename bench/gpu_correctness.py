"""The GPU correctness sweep of scripts/gpu_check.sh: every GPU backend against the fp32 reference.

    python bench/gpu_correctness.py --out check.json [--budget-s 150] [--backend cuda,triton]
    python bench/gpu_correctness.py --dry --out check.json      # CPU rehearsal (the CPU backend)

Cases, most valuable first (a time budget stops the sweep between cases; what did not run is
listed as such):
  * every MobileNetV2 depthwise layer at N=2: fp16 and bf16 channels_last, fp32 NCHW; the
    forward, the inference backward (dx, dweight, dscale, dshift) and the training op (y, mean,
    var, dx, dweight, dgamma, dbeta), each through the public functions and autograd;
  * MobileNetV2's first layer at N=128 (fp16 channels_last);
  * the fallback paths: C % 8 != 0, a channels_last view at an odd offset, dilation 2, a 5x5;
  * an empty batch and a one-element input.
The caching allocator is poisoned with NaN before every run, so an output element a kernel never
writes fails instead of passing with the last run's value. Tolerances per dtype as in fastdw.bench
(max-abs error over the reference's max; dx through grad_err, which allows a few activation-kink
flips). Writes one JSON (schema fastdw-check/1) and prints a line per failure and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fastdw  # noqa: E402
from fastdw.bench import environment, grad_err, rel_err  # noqa: E402
from fastdw.layers import NETWORKS, DWLayer  # noqa: E402
from fastdw.reference import dwconv_bn_act_ref, dwconv_bn_act_train_ref  # noqa: E402

TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
FORMATS = [(torch.float16, "channels_last"), (torch.bfloat16, "channels_last"), (torch.float32, "nchw")]


def _poison(like_shapes, device):
    """Fills freed allocator blocks of these sizes with NaN (the next outputs of those sizes are
    likely to land in them)."""
    if device.type != "cuda":
        return
    blocks = [torch.full(s, float("nan"), device=device) for s in like_shapes for _ in range(3)]
    del blocks


def _make(N, C, H, W, k, dtype, layout, device, gen, offset=False):
    x = torch.randn(N, C + (1 if offset else 0), H, W, generator=gen).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if offset:  # a channels_last view one channel in: misaligned for 16-byte loads
        x = x[:, 1:]
    w = (torch.randn(C, 1, k, k, generator=gen) * (1.5 / k)).to(device=device, dtype=dtype)
    sc = (torch.rand(C, generator=gen) + 0.5).to(device)
    sh = (torch.randn(C, generator=gen) * 0.1).to(device)
    return x, w, sc, sh


def check_case(backend, N, C, H, W, k, stride, dil, act, dtype, layout, mode, device, gen, offset=False):
    """{output: error}, tolerance for one run."""
    pad = dil * (k - 1) // 2
    x, w, sc, sh = _make(N, C, H, W, k, dtype, layout, device, gen, offset)
    oh = (H + 2 * pad - dil * (k - 1) - 1) // stride + 1
    ow = (W + 2 * pad - dil * (k - 1) - 1) // stride + 1
    dy = torch.randn(N, C, oh, ow, generator=gen).to(device=device, dtype=dtype)
    f32 = lambda t: t.detach().float().requires_grad_()  # noqa: E731
    errs = {}
    if mode == "inference":
        _poison([(N, C, oh, ow)], device)
        with torch.no_grad():
            y = fastdw.dwconv_bn_act(x, w, sc, sh, stride, pad, dil, act, backend=backend)
        ref = dwconv_bn_act_ref(x, w, sc, sh, stride, pad, dil, act)
        errs["y"] = rel_err(y, ref)
    elif mode == "backward":
        xs, ws, ss, bs = (t.detach().requires_grad_() for t in (x, w, sc, sh))
        _poison([(N, C, H, W), (N, C, oh, ow)], device)
        y = fastdw.dwconv_bn_act(xs, ws, ss, bs, stride, pad, dil, act, backend=backend)
        g = torch.autograd.grad(y, [xs, ws, ss, bs], dy)
        xr, wr, sr, br = f32(x), f32(w), f32(sc), f32(sh)
        gr = torch.autograd.grad(dwconv_bn_act_ref(xr, wr, sr, br, stride, pad, dil, act), [xr, wr, sr, br], dy.float())
        errs.update(dx=grad_err(g[0], gr[0]), dweight=rel_err(g[1], gr[1]), dscale=rel_err(g[2], gr[2]),
                    dshift=rel_err(g[3], gr[3]))
    else:  # train
        gam, bet = sc, sh
        xs, ws, gs, bs = (t.detach().requires_grad_() for t in (x, w, gam, bet))
        _poison([(N, C, H, W), (N, C, oh, ow)], device)
        y, mean, var = fastdw.dwconv_bn_act_train(xs, ws, None, gs, bs, stride, pad, dil, 1e-5, act, backend=backend)
        g = torch.autograd.grad(y, [xs, ws, gs, bs], dy)
        xr, wr, gr_, br = f32(x), f32(w), f32(gam), f32(bet)
        yr, mr, vr = dwconv_bn_act_train_ref(xr, wr, None, gr_, br, stride, pad, dil, 1e-5, act)
        gr = torch.autograd.grad(yr, [xr, wr, gr_, br], dy.float())
        errs.update(y=rel_err(y, yr), mean=rel_err(mean, mr), var=rel_err(var, vr), dx=grad_err(g[0], gr[0]),
                    dweight=rel_err(g[1], gr[1]), dgamma=rel_err(g[2], gr[2]), dbeta=rel_err(g[3], gr[3]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return errs, TOL[dtype]


def cases(dry: bool):
    """(name, kwargs) in order of value."""
    layers = NETWORKS["mobilenet_v2"]
    if dry:  # the rehearsal: a few small layers, N=1
        layers = [DWLayer("mobilenet_v2", L.index, L.C, min(L.H, 14), min(L.W, 14), L.k, L.stride, L.act)
                  for L in (layers[0], layers[1], layers[7])]
    N = 1 if dry else 2
    out = []
    for L in layers:
        for dtype, layout in FORMATS:
            for mode in ("inference", "backward", "train"):
                out.append((f"{L.name} N{N}", dict(N=N, C=L.C, H=L.H, W=L.W, k=L.k, stride=L.stride, dil=1,
                                                   act=L.act, dtype=dtype, layout=layout, mode=mode)))
    big = NETWORKS["mobilenet_v2"][0]
    bigN = 2 if dry else 128
    for mode in ("inference", "backward", "train"):
        out.append((f"{big.name} N{bigN}", dict(N=bigN, C=big.C, H=28 if dry else big.H, W=28 if dry else big.W,
                                                k=3, stride=1, dil=1, act="relu6", dtype=torch.float16,
                                                layout="channels_last", mode=mode)))
    extra = [("C17 (C % 8 != 0)", dict(N=2, C=17, H=15, W=13, k=3, stride=1, dil=1, act="hardswish")),
             ("offset view", dict(N=2, C=24, H=14, W=14, k=3, stride=2, dil=1, act="relu6", offset=True)),
             ("dilation 2", dict(N=2, C=16, H=15, W=15, k=3, stride=1, dil=2, act="silu")),
             ("5x5", dict(N=2, C=40, H=28, W=28, k=5, stride=2, dil=1, act="hardswish")),
             ("empty batch", dict(N=0, C=16, H=8, W=8, k=3, stride=1, dil=1, act="relu6")),
             ("one element", dict(N=1, C=1, H=1, W=1, k=3, stride=1, dil=1, act="relu"))]
    for name, kw in extra:
        for dtype, layout in FORMATS:
            for mode in ("inference", "backward", "train"):
                if mode == "train" and kw["N"] * kw["H"] * kw["W"] <= 1:
                    continue  # batch statistics of one value (or none) per channel: not a training case
                out.append((name, dict(kw, dtype=dtype, layout=layout, mode=mode)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", help="comma separated (default: the GPU backends available)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    ap.add_argument("--dry", action="store_true", help="CPU rehearsal: the CPU backend, a few small cases")
    args = ap.parse_args(argv)
    dry = args.dry or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        print("[dry] gpu_correctness: no GPU here; rehearsing the sweep with the CPU backend on small cases")
        backends = ["cpu"]
    else:
        backends = [b for b in ("cuda", "triton") if b in fastdw.available_backends()]
    if args.backend:
        backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    env = environment() if not dry else {"schema": "fastdw-check/1", "device": "cpu (dry run)"}
    env["schema"] = "fastdw-check/1"
    res = dict(env, backends=backends, cases=[], not_run=[])
    out = Path(args.out)
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    # case by case, every backend in turn: a budget that runs out leaves both equally covered
    todo = [(b, name, kw) for name, kw in cases(dry) for b in backends]
    for i, (b, name, kw) in enumerate(todo):
        if args.budget_s is not None and time.time() - t0 > args.budget_s:
            res["not_run"] = [f"{b} {n} {k['dtype']} {k['layout']} {k['mode']}" for b, n, k in todo[i:]]
            print(f"budget of {args.budget_s:.0f}s spent: {len(todo) - i} cases not run", flush=True)
            break
        row = dict(backend=b, case=name, mode=kw["mode"], dtype=str(kw["dtype"]).replace("torch.", ""),
                   layout=kw["layout"], errs={}, tol=None, ok=False, note="")
        try:
            errs, tol = check_case(b, device=device, gen=gen, **kw)
            row.update(errs=errs, tol=tol, ok=all(e <= tol for e in errs.values()))  # NaN fails
        except Exception as e:  # noqa: BLE001 -- a crash is a failed case, recorded
            row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        res["cases"].append(row)
        if not row["ok"]:
            bad = {k: f"{v:.2e}" for k, v in row["errs"].items() if not v <= (row["tol"] or 0)}
            print(f"FAIL {b} {name} {row['dtype']} {row['layout']} {row['mode']}: {bad or row['note']}", flush=True)
        if i % 20 == 0:
            out.write_text(json.dumps(res, indent=1))
    summary = {}
    for r in res["cases"]:
        s = summary.setdefault(r["backend"], [0, 0])
        s[0] += r["ok"]
        s[1] += 1
    res["summary"] = {b: {"passed": p, "run": n} for b, (p, n) in summary.items()}
    res["seconds"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(res, indent=1))
    line = ", ".join(f"{b} {p}/{n} passed" for b, (p, n) in summary.items())
    print(f"correctness: {line}; {len(res['not_run'])} not run; {res['seconds']}s -> {out}", flush=True)
    return 0 if all(p == n for p, n in summary.values()) and not res["not_run"] else 1


if __name__ == "__main__":
    os.environ.setdefault("FASTDW_TRITON_AUTOTUNE", "0")
    sys.exit(main())
