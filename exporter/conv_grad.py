"""ONNX for ``aten.convolution_backward``, which the dynamo exporter's op library does not translate.

Plain functions of ONNX ops (opset 18), handed to ``torch.onnx.export`` in its
``custom_translation_table``. For a 2-d convolution ``y = conv(x, w, stride s, padding p, dilation d)``:

- the input's gradient is the transposed convolution of ``dy`` with ``w`` (same stride, padding and
  dilation), with ``output_padding`` chosen so that it has ``x``'s spatial size;
- the weight's gradient correlates ``x`` with ``dy``: a convolution of ``x`` seen as (C_in, N, H, W)
  with ``dy`` seen as (C_out, N, h, w) as its weights, where stride and dilation swap roles; the
  result (C_in, C_out, kh', kw') is cut to the kernel size and transposed to (C_out, C_in, kh, kw);
- the bias's gradient sums ``dy`` over batch and space.

All three are returned even where ``output_mask`` says one is unused: the exporter needs every output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onnxscript import opset18 as op


def _pair(values: Sequence[int]) -> list[int]:
    vals = [int(v) for v in values]
    return vals * 2 if len(vals) == 1 else vals


def convolution_backward(
    grad_output: Any,
    input: Any,  # noqa: A002 - the ATen schema's name
    weight: Any,
    bias_sizes: Any,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[Any, Any, Any]:
    """Gradients of a 2-d convolution with respect to its input, weight and bias."""
    if transposed or groups != 1:
        raise NotImplementedError(
            f"the training step supports plain 2-d convolutions only (transposed={transposed}, groups={groups})"
        )
    if len(input.shape) != 4:
        raise NotImplementedError(f"the training step supports 2-d convolutions only, got rank {len(input.shape)}")
    big = [int(input.shape[2]), int(input.shape[3])]  # spatial sizes are static; only the batch varies
    small = [int(grad_output.shape[2]), int(grad_output.shape[3])]
    kernel = [int(weight.shape[2]), int(weight.shape[3])]
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    pads = [p[0], p[1], p[0], p[1]]
    extra = [big[i] - ((small[i] - 1) * s[i] - 2 * p[i] + d[i] * (kernel[i] - 1) + 1) for i in range(2)]
    grad_input = op.ConvTranspose(grad_output, weight, strides=s, pads=pads, dilations=d,
                                  output_padding=extra, kernel_shape=kernel)
    x_t = op.Transpose(input, perm=[1, 0, 2, 3])
    dy_t = op.Transpose(grad_output, perm=[1, 0, 2, 3])
    corr = op.Conv(x_t, dy_t, strides=d, dilations=s, pads=pads)
    starts, ends, axes = (op.Constant(value_ints=v) for v in ([0, 0], kernel, [2, 3]))
    corr = op.Slice(corr, starts, ends, axes)  # type: ignore[type-var]  # Constant's typing is too wide
    grad_weight = op.Transpose(corr, perm=[1, 0, 2, 3])
    spatial = op.Constant(value_ints=[0, 2, 3])
    grad_bias = op.ReduceSum(grad_output, spatial, keepdims=0)  # type: ignore[arg-type]
    return grad_input, grad_weight, grad_bias
