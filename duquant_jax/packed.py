"""`PackedLinear`: a quantized linear weight as a small pytree, and its jitted W4A8 einsum.

Follows qwix's QArray style: arrays (codes, scales, zero points, transform) as pytree leaves, the
layout and quantizer format as static fields. A `PackedLinear` stands in the param tree exactly where
the float weight was, so openpi-style modules (through `duquant_jax.models.gemma.linear`) and flax
`Dense` / `DenseGeneral` (through `duquant_jax.inference.packed_interceptor`) run it unchanged, and
`nn.scan` slices its leading depth axis like any other param.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from duquant_jax.kernels import xla
from duquant_jax.layouts import split_eqn
from duquant_jax.numerics import dequantize_weight
from duquant_jax.transforms import InputTransform, restore_output


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
    matmul_impl / transform_impl: static, which implementation of the W4A8 (or weight-only)
      matmul (`kernels.IMPLEMENTATIONS`) and of the online transform + activation quantizer
      (`kernels.TRANSFORM_IMPLEMENTATIONS`) to run; None = auto-dispatch by platform and shape.
      A run-time choice: set with `inference.with_implementations`, not stored in checkpoints.
    input_group: static, set by `quantize_params` on the W4A8 members of a group of linears that
      read the same input (q and kv of one Gemma attention; SigLIP's query, key and value): they
      carry the same online transform, so a model may quantize that input once for all of them
      (`input_share_key`, `quantize_input`); None for a linear that reads its input alone.
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
  matmul_impl: Optional[str] = flax.struct.field(pytree_node=False, default=None)
  transform_impl: Optional[str] = flax.struct.field(pytree_node=False, default=None)
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
    from duquant_jax import kernels
    if self.matmul_impl not in kernels.IMPLEMENTATIONS:
      raise ValueError(f"PackedLinear.matmul_impl={self.matmul_impl!r} is not one of "
                       f"{kernels.IMPLEMENTATIONS}")
    if self.transform_impl not in kernels.TRANSFORM_IMPLEMENTATIONS:
      raise ValueError(f"PackedLinear.transform_impl={self.transform_impl!r} is not one of "
                       f"{kernels.TRANSFORM_IMPLEMENTATIONS}")

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (..., K) -> (..., N): this linear on a raw array, jitted (`apply_packed`)."""
    return apply_packed(self, x)

  @property
  def kernel_transform(self) -> Optional[InputTransform]:
    """The online transform in the form kernels read (`InputTransform.materialized`)."""
    return None if self.transform is None else self.transform.materialized()

  def dequantize(self) -> jax.Array:
    """W2^T (..., N, K) float32, in the transformed basis (for diagnostics)."""
    return dequantize_weight(self.codes, self.scale, self.zero)

  def quantizes(self, m: int) -> bool:
    """Whether a call on M tokens quantizes its activations (W4A8) or runs weight-only."""
    return self.act_bits is not None and m >= self.act_min_tokens

  def input_share_key(self):
    """A hashable key equal for linears whose `quantize_input` gives the same result for the same
    input (one shared-input group: one online transform, one activation quantizer), or None if
    this one shares nothing."""
    if self.input_group is None or self.mode != "int" or self.bits is None:
      return None
    if self.act_bits is None:  # weight-only: what is shared is the transformed input, if any
      return None if self.transform is None else (self.input_group, None, self.transform_impl)
    # (Callers add the input's shape to the key: whether it is quantized depends on M.)
    return (self.input_group, self.act_bits, self.act_symmetric, self.act_clip,
            self.act_min_tokens, self.transform_impl, self.act_scale is not None)

  def quantize_input(self, x2: jax.Array):
    """x2 (M, K) -> what the integer matmul reads: (xq, sx, zx), the online transform and the
    per-token int8 quantizer; for a weight-only linear (or call: `quantizes`), the transformed x2
    in x2's dtype."""
    if not self.quantizes(x2.shape[0]):
      return _transform_only(x2, self.kernel_transform, implementation=self.transform_impl)
    if self.act_scale is not None:
      # Any remaining block rotation as the row-major multiply-reduce form (no transposes); the
      # quantizer after it is elementwise. (On the GPU an online rotation here measured far
      # slower than the whole gain of static scales: docs/design.md.)
      x = _transform_only(x2, self.kernel_transform,
                          implementation=self.transform_impl or "xla_reduce")
      return xla.quantize_static(x, self.act_scale, self.act_zero, self.act_bits)
    return _transform_quantize(x2, self.kernel_transform, self.act_bits, symmetric=self.act_symmetric,
                               clip_ratio=self.act_clip, implementation=self.transform_impl)

  def at_layer(self, layer: jax.Array) -> "PackedLinear":
    """Layer `layer` (a traced int scalar) of a stacked (L, ...) weight: every array sliced."""
    return jax.tree.map(lambda a: a[layer], self)

  def matmul(self, x2: jax.Array, quantized=None, layer: Optional[jax.Array] = None) -> jax.Array:
    """x2 (M, K) in the linear's input layout -> (M, N) in x2's dtype.

    `quantized`: this linear's `quantize_input(x2)`, already computed for another member of its
    input group (same `input_share_key`); None computes it here.
    `layer`: None for one layer (no stack axes), or the index of the layer to apply in a stacked
    weight; the W4A8 or weight-only matmul then gets the stacked codes and scales with the index
    (a kernel reads that layer in place, `kernels.w4a8_matmul` / `kernels.weight_only_matmul`),
    everything else is sliced.
    """
    one = self if layer is None else self.at_layer(layer)  # slices no path reads are dropped
    dtype = x2.dtype
    quantizes = one.quantizes(x2.shape[0])
    # Without an output rotation the matmul writes x's dtype: half the bytes of a float32 result
    # for bf16 activations (prefix gate/up: 107 MB per layer in float32). With a layer index the
    # matmul gets the stacked codes (a kernel reads that layer in place).
    out_dtype = jnp.float32 if one.out_rot is not None else dtype
    integer = one.mode == "int" and one.bits is not None  # bits None: float weights, float path
    if quantizes and integer:
      xq, sx, zx = one.quantize_input(x2) if quantized is None else quantized
      y = _int_matmul(xq, sx, zx, self.codes, _f32(self.scale), _f32(self.zero),
                      implementation=one.matmul_impl,
                      out_dtype=out_dtype, layer=layer)
    elif integer:  # weight-only: codes read packed
      x = one.quantize_input(x2) if quantized is None else quantized
      y = _weight_only_matmul(x, self.codes, _f32(self.scale), _f32(self.zero),
                              implementation=one.matmul_impl,
                              out_dtype=out_dtype, layer=layer)
    else:
      x = x2.astype(jnp.float32)
      # Float weights (bits None) are a check of exactness: no TF32 on the GPU there.
      prec = jax.lax.Precision.HIGHEST if one.bits is None else None
      if one.transform is not None:
        x = one.transform.apply(x, precision=prec)
      if not quantizes:
        y = jnp.matmul(x, one.dequantize().T, precision=prec)
      else:  # simulate: the same quantizers, in float
        if one.act_scale is not None:
          xq, sx, zx = xla.quantize_static(x, one.act_scale, one.act_zero, one.act_bits)
        else:
          xq, sx, zx = xla.quantize_per_token(x, one.act_bits, symmetric=one.act_symmetric,
                                              clip_ratio=one.act_clip)
        y = xla.dequantize_per_token(xq, sx, zx) @ one.dequantize().T
    if one.out_rot is not None:
      y = restore_output(y, one.out_rot)
    return y.astype(dtype)

  def gated_mlp(self, w_gating: Any, x: jax.Array,
                layer: Optional[jax.Array] = None) -> Optional[jax.Array]:
    """This down projection's Gemma MLP in one fused form (`gated_mlp`), or None."""
    return gated_mlp(w_gating, self, x, layer)

  def einsum(self, eqn: str, x: jax.Array, memo: Optional[dict] = None,
             layer: Optional[jax.Array] = None) -> jax.Array:
    """`jnp.einsum(eqn, x, W)` with W this packed weight (the eqn the float weight was used with).

    `memo`: a dict shared by the linears of one call site that read the same x (a Gemma attention's
    q and kv): the first member of an input group quantizes x, the others reuse it.
    `layer`: for a weight stacked over one leading layer axis, the (traced) layer to apply.
    """
    x_spec, w_spec, y_spec = split_eqn(eqn)
    if w_spec != self.w_spec:
      raise ValueError(f"einsum {eqn!r} names weight axes {w_spec!r} but this packed weight was "
                       f"built for {self.w_spec!r}")
    if self.codes.ndim != (2 if layer is None else 3):
      raise ValueError(f"packed weight has stack axes {self.codes.shape[:-2]}; apply it inside the "
                       "scanned module, or pass the layer index of a single stack axis")
    contract = "".join(c for c in w_spec if c in x_spec and c not in y_spec)
    outs = "".join(c for c in w_spec if c not in contract)
    batch = "".join(c for c in x_spec if c not in contract)
    sizes = dict(zip(x_spec, x.shape))
    sizes.update(zip(w_spec, self.w_shape))
    x2 = jnp.einsum(f"{x_spec}->{batch}{contract}", x)
    m = math.prod(sizes[c] for c in batch)
    x2 = x2.reshape(m, self.in_features)
    y2 = shared_matmul(self, x2, memo, x, layer)
    y = y2.reshape(*(sizes[c] for c in batch + outs))
    return jnp.einsum(f"{batch}{outs}->{y_spec}", y)


@jax.jit
def apply_packed(w: PackedLinear, x: jax.Array) -> jax.Array:
  """y = x W for one (unstacked) packed linear on a raw array, jitted once per shape and format.

  Args:
    w: a PackedLinear without stack axes.
    x: (..., K) in the linear's flattened input layout (K = `w.in_features`).

  Returns:
    (..., N) in x's dtype, N = `w.out_features` (the weight's non-contracted axes, flattened in the
    weight's order; for a flax Dense kernel (K, N) just N).

  Raises:
    ValueError: a stacked weight, or x whose last axis is not K.
  """
  if w.codes.ndim != 2:
    raise ValueError(f"apply_packed: weight has stack axes {w.codes.shape[:-2]}; slice a layer "
                     "first (`PackedLinear.at_layer`)")
  if x.shape[-1] != w.in_features:
    raise ValueError(f"apply_packed: {x.shape=} does not end in K={w.in_features}")
  y = w.matmul(x.reshape(-1, w.in_features))
  return y.reshape(*x.shape[:-1], w.out_features)


def gated_mlp(w_gating: Any, w_linear: Any, x: jax.Array,
              layer: Optional[jax.Array] = None) -> Optional[jax.Array]:
  """A Gemma MLP `linear(gelu(gate) * up)` ("BTD,2DF->2BTF", then "BTF,FD->BTD") on packed
  weights with its hidden activation never in float memory, or None where that form does not apply.

  It applies when both weights are one layer of W4A8 integer weights, the gate/up weight has
  per-channel scales and no output rotation, and the down projection reads its input through a
  static 8-bit quantizer with no online transform (the `fast` preset): then one pass
  (`kernels.gated_w4a8`) writes the hidden activation as the down projection's int8 codes,
  instead of writing gate and up and reading them back to quantize (on the H200 at batch 8 that
  round trip was 4 ms of pi0's 60 ms prefix). gate and up are float32 here (the unfused form rounds
  them to x's dtype first).

  Args:
    w_gating: the (2, D, F) gate/up weight; w_linear: the (F, D) down projection.
    x: (..., D) input of the MLP.
    layer: None, or a traced int32 scalar: both weights are stacked over one leading layer axis
      and this layer is applied (the kernels read it in place).

  Returns:
    (..., D) in x's dtype, or None.
  """
  if not (isinstance(w_gating, PackedLinear) and isinstance(w_linear, PackedLinear)):
    return None
  d = x.shape[-1]
  m = math.prod(x.shape[:-1])
  ndim = 2 if layer is None else 3
  if not (w_gating.codes.ndim == ndim and w_linear.codes.ndim == ndim):
    return None
  # g, l: this layer's fields (static scales, flags); the kernels get w_gating's and w_linear's
  # codes and scales whole, with the layer index.
  g, l = (w_gating, w_linear) if layer is None else (w_gating.at_layer(layer),
                                                      w_linear.at_layer(layer))
  if not (g.w_spec == "2DF" and l.w_spec == "FD" and g.codes.ndim == 2 and l.codes.ndim == 2
          and g.mode == "int" and l.mode == "int" and g.codes.dtype == jnp.int4
          and l.codes.dtype in (jnp.int4, jnp.int8)
          and g.out_rot is None and g.scale.shape[-1] == 1 and g.act_bits == 8 and g.quantizes(m)
          and l.act_scale is not None and l.act_bits == 8 and l.transform is None
          and l.quantizes(m) and 2 * l.in_features == g.out_features and g.in_features == d):
    return None
  from duquant_jax import kernels
  xq, sx, zx = g.quantize_input(x.reshape(m, d))
  impl = g.matmul_impl if g.matmul_impl in (None, "mosaic") else "xla"
  hq = kernels.gated_w4a8(xq, sx, zx, w_gating.codes, _f32(w_gating.scale), _f32(w_gating.zero),
                          l.act_scale, l.act_zero, implementation=impl, layer=layer)
  sh = jnp.broadcast_to(l.act_scale.reshape(1, 1).astype(jnp.float32), (m, 1))
  zh = None if l.act_zero is None else jnp.broadcast_to(
      l.act_zero.reshape(1, 1).astype(jnp.float32), (m, 1))
  out_dtype = jnp.float32 if l.out_rot is not None else x.dtype
  y = _int_matmul(hq, sh, zh, w_linear.codes, _f32(w_linear.scale), _f32(w_linear.zero),
                  implementation=l.matmul_impl, out_dtype=out_dtype, layer=layer)
  if l.out_rot is not None:
    y = restore_output(y, l.out_rot)
  return y.astype(x.dtype).reshape(*x.shape[:-1], l.out_features)


def shared_matmul(w: "PackedLinear", x2: jax.Array, memo: Optional[dict], source,
                  layer: Optional[jax.Array] = None) -> jax.Array:
  """`w.matmul(x2, layer=layer)`, quantizing x2 once per input group within `memo` (None: no
  sharing).

  `source` is the array x2 was flattened from; memo entries are keyed by its identity and hold a
  reference to it, so within one trace a key cannot come back for another array.
  """
  key = None if memo is None else w.input_share_key()
  if key is None:
    return w.matmul(x2, layer=layer)
  key = (key, id(source), x2.shape)
  if key not in memo:
    one = w if layer is None else w.at_layer(layer)
    memo[key] = (source, one.quantize_input(x2))
  return w.matmul(x2, quantized=memo[key][1], layer=layer)


def _f32(a: Optional[jax.Array]) -> Optional[jax.Array]:
  """Scales / zero points as the kernels read them (`compact` storage keeps float16 / int8)."""
  return None if a is None else a.astype(jnp.float32)


def tree_nbytes(tree) -> int:
  """Bytes of every array leaf of a tree as stored on device (int4 packed two per byte)."""
  total = 0
  for x in jax.tree.leaves(tree):
    bits = 4 if x.dtype == jnp.int4 else 8 * x.dtype.itemsize
    total += math.prod(x.shape) * bits // 8
  return total


def _int_matmul(xq, sx, zx, codes, scale, zero, implementation=None, out_dtype=jnp.float32,
                layer=None):
  from duquant_jax import kernels
  return kernels.w4a8_matmul(xq, sx, zx, codes, scale, zero, out_dtype=out_dtype,
                             implementation=implementation, layer=layer)


def _weight_only_matmul(x, codes, scale, zero, implementation=None, out_dtype=jnp.float32,
                        layer=None):
  from duquant_jax import kernels
  return kernels.weight_only_matmul(x, codes, scale, zero, out_dtype=out_dtype,
                                    implementation=implementation, layer=layer)


def _transform_only(x, transform, implementation=None):
  from duquant_jax import kernels
  return kernels.transform_only(x, transform, implementation=implementation)


def _transform_quantize(x, transform, bits, implementation=None, **quantizer):
  from duquant_jax import kernels
  return kernels.transform_quantize(x, transform, bits, implementation=implementation, **quantizer)
