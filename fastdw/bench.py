"""fastdw's benchmark runner: the sweeps behind bench/results/*.json and the README tables.

    python -m fastdw.bench --quick                    # MobileNetV2, N=128, fp16, channels_last
    python -m fastdw.bench                            # the standard sweep (run it in slices:
    python -m fastdw.bench --net xception --dtype float16,bfloat16 --N 32,128 ...)
    python -m fastdw.bench --list [filters]           # print the cases and exit (no GPU needed)

Per depthwise layer of the registry (fastdw/layers.py) and per (N, dtype, layout), every provider
of the RESULTS spec is checked against the fp32 reference (input gradients with grad_err: a few
activation-kink flips allowed), then timed:
  fastdw_cuda, fastdw_triton   the fused op (backend="cuda" / "triton")
  eager                        Conv2d(groups=C) + BatchNorm2d + activation modules (cuDNN or
                               PyTorch's native depthwise kernel: which one is recorded in note)
  eager_folded                 BN folded into the conv, then the activation
  compile, compile_max         torch.compile of the eager block (default / max-autotune, the
                               latter with Inductor freezing for inference)
  clone                        torch.clone of the layer's input: the per-shape ceiling
in modes inference (eval, no grad), backward (the backward alone: dx, dweight and the BN
parameter gradients for a fixed dy) and train (forward + backward of a training step of the
block). GPU time comes from CUDA events around each call after warm-up: median, p20 and p80 of
--repeats calls, inputs rotated over >= 256 MiB so L2 cannot hold them, cudnn.benchmark on.
Eager and fastdw rows also carry the host-inclusive time per call (`host_us`).

Whole networks (--models): torchvision MobileNetV2 and MobileNetV3-Large, stock vs converted,
eager and torch.compile, inference and a training step (forward, loss, backward, SGD step), and
CUDA-graph replay of the inference at N = 1.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import fastdw
from fastdw._utils import positive_float, positive_int
from fastdw.layers import INPUT_SIZE, NETWORKS, DWLayer, unique_layers
from fastdw.reference import dwconv_bn_act_ref
from fastdw.timing import time_cuda, time_fn

ROOT = Path(__file__).resolve().parents[1]
LAYER_PROVIDERS = ("fastdw_cuda", "fastdw_triton", "eager", "eager_folded", "compile", "compile_max", "clone")
MODES = ("inference", "backward", "train")
MODEL_PROVIDERS = ("stock_eager", "fastdw_eager", "stock_compile", "fastdw_compile", "stock_graph", "fastdw_graph")
MODEL_MODES = ("inference", "train_step")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LAYOUTS = ("channels_last", "nchw")
ROTATE_BYTES = 256 << 20
_ACT_MODULES = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}


@dataclass(frozen=True)
class Sweep:
    nets: Tuple[str, ...]
    Ns: Tuple[int, ...]
    dtypes: Tuple[str, ...]
    layouts: Tuple[str, ...]
    providers: Tuple[str, ...]
    modes: Tuple[str, ...]
    model_nets: Tuple[str, ...]
    model_Ns: Tuple[int, ...]
    model_providers: Tuple[str, ...]
    model_modes: Tuple[str, ...]


STANDARD = Sweep(nets=tuple(NETWORKS), Ns=(1, 32, 128), dtypes=tuple(DTYPES), layouts=LAYOUTS,
                 providers=LAYER_PROVIDERS, modes=MODES, model_nets=("mobilenet_v2", "mobilenet_v3_large"),
                 model_Ns=(1, 32, 128), model_providers=MODEL_PROVIDERS, model_modes=MODEL_MODES)
QUICK = Sweep(nets=("mobilenet_v2",), Ns=(128,), dtypes=("float16",), layouts=("channels_last",),
              providers=LAYER_PROVIDERS, modes=("inference", "backward", "train"), model_nets=("mobilenet_v2",),
              model_Ns=(128,), model_providers=("stock_eager", "fastdw_eager", "stock_compile", "fastdw_compile"),
              model_modes=MODEL_MODES)


@dataclass(frozen=True)
class LayerCase:
    layer: DWLayer
    N: int
    dtype: str
    layout: str

    @property
    def name(self) -> str:
        return f"{self.layer.name}-N{self.N}-{self.dtype}-{self.layout}"


def layer_cases(sweep: Sweep) -> List[LayerCase]:
    return [LayerCase(L, N, d, lay) for net in sweep.nets for L in unique_layers(NETWORKS[net])
            for N in sweep.Ns for d in sweep.dtypes for lay in sweep.layouts]


# ------------------------------------------------------------------------------------------
# One layer case: blocks, inputs, references, and the (timed fn, check fn) of each provider/mode


def _fmt(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def make_block(L: DWLayer, dtype: torch.dtype, device, layout: str, seed: int = 0) -> nn.Sequential:
    """Conv2d(groups=C) + BatchNorm2d + activation with non-trivial BN statistics, eval mode."""
    blk = nn.Sequential(nn.Conv2d(L.C, L.C, L.k, L.stride, L.padding, groups=L.C, bias=False),
                        nn.BatchNorm2d(L.C), _ACT_MODULES[L.act]())
    g = torch.Generator().manual_seed(seed + L.index)
    with torch.no_grad():
        blk[0].weight.copy_(torch.randn(blk[0].weight.shape, generator=g) / L.k)
        blk[1].weight.copy_(torch.rand(L.C, generator=g) + 0.5)
        blk[1].bias.copy_(torch.randn(L.C, generator=g) * 0.1)
        blk[1].running_mean.copy_(torch.randn(L.C, generator=g) * 0.1)
        blk[1].running_var.copy_(torch.rand(L.C, generator=g) + 0.5)
    return blk.eval().to(device=device, dtype=dtype, memory_format=_fmt(layout))


def grad_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """rel_err for an input gradient, ignoring its few largest differences: where an output lands
    within rounding of an activation kink (ReLU6 at 0 or 6), the provider and the fp32 reference
    may legitimately take different branches, and each such flip moves up to k*k elements of dx
    by a whole dy*w. Drops max(64, numel/10^4) elements: a handful of flips, never a wrong kernel
    (which is wrong almost everywhere)."""
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    d = (a - b).abs().flatten()
    drop = min(d.numel() - 1, max(64, d.numel() // 10_000))
    kept = d.kthvalue(d.numel() - drop).values if drop > 0 else d.max()
    return (kept / b.abs().max().clamp_min(1e-6)).item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _rotated(make: Callable[[], torch.Tensor], nbytes_each: int, device) -> Callable[[], torch.Tensor]:
    copies = 1 if torch.device(device).type == "cpu" else max(2, min(64, ROTATE_BYTES // max(1, nbytes_each)))
    items = [make() for _ in range(copies)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return nxt


def eager_kernel_kind(fn: Callable[[], object]) -> str:
    """'cudnn' or 'native' (PyTorch's conv_depthwise2d), from the kernel names of one profiled call."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"
    low = " ".join(names).lower()
    if "depthwise" in low and "cudnn" not in low:
        return "native"
    if any(s in low for s in ("cudnn", "xmma", "implicit_convolve", "sm80_", "sm90_", "cutlass")):
        return "cudnn"
    return "other: " + ",".join(sorted(set(n[:40] for n in names)))[:120]


class LayerBench:
    """Everything needed to check and time one LayerCase on one device."""

    def __init__(self, case: LayerCase, device="cuda", act: Optional[str] = None):
        self.case, self.device = case, torch.device(device)
        L, dtype = case.layer, DTYPES[case.dtype]
        self.L, self.dtype = L, dtype
        self.act = act or L.act
        self.blk = make_block(L, dtype, device, case.layout)
        self.scale, self.shift = fastdw.fold_bn(self.blk[1])
        self.w = self.blk[0].weight.detach()
        oh, ow = L.out_hw()
        esz = torch.finfo(dtype).bits // 8
        self.x_bytes, self.y_bytes = case.N * L.C * L.H * L.W * esz, case.N * L.C * oh * ow * esz
        self.w_bytes = L.C * L.k * L.k * esz + 2 * L.C * 4
        fmt = _fmt(case.layout)
        make_x = lambda: torch.randn(case.N, L.C, L.H, L.W, device=device, dtype=dtype).contiguous(memory_format=fmt)  # noqa: E731
        self.next_x = _rotated(make_x, self.x_bytes, device)
        self.x0 = self.next_x()
        self.dy = torch.randn(case.N, L.C, oh, ow, device=device, dtype=dtype).contiguous(memory_format=fmt)
        self.ref = dwconv_bn_act_ref(self.x0, self.w, self.scale, self.shift, L.stride, L.padding, 1, self.act)
        self.tol = 1e-3 if dtype == torch.float32 else (2e-2 if dtype == torch.float16 else 5e-2)
        self._ref_bwd = None
        self._ref_train = None
        self._compiled: Dict[str, nn.Module] = {}

    # bytes each mode must move (the same for every provider of a row)
    def bytes(self, mode: str) -> int:
        if mode == "inference":
            return self.x_bytes + self.y_bytes + self.w_bytes
        if mode == "backward":  # read x and dy, write dx
            return 2 * self.x_bytes + self.y_bytes + self.w_bytes
        # train: forward (read x, write y) + backward (read x, dy, write dx)
        return 3 * self.x_bytes + 2 * self.y_bytes + 2 * self.w_bytes

    def ref_backward(self):
        """fp32 (dx, dweight) of the eval block for dy."""
        if self._ref_bwd is None:
            blk = copy.deepcopy(self.blk).float()
            xf = self.x0.detach().float().requires_grad_(True)
            self._ref_bwd = torch.autograd.grad(blk(xf), [xf, blk[0].weight], self.dy.float())
        return self._ref_bwd

    def ref_train(self):
        """fp32 (y, dx) of one training step of the block (batch statistics)."""
        if self._ref_train is None:
            blk = copy.deepcopy(self.blk).float().train()
            xf = self.x0.detach().float().requires_grad_(True)
            y = blk(xf)
            (dx,) = torch.autograd.grad(y, [xf], self.dy.float())
            self._ref_train = (y.detach(), dx)
        return self._ref_train

    def _fused(self, backend):
        """The fused inference layer as a converted model runs it (DWConvBNAct2d in eval): on the
        CUDA backend with its parameters prepacked once (no pack launch per call)."""
        L = self.L
        w, scale, shift = self.w, self.scale, self.shift
        if backend == "cuda":
            w, scale, shift = fastdw.prepack_params(w, scale, shift)
        return lambda x: fastdw.dwconv_bn_act(x, w, scale, shift, L.stride, L.padding, 1, self.act,  # noqa: E731
                                              backend=backend)

    def _bwd_op(self, backend):
        if backend == "triton":
            fastdw.ops._triton_module()
            return torch.ops.fastdw._dwconv_bn_act_backward_triton.default
        return torch.ops.fastdw._dwconv_bn_act_backward.default

    def compiled(self, provider: str, train: bool) -> nn.Module:
        key = f"{provider}-{'train' if train else 'eval'}"
        if key not in self._compiled:
            blk = copy.deepcopy(self.blk).train(train)
            if provider == "compile":
                self._compiled[key] = torch.compile(blk)
            else:
                self._compiled[key] = torch.compile(blk, mode="max-autotune-no-cudagraphs")
        return self._compiled[key]

    def runner(self, provider: str, mode: str) -> Tuple[Callable[[], object], Callable[[], float], str]:
        """(timed fn, check fn returning max_rel_err, note) for provider in mode; raises
        NotImplementedError for a combination that does not exist (clone only has inference)."""
        L = self.L
        backend = {"fastdw_cuda": "cuda", "fastdw_triton": "triton", "fastdw_cpu": "cpu"}.get(provider)
        if provider == "clone":
            if mode != "inference":
                raise NotImplementedError
            return (lambda: self.next_x().clone()), (lambda: rel_err(self.x0.clone(), self.x0)), ""
        if mode == "inference":
            if backend:
                f = self._fused(backend)
                return (lambda: f(self.next_x())), (lambda: rel_err(f(self.x0), self.ref)), ""
            if provider == "eager":
                m = self.blk
            elif provider == "eager_folded":
                m = nn.Sequential(nn.Conv2d(L.C, L.C, L.k, L.stride, L.padding, groups=L.C, bias=True),
                                  _ACT_MODULES[self.act]())
                with torch.no_grad():
                    m[0].weight.copy_((self.w.float() * self.scale.view(-1, 1, 1, 1)))
                    m[0].bias.copy_(self.shift)
                m = m.eval().to(device=self.device, dtype=self.dtype, memory_format=_fmt(self.case.layout))
            elif provider in ("compile", "compile_max"):
                m = self.compiled(provider, train=False)
            else:
                raise ValueError(f"unknown provider {provider!r}")
            return (lambda: m(self.next_x())), (lambda: rel_err(m(self.x0), self.ref)), ""
        if mode == "backward":
            want = self.ref_backward()
            if backend:
                op = self._bwd_op(backend)
                args = (self.dy, self.x0, self.w, self.scale, self.shift, [L.stride] * 2, [L.padding] * 2, [1, 1],
                        self.act, [True, True, True, True], False)

                def check():
                    dx, dw, _, _ = op(*args)
                    return max(grad_err(dx, want[0]), rel_err(dw, want[1]))
                return (lambda: op(*args)), check, ""
            m = self.blk if provider == "eager" else (self.compiled(provider, train=False)
                                                     if provider in ("compile", "compile_max") else None)
            if m is None:
                raise NotImplementedError
            inner = getattr(m, "_orig_mod", m)
            params = [inner[0].weight, inner[1].weight, inner[1].bias]
            xr = self.x0.detach().requires_grad_(True)
            with torch.enable_grad():
                y = m(xr)

            def fn():
                return torch.autograd.grad(y, [xr] + params, self.dy, retain_graph=True)

            def check():
                g = fn()
                return max(grad_err(g[0], want[0]), rel_err(g[1], want[1]))
            return fn, check, ""
        if mode == "train":
            want_y, want_dx = self.ref_train()
            if backend:
                mod = fastdw.DWConvBNAct2d.from_modules(copy.deepcopy(self.blk[0]), copy.deepcopy(self.blk[1]),
                                                       act=self.act, backend=backend).train()
            elif provider == "eager":
                mod = copy.deepcopy(self.blk).train()
            elif provider in ("compile", "compile_max"):
                mod = self.compiled(provider, train=True)
            else:
                raise NotImplementedError

            def step(x):
                xr = x.detach().requires_grad_(True)
                y = mod(xr)
                y.backward(self.dy)
                return y, xr.grad

            def check():
                y, dx = step(self.x0)
                return max(rel_err(y, want_y), grad_err(dx, want_dx))
            return (lambda: step(self.next_x())), check, ""
        raise ValueError(f"unknown mode {mode!r}")

    def measure(self, provider: str, mode: str, repeats: int = 50, warmup: int = 10) -> Optional[dict]:
        """One results row (RESULTS spec), or None when the provider has no such mode."""
        L, c = self.L, self.case
        row = dict(net=L.net, layer=L.index, N=c.N, C=L.C, H=L.H, W=L.W, k=L.k, stride=L.stride, dtype=c.dtype,
                   layout=c.layout, act=self.act, mode=mode, provider=provider, bytes=self.bytes(mode),
                   median_us=None, p20_us=None, p80_us=None, max_rel_err=None, checked=False, note="")
        try:
            fn, check, note = self.runner(provider, mode)
        except NotImplementedError:
            return None
        grad = torch.enable_grad() if mode != "inference" else torch.no_grad()
        try:
            with grad:
                err = check()
            row["max_rel_err"] = err
            row["checked"] = bool(err <= self.tol)
            if not row["checked"]:
                row["note"] = f"check failed (max_rel_err {err:.3g} > {self.tol:g}); not timed"
                return row
            with grad:
                t = time_fn(fn, self.device, repeats, warmup)
                row.update(median_us=t.median_ms * 1e3, p20_us=t.p20_ms * 1e3, p80_us=t.p80_ms * 1e3)
                if provider in ("eager", "fastdw_cuda", "fastdw_triton") and self.device.type == "cuda":
                    row["host_us"] = host_time_us(fn, max(10, repeats // 2))
                if provider == "eager" and mode == "inference" and self.device.type == "cuda":
                    note = eager_kernel_kind(fn)
            row["note"] = note
        except Exception as e:  # noqa: BLE001 -- a provider that cannot run is recorded, not fatal
            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            row["checked"] = False
        return row


def host_time_us(fn: Callable[[], object], calls: int) -> float:
    """Host-inclusive time per call: wall clock over `calls` back-to-back calls, synchronized."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


# ------------------------------------------------------------------------------------------
# Whole networks


def _tv_model(net: str):
    import torchvision

    return getattr(torchvision.models, net)()


def randomize_bn(model: nn.Module, seed: int = 0, spread: float = 0.1) -> nn.Module:
    """Non-trivial BatchNorm parameters and statistics (fresh models have 1, 0, 0, 1, which hide
    scale/shift mistakes): gamma, var in [0.5, 1.5), beta, mean ~ N(0, spread^2)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * spread)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * spread)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def model_rows(net: str, N: int, dtype_name: str, layout: str, providers: Sequence[str], modes: Sequence[str],
               repeats: int = 30, device="cuda") -> List[dict]:
    dtype = DTYPES[dtype_name]
    fmt = _fmt(layout)
    H = INPUT_SIZE.get(net, 224)
    torch.manual_seed(0)
    stock = randomize_bn(_tv_model(net)).to(device=device, dtype=dtype, memory_format=fmt)
    fused = fastdw.convert(copy.deepcopy(stock))
    xs = [torch.randn(N, 3, H, H, device=device, dtype=dtype).contiguous(memory_format=fmt) for _ in range(2)]
    rows = []
    for mode in modes:
        for prov in providers:
            base = dict(model=net, N=N, H=H, dtype=dtype_name, layout=layout, mode=mode, provider=prov,
                        median_ms=None, p20_ms=None, p80_ms=None, max_rel_err=None, note="")
            kind, how = prov.split("_", 1)
            if how == "graph" and (mode != "inference" or N != 1 or torch.device(device).type != "cuda"):
                continue
            m = copy.deepcopy(stock if kind == "stock" else fused)
            try:
                fn, out_fn = _model_runner(m, how, mode, xs)
                ref_m = copy.deepcopy(stock)
                ref_fn, ref_out = _model_runner(ref_m, "eager", mode, xs)
                base["max_rel_err"] = rel_err(out_fn(), ref_out())
                t = time_fn(fn, torch.device(device), repeats, 5)
                base.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms)
            except Exception as e:  # noqa: BLE001
                base["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(base)
    return rows


def _model_runner(m: nn.Module, how: str, mode: str, xs: List[torch.Tensor]):
    """(timed fn, fn returning a comparable output) for a model in `how` (eager/compile/graph)."""
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(xs)
        return xs[state["i"]]

    if mode == "inference":
        m.eval()
        f = torch.compile(m) if how == "compile" else m
        if how == "graph":
            static_x = xs[0].clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.no_grad():
                for _ in range(3):
                    m(static_x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g), torch.no_grad():
                static_y = m(static_x)

            def run():
                static_x.copy_(nxt())
                g.replay()
                return static_y

            def out():
                static_x.copy_(xs[0])
                g.replay()
                return static_y.clone()
            return run, out

        def run():
            with torch.no_grad():
                return f(nxt())

        def out():
            with torch.no_grad():
                return f(xs[0])
        return run, out
    # train_step: forward, cross-entropy on fixed labels, backward, SGD step (in the model's dtype)
    m.train()
    for mod in m.modules():  # dropout off: stock and converted outputs must be comparable
        if isinstance(mod, nn.Dropout):
            mod.eval()
    f = torch.compile(m) if how == "compile" else m
    labels = torch.zeros(xs[0].shape[0], dtype=torch.long, device=xs[0].device)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: repeated steps keep the weights

    def run():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(f(nxt()).float(), labels)
        loss.backward()
        opt.step()
        return loss

    def out():
        opt.zero_grad(set_to_none=True)
        y = f(xs[0])
        nn.functional.cross_entropy(y.float(), labels).backward()
        return y.detach()
    return run, out


# ------------------------------------------------------------------------------------------
# The run: environment, progress, results file


def git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def clone_gbps(device: str = "cuda") -> float:
    n = (1 << 29) if device == "cuda" else (1 << 25)  # 1 GiB on a GPU; 64 MiB for a CPU rehearsal
    x = torch.empty(n, dtype=torch.float16, device=device).normal_()
    t = time_fn(lambda: x.clone(), torch.device(device), 20 if device == "cuda" else 5, 3 if device == "cuda" else 1)
    return 2 * x.numel() * x.element_size() / (t.median_ms * 1e-3) / 1e9


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return out.splitlines()[0] if out else ""
    except (OSError, subprocess.CalledProcessError):
        return ""


def environment() -> dict:
    if not torch.cuda.is_available():  # a CPU rehearsal (--dry): same fields, no GPU
        return {"schema": "fastdw-results/1", "commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                "device": f"cpu (dry run: {platform.processor() or platform.machine()})", "sm": "", "driver": "",
                "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": "", "triton": "",
                             "python": platform.python_version(), "fastdw": fastdw.__version__},
                "date": dt.date.today().isoformat(), "fastdw_build": fastdw.build_info(), "dry_run": True}
    props = torch.cuda.get_device_properties(0)
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = ""
    return {
        "schema": "fastdw-results/1",
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "device": props.name,
        "sm": f"{props.major}.{props.minor}",
        "driver": driver_version(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": str(torch.backends.cudnn.version()), "triton": tv,
                     "python": platform.python_version(), "fastdw": fastdw.__version__},
        "date": dt.date.today().isoformat(),
        "fastdw_build": fastdw.build_info(),
        # FASTDW_TRITON_AUTOTUNE=0 pins the Triton kernels' first config (gpu_check.sh's first call)
        "triton_autotune": os.environ.get("FASTDW_TRITON_AUTOTUNE", "1") != "0",
    }


def default_out(env: dict) -> Path:
    gpu = env["device"].lower().replace("nvidia", "").strip().split()[0] if env.get("device") else "gpu"
    return ROOT / "bench" / "results" / f"{env['date']}-{gpu}-{(env['commit'] or 'nogit')[:7]}.json"


class Progress:
    """A one-line progress bar on a terminal, one line per step otherwise (logs)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.t0, self.stream = max(1, total), 0, time.time(), stream
        self.tty = stream.isatty()

    def step(self, label: str, summary: str = ""):
        self.done += 1
        frac = self.done / self.total
        el = time.time() - self.t0
        eta = el / frac - el if frac > 0 else 0
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        msg = f"[{bar}] {self.done}/{self.total} {el:5.0f}s eta {eta:5.0f}s {label} {summary}"
        if self.tty:
            self.stream.write("\r" + msg[:200].ljust(200))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


def _csv(v: Optional[str], allowed: Sequence[str], what: str, conv=str) -> Optional[Tuple]:
    if v is None:
        return None
    try:
        items = tuple(conv(s.strip()) for s in v.split(",") if s.strip())
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise SystemExit(f"fastdw.bench: bad {what} in {v!r}: {e}") from None
    bad = [i for i in items if str(i) not in {str(a) for a in allowed}] if allowed else []
    if bad:
        raise SystemExit(f"fastdw.bench: unknown {what} {bad}; choose from {list(allowed)}")
    return items


def build_sweep(args) -> Sweep:
    s = QUICK if args.quick else STANDARD
    nets = _csv(args.net, tuple(NETWORKS), "network") or s.nets
    Ns = _csv(args.N, (), "N", positive_int) or s.Ns
    dtypes = _csv(args.dtype, tuple(DTYPES), "dtype") or s.dtypes
    layouts = _csv(args.layout, LAYOUTS, "layout") or s.layouts
    providers = _csv(args.provider, LAYER_PROVIDERS, "provider") or s.providers
    modes = _csv(args.mode, MODES, "mode") or s.modes
    model_nets = () if args.no_models else (tuple(n for n in s.model_nets if n in nets) or
                                            (s.model_nets if args.net is None else ()))
    return Sweep(nets, Ns, dtypes, layouts, providers, modes, model_nets,
                 _csv(args.model_N, (), "N", positive_int) or s.model_Ns, s.model_providers, s.model_modes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdw.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quick sweep: MobileNetV2, N=128, fp16, channels_last")
    ap.add_argument("--net", help=f"networks, comma separated ({', '.join(NETWORKS)})")
    ap.add_argument("--N", help="batch sizes, comma separated (standard: 1,32,128)")
    ap.add_argument("--dtype", help="float16,bfloat16,float32")
    ap.add_argument("--layout", help="channels_last,nchw")
    ap.add_argument("--provider", help=f"layer providers ({', '.join(LAYER_PROVIDERS)})")
    ap.add_argument("--mode", help="inference,backward,train")
    ap.add_argument("--model-N", help="batch sizes of the whole-network runs (standard: 1,32,128)")
    ap.add_argument("--no-models", action="store_true", help="skip the whole-network runs")
    ap.add_argument("--repeats", type=positive_int, default=50, help="timed calls per row (>= 50 for results files)")
    ap.add_argument("--budget-s", type=positive_float, default=None,
                    help="stop starting compile_max rows (slow autotuning) once this many seconds have passed")
    ap.add_argument("--out", help="results JSON (default bench/results/<date>-<gpu>-<sha>.json)")
    ap.add_argument("--list", action="store_true", help="print the cases of the sweep and exit")
    ap.add_argument("--dry", action="store_true",
                    help="CPU rehearsal of the sweep's harness (no GPU): fastdw's CPU kernels and the eager "
                         "providers on the sweep's first 3 layers at N=1 in fp32, a few repeats; same JSON "
                         "format, marked dry_run. Not a benchmark.")
    args = ap.parse_args(argv)
    sweep = build_sweep(args)
    if args.dry:
        gpu_only = [p for p in sweep.providers if p in ("fastdw_cuda", "fastdw_triton", "compile_max")]
        if gpu_only:
            print(f"[dry] skipping GPU providers {gpu_only}; adding fastdw_cpu", flush=True)
        provs = tuple(p for p in sweep.providers if p not in gpu_only) + ("fastdw_cpu",)
        sweep = Sweep(sweep.nets, (1,), ("float32",), sweep.layouts, provs, sweep.modes, (), (), (), ())
        args.repeats = min(args.repeats, 3)
    cases = layer_cases(sweep)
    if args.dry:
        cases = cases[:3]
    if args.list:
        for c in cases:
            print(c.name)
        print(f"{len(cases)} layer cases x {len(sweep.providers)} providers x {len(sweep.modes)} modes; "
              f"models: {list(sweep.model_nets)} at N {list(sweep.model_Ns)}")
        return 0
    if not torch.cuda.is_available() and not args.dry:
        print("fastdw.bench: no CUDA GPU is visible on this machine. The GPU sweeps need one; on a CPU use "
              "`pytest bench/bench_cpu.py` (fastdw's CPU kernels vs PyTorch) or `python -m fastdw`.",
              file=sys.stderr)
        return 2
    device = "cpu" if args.dry else "cuda"
    torch.backends.cudnn.benchmark = True
    env = environment()
    print(f"{env['device']} (sm_{env['sm']}), driver {env['driver']}; " +
          ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f"; commit {env['commit'][:10]}"
          f"{' (dirty)' if env['dirty'] else ''}", flush=True)
    avail = fastdw.available_backends()
    providers = [p for p in sweep.providers if not (p == "fastdw_cuda" and "cuda" not in avail)
                 and not (p == "fastdw_triton" and "triton" not in avail)]
    if len(providers) != len(sweep.providers):
        print(f"(skipping providers without a backend here: {sorted(set(sweep.providers) - set(providers))}; "
              f"backends {avail})", flush=True)
    env["clone_gbps"] = clone_gbps(device)
    print(f"clone bandwidth {env['clone_gbps']:.0f} GB/s", flush=True)
    res = dict(env, layers=[], models=[])
    out = Path(args.out) if args.out else default_out(env)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_jobs = [(n, N, m) for n in sweep.model_nets for N in sweep.model_Ns for m in sweep.model_modes]
    prog = Progress(len(cases) + len(model_jobs))
    t0 = time.time()
    for c in cases:
        lb = LayerBench(c, device=device)
        parts = []
        for mode in sweep.modes:
            for p in providers:
                if p == "compile_max" and args.budget_s is not None and time.time() - t0 > args.budget_s:
                    continue
                row = lb.measure(p, mode, repeats=args.repeats)
                if row is not None:
                    res["layers"].append(row)
                    if p in ("fastdw_cuda", "fastdw_cpu", "eager"):
                        parts.append(f"{p[:6]}/{mode[:3]} {row['median_us']:.1f}" if row["median_us"] else
                                     f"{p[:6]}/{mode[:3]} -")
        del lb
        if device == "cuda":
            torch.cuda.empty_cache()
        prog.step(c.name, " ".join(parts))
        out.write_text(json.dumps(res, indent=1))  # partial results survive an interrupted run
    for net, N, mode in model_jobs:
        res["models"] += model_rows(net, N, "float16", "channels_last", sweep.model_providers, [mode])
        prog.step(f"{net} N{N} {mode}")
        out.write_text(json.dumps(res, indent=1))
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out} ({len(res['layers'])} layer rows, {len(res['models'])} model rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
