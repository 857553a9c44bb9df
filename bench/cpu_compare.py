"""CPU comparison that can be trusted on a noisy machine: fastdw's C++ kernels vs PyTorch's own
CPU block (Conv2d(groups=C) + eval BatchNorm2d + ReLU6) on MobileNetV2's 17 depthwise layers.

Two measurements per layer, mode (forward, backward), layout and batch size:
- time: interleaved stock / fastdw samples (the order alternates every round, so drift and a
  neighbour's load hit both alike); the speed-up is the ratio of the medians, with a bootstrap
  95% interval over the rounds. Rounds are added until that interval is within --tol of the
  ratio (or --max-rounds is reached: the case is then marked unstable).
- instructions: `valgrind --tool=callgrind` counts of one call of each (the script reruns itself
  under valgrind, one thread, counting only the timed statement): deterministic whatever else
  the machine does, the same on every run. Valgrind runs the AVX2 code paths of both sides
  (it has no AVX-512), so these are the AVX2 kernels' counts.

    python bench/cpu_compare.py --out cpu.json                 # both measurements
    python bench/cpu_compare.py --out cpu.json --no-callgrind  # times only
    python bench/cpu_compare.py --report cpu.json [--readme README.md]

Backward: dx, dweight, dgamma, dbeta of the eval-mode block given dy (the BatchNorm folded for
fastdw, its fold differentiated), the forward graph built once outside the timed call.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fastdw  # noqa: E402
from fastdw.layers import MOBILENET_V2  # noqa: E402

LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
MODES = ("forward", "backward")


def stock_block(L, mf):
    """MobileNetV2's Conv2d(groups=C) + eval BatchNorm2d (seeded statistics) + ReLU6 for layer L."""
    blk = nn.Sequential(nn.Conv2d(L.C, L.C, L.k, L.stride, L.padding, groups=L.C, bias=False),
                        nn.BatchNorm2d(L.C), nn.ReLU6())
    g = torch.Generator().manual_seed(L.index)
    with torch.no_grad():
        bn = blk[1]
        bn.weight.copy_(torch.rand(L.C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(L.C, generator=g) * 0.1)
        bn.running_mean.copy_(torch.randn(L.C, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(L.C, generator=g) + 0.5)
    return blk.eval().to(memory_format=mf)


def make_case(L, mode, layout, n):
    """{'torch': fn, 'fastdw': fn}: one call each, checked against each other first."""
    mf = LAYOUTS[layout]
    blk = stock_block(L, mf)
    torch.manual_seed(L.index)
    if mode == "forward":
        x = torch.randn(n, L.C, L.H, L.W).to(memory_format=mf)
        w = blk[0].weight.detach()
        scale, shift = fastdw.fold_bn(blk[1])

        def stock():
            with torch.no_grad():
                return blk(x)

        def fused():
            with torch.no_grad():
                return fastdw.dwconv_bn_act(x, w, scale, shift, L.stride, L.padding, 1, "relu6", backend="cpu")

        torch.testing.assert_close(fused(), stock(), rtol=1e-5, atol=1e-5)
        return {"torch": stock, "fastdw": fused}
    x = torch.randn(n, L.C, L.H, L.W).to(memory_format=mf).requires_grad_(True)
    params = [x, blk[0].weight, blk[1].weight, blk[1].bias]
    y_stock = blk(x)
    scale, shift = fastdw.fold_bn(blk[1])
    y_fused = fastdw.dwconv_bn_act(x, blk[0].weight, scale, shift, L.stride, L.padding, 1, "relu6", backend="cpu")
    dy = torch.randn_like(y_stock)

    def stock():
        return torch.autograd.grad(y_stock, params, dy, retain_graph=True)

    def fused():
        return torch.autograd.grad(y_fused, params, dy, retain_graph=True)

    for a, b in zip(fused(), stock()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    return {"torch": stock, "fastdw": fused}


def cases(args):
    layers = [L for L in MOBILENET_V2 if not args.layers or L.index in args.layers]
    for n in args.batch:
        for mode in args.modes:
            for layout in args.layouts:
                for L in layers:
                    yield f"{mode}/{layout}/N{n}/L{L.index:02d}", L, mode, layout, n


# ------------------------------------------------------------------------------------------
# Time


def _sample(fn, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _ratio_ci(a, b, rng, reps=400):
    """Bootstrap 95% interval of median(a) / median(b) over paired rounds."""
    k = len(a)
    rs = []
    for _ in range(reps):
        idx = [rng.randrange(k) for _ in range(k)]
        rs.append(statistics.median(a[i] for i in idx) / statistics.median(b[i] for i in idx))
    rs.sort()
    return rs[int(0.025 * reps)], rs[int(0.975 * reps) - 1]


def time_case(fns, args, rng):
    for f in fns.values():  # warm-up (allocator, thread pool, caches)
        f()
        f()
    t1 = _sample(fns["torch"], 1)
    inner = max(1, min(50, int(args.sample_ms * 1e-3 / max(t1, 1e-6))))
    samples = {"torch": [], "fastdw": []}
    order = ["torch", "fastdw"]
    lo = hi = ratio = None
    while True:
        for name in order:
            samples[name].append(_sample(fns[name], inner))
        order.reverse()
        k = len(samples["torch"])
        if k >= args.min_rounds and (k - args.min_rounds) % 5 == 0:
            ratio = statistics.median(samples["torch"]) / statistics.median(samples["fastdw"])
            lo, hi = _ratio_ci(samples["torch"], samples["fastdw"], rng)
            if (hi - lo) / 2 <= args.tol * ratio or k >= args.max_rounds:
                break
    return {"torch_ms": statistics.median(samples["torch"]) * 1e3,
            "fastdw_ms": statistics.median(samples["fastdw"]) * 1e3,
            "speedup": ratio, "ci95": [lo, hi], "rounds": k, "inner": inner,
            "stable": (hi - lo) / 2 <= args.tol * ratio}


# ------------------------------------------------------------------------------------------
# Instructions (callgrind)


def _callgrind_child(args):
    """Runs under valgrind: for every case, one untoggled warm-up call, then `reps` calls with
    collection on, dumped to their own file. Prints nothing but the dump order."""
    torch.set_num_threads(1)
    order = []
    for key, L, mode, layout, n in cases(args):
        fns = make_case(L, mode, layout, n)
        for name in ("torch", "fastdw"):
            fns[name]()
            torch._C._valgrind_toggle()
            for _ in range(args.reps):
                fns[name]()
            torch._C._valgrind_toggle_and_dump_stats()
            order.append(f"{key}/{name}")
    with open(args.callgrind_order, "w") as f:
        json.dump({"order": order, "isa": fastdw.cpu_isa(), "torch_isa": torch.backends.cpu.get_cpu_capability()}, f)


def _dump_total(path):
    with open(path) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    return 0


def callgrind_counts(args):
    """{case key: {'torch': Ir per call, 'fastdw': Ir per call}} from one valgrind run."""
    tmp = tempfile.mkdtemp(prefix="fastdw_cg_")
    try:
        out = os.path.join(tmp, "cg.out")
        order_file = os.path.join(tmp, "order.json")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
               "--dump-instr=no", "--dump-line=no", sys.executable, os.path.abspath(__file__), "--callgrind-child",
               "--callgrind-order", order_file, "--reps", str(args.reps), "--batch", *map(str, args.batch),
               "--modes", *args.modes, "--layouts", *args.layouts]
        if args.layers:
            cmd += ["--layers", *map(str, args.layers)]
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
        run = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if run.returncode != 0:
            raise SystemExit(f"cpu_compare: the callgrind run failed ({run.returncode}):\n{run.stderr[-3000:]}")
        child = json.load(open(order_file))
        order = child["order"]
        dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        if len(dumps) != len(order):
            raise SystemExit(f"cpu_compare: {len(dumps)} callgrind dumps for {len(order)} measurements")
        res = {}
        for name, path in zip(order, dumps):
            key, prov = name.rsplit("/", 1)
            total = _dump_total(path)
            if total <= 0:
                raise SystemExit(f"cpu_compare: no instruction total in {path}")
            res.setdefault(key, {})[prov] = total / args.reps
        return res, {"isa": child["isa"], "torch_isa": child["torch_isa"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Report


def report(data) -> str:
    meta = data["meta"]
    lines = [f"fp32, {meta['threads']} threads, {meta['cpu']} ({meta['isa']}), torch {meta['torch']}, "
             f"fastdw {meta['commit']}; speed-up = stock time / fastdw time (median of interleaved rounds, "
             "95% interval), instr = stock / fastdw instructions per call (callgrind, 1 thread"
             + (f"; under valgrind fastdw runs its {meta['callgrind']['isa']} kernels, torch its "
                f"{meta['callgrind']['torch_isa']} ones" if "callgrind" in meta else "") + ")", ""]
    groups = {}
    for key, r in data["cases"].items():
        mode, layout, n, layer = key.split("/")
        groups.setdefault((mode, layout, n), []).append((layer, r))
    lines.append("| mode | layout | N | stock (ms) | fastdw (ms) | speed-up (sum) | layers ahead | slowest layer | "
                 "instr ratio (min - max) | unstable |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for (mode, layout, n), rows in groups.items():
        t = sum(r["time"]["torch_ms"] for _, r in rows if "time" in r)
        f = sum(r["time"]["fastdw_ms"] for _, r in rows if "time" in r)
        timed = [(layer, r["time"]) for layer, r in rows if "time" in r]
        ahead = sum(tm["ci95"][0] > 1.0 for _, tm in timed)
        worst = min(timed, key=lambda lt: lt[1]["speedup"]) if timed else None
        instr = [r["instr"]["torch"] / r["instr"]["fastdw"] for _, r in rows if "instr" in r]
        unstable = sum(not tm["stable"] for _, tm in timed)
        lines.append(
            f"| {mode} | {layout} | {n[1:]} | {t:.2f} | {f:.2f} | {t / f if f else 0:.2f}x | {ahead}/{len(timed)} | "
            + (f"{worst[0]} {worst[1]['speedup']:.2f}x [{worst[1]['ci95'][0]:.2f}, {worst[1]['ci95'][1]:.2f}]"
               if worst else "") + " | "
            + (f"{min(instr):.2f} - {max(instr):.2f}" if instr else "-") + f" | {unstable} |")
    lines.append("")
    for (mode, layout, n), rows in groups.items():
        cells = []
        for layer, r in rows:
            c = layer
            if "time" in r:
                tm = r["time"]
                c += f" {tm['speedup']:.2f}x [{tm['ci95'][0]:.2f}, {tm['ci95'][1]:.2f}]"
            if "instr" in r:
                c += f" i{r['instr']['torch'] / r['instr']['fastdw']:.2f}"
            cells.append(c)
        lines.append(f"{mode}, {layout}, N={n[1:]}: " + ", ".join(cells))
        lines.append("")
    lines.append("\"layers ahead\": the 95% interval above 1. i: the instruction-count ratio.")
    return "\n".join(lines)


def write_readme(path, text):
    begin, end = "<!-- cpu:begin -->", "<!-- cpu:end -->"
    src = open(path).read()
    if begin not in src or end not in src:
        raise SystemExit(f"cpu_compare: {path} has no {begin} ... {end} block")
    head, rest = src.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + text + "\n" + end + tail)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="results JSON to write")
    p.add_argument("--report", metavar="JSON", help="print the Markdown table of a results JSON")
    p.add_argument("--readme", help="with --report: rewrite the README's cpu:begin/end block")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--layers", type=int, nargs="+", help="layer indices (1-17); default all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tol", type=float, default=0.03, help="95%% interval half-width / ratio to stop at")
    p.add_argument("--min-rounds", type=int, default=15)
    p.add_argument("--max-rounds", type=int, default=60)
    p.add_argument("--sample-ms", type=float, default=5.0, help="time per sample (calls are repeated to reach it)")
    p.add_argument("--no-callgrind", action="store_true")
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--reps", type=int, default=2, help="calls per callgrind measurement")
    p.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--callgrind-order", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report:
        data = json.load(open(args.report))
        if not isinstance(data, dict) or data.get("kind") != "fastdw-cpu-compare":
            raise SystemExit(f"cpu_compare: {args.report} is not a cpu_compare results file")
        text = report(data)
        print(text)
        if args.readme:
            write_readme(args.readme, text)
        return
    if args.callgrind_child:
        return _callgrind_child(args)
    if any(n < 1 for n in args.batch) or min(args.threads, args.reps, args.min_rounds) < 1 or not 0 < args.tol < 1:
        p.error("--batch, --threads, --reps and --min-rounds must be >= 1 and --tol in (0, 1)")
    if args.max_rounds < args.min_rounds or not args.sample_ms > 0:
        p.error("--max-rounds must be >= --min-rounds and --sample-ms > 0")
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    data = {"kind": "fastdw-cpu-compare", "meta": {
        "cpu": platform.processor() or platform.machine(), "isa": fastdw.cpu_isa(), "threads": args.threads,
        "torch": torch.__version__, "commit": commit, "tol": args.tol, "date": time.strftime("%Y-%m-%d")},
        "cases": {}}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            data["meta"]["cpu"] = names[0]
    except OSError:
        pass
    rng = random.Random(0)
    if not args.no_time:
        for key, L, mode, layout, n in cases(args):
            data["cases"].setdefault(key, {})["time"] = r = time_case(make_case(L, mode, layout, n), args, rng)
            print(f"{key}: {r['speedup']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] "
                  f"({r['rounds']} rounds{'' if r['stable'] else ', unstable'})", flush=True)
    if not args.no_callgrind and not (shutil.which("valgrind") and torch._C._valgrind_supported_platform()):
        print("cpu_compare: no instruction counts: valgrind is not installed (or this torch has no valgrind "
              "hooks); times only", flush=True)
        args.no_callgrind = True
    if not args.no_callgrind:
        counts_by_key, data["meta"]["callgrind"] = callgrind_counts(args)
        for key, counts in counts_by_key.items():
            data["cases"].setdefault(key, {})["instr"] = counts
            print(f"{key}: instructions stock / fastdw {counts['torch'] / counts['fastdw']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
    print(report(data))


if __name__ == "__main__":
    main()
