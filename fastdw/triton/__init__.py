"""Triton backend of fastdw (portable GPU path, visible to torch.compile).

The kernels live in `fastdw/triton/dwconv_bn_act.py`; fastdw.ops imports that module lazily and
calls `dwconv_bn_act_triton(x, weight, scale, shift, stride, padding, dilation, act)` (same
contract as torch.ops.fastdw.dwconv_bn_act, stride/padding/dilation as int pairs). Until that
module exists the 'triton' backend reports itself unavailable.
"""
