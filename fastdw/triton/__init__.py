"""Triton backend of fastdw (portable GPU path, visible to torch.compile).

`fastdw/triton/dwconv_bn_act.py` holds the kernels and registers the ops
fastdw::dwconv_bn_act_triton and fastdw::_dwconv_bn_act_backward_triton. fastdw.ops imports it
lazily (so `import fastdw` never needs Triton) and calls
`dwconv_bn_act_triton(x, weight, scale, shift, stride, padding, dilation, act)` for
backend="triton", and for backend="auto" on a GPU when the CUDA extension was not built.
On a machine without a GPU, set TRITON_INTERPRET=1 before the import to run the kernels on CPU
tensors through the Triton interpreter (slow; for tests).
"""
