"""Shared test machinery: seeds, device/dtype skips, layouts, sample inputs, tolerances (STYLE B5)."""
from __future__ import annotations

import os
import zlib
from typing import Optional, Sequence

import pytest
import torch

# CPU-only machine: the Triton kernels run through the Triton interpreter. It has to be on before
# fastdw.triton.dwconv_bn_act is imported (fastdw.ops imports it lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdw  # noqa: E402
from fastdw.reference import dwconv_bn_act_ref  # noqa: E402

# ------------------------------------------------------------------------------------------
# Seeds: every test gets its own reproducible seed (derived from its node id, so different
# parametrizations see different data, and a rerun of one case sees the same data).


@pytest.fixture(autouse=True)
def seed(request) -> int:
    s = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(s)
    return s


# ------------------------------------------------------------------------------------------
# Devices and dtypes. GPU cases skip (not fail) on a machine without a GPU, and on a GPU
# machine whose fastdw build has no GPU backend yet (the CUDA kernels come in a later issue).

HAS_CUDA = torch.cuda.is_available()
HAS_BF16_CUDA = HAS_CUDA and torch.cuda.is_bf16_supported()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_bf16_cuda = pytest.mark.skipif(not HAS_BF16_CUDA, reason="needs a CUDA device with bf16 support")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[requires_cuda, pytest.mark.gpu]),
]


def _gpu_backend_available() -> bool:
    return any(b in fastdw.available_backends() for b in ("cuda", "triton"))


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """'cpu', or 'cuda' (skipped without a GPU, or without a fastdw GPU backend in this build)."""
    if request.param == "cuda" and not _gpu_backend_available():
        pytest.skip(f"no fastdw GPU backend in this build (available: {fastdw.available_backends()}, "
                    f"build_info: {fastdw.build_info()})")
    return request.param


def skip_unsupported(device: str, dtype: torch.dtype) -> None:
    """fp64 exists on the CPU only (gradcheck); bf16 on CUDA needs sm80+."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is a CPU-only dtype of fastdw")
    if device == "cuda" and dtype == torch.bfloat16 and not HAS_BF16_CUDA:
        pytest.skip("bf16 not supported on this GPU")


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOWP = (torch.float16, torch.bfloat16)
ACTS = fastdw.ACTIVATIONS


def dtype_id(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}[dt]


# ------------------------------------------------------------------------------------------
# Layouts

LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted")


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` (N, C, H, W), stored in `layout`. The result is a leaf (detached).

    contiguous / channels_last: the two dense layouts the kernels read in place.
    sliced: a window big[:, :, 1:H+1, 2:W+2] of a wider NaN-filled buffer (causal-conv1d's wide
        buffer): not dense, and any read outside the window poisons the result.
    permuted: dense but neither contiguous nor channels_last: a (N, H, C, W)-contiguous tensor
        viewed as (N, C, H, W).
    """
    t = t.detach()
    if layout == "contiguous":
        return t.contiguous().clone()
    if layout == "channels_last":
        return t.clone().contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        N, C, H, W = t.shape
        big = torch.full((N, C, H + 3, W + 5), float("nan"), dtype=t.dtype, device=t.device)
        big[:, :, 1:H + 1, 2:W + 2] = t
        return big[:, :, 1:H + 1, 2:W + 2]
    if layout == "permuted":
        return t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    raise ValueError(f"unknown layout {layout!r}")


def expected_format(x: torch.Tensor) -> torch.memory_format:
    """The layout rule (STYLE B4), written out here independently of fastdw._utils."""
    cl = x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if (cl and not x.is_contiguous()) else torch.contiguous_format


def format_name(t: torch.Tensor) -> str:
    c, cl = t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)
    return {(True, True): "both", (True, False): "contiguous", (False, True): "channels_last",
            (False, False): f"strided{tuple(t.stride())}"}[(c, cl)]


def assert_format(t: torch.Tensor, fmt: torch.memory_format, what: str = "") -> None:
    assert t.is_contiguous(memory_format=fmt), (
        f"{what}: expected {fmt}, got {format_name(t)} (shape {tuple(t.shape)}, strides {t.stride()})")


# ------------------------------------------------------------------------------------------
# Sample inputs


def make_inputs(N: int, C: int, H: int, W: int, k=3, *, dtype=torch.float32, device="cpu",
                layout="contiguous", scale=True, shift=True, wdtype: Optional[torch.dtype] = None,
                ssdtype: Optional[torch.dtype] = torch.float32, requires_grad=False):
    """(x, weight, scale, shift) with values that exercise every activation region.

    weight ~ N(0, 1/(kH*kW)) keeps conv(x) ~ N(0, 1); scale in [0.5, 3] and shift ~ N(0, 1) put
    u = conv*scale + shift on both sides of 0, 6 (relu6) and +-3 (hardswish).
    """
    kh, kw = (k, k) if isinstance(k, int) else k
    wdtype = dtype if wdtype is None else wdtype
    ssdtype = torch.float32 if ssdtype is None else ssdtype
    x = to_layout(torch.randn(N, C, H, W, device=device).to(dtype), layout)
    w = (torch.randn(C, 1, kh, kw, device=device) / (kh * kw) ** 0.5).to(wdtype)
    s = (torch.rand(C, device=device) * 2.5 + 0.5).to(ssdtype) if scale else None
    b = torch.randn(C, device=device).to(ssdtype) if shift else None
    if requires_grad:
        for t in (x, w, s, b):
            if t is not None:
                t.requires_grad_(True)
    return x, w, s, b


def f32_copy(t: Optional[torch.Tensor], requires_grad: Optional[bool] = None) -> Optional[torch.Tensor]:
    """A detached fp32 (fp64 stays fp64) leaf with the same values (same rounding) as t."""
    if t is None:
        return None
    c = t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32).clone()
    rg = t.requires_grad if requires_grad is None else requires_grad
    return c.requires_grad_(rg)


def ref_forward(x, w, s, b, stride, padding, dilation, act, compute_dtype=torch.float32):
    return dwconv_bn_act_ref(x, w, s, b, stride, padding, dilation, act, compute_dtype=compute_dtype)


# ------------------------------------------------------------------------------------------
# Tolerances (STYLE B5)
#
# fp32 / fp64: torch.testing.assert_close against an fp64 reference with this table. The fp32
# atol is for sums of 9 products of O(1) numbers; sums of kH*kW products scale it by kH*kW/9 and
# reductions over N*OH*OW positions (dweight, dscale, dshift) pass their own `atol_scale`.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}


def kernel_scale(weight_or_k) -> float:
    if isinstance(weight_or_k, torch.Tensor):
        taps = weight_or_k.shape[-1] * weight_or_k.shape[-2]
    elif isinstance(weight_or_k, int):
        taps = weight_or_k * weight_or_k
    else:
        taps = weight_or_k[0] * weight_or_k[1]
    return max(1.0, taps / 9.0)


def reduction_scale(count: int) -> float:
    """atol factor for a sum over `count` terms: rounding errors of a sum grow like sqrt(count)."""
    return max(1.0, (count / 16.0) ** 0.5)


def _diff_summary(out: torch.Tensor, ref: torch.Tensor) -> str:
    if out.numel() == 0:
        return "empty"
    d = (out.double() - ref.double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    i = int(d.argmax())
    idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), out.shape))
    return (f"max|diff| = {d.max().item():.3e} at {idx} (out {out.flatten()[i].item():.6g}, "
            f"ref {ref.flatten()[i].item():.6g}), mean|diff| = {d.mean().item():.3e}, "
            f"max|ref| = {ref.double().abs().max().item():.3e}")


def assert_close_fp(out: torch.Tensor, ref: torch.Tensor, *, dtype: Optional[torch.dtype] = None,
                    atol_scale: float = 1.0, what: str = "") -> None:
    """fp32/fp64: assert_close vs an fp64 reference, with the TOL table (atol scaled)."""
    dtype = out.dtype if dtype is None else dtype
    tol = TOL[dtype]
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    prefix = f"{what}: " if what else ""
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol["rtol"], atol=tol["atol"] * atol_scale,
                               equal_nan=False, msg=lambda m: f"{prefix}{_diff_summary(out, ref)}\n{m}")


# (rtol, atol) caps on max|out - ref32| relative to max|ref32|, by the dtype of the compared tensor
# (an fp32 dscale/dweight can come out of an fp16 call).
LOWP_CAP = {
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (1e-2, 5e-2),
    torch.float32: (1e-4, 1e-4),
}


def lowp_check(out: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype,
               factor: float = 2.0) -> Optional[str]:
    """flash-attn's rule: max|out - ref32| <= factor * max|ref_lowp - ref32| + eps.

    ref32 is the fp32 reference computed from the same low-precision inputs; ref_lowp is stock
    PyTorch in the low-precision dtype (its error is the yardstick). eps = finfo(dtype).eps *
    max(1, max|ref32|): a correctly rounded result still differs from ref32 by up to half an ulp,
    and ulp(v) <= eps * |v|, so eps covers one final rounding to `dtype` (plus fp32 summation-order
    noise, which is far smaller) even where stock PyTorch happens to be exact. Returns None when
    it holds, else a message with max/mean abs diffs.
    """
    if out.shape != ref32.shape:
        return f"shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    if out.numel() == 0:
        return None
    o, r, s = out.double(), ref32.double(), ref_lowp.double()
    if not torch.equal(torch.isfinite(o), torch.isfinite(r)):
        return f"non-finite mismatch: {_diff_summary(out, ref32)}"
    err = (o - r).abs().max().item()
    stock = (s - r).abs()
    stock = torch.where(torch.isfinite(stock), stock, torch.zeros_like(stock)).max().item()
    ref_max = r.abs().max().item()
    eps = torch.finfo(dtype).eps * max(1.0, ref_max)
    bound = factor * stock + eps
    # Cap from the STYLE B5 table: where stock PyTorch's low-precision pre-activation lands on the
    # other side of a relu/relu6/hardswish kink, its gradient error is a whole g*scale, and twice
    # that would hide a real bug. The kernel computes u in fp32, like ref32, so it stays far below.
    rtol, atol = LOWP_CAP[out.dtype]
    cap = atol + rtol * ref_max
    if not err <= min(bound, cap):
        return (f"max|out - ref32| = {err:.3e} > min({factor} * max|stock_{dtype_id(dtype)} - ref32| "
                f"({stock:.3e}) + eps ({eps:.3e}) = {bound:.3e}, cap {atol:g} + {rtol:g} * max|ref32| = "
                f"{cap:.3e}); mean|out - ref32| = {(o - r).abs().mean().item():.3e}, mean|stock - ref32| = "
                f"{(s - r).abs().mean().item():.3e}; {_diff_summary(out, ref32)}")
    return None


def assert_lowp_close(out, ref32, ref_lowp, dtype, factor: float = 2.0, what: str = "") -> None:
    msg = lowp_check(out, ref32, ref_lowp, dtype, factor)
    assert msg is None, f"{what}: {msg}"


def check_close(out, ref64_or_32, ref_lowp=None, *, dtype, atol_scale=1.0) -> Optional[str]:
    """One entry point for sweeps that collect failures: None if close, else a message."""
    if dtype in LOWP:
        return lowp_check(out, ref64_or_32, ref_lowp, dtype)
    try:
        assert_close_fp(out, ref64_or_32, dtype=dtype, atol_scale=atol_scale)
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None


def report(failures: Sequence[str], total: int, what: str = "configs") -> None:
    """Assert once for a sweep, listing (the first 40 of) the failing configs."""
    if failures:
        shown = "\n  ".join(failures[:40])
        more = f"\n  ... and {len(failures) - 40} more" if len(failures) > 40 else ""
        pytest.fail(f"{len(failures)} of {total} {what} failed:\n  {shown}{more}", pytrace=False)


# ------------------------------------------------------------------------------------------
# Sample inputs for opcheck (tiny: opcheck runs the op many times, incl. under aot_autograd)

OPCHECK_CONFIGS = [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 5), (2, 1), (2, 2), (1, 2))]


def opcheck_samples(dtype=torch.float32, device="cpu", configs=OPCHECK_CONFIGS):
    """Yields (id, args) for torch.ops.fastdw.dwconv_bn_act.default: the four layouts x
    requires_grad False/True x with/without scale and shift x configs, the activation cycling
    through all five."""
    i = 0
    for layout in LAYOUTS:
        for rg in (False, True):
            for ss in (True, False):
                for k, s, p, d in configs:
                    act = ACTS[i % len(ACTS)]
                    i += 1
                    H, W = (5, 6) if layout != "permuted" else (6, 5)
                    x, w, sc, sh = make_inputs(2, 3, H, W, k, dtype=dtype, device=device, layout=layout,
                                               scale=ss, shift=ss, requires_grad=rg)
                    sid = (f"{dtype_id(dtype)}-{layout}-{'grad' if rg else 'nograd'}-{'ss' if ss else 'noss'}-"
                           f"k{k[0]}x{k[1]}s{s[0]}{s[1]}p{p[0]}{p[1]}d{d[0]}{d[1]}-{act}")
                    yield sid, (x, w, sc, sh, list(s), list(p), list(d), act)


# ------------------------------------------------------------------------------------------
# Every test that needs a GPU carries the `gpu` marker, whichever way it says so (the cuda
# device parameter, requires_cuda, a module's own skipif), so `pytest -m gpu` on a GPU machine
# runs exactly the GPU suite (scripts/gpu_check.sh full).


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            continue
        for m in item.iter_markers("skipif"):
            reason = str(m.kwargs.get("reason", ""))
            if "CUDA device" in reason or "needs a GPU" in reason:
                item.add_marker(pytest.mark.gpu)
                break
