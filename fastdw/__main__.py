"""The main job: convert a torchvision network, check it against the stock one, time both.

    python -m fastdw                       # MobileNetV2, best device present
    python -m fastdw --model mobilenet_v3_large --batch 32 --dtype bfloat16
    python -m fastdw --help

On a GPU it compares fastdw's fused layers against PyTorch's eager modules (cuDNN or PyTorch's
native depthwise kernel, whichever PyTorch picks) and, with --compile, torch.compile. On a
machine without a GPU it runs the CPU path (fastdw's C++ CPU kernels vs PyTorch's CPU modules)
and says so.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys

import torch
from torch import nn

import fastdw
from fastdw import layers as layer_registry
from fastdw._utils import positive_int
from fastdw.timing import time_fn

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so folding is exercised (fresh BNs are identities)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
    return model


def pick_device(requested: str):
    """(device, note). 'auto' takes the GPU when fastdw has a GPU backend for it."""
    has_gpu = torch.cuda.is_available()
    gpu_backends = [b for b in fastdw.available_backends() if b in ("cuda", "triton")]
    if requested == "cuda":
        if not has_gpu:
            sys.exit("fastdw: --device cuda requested but no CUDA GPU is visible")
        if not gpu_backends:
            sys.exit(f"fastdw: --device cuda requested but this build has no GPU backend "
                     f"(build_info: {fastdw.build_info()})")
        return torch.device("cuda"), ""
    if requested == "cpu":
        return torch.device("cpu"), "CPU run requested (--device cpu)."
    if has_gpu and gpu_backends:
        return torch.device("cuda"), ""
    if has_gpu:
        return torch.device("cpu"), (
            "A GPU is visible but this fastdw build has no GPU backend yet "
            f"(backends: {fastdw.available_backends()}); running the CPU path instead.")
    return torch.device("cpu"), (
        "No CUDA GPU on this machine: running the CPU path (fastdw's C++ CPU kernels against "
        "PyTorch's CPU modules). The comparison with cuDNN runs on a machine with an NVIDIA GPU.")


def describe(device: torch.device) -> str:
    bits = [f"fastdw {fastdw.__version__}", f"torch {torch.__version__}", f"python {platform.python_version()}"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        bits += [f"GPU {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)",
                 f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}"]
    else:
        bits += [f"CPU {platform.processor() or platform.machine()}", f"{torch.get_num_threads()} threads"]
    return ", ".join(bits)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def table(rows, headers):
    widths = [max(len(str(r[i])) for r in rows + [headers]) for i in range(len(headers))]
    line = "  ".join(f"{h:>{w}}" for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(f"{str(c):>{w}}" for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def layer_rows(net, batch, dtype, memory_format, device, repeats, warmup):
    """Each depthwise layer of `net` alone: the stock Conv2d + BatchNorm2d + activation block in
    eval mode vs the fused op (BN folded), on the same input."""
    acts = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}
    rows, tot_s, tot_f = [], 0.0, 0.0
    for L in layer_registry.NETWORKS[net]:
        blk = nn.Sequential(nn.Conv2d(L.C, L.C, L.k, L.stride, L.padding, groups=L.C, bias=False),
                            nn.BatchNorm2d(L.C), acts[L.act]())
        blk = randomize_bn(blk, L.index).eval().to(device=device, dtype=dtype, memory_format=memory_format)
        x = torch.randn(batch, L.C, L.H, L.W, device=device, dtype=dtype).to(memory_format=memory_format)
        w = blk[0].weight
        scale, shift = fastdw.fold_bn(blk[1])
        with torch.no_grad():
            ref = blk(x)
            out = fastdw.dwconv_bn_act(x, w, scale, shift, L.stride, L.padding, 1, L.act)
            err = rel_err(out, ref)
            t_s = time_fn(lambda: blk(x), device, repeats, warmup).median_ms
            t_f = time_fn(lambda: fastdw.dwconv_bn_act(x, w, scale, shift, L.stride, L.padding, 1, L.act),
                          device, repeats, warmup).median_ms
        tot_s += t_s
        tot_f += t_f
        rows.append([f"{L.index:2d}", f"{L.C}x{L.H}x{L.W} k{L.k}s{L.stride}", L.act, f"{t_s:.3f}", f"{t_f:.3f}",
                     f"{t_s / t_f:.2f}x", f"{err:.1e}"])
    rows.append(["", "all layers", "", f"{tot_s:.3f}", f"{tot_f:.3f}", f"{tot_s / tot_f:.2f}x", ""])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdw", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2", choices=MODELS)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--batch", type=positive_int, default=None, help="default: 128 on a GPU, 8 on the CPU")
    ap.add_argument("--resolution", type=positive_int, default=224)
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float16 on a GPU, float32 on the CPU")
    ap.add_argument("--layout", default="channels_last", choices=("channels_last", "contiguous"))
    ap.add_argument("--repeats", type=positive_int, default=None, help="timed repeats (default: 50 GPU, 10 CPU)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of stock and converted models")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    args = ap.parse_args(argv)

    device, note = pick_device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch if args.batch is not None else (128 if gpu else 8)
    dtype = DTYPES[args.dtype or ("float16" if gpu else "float32")]
    memory_format = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    repeats = args.repeats if args.repeats is not None else (50 if gpu else 10)
    warmup = 10 if gpu else 2
    if gpu:
        torch.backends.cudnn.benchmark = True

    print(f"fastdw main job: {args.model}, N={batch}, {args.resolution}x{args.resolution}, "
          f"{str(dtype).replace('torch.', '')}, {args.layout}, on {device.type}")
    print(describe(device))
    if note:
        print(f"NOTE: {note}")

    import torchvision  # noqa: PLC0415

    torch.manual_seed(0)
    stock = randomize_bn(getattr(torchvision.models, args.model)(weights=None)).eval()
    stock = stock.to(device=device, dtype=dtype, memory_format=memory_format)
    fused = fastdw.convert(copy.deepcopy(stock))
    n_fused = sum(isinstance(m, fastdw.DWConvBNAct2d) for m in fused.modules())
    n_dw = sum(isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1 for m in stock.modules())
    assert list(fused.state_dict()) == list(stock.state_dict()), "state_dict keys changed"
    print(f"converted: {n_fused} of {n_dw} depthwise Conv2d + BatchNorm2d + activation blocks fused; "
          "state_dict keys unchanged")

    x = torch.randn(batch, 3, args.resolution, args.resolution, device=device, dtype=dtype)
    x = x.to(memory_format=memory_format)
    with torch.no_grad():
        y_stock, y_fused = stock(x), fused(x)
        ref = copy.deepcopy(stock).float()(x.float())  # fp32 yardstick for low precision
    err_f = rel_err(y_fused, y_stock)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    print(f"output check: max |fastdw - stock| / max |stock| = {err_f:.2e} "
          f"(stock vs fp32: {rel_err(y_stock, ref):.2e}, fastdw vs fp32: {rel_err(y_fused, ref):.2e})")
    if not err_f <= tol:
        print(f"FAILED: converted model differs from the stock one by more than {tol}")
        return 1

    providers = [("stock eager", stock), ("fastdw eager", fused)]
    if args.compile:
        providers += [("stock torch.compile", torch.compile(stock)), ("fastdw torch.compile", torch.compile(fused))]
    rows, base = [], None
    with torch.no_grad():
        for name, m in providers:
            t = time_fn(lambda: m(x), device, repeats, warmup)
            base = base or t.median_ms
            rows.append([name, f"{t.median_ms:.3f}", f"{t.p20_ms:.3f}", f"{t.p80_ms:.3f}", f"{base / t.median_ms:.2f}x"])
    print(f"\nwhole network, inference ({repeats} repeats, {'CUDA events' if gpu else 'wall clock'}):")
    print(table(rows, ["provider", "median ms", "p20 ms", "p80 ms", "vs stock eager"]))

    if not args.no_layers and args.model in layer_registry.NETWORKS:
        print(f"\ndepthwise layers of {args.model} alone (stock Conv2d+BatchNorm2d+act in eval vs fused op):")
        rows = layer_rows(args.model, batch, dtype, memory_format, device, repeats, warmup)
        print(table(rows, ["#", "layer (C x H x W)", "act", "stock ms", "fastdw ms", "speed-up", "rel err"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
