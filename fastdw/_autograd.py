"""Fake kernels and autograd of fastdw's ops, shared by the C++ ops (registered in fastdw.ops when
fastdw._C is loaded) and the Triton ops (fastdw/triton/dwconv_bn_act.py).

A module of its own so that neither backend imports the other's registration: fastdw.ops imports
the Triton module lazily, and the Triton module needs only what is here.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import check_args, check_channel_vectors, check_train_args, deterministic_requested, \
    output_memory_format, stat_dtype

__all__ = ["fake_forward", "fake_backward", "setup_context", "make_backward", "double_backward", "no_setup_context",
           "fake_train_forward", "fake_train_backward", "setup_train_context", "make_train_backward"]


def _empty0(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty((0,), dtype=dtype, device=like.device)


def _grad_dtype(t: Optional[torch.Tensor]) -> torch.dtype:
    return t.dtype if t is not None else torch.float32


def fake_forward(x, weight, scale, shift, stride, padding, dilation, act):
    """The forward's output metadata (shape, dtype, layout rule), after the argument checks."""
    oh, ow = check_args(x, weight, scale, shift, stride, padding, dilation, act)
    return torch.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


def fake_backward(grad_out, x, weight, scale, shift, stride, padding, dilation, act, output_mask, deterministic):
    """The backward's four outputs: empty (0,) tensors where output_mask (or a None input) says none."""
    check_args(x, weight, scale, shift, stride, padding, dilation, act)
    dx = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
          if output_mask[0] else _empty0(x, x.dtype))
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device) if output_mask[1] \
        else _empty0(x, weight.dtype)
    ds = torch.empty_like(scale, memory_format=torch.contiguous_format) \
        if (output_mask[2] and scale is not None) else _empty0(x, _grad_dtype(scale))
    db = torch.empty_like(shift, memory_format=torch.contiguous_format) \
        if (output_mask[3] and shift is not None) else _empty0(x, _grad_dtype(shift))
    return dx, dw, ds, db


def setup_context(ctx, inputs, output):
    """Autograd of a forward op: save only the inputs (the backward recomputes the pre-activation)."""
    x, weight, scale, shift, stride, padding, dilation, act = inputs
    ctx.conf = (stride, padding, dilation, act)
    ctx.save_for_backward(x, weight, scale, shift)


def make_backward(bwd_op):
    """The autograd backward of a forward op whose backward op is `bwd_op` (C++ or Triton)."""
    def backward(ctx, grad):
        x, weight, scale, shift = ctx.saved_tensors
        stride, padding, dilation, act = ctx.conf
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2] and scale is not None, need[3] and shift is not None]
        if not any(mask):
            return (None,) * 8
        dx, dw, ds, db = bwd_op(grad, x, weight, scale, shift, stride, padding, dilation, act, mask,
                                deterministic_requested())
        return (dx if mask[0] else None, dw if mask[1] else None, ds if mask[2] else None,
                db if mask[3] else None, None, None, None, None)
    return backward


def double_backward(ctx, *grads):
    raise RuntimeError("fastdw: double backward of dwconv_bn_act is not supported "
                       "(create_graph=True through the fused op)")


def no_setup_context(ctx, inputs, output):
    pass


# The training op (batch-statistics BatchNorm): (y, mean + bias, var) and its backward.

def fake_train_forward(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act):
    oh, ow = check_train_args(x, weight, bias, gamma, beta, stride, padding, dilation, eps, act)
    C = x.shape[1]
    y = torch.empty((x.shape[0], C, oh, ow), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    sd = stat_dtype(x)
    return y, torch.empty((C,), dtype=sd, device=x.device), torch.empty((C,), dtype=sd, device=x.device)


def fake_train_backward(grad_y, grad_mean, grad_var, x, weight, gamma, beta, mean, var, stride, padding, dilation,
                        eps, act, output_mask, deterministic):
    check_train_args(x, weight, None, gamma, beta, stride, padding, dilation, eps, act)
    check_channel_vectors(x, mean=mean, var=var, grad_mean=grad_mean, grad_var=grad_var)
    dx, dw, dg, db = fake_backward(grad_y, x, weight, gamma, beta, stride, padding, dilation, "none", output_mask,
                                   deterministic)
    return dx, dw, dg, db


def setup_train_context(ctx, inputs, output):
    """Saves x, the parameters and the batch statistics (the backward recomputes z)."""
    x, weight, bias, gamma, beta, stride, padding, dilation, eps, act = inputs
    _, mean, var = output
    ctx.conf = (stride, padding, dilation, eps, act)
    ctx.save_for_backward(x, weight, bias, gamma, beta, mean, var)


def make_train_backward(bwd_op):
    """Autograd backward of a training forward op whose backward op is `bwd_op`. The gradient of
    the conv bias is the mean output's gradient (BatchNorm cancels the bias in y)."""
    def backward(ctx, grad_y, grad_mean, grad_var):
        x, weight, bias, gamma, beta, mean, var = ctx.saved_tensors
        stride, padding, dilation, eps, act = ctx.conf
        need = ctx.needs_input_grad
        dbias = None
        if need[2] and bias is not None:
            dbias = grad_mean.to(bias.dtype) if grad_mean is not None else torch.zeros_like(bias)
        mask = [need[0], need[1], need[3] and gamma is not None, need[4] and beta is not None]
        if not any(mask):
            return None, None, dbias, None, None, None, None, None, None, None
        if grad_y is None:  # only mean / var were used
            y = fake_train_forward(x, weight, None, gamma, beta, stride, padding, dilation, eps, act)[0]
            grad_y = torch.zeros_like(y)
        center = mean - bias.to(mean.dtype) if bias is not None else mean
        dx, dw, dg, db = bwd_op(grad_y, grad_mean, grad_var, x, weight, gamma, beta, center, var, stride, padding,
                                dilation, eps, act, mask, deterministic_requested())
        return (dx if mask[0] else None, dw if mask[1] else None, dbias, dg if mask[2] else None,
                db if mask[3] else None, None, None, None, None, None)
    return backward
