"""Compile fastdw's Triton kernels for real GPU targets without a GPU, and report their resources.

The Triton interpreter (how CI runs the kernels on a CPU) is lenient about types; the GPU
compiler is not. This script runs the real launchers (fastdw.triton.dwconv_bn_act) on meta
tensors with the launch replaced by a recorder, then compiles every recorded launch with every
config of its autotune list through Triton's ahead-of-time path (TTIR -> TTGIR -> PTX -> cubin
with ptxas) for sm_80 and sm_90, specializing arguments the way the JIT does (ints equal to 1 are
constants, pointers and ints divisible by 16 get the divisibility hint). It prints registers,
the stack frame and spill bytes of each kernel (ptxas -v, with the ptxas Triton ships) and fails if
a kernel fails to compile or a 3x3 kernel spills more than SPILL_BYTES_3X3 bytes (every spill is
listed).

    python scripts/triton_compile_check.py [--quick] [--archs 80,90] [--json out.json]

Needs Triton with its NVIDIA backend (it ships ptxas); must run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the interpreter has nothing to compile)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fastdw.triton.dwconv_bn_act as T  # noqa: E402

SPILL_BYTES_3X3 = 16
_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    rec.calls.append((kernel, args, kwargs))
                return run
        return _Grid()


def _record(cases):
    rec = _Recorder()
    orig = T._launch
    T._launch = rec
    try:
        for layout, dtype, k, s, act, with_bwd in cases:
            N, C, H, W = 2, 96, 28, 28
            x = torch.empty(N, C, H, W, dtype=dtype, device="meta")
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            w = torch.empty(C, 1, k, k, dtype=dtype, device="meta")
            sc = torch.empty(C, device="meta")
            sh = torch.empty(C, device="meta")
            p = k // 2
            y = T.dwconv_bn_act_fwd(x, w, sc, sh, [s, s], [p, p], [1, 1], act)
            if with_bwd:
                go = torch.empty(y.shape, dtype=dtype, device="meta").contiguous(memory_format=T.output_memory_format(x))
                # deterministic=False: the autotuned kernels, whose config lists include the pinned one
                T.dwconv_bn_act_bwd(go, x, w, sc, sh, [s, s], [p, p], [1, 1], act, [True] * 4, False)
                # training mode: the statistics kernel, the centred forward, the gu kernel's two
                # training variants (sums; dz) and the dx kernel
                _, mean, var = T.dwconv_bn_act_train_fwd(x, w, None, sc, sh, [s, s], [p, p], [1, 1], 1e-5, act)
                T.dwconv_bn_act_train_bwd(go, None, None, x, w, sc, sh, mean, var, [s, s], [p, p], [1, 1], 1e-5,
                                          act, [True] * 4, False)
    finally:
        T._launch = orig
    return rec.calls


def _signature(fn, args, kwargs, config):
    """(signature, constexprs, attrs) as the JIT would specialize this call."""
    values = dict(zip(fn.arg_names, args))
    values.update(kwargs)
    values.update(config.kwargs)
    sig, const, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = values[name]
        if param.is_constexpr:
            sig[name], const[name] = "constexpr", (int(v) if isinstance(v, bool) else v)
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _DT.get(v.dtype, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, float):  # a float scalar: fp32, as the JIT passes it, unless annotated
            sig[name] = param.annotation_type or "fp32"
        elif isinstance(v, int):
            if v == 1 and not getattr(param, "do_not_specialize", False):
                sig[name], const[name] = "constexpr", 1
            else:
                sig[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
                if v % 16 == 0 and not getattr(param, "do_not_specialize", False):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{name}: unexpected argument {v!r}")
    return sig, const, attrs


def _configs_of(kernel):
    """(JITFunction, configs) of a recorded launch: an autotuned kernel's list, or the launch
    defaults of a plain one (the per-channel finish kernels)."""
    if hasattr(kernel, "configs"):
        return kernel.fn, kernel.configs
    return kernel, [triton.Config({}, num_warps=4, num_stages=3)]


def _resources(ptx: str, arch: int, ptxas: str):
    """Registers, stack frame and spill bytes of a kernel, from `ptxas -v` on its PTX (what the
    JIT would assemble)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", src,
                            "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    out = r.stdout + r.stderr
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    g = re.search(r"Used (\d+) registers", out)
    if not (m and g):
        return None
    stack, st, ld = map(int, m.groups())
    return dict(regs=int(g.group(1)), stack=stack, spill_stores=st, spill_loads=ld)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fp16 channels_last and fp32 NCHW 3x3 only")
    ap.add_argument("--smoke", action="store_true", help="--quick with the first config of each kernel only")
    ap.add_argument("--archs", default="80,90", help="compute capabilities, comma separated (default 80,90)")
    ap.add_argument("--json", help="write the per-kernel table here")
    args = ap.parse_args(argv)

    acts = ["relu6", "hardswish", "silu", "none", "relu"]
    if args.quick or args.smoke:
        cases = [("channels_last", torch.float16, 3, 1, "relu6", True), ("contiguous", torch.float32, 3, 2, "silu", True)]
    else:
        cases = []
        for layout in ("channels_last", "contiguous"):
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                cases.append((layout, dt, 3, 1, "relu6", True))
            for i, (k, s) in enumerate(((3, 2), (5, 1), (5, 2), (7, 1))):
                cases.append((layout, torch.float16 if layout == "channels_last" else torch.float32, k, s,
                              acts[(i + 1) % len(acts)], True))
    calls = _record(cases)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    rows, failures, warnings = [], [], []
    t0 = time.time()
    for arch in (int(a) for a in args.archs.split(",")):
        target = GPUTarget("cuda", arch, 32)
        from triton.compiler import make_backend

        backend = make_backend(target)
        seen = set()
        for kernel, a, kw in calls:
            fn, configs = _configs_of(kernel)
            for cfg in (configs[:1] if args.smoke else configs):
                sig, const, attrs = _signature(fn, a, kw, cfg)
                key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(const.items())), str(cfg))
                if key in seen:
                    continue
                seen.add(key)
                opts = backend.parse_options({"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                desc = (f"sm_{arch} {fn.__name__} {','.join(v for v in sig.values() if v.startswith('*'))[:40]} "
                        f"K={const.get('KH')}x{const.get('KW')} S={const.get('SH')} ACT={const.get('ACT')} "
                        f"{cfg.kwargs} w{cfg.num_warps}")
                try:
                    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=target,
                                        options=opts.__dict__)
                except Exception as e:  # noqa: BLE001
                    failures.append(f"{desc}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    print("FAIL", failures[-1], flush=True)
                    continue
                res = _resources(ck.asm["ptx"], arch, ptxas) if os.path.exists(ptxas) else None
                row = dict(arch=arch, kernel=fn.__name__, signature=sig, constexprs={k: v for k, v in const.items()},
                           config=dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                           resources=res)
                rows.append(row)
                spill = res is not None and res["spill_stores"] > 0
                # 3x3 is the fast path: more than a few bytes of spill there fails (ptxas on sm_90
                # spills 4-8 bytes in some fp16 backward variants); 5x5 / 7x7 spills are reported
                if spill and const.get("KH", 3) * const.get("KW", 3) <= 9 and res["spill_stores"] > SPILL_BYTES_3X3:
                    failures.append(f"{desc}: spills ({res})")
                elif spill:
                    warnings.append(f"{desc}: spills ({res})")
                print(f"{'SPILL' if spill else 'ok   '} {desc} {res}", flush=True)
    print(f"\n{len(rows)} kernel variants compiled in {time.time() - t0:.0f} s, {len(failures)} failures "
          f"(triton {triton.__version__}, torch {torch.__version__})")
    for f in failures:
        print("  " + f)
    if warnings:
        print(f"{len(warnings)} variants spill (5x5 / 7x7, or at most {SPILL_BYTES_3X3} bytes at 3x3; reported, not failed):")
        for w in warnings:
            print("  " + w)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, rows=rows, failures=failures,
                           warnings=warnings), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
