"""torch.library.opcheck over the sample inputs: schema, autograd registration, fake kernel
(shapes, dtypes, strides via the layout rule) and aot_dispatch_dynamic, forward and backward op."""
from __future__ import annotations

import pytest
import torch

from conftest import OPCHECK_CONFIGS, dtype_id, make_inputs, opcheck_samples

FWD = torch.ops.fastdw.dwconv_bn_act.default
BWD = torch.ops.fastdw._dwconv_bn_act_backward.default

# Generated once at collection, from a fixed seed, without disturbing the global RNG.
with torch.random.fork_rng():
    torch.manual_seed(0)
    # fp32 over every config; fp64 (the gradcheck dtype) over the first only, to keep the file fast
    FWD_SAMPLES = [pytest.param(args, id=sid) for dt, confs in ((torch.float32, OPCHECK_CONFIGS),
                                                                (torch.float64, OPCHECK_CONFIGS[:1]))
                   for sid, args in opcheck_samples(dt, configs=confs)]


@pytest.mark.parametrize("args", FWD_SAMPLES)
def test_opcheck_forward(args):
    result = torch.library.opcheck(FWD, args)
    assert all(v == "SUCCESS" for v in result.values()), result


BWD_MASKS = [[True] * 4, [True, False, False, False], [False, True, True, False], [False, False, False, True],
             [False] * 4]


@pytest.mark.parametrize("deterministic", [False, True], ids=["nondet", "det"])
@pytest.mark.parametrize("mask", BWD_MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_backward(layout, mask, deterministic):
    ss = mask != [False, False, False, True]  # one case without scale/shift
    x, w, s, b = make_inputs(2, 3, 5, 6, 3, layout=layout, scale=ss, shift=ss)
    go = torch.randn(2, 3, 5, 6).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    args = (go, x, w, s, b, [1, 1], [1, 1], [1, 1], "hardswish", mask, deterministic)
    result = torch.library.opcheck(BWD, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_opcheck_lowp_mixed_weight(dtype):
    """Low-precision x with fp32 weight/scale/shift (the autocast call) and lowp scale/shift."""
    for ssd in (torch.float32, dtype):
        x, w, s, b = make_inputs(2, 3, 5, 6, 3, dtype=dtype, layout="channels_last", wdtype=torch.float32,
                                 ssdtype=ssd, requires_grad=True)
        result = torch.library.opcheck(FWD, (x, w, s, b, [1, 1], [1, 1], [1, 1], "relu6"))
        assert all(v == "SUCCESS" for v in result.values()), result
