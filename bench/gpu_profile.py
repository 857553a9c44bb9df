"""Which kernels each provider launches, from torch.profiler (scripts/gpu_check.sh).

    python bench/gpu_profile.py --out profile.txt          # kernel tables
    python bench/gpu_profile.py --ncu                      # the run ncu profiles: fastdw only
    python bench/gpu_profile.py --dry --out profile.txt    # CPU rehearsal (CPU ops, no kernels)

For two MobileNetV2 layers (the first, C=32 at 112x112, and a late one, C=960 at 7x7; N=128,
fp16, channels_last) and each provider (fastdw_cuda, fastdw_triton, eager = Conv2d + BatchNorm2d
+ ReLU6, eager_folded = the conv with BN folded in + ReLU6), one forward in eval mode and one
training step (forward + backward with batch statistics) after a warm-up, under the profiler:
the GPU kernels launched (name, calls, total time) and the launch count per call. That says
whether stock ran cuDNN or PyTorch's native depthwise kernel, and how many launches fastdw makes.
--ncu runs only fastdw's forward and inference backward of the same layers, a few times each,
for `ncu --kernel-name regex:body_kernel|_dwconv` to read their counters.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fastdw  # noqa: E402
from fastdw.bench import make_block  # noqa: E402
from fastdw.layers import NETWORKS  # noqa: E402

LAYERS = (NETWORKS["mobilenet_v2"][0], NETWORKS["mobilenet_v2"][14])


def _providers(blk, L, backend_ok):
    scale, shift = fastdw.fold_bn(blk[1])
    w = blk[0].weight.detach()
    out = {}
    for name, b in (("fastdw_cuda", "cuda"), ("fastdw_triton", "triton"), ("fastdw_cpu", "cpu")):
        if backend_ok(b):
            mod = fastdw.DWConvBNAct2d.from_modules(copy.deepcopy(blk[0]), copy.deepcopy(blk[1]), act=L.act,
                                                   backend=b)
            out[name] = (lambda x, b=b: fastdw.dwconv_bn_act(x, w, scale, shift, L.stride, L.padding, 1, L.act,
                                                             backend=b), mod)
    out["eager"] = (lambda x: blk(x), copy.deepcopy(blk))
    folded = nn.Sequential(nn.Conv2d(L.C, L.C, L.k, L.stride, L.padding, groups=L.C, bias=True), nn.ReLU6())
    with torch.no_grad():
        folded[0].weight.copy_(w.float() * scale.view(-1, 1, 1, 1))
        folded[0].bias.copy_(shift)
    folded = folded.to(device=w.device, dtype=w.dtype, memory_format=torch.channels_last)
    out["eager_folded"] = (lambda x: folded(x), None)
    return out


def _step(mod, x, dy):
    xr = x.detach().requires_grad_(True)
    mod.train()(xr).backward(dy)


def kernel_table(prof, device_type) -> list:
    agg = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if device_type == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA:
            a = agg[e.name]
            a[0] += 1
            a[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        elif device_type == "cpu" and e.name.startswith(("fastdw::", "aten::conv", "aten::native_batch_norm",
                                                           "aten::cudnn", "aten::_conv", "aten::hardtanh")):
            a = agg[e.name]
            a[0] += 1
            a[1] += e.cpu_time_total
    return sorted(agg.items(), key=lambda kv: -kv[1][1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args(argv)
    dry = args.dry or not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    N = 2 if dry else 128
    dtype = torch.float32 if dry else torch.float16
    avail = fastdw.available_backends()
    lines = []
    if dry:
        lines.append("[dry] gpu_profile: no GPU here; rehearsing with the CPU backend, CPU op events, N=2, fp32")
    for L in LAYERS:
        blk = make_block(L, dtype, device, "channels_last")
        x = torch.randn(N, L.C, L.H, L.W, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        oh, ow = L.out_hw()
        dy = torch.randn(N, L.C, oh, ow, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        provs = _providers(blk, L, lambda b: b in avail and (b == "cpu") == dry)
        if args.ncu:
            for name in ("fastdw_cuda", "fastdw_triton"):
                if name not in provs:
                    continue
                f, _ = provs[name]
                op = (torch.ops.fastdw._dwconv_bn_act_backward_triton if name == "fastdw_triton"
                      else torch.ops.fastdw._dwconv_bn_act_backward)
                scale, shift = fastdw.fold_bn(blk[1])
                for _ in range(2):
                    f(x)
                    op(dy, x, blk[0].weight.detach(), scale, shift, [L.stride] * 2, [L.padding] * 2, [1, 1], L.act,
                       [True, True, True, True], False)
            if not dry:
                torch.cuda.synchronize()
            continue
        for name, (f, mod) in provs.items():
            with torch.no_grad():
                f(x)  # warm-up (Triton compiles, cuDNN picks its algorithm)
            if mod is not None:
                _step(mod, x, dy)
            if not dry:
                torch.cuda.synchronize()
            acts = [torch.profiler.ProfilerActivity.CPU] + ([] if dry else [torch.profiler.ProfilerActivity.CUDA])
            for what in ("inference", "train_step"):
                if what == "train_step" and mod is None:
                    continue
                with torch.profiler.profile(activities=acts) as prof:
                    if what == "inference":
                        with torch.no_grad():
                            f(x)
                    else:
                        _step(mod, x, dy)
                    if not dry:
                        torch.cuda.synchronize()
                table = kernel_table(prof, device)
                launches = sum(c for _, (c, _) in table)
                lines.append(f"\n== {L.name} N{N} {str(dtype)[6:]} channels_last | {name} | {what}: "
                             f"{launches} {'kernel launches' if not dry else 'op calls'}, "
                             f"{sum(t for _, (_, t) in table):.0f} us")
                for kname, (c, t) in table[:12]:
                    lines.append(f"  {c:3d} x {t:9.1f} us  {kname[:150]}")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FASTDW_TRITON_AUTOTUNE", "0")
    sys.exit(main())
