"""Integer grids of weight quantization, and the clip search that picks each tile's range.

A weight w (N, K) (stored out x in) is quantized per tile of `rows` outputs x `cols` inputs (one
output channel, one attention head, or one input group): codes q in the `bits` grid with
w ~ scale * (q - zero) (`dequantize_weight`), zero None for symmetric grids. The clip search
(DuQuant, Lin et al., NeurIPS 2024, following AWQ / OmniQuant's weight clipping) shrinks each
tile's range by the ratio of `clip_grid` that minimises the output error on calibration rows.

Used by the linear packer (`duquant_jax.quantize`) and the embedding tables
(`duquant_jax.embedding`); both import it from here, below them.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

# Float32 bytes of weight rows per block of the clip search (cache-sized; `quantize_weight`).
_ROW_BLOCK_BYTES = 1 << 21


def dequantize_weight(codes: jax.Array, scale: jax.Array, zero: Optional[jax.Array]) -> jax.Array:
  """codes (..., N, K), scale / zero (..., N, G) -> W2^T (..., N, K) float32 = scale * (codes - zero)."""
  g = scale.shape[-1]
  q = codes.astype(jnp.float32)
  q = q.reshape(*q.shape[:-1], g, q.shape[-1] // g)
  if zero is not None:
    q = q - zero[..., None]
  return (q * scale[..., None]).reshape(codes.shape)


def static_range(x: jax.Array, bits: int = 8, *, symmetric: bool, percentile: float):
  """(scale (..., 1), zero (..., 1) or None) of `quantize_static` from calibration rows
  x (..., R, K).

  The range is the `percentile` of the rows' own ranges (per-token max |x|; asymmetric: the
  upper percentile of row maxima and the lower one of row minima), so a few rare tokens beyond
  it are clipped rather than coarsening every other token's codes.
  """
  x = x.astype(jnp.float32)
  if symmetric:
    hi = jnp.percentile(jnp.max(jnp.abs(x), axis=-1), percentile, axis=-1)[..., None]
    return jnp.maximum(hi, 1e-8) / (2 ** (bits - 1) - 1), None
  qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  hi = jnp.maximum(jnp.percentile(jnp.max(x, axis=-1), percentile, axis=-1), 0.0)[..., None]
  lo = jnp.minimum(jnp.percentile(jnp.min(x, axis=-1), 100.0 - percentile, axis=-1), 0.0)[..., None]
  scale = jnp.maximum(hi - lo, 1e-8) / (qmax - qmin)
  return scale, jnp.round(qmin - lo / scale)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
  """(qmin, qmax) of the integer grid: symmetric grids drop the most negative code."""
  if symmetric:
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _tile_range(w: jax.Array, *, symmetric: bool, rows: int, cols: int):
  """Per-tile (lo, hi) of w (N, K) over tiles of `rows` outputs x `cols` inputs: (N // rows, G) each.

  Symmetric tiles get (-max|w|, max|w|); asymmetric ones include 0 in the range.
  """
  n, k = w.shape
  t = w.reshape(n // rows, rows, k // cols, cols)
  if symmetric:
    amax = jnp.max(jnp.abs(t), axis=(1, 3))
    return -amax, amax
  return jnp.minimum(jnp.min(t, axis=(1, 3)), 0.0), jnp.maximum(jnp.max(t, axis=(1, 3)), 0.0)


def _tile_quantize(w: jax.Array, lo: jax.Array, hi: jax.Array, clip: jax.Array, *, bits: int,
                   symmetric: bool, rows: int):
  """Quantizes w (N, K) given tile ranges lo / hi and clip ratios, all (N // rows, G).

  Returns codes (N, K) float (integer-valued), scale (N, G), zero (N, G) or None.
  """
  n, k = w.shape
  g = lo.shape[-1]
  qmin, qmax = qrange(bits, symmetric)
  if symmetric:
    scale = jnp.maximum(hi * clip, 1e-10) / qmax
    zero = None
  else:
    scale = jnp.maximum((hi - lo) * clip, 1e-10) / (qmax - qmin)
    zero = jnp.round(qmin - lo * clip / scale)
  scale = jnp.repeat(scale, rows, axis=0)
  q = jnp.round(w.reshape(n, g, k // g) / scale[..., None])
  if zero is not None:
    zero = jnp.repeat(zero, rows, axis=0)
    q = q + zero[..., None]
  return jnp.clip(q, qmin, qmax).reshape(n, k), scale, zero


def row_block(n: int, k: int, rows: int) -> int:
  """Output rows per block of the clip search: a multiple of the scale tile's rows dividing N,
  about `_ROW_BLOCK_BYTES` of float32."""
  target = max(rows, _ROW_BLOCK_BYTES // (4 * k))
  best = rows
  for rb in range(rows, min(n, target) + 1, rows):
    if n % rb == 0:
      best = rb
  return best


def quantize_weight(w: jax.Array, x: Optional[jax.Array], *, bits: int, symmetric: bool,
                    rows: int, cols: int, clip_grid: tuple[float, ...]):
  """Quantizes one weight w (N, K) (stored out x in), searching the clip ratio per tile.

  The search keeps only the best clip ratio per tile; the weight is quantized once at the end.

  Args:
    w: (N, K) float32 weight, transposed 2-D view.
    x: (R, K) activations in the same (transformed) basis, or None (then the search minimises the
      weight MSE). Rows of zeros are ignored by the objective.
    bits: weight bits; symmetric: no zero point; rows / cols: the scale tile (rows = 1 per channel,
      head_dim per head; cols = K, or the group size).
    clip_grid: clip ratios to try; (1.0,) is plain round-to-nearest.

  Returns:
    codes (N, K) int8 (values in the `bits` range), scale (N, G) float32, zero (N, G) float32 or None.
  """
  # Tiles are independent: search a block of output rows at a time (`lax.map`), so every candidate's
  # error lives in cache instead of N x K float32 temporaries per candidate (2.8x faster on a CPU
  # for gemma_2b's gate / up, BENCHMARKS.md).
  n, k = w.shape
  rb = row_block(n, k, rows)
  if rb < n:
    one = functools.partial(_quantize_rows, x=x, bits=bits, symmetric=symmetric, rows=rows,
                            cols=cols, clip_grid=clip_grid)
    codes, scale, zero = jax.lax.map(one, w.reshape(n // rb, rb, k))
    return (codes.reshape(n, k), scale.reshape(n, -1),
            None if zero is None else zero.reshape(n, -1))
  return _quantize_rows(w, x=x, bits=bits, symmetric=symmetric, rows=rows, cols=cols,
                        clip_grid=clip_grid)


def _quantize_rows(w, *, x, bits, symmetric, rows, cols, clip_grid):
  """`quantize_weight` on a block of whole tiles (rows divisible by `rows`)."""
  n, k = w.shape
  g = k // cols
  lo, hi = _tile_range(w, symmetric=symmetric, rows=rows, cols=cols)
  quant = functools.partial(_tile_quantize, w, lo, hi, bits=bits, symmetric=symmetric, rows=rows)

  def tile_error(clip):
    err = w - dequantize_weight(*quant(jnp.full(lo.shape, clip, jnp.float32)))
    # Output MSE ||X e_n||^2 summed over the tile; per group the diagonal of X^T X weights it.
    if x is None:
      per = jnp.sum(err.reshape(n, g, cols) ** 2, axis=-1)
    elif g == 1:
      per = jnp.sum((err @ x.T) ** 2, axis=-1, keepdims=True)
    else:
      h = jnp.mean(x * x, axis=0).reshape(g, cols)
      per = jnp.sum(err.reshape(n, g, cols) ** 2 * h, axis=-1)
    return per.reshape(n // rows, rows, g).sum(axis=1)  # (N // rows, G)

  best_clip = jnp.full(lo.shape, clip_grid[0], jnp.float32)
  if len(clip_grid) > 1:
    best_err = tile_error(clip_grid[0])
    for c in clip_grid[1:]:  # a handful of static candidates; only (N // rows, G) state is kept
      e = tile_error(c)
      best_clip = jnp.where(e < best_err, c, best_clip)
      best_err = jnp.minimum(e, best_err)
  codes, scale, zero = quant(best_clip)
  return codes.astype(jnp.int8), scale.astype(jnp.float32), zero


def codes_dtype(bits: Optional[int]):
  """The storage dtype of codes of `bits` (int4 up to 4 bits, else int8; None: float32 weights
  of a transforms-only pack)."""
  if bits is None:
    return jnp.float32
  return jnp.int4 if bits <= 4 else jnp.int8
