"""DuQuant's online input transform and per-token int8 quantization as ONE Pallas GPU kernel.

Computes what `InputTransform.apply` followed by `xla.quantize_per_token` computes,

    x' = ((x R1)[perm]) R2,      xq, sx, zx = q8(x')     (per token: one scale / zero point per row)

with R1, R2 block-diagonal (G, b, b) rotations (the smoothing already merged into R1 by
`InputTransform.merged`) and perm DuQuant's zigzag permutation. On XLA this is a chain of about ten
small kernels per linear (cast, transposes around two batched (M, b) x (b, b) matmuls, a gather, a
row reduction, the quantizer); at policy batch sizes (M = 1..64 tokens) each is launch- and
latency-bound. Auto-dispatch does not pick this kernel (docs/kernels.md, "Transform + quantize").

Design: one program per token row (M programs). No intermediate goes to memory:
- the permutation is applied by *gathering*: output channel o = g * b + i of (x R1)[perm] is
  column c = perm[o] of x R1, i.e. sum_t x[B(c) * b + t] * R1[B(c), t, c mod b] with B(c) = c // b.
  So each K chunk loads the x values and R1 columns it needs with index arrays (gather loads from
  the row, which sits in L1/L2), multiplies and reduces over t, then applies R2 block by block;
- per-token quantization needs the row's range before the first code can be written, so the row is
  transformed twice: pass 1 reduces min / max, pass 2 recomputes each chunk and stores its codes.
  Recomputing (K * 2b multiply-adds per pass) is cheaper than a round trip through memory.
- Rounding is round-half-to-even and the division x' / sx is IEEE-correct (`div.rn`), as XLA does,
  so codes equal the XLA path's up to the float32 rounding of the rotation sums.

Shapes the kernel takes: K and b powers of two, b >= 2, chunk (a power of two, b <= chunk <= K);
`supports` says which; anything else goes through XLA (`kernels.transform_quantize`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from duquant_jax.models.pallas_backend import triton_api as _triton_api


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformTiles:
  """Static tuning of the transform kernel (hashable: a static jit argument).

  Attributes:
    chunk: channels of one row transformed at a time (a power of two, a multiple of b); the gather
      tiles are (chunk / b, b, b), so chunk * b values live in registers per step.
    num_warps: Triton warps per program (one program per token row).
  """
  chunk: int = 256
  num_warps: int = 4

  def __post_init__(self):
    if self.chunk < 2 or self.chunk & (self.chunk - 1):
      raise ValueError(f"TransformTiles.chunk={self.chunk} must be a power of two")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"TransformTiles.num_warps={self.num_warps} must be 1, 2, 4, 8 or 16")


def _pow2(v: int) -> bool:
  return v > 0 and not v & (v - 1)


def supports(k: int, b: int, tiles: TransformTiles = TransformTiles()) -> bool:
  """Whether the kernel handles K channels in blocks of b with these tiles (else use XLA)."""
  return _pow2(k) and _pow2(b) and b >= 2 and k % b == 0 and b <= min(tiles.chunk, k)


def _round_half_even(v):
  """jnp.round (half to even) from floor: Pallas' Triton backend lowers no round primitive."""
  f = jnp.floor(v)
  d = v - f  # exact for |v| < 2^23; codes are clipped to 8 bits anyway
  odd = (f - 2.0 * jnp.floor(0.5 * f)) != 0.0
  return jnp.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


def _div_rn(a, b, interpret: bool):
  """a / b rounded to nearest (IEEE), as XLA divides; Triton's plain divide may be approximate."""
  if interpret:
    return a / b
  plgpu = _triton_api()
  b = jnp.broadcast_to(b, a.shape)
  [out] = plgpu.elementwise_inline_asm(
      "div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=r,r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
  return out


def _kernel(x_ref, perm_ref, r1_ref, *refs, k, b, chunk, bits, symmetric, clip_ratio, has_rot2,
            interpret):
  """One token row: two passes over K in chunks (range, then codes).

  Refs: x (M, K) any float; perm (G, b) int32 (source channel of each output channel, output
  block-major); r1 (G * b * b,) float (flat, gathered by index); [r2 (G, b, b) float];
  outputs xq (M, G, b) int8, sx (M, 1) f32, [zx (M, 1) f32 when asymmetric].
  """
  from jax.experimental import pallas as pl

  refs = list(refs)
  r2_ref = refs.pop(0) if has_rot2 else None
  xq_ref, sx_ref = refs[0], refs[1]
  zx_ref = None if symmetric else refs[2]

  row = pl.program_id(0)
  gpc = chunk // b  # blocks per chunk
  shift = b.bit_length() - 1
  t = jax.lax.broadcasted_iota(jnp.int32, (gpc, b, b), 2)

  def rotated(j):
    """(gpc, b) float32: output blocks [j * gpc, (j + 1) * gpc) of ((x R1)[perm]) R2."""
    g0 = pl.multiple_of(j * gpc, gpc)
    src = perm_ref[pl.ds(g0, gpc), :]  # (gpc, b)
    blk = jnp.right_shift(src, shift)
    col = jnp.bitwise_and(src, b - 1)
    xi = jnp.left_shift(blk, shift)[:, :, None] + t  # x channel B(c) * b + t
    ri = jnp.left_shift(blk, 2 * shift)[:, :, None] + jnp.left_shift(t, shift) + col[:, :, None]
    xg = x_ref[row, xi].astype(jnp.float32)  # (gpc, b, b) gathered from the row
    rg = r1_ref[ri].astype(jnp.float32)  # R1 columns of those channels
    z = jnp.sum(xg * rg, axis=2)  # (gpc, b) = (x R1)[perm]
    if has_rot2:
      r2 = r2_ref[pl.ds(g0, gpc), :, :].astype(jnp.float32)
      z = jnp.sum(z[:, :, None] * r2, axis=1)
    return z

  n_chunks = k // chunk

  def range_step(j, carry):
    lo, hi = carry
    z = rotated(j)
    return jnp.minimum(lo, jnp.min(z)), jnp.maximum(hi, jnp.max(z))

  zero = jnp.float32(0.0)
  lo, hi = jax.lax.fori_loop(0, n_chunks, range_step, (zero, zero))
  # The quantizer of `xla.quantize_per_token`, operation for operation.
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax
    amax = jnp.maximum(-lo, hi) * clip_ratio
    sx = jnp.maximum(amax, 1e-8) / qmax
    zx = None
  else:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = lo * clip_ratio, hi * clip_ratio
    sx = jnp.maximum(hi - lo, 1e-8) / (qmax - qmin)
    zx = _round_half_even(qmin - lo / sx)

  def code_step(j, _):
    z = rotated(j)
    q = _round_half_even(_div_rn(z, sx, interpret))
    if zx is not None:
      q = q + zx
    q = jnp.clip(q, qmin, qmax).astype(jnp.int8)
    xq_ref[row, pl.ds(pl.multiple_of(j * gpc, gpc), gpc), :] = q
    return 0

  jax.lax.fori_loop(0, n_chunks, code_step, 0)
  sx_ref[pl.ds(row, 1), :] = jnp.full((1, 1), sx, jnp.float32)
  if zx_ref is not None:
    zx_ref[pl.ds(row, 1), :] = jnp.full((1, 1), zx, jnp.float32)


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "clip_ratio", "tiles",
                                             "interpret"))
def transform_quantize(x: jax.Array, rot1: jax.Array, perm: jax.Array | None,
                       rot2: jax.Array | None, *, bits: int = 8, symmetric: bool = False,
                       clip_ratio: float = 1.0, tiles: TransformTiles | None = None,
                       interpret: bool = False):
  """q8(((x R1)[perm]) R2) per token, in one kernel.

  Args:
    x: (M, K) activations (any float dtype; computed in float32).
    rot1: (G, b, b) first block rotation (smoothing merged in), G * b = K.
    perm: (K,) integer permutation, x' = z[..., perm]; None for the identity.
    rot2: (G, b, b) second block rotation or None.
    bits, symmetric, clip_ratio: the per-token quantizer (`xla.quantize_per_token`'s arguments).
    tiles: static tuning; default TransformTiles(chunk=min(256, K)).
    interpret: Pallas interpret mode (CPU tests).

  Returns:
    (xq (M, K) int8, sx (M, 1) float32, zx (M, 1) float32 or None).

  Raises:
    ValueError: shapes that do not agree, or that the kernel does not take (`supports`).
  """
  from jax.experimental import pallas as pl
  plgpu = _triton_api()

  if x.ndim != 2:
    raise ValueError(f"x must be (M, K), got {x.shape}")
  m, k = x.shape
  if rot1.ndim != 3 or rot1.shape[1] != rot1.shape[2] or rot1.shape[0] * rot1.shape[1] != k:
    raise ValueError(f"rot1 {rot1.shape} must be (G, b, b) with G * b = K = {k}")
  g, b = rot1.shape[0], rot1.shape[1]
  if rot2 is not None and rot2.shape != rot1.shape:
    raise ValueError(f"rot2 {rot2.shape} must match rot1 {rot1.shape}")
  if perm is not None and perm.shape != (k,):
    raise ValueError(f"perm {perm.shape} must be (K,) = ({k},)")
  if not 1 <= bits <= 8:
    raise ValueError(f"activation bits must be in [1, 8], got {bits}")
  if not (_pow2(k) and _pow2(b) and b >= 2):
    raise ValueError(f"transform kernel needs K and b powers of two (b >= 2); got K={k}, b={b}")
  tiles = tiles or TransformTiles(chunk=min(256, k))
  if not supports(k, b, tiles):
    raise ValueError(f"transform kernel needs K and b powers of two with b <= chunk <= K; got "
                     f"K={k}, b={b}, {tiles}")
  perm2 = (jnp.arange(k, dtype=jnp.int32) if perm is None else perm.astype(jnp.int32)).reshape(g, b)
  args = [x, perm2, rot1.reshape(-1)] + ([] if rot2 is None else [rot2])
  out_shape = [jax.ShapeDtypeStruct((m, g, b), jnp.int8), jax.ShapeDtypeStruct((m, 1), jnp.float32)]
  if not symmetric:
    out_shape.append(jax.ShapeDtypeStruct((m, 1), jnp.float32))
  kernel = functools.partial(
      _kernel, k=k, b=b, chunk=min(tiles.chunk, k), bits=bits, symmetric=symmetric,
      clip_ratio=float(clip_ratio), has_rot2=rot2 is not None, interpret=interpret)
  outs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(m,),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=1),
      interpret=interpret,
      name="duquant_transform_quantize",
  )(*args)
  xq, sx = outs[0].reshape(m, k), outs[1]
  return xq, sx, (None if symmetric else outs[2])


__all__ = ["TransformTiles", "supports", "transform_quantize"]
