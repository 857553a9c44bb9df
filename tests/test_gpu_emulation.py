"""The CUDA kernels' per-thread bodies, run on the CPU by the emulation ops.

torch.ops.fastdw._dwconv_bn_act_gpu_emulated / _backward_gpu_emulated execute exactly the bodies
that csrc/dwconv_bn_act_{fwd,bwd}.cu launch (same plan, same path choice), one thread index at a
time. These tests check their indexing, vector paths, bounds and reductions against the
reference on any machine; on a GPU, test_dwconv_bn_act.py runs the real kernels.
"""
import pytest
import torch

from fastdw.reference import dwconv_bn_act_ref, dwconv_bn_act_train_ref

EMU_FWD = torch.ops.fastdw._dwconv_bn_act_gpu_emulated.default
EMU_BWD = torch.ops.fastdw._dwconv_bn_act_backward_gpu_emulated.default
PATH = torch.ops.fastdw._dwconv_bn_act_gpu_path.default
EMU_TRAIN_FWD = torch.ops.fastdw._dwconv_bn_act_train_gpu_emulated.default

CONFIGS = [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 0, 1), (5, 1, 2, 1), (5, 2, 2, 1), (7, 1, 3, 1), (7, 2, 3, 1),
           (3, 1, 2, 2), (4, 3, 0, 1)]
ACTS = ["none", "relu", "relu6", "hardswish", "silu"]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _layout(x, layout):
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "sliced_cl":  # channels_last view at an offset that is not 16-byte aligned
        big = torch.empty(x.shape[0], x.shape[1] + 1, x.shape[2], x.shape[3], dtype=x.dtype)
        big = big.to(memory_format=torch.channels_last)[:, 1:]
        big.copy_(x)
        return big
    return x.contiguous()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [8, 17, 32])
def test_forward_bodies_match_reference(C, dtype, layout):
    fails = []
    for k, s, p, d in CONFIGS:
        x = _layout(torch.randn(2, C, 11, 13).to(dtype), layout)
        w = torch.randn(C, 1, k, k).to(dtype)
        sc, sh = torch.rand(C) + 0.5, torch.randn(C)
        for act in ACTS:
            y = EMU_FWD(x, w, sc, sh, [s, s], [p, p], [d, d], act)
            ref = dwconv_bn_act_ref(x, w, sc, sh, s, p, d, act)
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last if layout != "contiguous"
                                                        else torch.contiguous_format)
            err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
            if not err <= TOL[dtype]:
                fails.append(f"k{k}s{s}p{p}d{d} {act} path={PATH(x, w, [s, s], [p, p], [d, d])}: rel err {err:.2e}")
    assert not fails, "\n".join(fails)


def test_forward_path_choice():
    x = torch.randn(2, 16, 9, 9).to(memory_format=torch.channels_last)
    w = torch.randn(16, 1, 3, 3)
    # 3x3 stride 1 / 2 channels_last: the register-window kernel (small problem: one vector a thread)
    assert PATH(x, w, [1, 1], [1, 1], [1, 1]) == "nhwc_win3s1_single"
    assert PATH(x.half(), w.half(), [2, 2], [1, 1], [1, 1]) == "nhwc_win3s2_single"
    big = torch.randn(8, 64, 128, 128).half().to(memory_format=torch.channels_last)  # >= 32768 strip threads
    assert PATH(big, torch.randn(64, 1, 3, 3).half(), [1, 1], [1, 1], [1, 1]) == "nhwc_win3s1_strip"
    # 5x5 / 7x7: the one-channel-per-thread window kernel, both layouts; other sizes the general path
    for k in (5, 7):
        for s in (1, 2):
            assert PATH(x, torch.randn(16, 1, k, k), [s, s], [k // 2] * 2, [1, 1]) == f"nhwc_scalar_win{k}s{s}"
            assert PATH(x.contiguous(), torch.randn(16, 1, k, k), [s, s], [k // 2] * 2, [1, 1]) == \
                f"nchw_scalar_win{k}s{s}"
    assert PATH(x, torch.randn(16, 1, 4, 4), [1, 1], [1, 1], [1, 1]) == "general"
    # dilation: the scalar window kernel, one phase per residue of the output index
    assert PATH(x, w, [1, 1], [2, 2], [2, 2]) == "nhwc_scalar_win3s1d2"
    assert PATH(x.contiguous(), w, [1, 1], [2, 2], [2, 2]) == "nchw_scalar_win3s1d2"
    assert PATH(x.contiguous(), torch.randn(16, 1, 5, 5), [2, 2], [4, 4], [3, 3]) == "nchw_scalar_win5s2d3"
    assert PATH(x, w, [2, 2], [2, 2], [2, 4]) == "nhwc_scalar_win3s2d2x4"  # phase strides 1 and 1
    assert PATH(x, w, [2, 2], [2, 2], [2, 3]) == "nhwc_vec3"  # phase strides 1 and 2 differ
    assert PATH(x, w, [1, 2], [1, 1], [1, 1]) == "nhwc_vec3"  # unequal strides
    assert PATH(x, w, [3, 3], [1, 1], [1, 1]) == "nhwc_vec3"  # stride 3
    assert PATH(x.contiguous(), w, [3, 3], [1, 1], [1, 1]) == "general"
    # NCHW 3x3 stride 1 / 2: its own window kernel
    assert PATH(x.contiguous(), w, [1, 1], [1, 1], [1, 1]) == "nchw_win3s1"
    assert PATH(x.contiguous(), w, [2, 2], [1, 1], [1, 1]) == "nchw_win3s2"
    # channels_last with C not a multiple of the vector width: the scalar window kernel
    x17 = torch.randn(2, 17, 9, 9).to(memory_format=torch.channels_last)
    assert PATH(x17, torch.randn(17, 1, 3, 3), [1, 1], [1, 1], [1, 1]) == "nhwc_scalar_win3s1"
    # channels_last-contiguous but 2 bytes off 16-byte alignment: the scalar window kernel
    assert PATH(_misaligned_cl(torch.randn(2, 16, 9, 9).half()), w.half(), [1, 1], [1, 1], [1, 1]) == \
        "nhwc_scalar_win3s1"
    # a channels_last view one channel in is not channels_last-contiguous: by the layout rule it is
    # made contiguous (NCHW) and takes the NCHW kernel
    assert PATH(_layout(torch.randn(2, 16, 9, 9), "sliced_cl"), w, [1, 1], [1, 1], [1, 1]) == "nchw_win3s1"
    x12 = torch.randn(2, 12, 9, 9).half().to(memory_format=torch.channels_last)  # 12 % 8 != 0 in fp16
    assert PATH(x12, torch.randn(12, 1, 3, 3).half(), [1, 1], [1, 1], [1, 1]) == "nhwc_scalar_win3s1"


def _misaligned_cl(x):
    """A channels_last-contiguous copy of x whose data starts one element past a 16-byte boundary."""
    N, C, H, W = x.shape
    flat = torch.empty(N * C * H * W + 1, dtype=x.dtype)[1:]
    y = flat.view(N, H, W, C).permute(0, 3, 1, 2)
    y.copy_(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.data_ptr() % 16 != 0
    return y


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_scalar_window_kernel(dtype):
    """The one-channel-per-thread window kernel: 3x3 with odd C or an unaligned view, 5x5 and 7x7
    in both layouts, stride 1 and 2, padding 0 to k//2, planes narrower and wider than its strip
    (8 rows x 8 or 4 columns), every activation, the training op's center through the emulated
    training forward."""
    gen = torch.Generator().manual_seed(3)
    fails, paths = [], set()
    cases = [(3, 17, "channels_last"), (3, 16, "misaligned"), (5, 12, "channels_last"), (7, 9, "channels_last"),
             (5, 6, "contiguous"), (7, 5, "contiguous")]
    for k, C, layout in cases:
        for s in (1, 2):
            for H, W in ((1, 1), (7, 9), (19, 17), (12, 3)):
                for pad in (0, k // 2):
                    if H + 2 * pad < k or W + 2 * pad < k:
                        continue
                    act = ACTS[(H + W + k + s + pad) % len(ACTS)]
                    x = torch.randn(2, C, H, W, generator=gen).to(dtype)
                    x = _misaligned_cl(x) if layout == "misaligned" else _layout(x, layout)
                    w = torch.randn(C, 1, k, k, generator=gen).to(dtype)
                    sc, sh = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
                    paths.add(PATH(x, w, [s, s], [pad, pad], [1, 1]))
                    y = EMU_FWD(x, w, sc, sh, [s, s], [pad, pad], [1, 1], act)
                    ref = dwconv_bn_act_ref(x, w, sc, sh, s, pad, 1, act)
                    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
                    if not err <= TOL[dtype]:
                        fails.append(f"k{k} C{C} {layout} s{s} p{pad} {H}x{W} {act}: rel err {err:.2e}")
                    if H * W > 4:  # the training forward: center = the batch mean
                        yt, m, v = EMU_TRAIN_FWD(x, w, None, sc, sh, [s, s], [pad, pad], [1, 1], 1e-5, act)
                        rt, _, _ = dwconv_bn_act_train_ref(x, w, None, sc, sh, s, pad, 1, 1e-5, act)
                        err = ((yt.float() - rt).abs().max() / rt.abs().max().clamp_min(1)).item()
                        if not err <= 4 * TOL[dtype]:
                            fails.append(f"train k{k} C{C} {layout} s{s} p{pad} {H}x{W} {act}: rel err {err:.2e}")
    assert {p for p in paths if "scalar_win" in p} >= {"nhwc_scalar_win3s1", "nhwc_scalar_win5s2",
                                                       "nhwc_scalar_win7s1", "nchw_scalar_win5s1",
                                                       "nchw_scalar_win7s2"}, paths
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "misaligned"])
def test_dilated_scalar_window_kernel(layout):
    """Dilation through the scalar window kernel's phases: dilation 2-5 with stride 1 and 2 (even
    and odd dilations give phase strides 1 and 2), unequal dilations per axis, padding from 0 to
    past the dilated half-width, planes smaller than a phase's strip and than the dilated kernel,
    every activation, and the training forward's center."""
    gen = torch.Generator().manual_seed(5)
    dtype = torch.float16 if layout == "misaligned" else torch.float32
    fails, paths = [], set()
    cases = [(3, 1, (2, 2)), (3, 2, (2, 2)), (3, 1, (4, 4)), (3, 2, (3, 3)), (5, 1, (2, 3)), (7, 2, (2, 2)),
             (5, 2, (5, 5)), (3, 1, (1, 2))]
    for k, s, (dh, dw) in cases:
        for H, W in ((5, 6), (17, 23), (30, 9)):
            for pad in (0, (k // 2) * dh, (k // 2) * dh + 1):
                if H + 2 * pad < (k - 1) * dh + 1 or W + 2 * pad < (k - 1) * dw + 1:
                    continue
                C = 5 if layout == "contiguous" else 16
                act = ACTS[(H + k + s + pad + dh) % len(ACTS)]
                x = torch.randn(2, C, H, W, generator=gen).to(dtype)
                x = _misaligned_cl(x) if layout == "misaligned" else _layout(x, layout)
                w = torch.randn(C, 1, k, k, generator=gen).to(dtype)
                sc, sh = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
                paths.add(PATH(x, w, [s, s], [pad, pad], [dh, dw]))
                y = EMU_FWD(x, w, sc, sh, [s, s], [pad, pad], [dh, dw], act)
                ref = dwconv_bn_act_ref(x, w, sc, sh, s, pad, (dh, dw), act)
                err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
                if not err <= TOL[dtype]:
                    fails.append(f"k{k} s{s} d{dh}x{dw} p{pad} {H}x{W} {act}: rel err {err:.2e}")
                yt, _, _ = EMU_TRAIN_FWD(x, w, None, sc, sh, [s, s], [pad, pad], [dh, dw], 1e-5, act)
                rt, _, _ = dwconv_bn_act_train_ref(x, w, None, sc, sh, s, pad, (dh, dw), 1e-5, act)
                err = ((yt.float() - rt).abs().max() / rt.abs().max().clamp_min(1)).item()
                if not err <= 4 * TOL[dtype]:
                    fails.append(f"train k{k} s{s} d{dh}x{dw} p{pad} {H}x{W} {act}: rel err {err:.2e}")
    prefix = "nchw" if layout == "contiguous" else "nhwc"
    assert {f"{prefix}_scalar_win3s1d2", f"{prefix}_scalar_win3s2d3", f"{prefix}_scalar_win5s1d2x3",
            f"{prefix}_scalar_win7s2d2", f"{prefix}_scalar_win3s1d1x2"} <= paths, paths
    assert not fails, "\n".join(fails)


def test_int32_window_limits():
    """The window kernels keep 32-bit offsets inside an image and a 32-bit thread decode: a large
    batch of ordinary images stays on them, an image past 2^31 elements (with its padding and
    strip overhang) or a thread count past 2^31 goes to the int64 kernels. Uninitialised tensors:
    nothing is computed or touched (no memory is committed), only the path chosen."""
    big_batch = torch.empty(16400, 32, 64, 64, dtype=torch.float16, memory_format=torch.channels_last)
    assert big_batch.numel() > 2 ** 31
    w3 = torch.empty(32, 1, 3, 3, dtype=torch.float16)
    assert PATH(big_batch, w3, [1, 1], [1, 1], [1, 1]) == "nhwc_win3s1_strip"
    assert PATH(big_batch, torch.empty(32, 1, 5, 5, dtype=torch.float16), [1, 1], [2, 2], [1, 1]) == \
        "nhwc_scalar_win5s1"
    # one image of 8 x 16384 x 16400 elements: past 2^31
    shape = (1, 8, 16384, 16400)
    huge = torch.empty(shape, dtype=torch.float16, memory_format=torch.channels_last)
    assert huge.numel() > 2 ** 31
    w8 = torch.empty(8, 1, 3, 3, dtype=torch.float16)
    assert PATH(huge, w8, [1, 1], [1, 1], [1, 1]) == "nhwc_vec3"
    # the same tensor in NCHW: 8 planes of 2.7e8 elements, each within int32
    assert PATH(torch.empty(shape, dtype=torch.float16), w8, [1, 1], [1, 1], [1, 1]) == "nchw_win3s1"
    # just under: 8 x 16000 x 16000 with the padding and the overhang is still < 2^31
    near = torch.empty(1, 8, 16000, 16000, dtype=torch.float16, memory_format=torch.channels_last)
    assert PATH(near, w8, [1, 1], [1, 1], [1, 1]) == "nhwc_win3s1_strip"
    assert PATH(torch.empty(near.shape, dtype=torch.float16), w8, [1, 1], [1, 1], [1, 1]) == "nchw_win3s1"
    # the dilation widens the overhang: the same image at dilation 64 crosses the limit
    assert PATH(near, w8, [1, 1], [64, 64], [64, 64]) == "nhwc_vec3"
    # NCHW offsets span one plane: 2048 planes of 1024 x 1024 (2^31 elements) stay on the window
    # kernel, a single plane past 2^31 elements does not
    h = dict(dtype=torch.float16)
    planes = torch.empty(1, 2048, 1024, 1024, **h)
    assert PATH(planes, torch.empty(2048, 1, 3, 3, **h), [1, 1], [1, 1], [1, 1]) == "nchw_win3s1"
    assert PATH(planes, torch.empty(2048, 1, 5, 5, **h), [1, 1], [2, 2], [2, 2]) == "nchw_scalar_win5s1d2"
    assert PATH(torch.empty(1, 1, 46400, 46400, **h), torch.empty(1, 1, 3, 3, **h), [1, 1], [1, 1], [1, 1]) == \
        "general"


def _win_case(N, C, H, W, s, dtype, layout, act, gen):
    x = _layout(torch.randn(N, C, H, W, generator=gen).to(dtype), layout)
    w = torch.randn(C, 1, 3, 3, generator=gen).to(dtype)
    sc, sh = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    y = EMU_FWD(x, w, sc, sh, [s, s], [1, 1], [1, 1], act)
    ref = dwconv_bn_act_ref(x, w, sc, sh, s, 1, 1, act)
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1)).item() if ref.numel() else 0.0
    return err, PATH(x, w, [s, s], [1, 1], [1, 1])


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_window_kernels_awkward_shapes(dtype, layout):
    """The register-window kernels (channels_last and NCHW, 3x3, stride 1 and 2) on planes of every
    width from 1 to 15 and heights around the strip height (16 rows),
    where strips straddle the borders, N = 0 and 1, every activation."""
    gen = torch.Generator().manual_seed(0)
    fails, paths = [], set()
    C = 16 if dtype != torch.float32 else 12
    for W in range(1, 16):
        for H, N in ((1, 1), (7, 2), (16, 1), (17, 1), (33, 1), (5, 0)):
            for s in (1, 2):
                act = ACTS[(W + H + s) % len(ACTS)]
                err, path = _win_case(N, C, H, W, s, dtype, layout, act, gen)
                paths.add(path)
                if not err <= TOL[dtype]:
                    fails.append(f"N{N} {H}x{W} s{s} {act} {path}: rel err {err:.2e}")
    want = {"nhwc_win3s1_single", "nhwc_win3s2_single"} if layout == "channels_last" else {"nchw_win3s1",
                                                                                            "nchw_win3s2"}
    assert want <= paths, paths
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_window_strip_tile(dtype, s):
    """The strip tile (16 rows x 2 or 1 columns per thread) on a problem large enough to select it,
    with a plane whose height and width are not multiples of the strip."""
    gen = torch.Generator().manual_seed(1)
    C = 64 if dtype != torch.float32 else 32
    N, H, W = (8, 131, 130) if s == 1 else (16, 157, 134)
    err, path = _win_case(N, C, H, W, s, dtype, "channels_last", "relu6", gen)
    assert path == f"nhwc_win3s{s}_strip"
    assert err <= TOL[dtype], err


def test_packed_parameters_read_any_strides_and_dtypes():
    """Weight, scale and shift go through one pack kernel that reads them in place: a weight slice
    with odd strides, scale / shift as strided views, fp16 parameters."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 12, 12, generator=gen).to(memory_format=torch.channels_last)
    wbig = torch.randn(32, 1, 5, 5, generator=gen)
    w = wbig[::2, :, 1:4, 1:4]  # (16, 1, 3, 3) with strides (50, 25, 5, 1)
    sbig, bbig = torch.rand(48, generator=gen) + 0.5, torch.randn(48, generator=gen)
    sc, sh = sbig[::3], bbig[1::3]
    for wt, a, b in ((w, sc, sh), (w.half(), sc.half(), sh.half()), (w, None, sh), (w, sc, None)):
        xx = x.half() if wt.dtype == torch.float16 else x
        for s in (1, 2):
            y = EMU_FWD(xx, wt, a, b, [s, s], [1, 1], [1, 1], "silu")
            ref = dwconv_bn_act_ref(xx, wt, a, b, s, 1, 1, "silu")
            tol = TOL[xx.dtype]
            assert ((y.float() - ref).abs().max() / ref.abs().max()).item() <= tol
            yc = EMU_FWD(xx.contiguous(), wt, a, b, [s, s], [1, 1], [1, 1], "silu")
            assert ((yc.float() - ref).abs().max() / ref.abs().max()).item() <= tol


LAUNCHES = torch.ops.fastdw._dwconv_bn_act_gpu_launches.default


@pytest.mark.parametrize("case", ["cl_fp16_3x3s1", "cl_bf16_3x3s2", "nchw_fp32_3x3s1", "cl_fp32_5x5s1",
                                  "cl_fp16_c12_3x3", "nchw_fp32_7x7s2_d2", "cl_fp32_k4_general"])
def test_prepacked_parameters_skip_the_pack_launch(case):
    """fastdw.prepack_params: the forward reads the packed views in place (one launch per call,
    not two) and gives bitwise the result of the original parameters."""
    import fastdw

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case.split("_")[1]]
    C = 12 if "c12" in case else 16
    k = int(case.split("x")[-1][0]) if "x" in case else 4
    s = 2 if "s2" in case else 1
    d = 2 if "_d2" in case else 1
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, C, 13, 11, generator=gen).to(dtype)
    x = x.contiguous() if case.startswith("nchw") else x.to(memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, generator=gen).to(dtype)
    sc, sh = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    pw, ps, pb = fastdw.prepack_params(w, sc, sh)
    assert pw.dtype == ps.dtype == pb.dtype == torch.float32 and pw.shape == w.shape
    args = ([s, s], [k // 2 * d] * 2, [d, d], "hardswish")
    plain = LAUNCHES(x, w, sc, sh, *args)
    assert plain[0] == "PackParams" and len(plain) == 2, plain
    assert LAUNCHES(x, pw, ps, pb, *args) == plain[1:]
    y = EMU_FWD(x, w, sc, sh, *args)
    assert torch.equal(EMU_FWD(x, pw, ps, pb, *args), y)
    ref = dwconv_bn_act_ref(x, w, sc, sh, s, k // 2 * d, d, "hardswish")
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() <= TOL[dtype]
    # the inference backward reads them in place too: same dx
    dy = torch.randn(y.shape, generator=gen).to(dtype).to(memory_format=torch.channels_last
                                                         if x.is_contiguous(memory_format=torch.channels_last)
                                                         else torch.contiguous_format)
    mask = [True, False, False, False]
    assert torch.equal(EMU_BWD(dy, x, pw, ps, pb, *args, mask, True)[0], EMU_BWD(dy, x, w, sc, sh, *args, mask, True)[0])


def test_prepack_recognition_is_by_address_only():
    """Views that are not exactly the packed layout (an offset base, separate scale / shift, a
    missing shift) are packed as usual, and every variant computes the same numbers."""
    import fastdw

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 8, 9, 9, generator=gen).to(memory_format=torch.channels_last)
    w, sc, sh = torch.randn(8, 1, 3, 3, generator=gen), torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    pw, ps, pb = fastdw.prepack_params(w, sc, sh)
    args = ([1, 1], [1, 1], [1, 1], "relu6")
    y = EMU_FWD(x, w, sc, sh, *args)
    # the same layout one float further on: not 16-byte aligned
    flat = torch.zeros(11 * 8 + 1)
    flat[1:].copy_(torch.cat([pw.permute(2, 3, 0, 1).reshape(9, 8), ps[None], pb[None]]).reshape(-1))
    qw, qs, qb = flat[1:73].view(9, 8).t().view(8, 1, 3, 3), flat[73:81], flat[81:89]
    assert torch.equal(qw, pw) and torch.equal(qs, ps) and torch.equal(qb, pb)
    for ww, a, b in ((qw, qs, qb), (pw, ps.clone(), pb), (pw, ps, pb.clone()), (pw, ps, None)):
        assert LAUNCHES(x, ww, a, b, *args)[0] == "PackParams"
        want = y if b is not None else EMU_FWD(x, w, sc, None, *args)
        assert torch.equal(EMU_FWD(x, ww, a, b, *args), want)
    assert LAUNCHES(x, pw, ps, pb, *args)[0] != "PackParams"
    # scale / shift None: packed as 1 / 0
    nw, ns, nb = fastdw.prepack_params(w)
    assert torch.equal(ns, torch.ones(8)) and torch.equal(nb, torch.zeros(8))
    assert torch.equal(EMU_FWD(x, nw, ns, nb, *args), EMU_FWD(x, w, None, None, *args))


def test_prepack_params_errors():
    import fastdw

    with pytest.raises(ValueError, match=r"\(C, 1, kH, kW\)"):
        fastdw.prepack_params(torch.randn(8, 2, 3, 3))
    with pytest.raises(ValueError, match=r"scale must be a \(8,\) tensor"):
        fastdw.prepack_params(torch.randn(8, 1, 3, 3), torch.ones(7))
    with pytest.raises(ValueError, match=r"shift must be a \(8,\) tensor"):
        fastdw.prepack_params(torch.randn(8, 1, 3, 3), None, torch.ones(8, 1))


def test_unaligned_channels_last_input_is_correct():
    x = _layout(torch.randn(2, 16, 9, 9), "sliced_cl")
    w = torch.randn(16, 1, 3, 3)
    y = EMU_FWD(x, w, None, None, [1, 1], [1, 1], [1, 1], "relu6")
    torch.testing.assert_close(y, dwconv_bn_act_ref(x, w, None, None, 1, 1, 1, "relu6"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("C", [8, 17])
def test_backward_bodies_match_reference(C, layout):
    fails = []
    for k, s, p, d in CONFIGS:
        for act in ACTS:
            x = _layout(torch.randn(2, C, 11, 13, dtype=torch.float64), layout)
            w = torch.randn(C, 1, k, k, dtype=torch.float64)
            sc, sh = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
            leaves = [t.clone().requires_grad_(True) for t in (x, w, sc, sh)]
            ref = dwconv_bn_act_ref(*leaves, s, p, d, act)
            g = torch.randn_like(ref)
            want = torch.autograd.grad(ref, leaves, g)
            got = EMU_BWD(g.float(), x.float(), w.float(), sc.float(), sh.float(), [s, s], [p, p], [d, d], act,
                          [True] * 4, True)
            for name, a, b in zip(("dx", "dweight", "dscale", "dshift"), got, want):
                err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1)).item()
                if not err <= 1e-5:
                    fails.append(f"k{k}s{s}p{p}d{d} {act} {name}: rel err {err:.2e}")
            assert got[0].is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                        else torch.contiguous_format)
    assert not fails, "\n".join(fails)


def test_backward_masks_empty_and_low_precision():
    x = torch.randn(2, 16, 9, 9).half().to(memory_format=torch.channels_last)
    w = torch.randn(16, 1, 3, 3)  # fp32 weight with fp16 x
    sc, sh = torch.rand(16) + 0.5, torch.randn(16)
    g = torch.randn(2, 16, 9, 9).half()
    dx, dw, ds, db = EMU_BWD(g, x, w, sc, sh, [1, 1], [1, 1], [1, 1], "hardswish", [False, True, False, True], False)
    assert dx.shape == (0,) and ds.shape == (0,) and dw.dtype == torch.float32 and db.shape == (16,)
    leaves = [t.float().clone().requires_grad_(True) for t in (x, w, sc, sh)]
    ref = dwconv_bn_act_ref(*leaves, 1, 1, 1, "hardswish")
    want = torch.autograd.grad(ref, leaves, g.float())
    torch.testing.assert_close(dw, want[1], rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(db, want[3], rtol=1e-3, atol=1e-2)
    # N == 0: zero gradients of the right shapes
    e = torch.randn(0, 16, 9, 9)
    dx, dw, ds, db = EMU_BWD(torch.randn(0, 16, 9, 9), e, w, sc, sh, [1, 1], [1, 1], [1, 1], "relu", [True] * 4, False)
    assert dx.shape == e.shape and not dw.any() and not ds.any() and not db.any()


def test_deterministic_repeatable():
    x = torch.randn(4, 24, 20, 20).to(memory_format=torch.channels_last)
    w, sc, sh = torch.randn(24, 1, 3, 3), torch.rand(24) + 0.5, torch.randn(24)
    g = torch.randn(4, 24, 20, 20)
    a = EMU_BWD(g, x, w, sc, sh, [1, 1], [1, 1], [1, 1], "relu6", [True] * 4, True)
    b = EMU_BWD(g, x, w, sc, sh, [1, 1], [1, 1], [1, 1], "relu6", [True] * 4, True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_awkward_sizes_forward_and_backward(layout):
    """Tiny and lopsided planes, where every output column is a border column."""
    fails, n = [], 0
    for H, W in ((1, 1), (2, 7), (15, 2), (3, 3)):
        for k in (3, 5):
            for s in (1, 2):
                for p in (0, 1, 2):
                    for d in (1, 2):
                        if d * (k - 1) + 1 > min(H, W) + 2 * p:
                            continue
                        n += 1
                        x = _layout(torch.randn(2, 8, H, W, dtype=torch.float64), layout)
                        w = torch.randn(8, 1, k, k, dtype=torch.float64)
                        sc, sh = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
                        leaves = [t.clone().requires_grad_(True) for t in (x, w, sc, sh)]
                        ref = dwconv_bn_act_ref(*leaves, s, p, d, "hardswish")
                        y = EMU_FWD(x.float(), w.float(), sc.float(), sh.float(), [s, s], [p, p], [d, d], "hardswish")
                        g = torch.randn_like(ref)
                        want = (ref,) + torch.autograd.grad(ref, leaves, g)
                        got = (y,) + EMU_BWD(g.float(), x.float(), w.float(), sc.float(), sh.float(), [s, s], [p, p],
                                             [d, d], "hardswish", [True] * 4, False)
                        for name, a, b in zip(("y", "dx", "dweight", "dscale", "dshift"), got, want):
                            err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1)).item() if b.numel() else 0
                            if not err <= 1e-5:
                                fails.append(f"{H}x{W} k{k}s{s}p{p}d{d} {name}: rel err {err:.2e}")
    assert n > 20 and not fails, "\n".join(fails)


BWD_LAUNCHES = torch.ops.fastdw._dwconv_bn_act_backward_gpu_launches.default
FUSED = ["PackParams", "BwdFused", "BwdReduceTiles", "BwdReduceGroups"]
GENERAL = ["PackParams", "BwdGu", "BwdDx", "BwdPartial", "BwdFinish"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_launches(layout):
    """3x3 at stride 1 / 2 without dilation: one fused kernel and the two finish stages (no gu
    workspace); everything else the general kernels. Weight-less masks skip the finish."""
    x = _layout(torch.randn(2, 8, 12, 12), layout)
    sc, sh = torch.rand(8) + 0.5, torch.randn(8)

    def launches(k, s, p, d, mask=(True,) * 4):
        w = torch.randn(8, 1, k, k)
        OH = (12 + 2 * p - d * (k - 1) - 1) // s + 1
        g = torch.randn(2, 8, OH, OH)
        return BWD_LAUNCHES(g, x, w, sc, sh, [s, s], [p, p], [d, d], "relu6", list(mask))

    assert launches(3, 1, 1, 1) == FUSED
    assert launches(3, 2, 1, 1) == FUSED
    assert launches(3, 1, 0, 1) == FUSED
    assert launches(3, 1, 1, 1, (True, False, False, False)) == FUSED[:2]
    assert launches(3, 1, 2, 2) == GENERAL
    assert launches(5, 1, 2, 1) == GENERAL
    assert launches(3, 3, 1, 1) == GENERAL


# sizes with interior tiles (16 x 8 outputs at stride 1, 8 x 4 at stride 2), ragged last tiles,
# and paddings 0 .. 3 (the first tile's extra dx rows, and padding past K - 1)
FUSED_CASES = [(1, 1, 40, 37), (1, 0, 35, 26), (1, 2, 33, 19), (1, 3, 20, 18), (2, 1, 38, 41),
               (2, 0, 37, 35), (2, 2, 18, 34), (2, 3, 21, 17)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced_cl"])
def test_fused_backward_tiles(layout):
    fails = []
    for i, (s, p, H, W) in enumerate(FUSED_CASES):
        act = ACTS[i % len(ACTS)]
        C = 3
        x = _layout(torch.randn(2, C, H, W, dtype=torch.float64), layout)
        w = torch.randn(C, 1, 3, 3, dtype=torch.float64)
        sc, sh = torch.rand(C, dtype=torch.float64) + 0.5, 0.5 * torch.randn(C, dtype=torch.float64)
        leaves = [t.clone().requires_grad_(True) for t in (x, w, sc, sh)]
        ref = dwconv_bn_act_ref(*leaves, s, p, 1, act)
        g = torch.randn_like(ref)
        want = torch.autograd.grad(ref, leaves, g)
        got = EMU_BWD(g.float(), x.float(), w.float(), sc.float(), sh.float(), [s, s], [p, p], [1, 1], act,
                      [True] * 4, True)
        for name, a, b in zip(("dx", "dweight", "dscale", "dshift"), got, want):
            err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1)).item()
            if not err <= 1e-5:
                fails.append(f"s{s} p{p} {H}x{W} {act} {name}: rel err {err:.2e}")
        # dx only, and weight gradients only: the same values
        dx_only = EMU_BWD(g.float(), x.float(), w.float(), sc.float(), sh.float(), [s, s], [p, p], [1, 1], act,
                          [True, False, False, False], True)
        red_only = EMU_BWD(g.float(), x.float(), w.float(), sc.float(), sh.float(), [s, s], [p, p], [1, 1], act,
                           [False, True, True, True], True)
        assert torch.equal(dx_only[0], got[0]) and dx_only[1].numel() == 0
        assert red_only[0].numel() == 0 and all(torch.equal(u, v) for u, v in zip(red_only[1:], got[1:]))
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_backward_low_precision(dtype):
    """fp16 / bf16 activations with fp32 parameters: dx within the dtype's rounding, the weight,
    scale and shift gradients as accurate as fp32 sums of the rounded inputs."""
    x = torch.randn(2, 16, 34, 20).to(dtype).to(memory_format=torch.channels_last)
    w, sc, sh = torch.randn(16, 1, 3, 3), torch.rand(16) + 0.5, torch.randn(16)
    g = torch.randn(2, 16, 17, 10).to(dtype)
    got = EMU_BWD(g, x, w, sc, sh, [2, 2], [1, 1], [1, 1], "hardswish", [True] * 4, False)
    leaves = [t.double().clone().requires_grad_(True) for t in (x, w, sc, sh)]
    ref = dwconv_bn_act_ref(*leaves, 2, 1, 1, "hardswish")
    want = torch.autograd.grad(ref, leaves, g.double())
    assert got[0].dtype == dtype
    for name, a, b in zip(("dx", "dweight", "dscale", "dshift"), got, want):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err <= (TOL[dtype] if name == "dx" else 1e-5), (name, err)


def test_fused_backward_zero_sized_outputs():
    """No outputs (a kernel larger than the padded image is refused; an empty batch or zero
    channels are not): zero gradients of the right shapes on the fused path."""
    for N, C in ((0, 8), (2, 0)):
        x = torch.randn(N, C, 10, 10).to(memory_format=torch.channels_last)
        w, sc, sh = torch.randn(C, 1, 3, 3), torch.rand(C) + 0.5, torch.randn(C)
        dx, dw, ds, db = EMU_BWD(torch.randn(N, C, 10, 10), x, w, sc, sh, [1, 1], [1, 1], [1, 1], "silu",
                                 [True] * 4, False)
        assert dx.shape == x.shape and not dx.any() and dw.shape == w.shape and not dw.any()
        assert ds.shape == (C,) and db.shape == (C,) and not ds.any() and not db.any()
