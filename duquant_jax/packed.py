"""`PackedLinear`: a quantized linear weight as data: arrays, static format, invariant, `validate`.

Follows qwix's QArray style: arrays (codes, scales, zero points, transform) as pytree leaves, the
quantizer format as static fields, the reconstruction invariant in the docstring, and a separate
`validate()`. A `PackedLinear` stands in the param tree exactly where the float weight was, and
`nn.scan` slices its leading depth axis like any other param. It holds no run-time choice and does
not run itself: `duquant_jax.runtime` executes it (which kernels, shared-input memo, layer-stacked
reads, the model and flax hooks).

Axes: L stacked layers, N output features, K input features, G scale groups of K, M tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from duquant_jax.numerics import dequantize_weight
from duquant_jax.transforms import InputTransform


@flax.struct.dataclass
class PackedLinear:
  """A linear weight W (stored 2-D as its transposed view W2^T (N, K)) quantized for W4A8.

  Invariant (per stacked layer): for activations x (M, K) in the linear's input layout,
    x @ W2 ~ restore( dequant8(q8(T(x))) @ (scale * (codes - zero))^T )
  where T = `transform.apply` (DuQuant's smoothing, rotation, permutation, rotation), q8 the
  activation quantizer (skipped when `act_bits` is None, or for calls of fewer than
  `act_min_tokens` tokens): per token from each row's range, or, with `act_scale`, static
  (calibrated): xq = clip(round(x / act_scale) + act_zero), an elementwise op that XLA fuses into
  the op producing x. `restore` undoes the optional output rotation. Every array may carry
  leading stack axes (L, ...) for `nn.scan`-ed layers.

  Attributes:
    codes: (..., N, K) int4 (bits <= 4) or int8 weight codes; float32 weights when `bits` is
      None (transforms only: no weight quantization, scale 1, no zero point).
    scale: (..., N, G) float32 (float16 under `LayerRule.compact`) weight scales; G groups of
      K // G input channels.
    zero: (..., N, G) float32 (int8 under `compact`) integer-valued zero points, or None.
    transform: the online input transform (InputTransform), or None.
    out_rot: (..., N // b, b, b) output rotation to restore after the matmul, or None.
    act_scale: (..., 1) float32 static activation scale (one per layer), or None: per-token scales.
    act_zero: (..., 1) float32 integer-valued static zero point (asymmetric static), or None.
    w_shape: static, one layer's original weight shape (the einsum's weight operand).
    w_spec: static, the weight's axis letters as the model's einsum names them.
    bits / act_bits / act_symmetric / act_clip: static quantizer format.
    act_min_tokens: static; calls of fewer tokens (M) skip the activation quantizer and run the
      same codes weight-only on the transformed float input (`quantizes`); 0: always quantize.
    mode: static, "int" (integer dot) or "simulate" (the same numerics in float).
    input_group: static, the quantizer's statement, set by `quantize_params` on the W4A8 members
      of a group of linears that read the same input (q and kv of one Gemma attention; SigLIP's
      query, key and value), that they carry equal online transforms and activation quantizers:
      a runtime may quantize that input once for all of them (`runtime.share_key`); None for a
      linear that reads its input alone.

  Which kernels run it is not part of the weight: `runtime.Execution` holds that choice.
  """

  codes: jax.Array
  scale: jax.Array
  zero: Optional[jax.Array]
  transform: Optional[InputTransform]
  out_rot: Optional[jax.Array]
  w_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  w_spec: str = flax.struct.field(pytree_node=False)
  bits: Optional[int] = flax.struct.field(pytree_node=False, default=4)
  act_bits: Optional[int] = flax.struct.field(pytree_node=False, default=8)
  act_symmetric: bool = flax.struct.field(pytree_node=False, default=False)
  act_clip: float = flax.struct.field(pytree_node=False, default=1.0)
  act_min_tokens: int = flax.struct.field(pytree_node=False, default=0)
  mode: str = flax.struct.field(pytree_node=False, default="int")
  input_group: Optional[str] = flax.struct.field(pytree_node=False, default=None)
  act_scale: Optional[jax.Array] = None
  act_zero: Optional[jax.Array] = None

  @property
  def shape(self) -> tuple[int, ...]:
    """The float weight's shape, stack axes included (so shape checks keep working)."""
    return tuple(self.codes.shape[:-2]) + tuple(self.w_shape)

  @property
  def in_features(self) -> int:
    return self.codes.shape[-1]

  @property
  def out_features(self) -> int:
    return self.codes.shape[-2]

  def nbytes(self) -> int:
    """Bytes of the packed weight as stored on device: int4 counts half a byte."""
    return tree_nbytes(self)

  def validate(self) -> None:
    """Checks shapes and dtypes agree; raises ValueError naming the field."""
    n, k = self.codes.shape[-2:]
    if self.bits is None:
      if self.codes.dtype != jnp.float32 or self.zero is not None:
        raise ValueError(f"PackedLinear with bits=None (float weights) needs float32 codes and no "
                         f"zero point, got {self.codes.dtype}")
    elif self.codes.dtype not in (jnp.int4, jnp.int8):
      raise ValueError(f"PackedLinear.codes must be int4 or int8, got {self.codes.dtype}")
    elif self.bits <= 4 and self.codes.dtype != jnp.int4:
      raise ValueError(f"{self.bits}-bit codes must be stored as int4, got {self.codes.dtype}")
    if self.scale.shape[-2] != n or k % self.scale.shape[-1]:
      raise ValueError(f"PackedLinear.scale {self.scale.shape} does not match codes {self.codes.shape}")
    if self.zero is not None and self.zero.shape != self.scale.shape:
      raise ValueError(f"PackedLinear.zero {self.zero.shape} != scale {self.scale.shape}")
    if math.prod(self.w_shape) != n * k:
      raise ValueError(f"PackedLinear: w_shape {self.w_shape} does not hold (N, K) = {(n, k)}")
    if self.transform is not None:
      self.transform.validate()
    if self.act_zero is not None and self.act_scale is None:
      raise ValueError("PackedLinear.act_zero is set without act_scale")
    if self.act_scale is not None:
      if self.act_bits is None:
        raise ValueError("PackedLinear.act_scale is set on a weight-only linear (act_bits=None)")
      if self.act_scale.shape != self.codes.shape[:-2] + (1,):
        raise ValueError(f"PackedLinear.act_scale {self.act_scale.shape} is not "
                         f"{self.codes.shape[:-2] + (1,)} (one static scale per layer)")
      if self.act_zero is not None and self.act_zero.shape != self.act_scale.shape:
        raise ValueError(f"PackedLinear.act_zero {self.act_zero.shape} != act_scale "
                         f"{self.act_scale.shape}")

  def dequantize(self) -> jax.Array:
    """W2^T (..., N, K) float32, in the transformed basis (for diagnostics)."""
    return dequantize_weight(self.codes, self.scale, self.zero)

  def quantizes(self, m: int) -> bool:
    """Whether a call on M tokens quantizes its activations (W4A8) or runs weight-only: the
    format's statement of `act_min_tokens`."""
    return self.act_bits is not None and m >= self.act_min_tokens

  def at_layer(self, layer: jax.Array) -> "PackedLinear":
    """Layer `layer` (an int, or a traced int scalar) of a stacked (L, ...) weight: every array
    sliced, the format unchanged."""
    return jax.tree.map(lambda a: a[layer], self)


def tree_nbytes(tree) -> int:
  """Bytes of every array leaf of a tree as stored on device (int4 packed two per byte)."""
  total = 0
  for x in jax.tree.leaves(tree):
    bits = 4 if x.dtype == jnp.int4 else 8 * x.dtype.itemsize
    total += math.prod(x.shape) * bits // 8
  return total
