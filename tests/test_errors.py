"""Malformed calls: each raises ValueError (values, shapes, devices) or TypeError (dtypes) with a
message that starts with "fastdw:" and names the constraint, through the public function, the raw
forward op, the raw backward op and the fake kernels (what torch.compile traces)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastdw

OP = torch.ops.fastdw.dwconv_bn_act.default
BWD = torch.ops.fastdw._dwconv_bn_act_backward.default
C = 3


def _base():
    return dict(x=torch.randn(2, C, 7, 7), weight=torch.randn(C, 1, 3, 3), scale=torch.rand(C) + 0.5,
                shift=torch.randn(C), stride=1, padding=1, dilation=1, act="relu6")


def _set(**kw):
    """An override of the base call; tensor factories are called lazily (inside the test)."""
    def apply(a):
        for k, v in kw.items():
            a[k] = v() if callable(v) else v
        return a
    return apply


MSG_X_RANK = r"x must be a 4-D \(N, C, H, W\) tensor"
MSG_W_SHAPE = r"weight must be \(C, 1, kH, kW\)"
MSG_W_C = r"weight must be \(C, 1, kH, kW\) with C == x\.size\(1\) = 3"
MSG_MULT = r"channel multiplier must be 1"
MSG_ACT = r"act must be one of 'none', 'relu', 'relu6', 'hardswish', 'silu'"
MSG_X_DTYPE = r"x must be float32, float16 or bfloat16"
MSG_W_DTYPE = r"weight must be float32 or x's dtype"
MSG_TOO_LARGE = r"kernel larger than the padded input"

# id -> (override, exception, message pattern after "fastdw: ")
CASES = {
    # rank of x
    "x_rank3": (_set(x=lambda: torch.randn(C, 7, 7)), ValueError, MSG_X_RANK),
    "x_rank5": (_set(x=lambda: torch.randn(1, 2, C, 7, 7)), ValueError, MSG_X_RANK),
    # weight shape
    "weight_rank3": (_set(weight=lambda: torch.randn(C, 3, 3)), ValueError, MSG_W_SHAPE + r"; got a 3-D"),
    "weight_rank2": (_set(weight=lambda: torch.randn(C, 9)), ValueError, MSG_W_SHAPE + r"; got a 2-D"),
    "weight_in_channels_2": (_set(weight=lambda: torch.randn(C, 2, 3, 3)), ValueError,
                             MSG_W_SHAPE + r" \(depthwise: one input channel per group\)"),
    "weight_kernel_0": (_set(weight=lambda: torch.randn(C, 1, 0, 3)), ValueError, r"kernel size must be >= 1"),
    # channels
    "channel_mismatch_more": (_set(weight=lambda: torch.randn(C + 1, 1, 3, 3)), ValueError, MSG_W_C),
    "channel_mismatch_fewer": (_set(weight=lambda: torch.randn(C - 1, 1, 3, 3)), ValueError, MSG_W_C),
    "channel_multiplier_2": (_set(weight=lambda: torch.randn(2 * C, 1, 3, 3)), ValueError,
                             MSG_MULT + r".*multiplier 2"),
    "channel_multiplier_3": (_set(weight=lambda: torch.randn(3 * C, 1, 3, 3)), ValueError,
                             MSG_MULT + r".*multiplier 3"),
    # activation
    "act_gelu": (_set(act="gelu"), ValueError, MSG_ACT + r"; got 'gelu'"),
    "act_wrong_case": (_set(act="ReLU6"), ValueError, MSG_ACT),
    "act_empty": (_set(act=""), ValueError, MSG_ACT),
    # stride, dilation, padding
    "stride_0": (_set(stride=0), ValueError, r"stride must be >= 1"),
    "stride_negative_w": (_set(stride=(1, -1)), ValueError, r"stride must be >= 1"),
    "dilation_0": (_set(dilation=0), ValueError, r"dilation must be >= 1"),
    "dilation_0_w": (_set(dilation=(2, 0)), ValueError, r"dilation must be >= 1"),
    "padding_negative": (_set(padding=-1), ValueError, r"padding must be >= 0"),
    "padding_negative_w": (_set(padding=(0, -2)), ValueError, r"padding must be >= 0"),
    "padding_negative_bottom": (_set(padding=(0, 0, -1, 0)), ValueError, r"padding must be >= 0"),
    "padding_3_elements": (_set(padding=(1, 1, 1)), ValueError,
                           r"padding must have 2 elements \(h, w\) or 4 \(top, left, bottom, right\)"),
    "stride_3_elements": (_set(stride=(1, 1, 1)), ValueError, r"stride must have 2 elements"),
    # scale / shift shapes
    "scale_too_long": (_set(scale=lambda: torch.rand(C + 1)), ValueError, r"scale must be a 1-D tensor of C = 3"),
    "scale_2d": (_set(scale=lambda: torch.rand(1, C)), ValueError, r"scale must be a 1-D tensor of C = 3"),
    "scale_0d": (_set(scale=lambda: torch.rand(())), ValueError, r"scale must be a 1-D tensor of C = 3"),
    "shift_too_short": (_set(shift=lambda: torch.rand(C - 1)), ValueError, r"shift must be a 1-D tensor of C = 3"),
    "shift_column": (_set(shift=lambda: torch.rand(C, 1)), ValueError, r"shift must be a 1-D tensor of C = 3"),
    # dtypes of x
    "x_int32": (_set(x=lambda: torch.randint(0, 5, (2, C, 7, 7), dtype=torch.int32)), TypeError, MSG_X_DTYPE),
    "x_int64": (_set(x=lambda: torch.randint(0, 5, (2, C, 7, 7))), TypeError, MSG_X_DTYPE),
    "x_uint8": (_set(x=lambda: torch.randint(0, 5, (2, C, 7, 7), dtype=torch.uint8)), TypeError, MSG_X_DTYPE),
    "x_bool": (_set(x=lambda: torch.rand(2, C, 7, 7) > 0.5), TypeError, MSG_X_DTYPE),
    "x_complex": (_set(x=lambda: torch.randn(2, C, 7, 7, dtype=torch.complex64)), TypeError, MSG_X_DTYPE),
    # dtypes of weight / scale / shift
    "weight_fp16_x_fp32": (_set(weight=lambda: torch.randn(C, 1, 3, 3, dtype=torch.float16)), TypeError,
                           MSG_W_DTYPE + r" \((Float|torch\.float32)\); got (Half|torch\.float16)"),
    "weight_fp64_x_fp32": (_set(weight=lambda: torch.randn(C, 1, 3, 3, dtype=torch.float64)), TypeError,
                           MSG_W_DTYPE),
    "weight_fp16_x_bf16": (_set(x=lambda: torch.randn(2, C, 7, 7, dtype=torch.bfloat16),
                                weight=lambda: torch.randn(C, 1, 3, 3, dtype=torch.float16)), TypeError, MSG_W_DTYPE),
    "weight_int_x_fp32": (_set(weight=lambda: torch.ones(C, 1, 3, 3, dtype=torch.int32)), TypeError, MSG_W_DTYPE),
    "scale_fp64_x_fp32": (_set(scale=lambda: torch.rand(C, dtype=torch.float64)), TypeError,
                          r"scale must be float32 or x's dtype"),
    "scale_int": (_set(scale=lambda: torch.ones(C, dtype=torch.int64)), TypeError,
                  r"scale must be float32 or x's dtype"),
    "shift_fp16_x_bf16": (_set(x=lambda: torch.randn(2, C, 7, 7, dtype=torch.bfloat16),
                               weight=lambda: torch.randn(C, 1, 3, 3, dtype=torch.bfloat16),
                               shift=lambda: torch.rand(C, dtype=torch.float16)), TypeError,
                          r"shift must be float32 or x's dtype"),
    # devices (CPU-only machine: "meta" stands in for another device)
    "weight_on_meta": (_set(weight=lambda: torch.randn(C, 1, 3, 3, device="meta")), ValueError,
                       r"weight must be on the same device as x \(cpu\); got meta"),
    "x_on_meta": (_set(x=lambda: torch.randn(2, C, 7, 7, device="meta")), ValueError,
                  r"(weight|scale|shift) must be on the same device as x \(meta\); got cpu"),
    "scale_on_meta": (_set(scale=lambda: torch.rand(C, device="meta")), ValueError,
                      r"scale must be on the same device as x \(cpu\); got meta"),
    "shift_on_meta": (_set(shift=lambda: torch.rand(C, device="meta")), ValueError,
                      r"shift must be on the same device as x \(cpu\); got meta"),
    # kernel vs padded input
    "kernel_larger_than_input": (_set(x=lambda: torch.randn(2, C, 2, 2), weight=lambda: torch.randn(C, 1, 5, 5)),
                                 ValueError, MSG_TOO_LARGE + r".*5x5.*4x4"),
    "dilated_kernel_larger": (_set(x=lambda: torch.randn(2, C, 5, 5), padding=0, dilation=3), ValueError,
                              MSG_TOO_LARGE + r".*7x7.*5x5"),
    "kernel_wider_than_input": (_set(weight=lambda: torch.randn(C, 1, 1, 9), padding=0), ValueError,
                                MSG_TOO_LARGE + r".*1x9.*7x7"),
    "empty_height": (_set(x=lambda: torch.randn(2, C, 0, 7)), ValueError, MSG_TOO_LARGE),
}

# Only the public function takes these.
PUBLIC_CASES = {
    "backend_unknown": (_set(backend="cudnn"), ValueError,
                        r"backend must be one of \('auto', 'cuda', 'triton', 'cpu'\)"),
    "backend_wrong_case": (_set(backend="CPU"), ValueError, r"backend must be one of"),
    "backend_cuda_for_cpu_tensor": (_set(backend="cuda"), (ValueError, RuntimeError), r"backend='cuda'"),
    "x_not_tensor": (_set(x=lambda: [[[[1.0]]]]), TypeError, r"x and weight must be tensors"),
    "weight_not_tensor": (_set(weight=lambda: 1.0), TypeError, r"x and weight must be tensors"),
    "stride_bool": (_set(stride=True), TypeError, r"stride must be an int or a pair of ints"),
    "padding_str_unknown": (_set(padding="full"), ValueError, r"padding must be an int, an \(h, w\) pair, "
                                                             r"\(top, left, bottom, right\), 'same' or 'valid'"),
    "padding_float": (_set(padding=1.5), TypeError, r"padding must be an int, an \(h, w\) pair or \(top, left, "
                                                    r"bottom, right\)"),
}


def _call_public(a):
    kw = {k: a[k] for k in ("scale", "shift", "stride", "padding", "dilation", "act")}
    if "backend" in a:
        kw["backend"] = a["backend"]
    return fastdw.dwconv_bn_act(a["x"], a["weight"], **kw)


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _raw_args(a):
    return (a["x"], a["weight"], a["scale"], a["shift"], _pair(a["stride"]), _pair(a["padding"]),
            _pair(a["dilation"]), a["act"])


def _case(cases, name):
    override, exc, pattern = cases[name]
    return override(_base()), exc, r"^fastdw: " + pattern


@pytest.mark.parametrize("name", list(CASES) + list(PUBLIC_CASES))
def test_public_function(name):
    a, exc, match = _case({**CASES, **PUBLIC_CASES}, name)
    with pytest.raises(exc, match=match):
        _call_public(a)


def test_bad_backend_env(monkeypatch):
    monkeypatch.setenv("FASTDW_BACKEND", "cudnn")
    with pytest.raises(ValueError, match=r"^fastdw: FASTDW_BACKEND must be one of"):
        fastdw.dwconv_bn_act(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3))


@pytest.mark.parametrize("name", list(CASES))
def test_raw_op(name):
    a, exc, match = _case(CASES, name)
    with pytest.raises(exc, match=match):
        OP(*_raw_args(a))


@pytest.mark.parametrize("name", list(CASES))
def test_raw_backward_op(name):
    """The backward op validates its inputs with the same checks (before looking at grad_out)."""
    a, exc, match = _case(CASES, name)
    grad_out = torch.zeros(2, C, 7, 7)
    with pytest.raises(exc, match=match):
        BWD(grad_out, *_raw_args(a), [True] * 4, False)


@pytest.mark.parametrize("name", list(CASES))
def test_fake_kernel(name):
    """What torch.compile sees: the fake kernel raises the same error."""
    a, exc, match = _case(CASES, name)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fa = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        with pytest.raises(exc, match=match):
            OP(*_raw_args(fa))


@pytest.mark.parametrize("name,grad_out,exc,match", [
    ("grad_out_shape", lambda: torch.zeros(2, C, 7, 6), ValueError, r"^fastdw: grad_out must have the output's shape"),
    ("grad_out_rank", lambda: torch.zeros(2, C, 49), ValueError, r"^fastdw: grad_out must have the output's shape"),
    ("grad_out_dtype", lambda: torch.zeros(2, C, 7, 7, dtype=torch.float64), TypeError,
     r"^fastdw: grad_out must have x's dtype"),
])
def test_raw_backward_grad_out(name, grad_out, exc, match):
    a = _base()
    with pytest.raises(exc, match=match):
        BWD(grad_out(), *_raw_args(a), [True] * 4, False)


def test_valid_edge_cases_do_not_raise():
    """Not errors: kernel exactly as large as the padded input, empty batch, 1x1 kernel."""
    x = torch.randn(2, C, 3, 3)
    assert OP(x, torch.randn(C, 1, 5, 5), None, None, [1, 1], [1, 1], [1, 1], "none").shape == (2, C, 1, 1)
    assert fastdw.dwconv_bn_act(torch.randn(0, C, 4, 4), torch.randn(C, 1, 3, 3)).shape == (0, C, 4, 4)
    assert fastdw.dwconv_bn_act(x, torch.randn(C, 1, 1, 1), padding=0).shape == (2, C, 3, 3)


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_forward_mode_ad_refused(train):
    """The fused ops have no forward derivative: jvp (functorch or torch.autograd.forward_ad) raises
    instead of returning a zero tangent; reverse mode and vmap are unaffected."""
    import torch.autograd.forward_ad as fwAD

    x, w = torch.randn(2, 4, 6, 5), torch.randn(4, 1, 3, 3)
    fn = (lambda a: fastdw.dwconv_bn_act_train(a, w, act="relu")[0]) if train else \
        (lambda a: fastdw.dwconv_bn_act(a, w, act="relu"))
    with pytest.raises(NotImplementedError, match="forward-mode AD .* is not supported"):
        torch.func.jvp(fn, (x,), (torch.randn_like(x),))
    with pytest.raises(NotImplementedError, match="forward-mode AD .* is not supported"):
        torch.func.jvp(lambda ww: fastdw.dwconv_bn_act(x, ww, act="relu"), (w,), (torch.randn_like(w),))
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            fn(fwAD.make_dual(x, torch.randn_like(x)))
        torch.testing.assert_close(fn(x), fn(x.clone()))  # no tangent on any input: runs
    y = torch.func.vmap(fn)(x[None])[0]
    torch.testing.assert_close(y, fn(x))
    (g,) = torch.autograd.grad(fn(x.requires_grad_()).sum(), [x])
    assert g.shape == x.shape
