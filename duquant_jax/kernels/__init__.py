"""Quantized matmul and activation kernels, one module per op, each with its reference, its
kernels and its dispatch table:

  w4a8                the W4A8 matmul (`w4a8_matmul`): XLA's integer path, the Mosaic GPU kernel
                      (Hopper), the Pallas Triton kernel (other CUDA GPUs);
  weight_only         the weight-only matmul (`weight_only_matmul`): XLA, the Pallas kernel;
  gated               a gated MLP's int8 hidden activation (`gated_w4a8`): XLA, the fused Mosaic
                      kernel;
  online_transform    DuQuant's online transform + per-token quantizer (`transform_quantize`,
                      `transform_only`): four XLA forms, a fused Pallas kernel;
  dispatch            the rule tables' types, the platform they are read on, `choose`.
Backends (kernels only, no dispatch): `xla` (the reference arithmetic and the portable path),
`mosaic_gpu`, `pallas_gpu`, `pallas_transform`. docs/kernels.md states every dispatch rule and
the measurement behind it.

Importing this package imports no GPU-only module: the backends import jax's Pallas GPU modules
when a kernel is first traced.
"""

from __future__ import annotations

from duquant_jax.kernels import xla
from duquant_jax.kernels.gated import gated_w4a8
from duquant_jax.kernels.online_transform import (REDUCE_FORM_MAX_CHANNELS, REDUCE_FORM_MAX_TOKENS,
                                                  TRANSFORM_IMPLEMENTATIONS,
                                                  fused_transform_applies, transform_only,
                                                  transform_quantize)
from duquant_jax.kernels.w4a8 import (IMPLEMENTATIONS, STACKED_MAX_TOKENS, kernel_preferred,
                                      mosaic_applies, mosaic_in_place_preferred, mosaic_preferred,
                                      stacked_preferred, w4a8_matmul)
from duquant_jax.kernels.weight_only import weight_only_matmul
from duquant_jax.kernels.xla import dequantize_per_token, quantize_per_token

__all__ = [
    "IMPLEMENTATIONS",
    "REDUCE_FORM_MAX_CHANNELS",
    "REDUCE_FORM_MAX_TOKENS",
    "STACKED_MAX_TOKENS",
    "TRANSFORM_IMPLEMENTATIONS",
    "dequantize_per_token",
    "fused_transform_applies",
    "gated_w4a8",
    "kernel_preferred",
    "mosaic_applies",
    "mosaic_in_place_preferred",
    "mosaic_preferred",
    "quantize_per_token",
    "stacked_preferred",
    "transform_only",
    "transform_quantize",
    "w4a8_matmul",
    "weight_only_matmul",
    "xla",
]
