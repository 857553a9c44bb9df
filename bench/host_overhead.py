"""Host time of a Triton-backend call: what Python spends before (and around) the kernel launch.

At N=1 a depthwise layer's kernels run for a few microseconds, so the host side decides the
latency. This times, per call, for MobileNetV2 layer shapes at N=1 (fp16 channels_last):
  launcher      fastdw.triton.dwconv_bn_act.dwconv_bn_act_fwd (checks, output, launch)
  op            the triton_op fastdw::dwconv_bn_act_triton (its dispatch around the launcher)
  public        fastdw.dwconv_bn_act(..., backend="triton") with no autograd graph (inference)
  public_grad   the same with x requiring grad (the op with its autograd), forward only
  backward      the backward launcher (all four gradients)
  train_fwd     the training forward launcher (batch statistics; gamma, beta, no conv bias)
  train_bwd     the training backward launcher (all four gradients, with grad_mean and grad_var)
Without a GPU the tensors are CPU tensors and Triton's own launch is replaced by a no-op (it
cannot run here): the numbers are fastdw's share of the host time. On a GPU the real launch is
included (asynchronous: host time, not kernel time). Each figure is the best of 5 medians of
`--calls` calls.

    python bench/host_overhead.py [--calls 2000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the compiled launch path, not the interpreter's
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's fastdw, installed or not

import torch  # noqa: E402

import fastdw  # noqa: E402
import fastdw.ops  # noqa: E402

# (C, H, W, stride) of MobileNetV2 depthwise layers: the largest plane, a middle one, the smallest
LAYERS = [(32, 112, 112, 1), (144, 56, 56, 2), (960, 7, 7, 1)]


class _NoLaunch:
    def __getitem__(self, grid):
        return self._run

    def _run(self, *args, **kwargs):
        pass


def _time(fn, calls: int) -> float:
    for _ in range(min(200, calls)):
        fn()
    meds = []
    for _ in range(5):
        ts = []
        for _ in range(max(1, calls // 50)):
            t = time.perf_counter()
            for _ in range(50):
                fn()
            ts.append((time.perf_counter() - t) / 50)
        meds.append(statistics.median(ts))
    return min(meds) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    T = fastdw.ops._triton_module()
    if T is None:
        print(f"host_overhead: the Triton backend is not importable ({fastdw.ops._TRITON_IMPORT_ERROR})")
        return 1
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    if not gpu:
        T._launch = lambda kernel: _NoLaunch()
        T.INTERPRET = True  # lets the public function accept CPU tensors (fastdw.ops asks the module)
    rows = []
    for C, H, W, s in LAYERS:
        x = torch.randn(1, C, H, W, device=dev).half().contiguous(memory_format=torch.channels_last)
        w = torch.randn(C, 1, 3, 3, device=dev).half()
        sc, sh = torch.rand(C, device=dev) + 0.5, torch.randn(C, device=dev)
        xg = x.clone().requires_grad_()
        y = T.dwconv_bn_act_fwd(x, w, sc, sh, [s, s], [1, 1], [1, 1], "relu6")
        g = torch.randn_like(y)
        _, mean, var = T.dwconv_bn_act_train_fwd(x, w, None, sc, sh, [s, s], [1, 1], [1, 1], 1e-5, "relu6")
        gm, gv = torch.randn(C, device=dev), torch.randn(C, device=dev)
        cases = {
            "launcher": lambda: T.dwconv_bn_act_fwd(x, w, sc, sh, [s, s], [1, 1], [1, 1], "relu6"),
            "op": lambda: T.OP(x, w, sc, sh, [s, s], [1, 1], [1, 1], "relu6"),
            "public": lambda: fastdw.dwconv_bn_act(x, w, sc, sh, stride=s, act="relu6", backend="triton"),
            "public_grad": lambda: fastdw.dwconv_bn_act(xg, w, sc, sh, stride=s, act="relu6", backend="triton"),
            "backward": lambda: T.dwconv_bn_act_bwd(g, x, w, sc, sh, [s, s], [1, 1], [1, 1], "relu6", [True] * 4,
                                                    False),
            "train_fwd": lambda: T.dwconv_bn_act_train_fwd(x, w, None, sc, sh, [s, s], [1, 1], [1, 1], 1e-5,
                                                           "relu6"),
            "train_bwd": lambda: T.dwconv_bn_act_train_bwd(g, gm, gv, x, w, sc, sh, mean, var, [s, s], [1, 1],
                                                           [1, 1], 1e-5, "relu6", [True] * 4, False),
        }
        row = dict(layer=f"C{C} {H}x{W} s{s}", **{k: round(_time(f, args.calls), 2) for k, f in cases.items()})
        rows.append(row)
    where = "GPU, launches included" if gpu else "CPU, Triton's launch stubbed"
    print(f"host time per call, microseconds ({where}; torch {torch.__version__}):")
    print("| layer | " + " | ".join(k for k in rows[0] if k != "layer") + " |")
    print("|---|" + "---:|" * (len(rows[0]) - 1))
    for r in rows:
        print(f"| {r['layer']} | " + " | ".join(f"{v:.1f}" for k, v in r.items() if k != "layer") + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(where=where, torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
