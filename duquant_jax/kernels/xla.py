"""W4A8 integer matmul on XLA: per-token int8 activations, int4 weights stored (N, K), int32 dot.

This is the reference integer arithmetic every backend must reproduce, and the portable path used
on CPU, TPU, and on GPU where no kernel wins. The weight is stored (out, in) = (N, K) so the
int8 x int8 -> int32 `dot_general` contracts the last axis of both operands ("TN"), the layout
cuBLASLt runs at full int8 rate; int4 codes are cast to int8 inside the jitted function because a
mixed s8 x s4 dot has no fast path.

Quantizers (DuQuant / SmoothQuant conventions):
  activations  x[m, k] ~ sx[m] * (xq[m, k] - zx[m])      xq int8, per token (row m)
  weights      w[n, k] ~ sw[n, g] * (q[n, k] - zw[n, g])  q int4 in [-8, 7], g = k // group_size
Symmetric quantizers have zero points None. Then

  y[m, n] = sx[m] * sum_g sw[n, g] * ( sum_{k in g} xq q  - zw[n, g] * sum_{k in g} xq
                                       - zx[m] * sum_{k in g} q + group_size * zx[m] * zw[n, g] )

computed with an int32 dot per group and a float32 epilogue (the row sums are the asymmetric
correction of DuQuant's asymmetric W4A8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duquant_jax.rotations import apply_block_rotation_transposed


def quantize_per_token(x: jax.Array, bits: int = 8, *, symmetric: bool = True,
                       clip_ratio: float = 1.0, axis: int = -1):
  """x (M, K) float -> (xq (M, K) int8, sx (M, 1) float32, zx (M, 1) float32 or None).

  Symmetric: xq = round(x / sx) in [-(2^(b-1) - 1), 2^(b-1) - 1],
  sx = clip * max|x| / (2^(b-1) - 1).
  Asymmetric: the row's [min, max] * clip maps to [-2^(b-1), 2^(b-1) - 1] with an integer zero
  point zx, x ~ sx * (xq - zx).
  `axis` is the channel axis reduced over (0 for channel-major x^T (K, M): then sx, zx are (1, M)).
  """
  x = x.astype(jnp.float32)
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True) * clip_ratio
    sx = jnp.maximum(amax, 1e-8) / qmax
    xq = jnp.clip(jnp.round(x / sx), -qmax, qmax).astype(jnp.int8)
    return xq, sx, None
  qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  lo, hi = _min_max(x, axis)
  lo = jnp.minimum(lo, 0.0) * clip_ratio
  hi = jnp.maximum(hi, 0.0) * clip_ratio
  sx = jnp.maximum(hi - lo, 1e-8) / (qmax - qmin)
  zx = jnp.round(qmin - lo / sx)
  xq = jnp.clip(jnp.round(x / sx) + zx, qmin, qmax).astype(jnp.int8)
  return xq, sx, zx


def quantize_static(x: jax.Array, scale: jax.Array, zero: jax.Array | None = None,
                    bits: int = 8):
  """x (M, K) float -> (xq (M, K) int8, sx (1, 1), zx (1, 1) or None) with a calibrated scale.

  x ~ scale * (xq - zero) with one scale (and zero point) for the whole tensor, fixed at
  calibration: xq = clip(round(x / scale) + zero) is elementwise, with no reduction over x, so
  XLA fuses it into the op that produces x. Values beyond the calibrated range are clipped.
  `scale`, `zero`: (1,) float32 (zero None: symmetric, codes in [-(2^(b-1) - 1), 2^(b-1) - 1]).
  The scales come back per tensor, (1, 1): the matmuls broadcast them over the tokens (the
  Mosaic kernels read them as scalars).
  """
  inv = 1.0 / scale.astype(jnp.float32)
  if zero is None:
    qmax = 2 ** (bits - 1) - 1
    xq = jnp.clip(jnp.round(x.astype(jnp.float32) * inv), -qmax, qmax).astype(jnp.int8)
    return xq, scale.reshape(1, 1), None
  qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  xq = jnp.clip(jnp.round(x.astype(jnp.float32) * inv) + zero, qmin, qmax).astype(jnp.int8)
  return xq, scale.reshape(1, 1), zero.reshape(1, 1)


def _min_max(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """(min, max) of x over `axis`, kept as a size-1 axis, from ONE variadic reduction.

  jnp.min and jnp.max are two reductions, which XLA runs as two kernels that each read the whole
  activation (docs/kernels.md, "Transform + quantize").
  """
  axis = axis % x.ndim
  lo, hi = jax.lax.reduce(
      (x, x), (jnp.array(jnp.inf, x.dtype), jnp.array(-jnp.inf, x.dtype)),
      lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])), (axis,))
  return jnp.expand_dims(lo, axis), jnp.expand_dims(hi, axis)


def transform_quantize_channel_major(x: jax.Array, transform, bits: int = 8, *,
                                     symmetric: bool = True, clip_ratio: float = 1.0,
                                     reduce: bool = False):
  """q8(`transform.apply(x)`) per token, computed on x^T (K, M): (xq (M, K), sx (M, 1), zx or None).

  Row-major (M, G, b) blocks make XLA wrap every batched block GEMM in transposes (the batch axis G
  must be major) and the multiply-reduce form reduce over a middle axis. Channel-major, each block
  rotation is diag(R_g)^T x^T: a batched GEMM whose batch axis is already major (or, with
  `reduce`, a product summed over a major axis with tokens contiguous), the permutation gathers
  whole contiguous rows, and the per-token range is a reduction over the major axis. One transpose
  in (fused with the cast) and one out (fused with the quantizer).
  """
  xt = _transform_cm(x, transform, reduce)
  xq, sx, zx = quantize_per_token(xt, bits, symmetric=symmetric, clip_ratio=clip_ratio, axis=0)
  return xq.T, sx.T, None if zx is None else zx.T


def transform_channel_major(x: jax.Array, transform, *, reduce: bool = False) -> jax.Array:
  """`transform.apply(x)` (M, K) float32, computed on x^T as `transform_quantize_channel_major`
  does (for weight-only linears: the transform without the quantizer)."""
  return _transform_cm(x, transform, reduce).T


def _transform_cm(x: jax.Array, transform, reduce: bool) -> jax.Array:
  """The transform's steps on x^T: (K, M) float32."""
  # HIGHEST: at the GPU's default float32 precision (TF32) the einsum form flips codes
  # (docs/kernels.md, "Transform + quantize"); the multiply-reduce form is exact float32.
  rotate = _rotate_blocks_cm_reduce if reduce else (
      lambda v, r: apply_block_rotation_transposed(v, r.astype(jnp.float32),
                                                   precision=jax.lax.Precision.HIGHEST))
  return _apply_steps(x.astype(jnp.float32).T, transform, rotate, channel_axis=0)


def _apply_steps(x: jax.Array, transform, rotate, channel_axis: int) -> jax.Array:
  """`transform.apply`'s steps on 2-D x with channels on `channel_axis` (-1: (M, K), 0: (K, M)),
  each block rotation as `rotate(x, rot)`."""
  if transform.smooth is not None:
    x = x / (transform.smooth if channel_axis == -1 else transform.smooth[:, None])
  if transform.rot1 is not None:
    x = rotate(x, transform.rot1)
  if transform.perm is not None:
    # mode="clip": a bare gather; the default ("fill") adds a bounds mask and select per element.
    x = jnp.take(x, transform.perm, axis=channel_axis, mode="clip")
  if transform.rot2 is not None:
    x = rotate(x, transform.rot2)
  return x


def _rotate_blocks_cm_reduce(xt: jax.Array, rot: jax.Array) -> jax.Array:
  """diag(R_g)^T xt for channel-major xt (K, M), as a product summed over the block's input axis."""
  k, m = xt.shape
  g, b = rot.shape[0], rot.shape[-1]
  prod = xt.reshape(g, b, 1, m) * rot.astype(jnp.float32)[:, :, :, None]  # (G, c, j, M)
  return jnp.sum(prod, axis=1).reshape(k, m)


def transform_reduce(x: jax.Array, transform) -> jax.Array:
  """`transform.apply(x)` for (M, K) x without dots: block rotations as multiply-reduce.

  XLA lowers the einsum form of a block rotation to a batched (G, M, b) x (G, b, b) GEMM with
  transposes on both sides; as an elementwise product reduced over b it fuses with its producer
  (the cast, the gather) into one reduction kernel per rotation. Same sums, another order: equal
  to float32 rounding.
  """
  return _apply_steps(x.astype(jnp.float32), transform, _rotate_blocks_reduce, channel_axis=-1)


def _rotate_blocks_reduce(x: jax.Array, rot: jax.Array) -> jax.Array:
  """x (M, K) times block-diagonal rot (G, b, b), as a product reduced over b (no GEMM)."""
  m, k = x.shape
  g, b = rot.shape[0], rot.shape[-1]
  return jnp.sum(x.reshape(m, g, b, 1) * rot.astype(jnp.float32)[None], axis=2).reshape(m, k)


def dequantize_per_token(xq, sx, zx=None):
  """Inverse of `quantize_per_token` (float32)."""
  xq = xq.astype(jnp.float32)
  return sx * (xq if zx is None else xq - zx)


# Largest |sum| of int8 x int4 products that float32 holds exactly: 2^24 = 16384 * 128 * 8.
_BF16_DOT_MAX_K = 16384
DOTS = ("int8", "int8_unpacked", "bf16")


def w4a8_matmul(xq: jax.Array, sx: jax.Array, zx: jax.Array | None, q: jax.Array, sw: jax.Array,
                zw: jax.Array | None, *, out_dtype=jnp.float32, dot: str = "int8") -> jax.Array:
  """Integer W4A8 matmul, XLA path.

  Args:
    xq: (M, K) int8 activation codes; sx (M, 1) float32 scales per token, or (1, 1) per
      tensor; zx the same form of zero points, or None.
    q: (N, K) int4 (or int8) weight codes; sw (N, G) float32 scales; zw (N, G) zero points or None.
      G groups of K // G consecutive input channels (G = 1: per output channel).
    out_dtype: dtype of the result.
    dot: "int8": int8 x int8 -> int32 dot, the int4 codes cast to int8 inside it (XLA fuses the
      cast into its GEMM's operand). "int8_unpacked": the same dot on an int8 copy of the codes
      made first (an `optimization_barrier` keeps the cast out of the GEMM, so that the GEMM
      library's int8 kernel runs; on Hopper faster than the Mosaic kernel from a few thousand
      tokens, docs/kernels.md, "W4A8 matmul"). "bf16": the same integer codes as bf16 operands with
      float32 accumulation, on bf16 tensor cores: every code is exact in bf16, every product
      (|xq q| <= 1024) and every partial sum (|sum| <= 2^24 for K / G <= 16384) exact in float32,
      so the result equals the int8 dot bit for bit (docs/kernels.md, "W4A8 matmul").

  Returns:
    (M, N) `dequant(xq) @ dequant(q).T`, computed as exact integer dots and a float32 epilogue.

  Raises:
    ValueError: shapes that do not agree, an unknown `dot`, or dot="bf16" with K / G > 16384.
  """
  m, n, g, gs = _grouped_shapes(xq, q, sw)
  if dot not in DOTS:
    raise ValueError(f"dot must be one of {DOTS}, got {dot!r}")
  if dot == "bf16" and gs > _BF16_DOT_MAX_K:
    raise ValueError(f"dot='bf16' is exact only for K / G <= {_BF16_DOT_MAX_K}, got {gs}")
  xg = xq.reshape(m, g, gs)
  # The weight's column sums (for zx) ride along as one extra row of ones: the dot reads the
  # weight once, where a separate reduction would read all of it a second time. The unpacked
  # form reduces its int8 copy instead: the odd row count slows the GEMM library's kernel more.
  ones_row = zx is not None and dot != "int8_unpacked"
  if ones_row:
    xg = jnp.concatenate([xg, jnp.ones((1, g, gs), xg.dtype)], axis=0)
  # (G, M[+1], N): one TN dot per group, batched over G (a plain 2-D dot for one group, the form
  # the GEMM libraries take without a layout change).
  if dot in ("int8", "int8_unpacked"):
    wq = q.astype(jnp.int8)
    if dot == "int8_unpacked" and q.dtype != jnp.int8:
      wq = jax.lax.optimization_barrier(wq)
    lhs, acc_type = xg, jnp.int32
  else:
    wq, lhs, acc_type = q.astype(jnp.bfloat16), xg.astype(jnp.bfloat16), jnp.float32
  if g == 1:
    acc = jax.lax.dot_general(lhs[:, 0], wq, (((1,), (1,)), ((), ())),
                              preferred_element_type=acc_type)[None]
  else:
    acc = jax.lax.dot_general(lhs, wq.reshape(n, g, gs), (((2,), (2,)), ((1,), (1,))),
                              preferred_element_type=acc_type)
  acc = acc.astype(jnp.float32)
  if ones_row:
    acc, colsum = acc[:, :m], acc[:, m:]  # (G, M, N), (G, 1, N): sum_k q per group
    xg = xg[:m]
  elif zx is not None:
    colsum = jnp.sum(wq.reshape(n, g, gs).astype(jnp.int32), axis=-1).T[:, None, :].astype(
        jnp.float32)
  acc = _minus_weight_zero(acc, xg, zw)
  if zx is not None:
    corr = colsum
    if zw is not None:
      corr = corr - gs * zw.T[:, None, :]
    acc = acc - zx[None, :, :] * corr
  if g == 1:  # elementwise, so that XLA fuses the epilogue into one pass over the product
    y = acc[0] * sw.T
  else:  # exact float32 sums over the groups (not TF32)
    y = jnp.einsum("gmn,ng->mn", acc, sw, precision=jax.lax.Precision.HIGHEST)
  return (y * sx).astype(out_dtype)


# Weight-only matmuls of int8 codes with at least this many tokens fold the zero points into the
# GEMM's weight operand; the others subtract zw * rowsum(x) after the dot (docs/kernels.md,
# "Weight-only matmul").
WEIGHT_ONLY_FOLD_MIN_TOKENS = 512


def weight_only_matmul(x: jax.Array, q: jax.Array, sw: jax.Array, zw: jax.Array | None, *,
                       fold_zero: bool | None = None) -> jax.Array:
  """Weight-only (W4A16 / W8A16) matmul: float x (M, K) times dequant(q) (N, K), float32 (M, N).

  The integer codes are cast to x's dtype inside the jitted function and XLA fuses that cast
  into its GEMM, so the weight is read as packed codes; per-group scales are applied to the
  float32 partial sums of each group. The zero points either go into the cast (q - zw: int8
  codes from `WEIGHT_ONLY_FOLD_MIN_TOKENS` tokens) or are subtracted after the dot (otherwise;
  `fold_zero` forces one form):

    y[m, n] = sum_g sw[n, g] * sum_{k in g} x[m, k] (q[n, k] - zw[n, g])
            = sum_g sw[n, g] * (sum_{k in g} x q - zw[n, g] * sum_{k in g} x)

  q - zw is an integer of magnitude below 2^bits (zero points lie in the code range), exact in
  bfloat16 up to 8 bits, so with x in bfloat16 every product is exact in float32 either way: the
  result equals `x @ dequant(q).T` up to float32 summation order. Float32 x runs the dot at the
  platform's default float32 precision.
  """
  m, n, g, gs = _grouped_shapes(x, q, sw)
  xg = x.reshape(m, g, gs)
  w = q.reshape(n, g, gs)
  if fold_zero is None:
    fold_zero = q.dtype == jnp.int8 and m >= WEIGHT_ONLY_FOLD_MIN_TOKENS
  fold = zw is not None and fold_zero
  w = (w.astype(jnp.float32) - zw[:, :, None]).astype(x.dtype) if fold else w.astype(x.dtype)
  acc = jax.lax.dot_general(xg, w, (((2,), (2,)), ((1,), (1,))),
                            preferred_element_type=jnp.float32)  # (G, M, N)
  if not fold:
    acc = _minus_weight_zero(acc, xg, zw)
  return jnp.einsum("gmn,ng->mn", acc, sw)


def _grouped_shapes(x, q, sw):
  """(M, N, G, K / G) of activations x (M, K), codes q (N, K) and scales sw (N, G); checks they
  agree."""
  m, k = x.shape
  n, g = sw.shape
  if q.shape != (n, k) or k % g:
    raise ValueError(f"weight codes {q.shape} do not match activations (M, K)={x.shape} "
                     f"and scales (N, G)={sw.shape}")
  return m, n, g, k // g


def _minus_weight_zero(acc, xg, zw):
  """acc (G, M, N) partial sums minus zw[n, g] * sum_{k in g} x[m, k] (xg (M, G, K / G));
  zw None: acc."""
  if zw is None:
    return acc
  rowsum = jnp.sum(xg.astype(jnp.float32), axis=-1)  # (M, G)
  return acc - zw.T[:, None, :] * rowsum.T[:, :, None]


def w4a8_matmul_reference_f64(xq, sx, zx, q, sw, zw):
  """The same arithmetic in float64 numpy, dequantizing first (for tests)."""
  import numpy as np
  xq, sx, q, sw = (np.asarray(a, np.float64) for a in (xq, sx, q, sw))
  n, g = sw.shape
  k = q.shape[1]
  x = sx * (xq - (0.0 if zx is None else np.asarray(zx, np.float64)))
  zfull = 0.0 if zw is None else np.repeat(np.asarray(zw, np.float64), k // g, axis=1)
  w = np.repeat(sw, k // g, axis=1) * (q - zfull)
  return x @ w.T
