"""GPTQ: error-compensating rounding of a weight against the Hessian of its inputs.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(ICLR 2023), as the rotation methods that lead at 4 bits apply it (QuaRot, Ashkboos et al. 2024;
SpinQuant, Liu et al. 2024): after the input transform, on the weight in the basis its int4 codes
live in. Columns (input channels) are rounded one at a time; the output error of each column is
pushed onto the not yet rounded columns through the upper Cholesky factor of the inverse Hessian,
128 columns at a time (lazy batches), so that ||X W - X Q|| is minimised greedily instead of
||W - Q|| entrywise.

Here the scales (and zero points) are fixed beforehand, by the clip search of
`numerics.quantize_weight`; GPTQ only chooses the codes. This is GPTQ with "static groups": every
granularity (per channel, per head, per group) works the same way.

Everything is float32 jax (traceable, so it runs inside the packing's `lax.map` over stacked
layers) and deterministic: no randomness, fixed reduction order on one device.

Axes: N output channels, K input channels (the transformed basis), G scale groups, B columns of a
lazy batch, NB Hessian blocks of HB channels (K = NB * HB).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def densify(h: jax.Array) -> jax.Array:
  """A block-diagonal Hessian (NB, HB, HB) -> the dense (K, K) matrix it stands for."""
  nb, hb, _ = h.shape
  if nb == 1:
    return h[0]
  eye = jnp.eye(nb, dtype=h.dtype)
  return jnp.einsum("bij,bc->bicj", h, eye).reshape(nb * hb, nb * hb)


def transform_hessian(h: jax.Array, apply: Callable[[jax.Array], jax.Array],
                      num_blocks: int) -> jax.Array:
  """The Hessian of the transformed input x M, given that of x, kept as NB diagonal blocks.

  Args:
    h: (NB0, HB0, HB0) block-diagonal X^T X of the original input.
    apply: x (..., K) -> x M (..., K), linear (the input transform's `apply`).
    num_blocks: NB of the result: M mixes the blocks of h, so the result is M^T H M computed dense
      (K x K transient) and cut back to its diagonal blocks.

  Returns:
    (NB, K // NB, K // NB) float32, the diagonal blocks of M^T H M.
  """
  dense = densify(h)
  hm = apply(dense)  # rows of H times M: H M
  mhm = apply(hm.T)  # (H M)^T M = M^T H M (H symmetric)
  mhm = 0.5 * (mhm + mhm.T)
  k = mhm.shape[0]
  hb = k // num_blocks
  blocks = mhm.reshape(num_blocks, hb, num_blocks, hb)
  return jnp.stack([blocks[b, :, b] for b in range(num_blocks)])


def inverse_cholesky(h: jax.Array, damp: float) -> jax.Array:
  """Upper Cholesky factor U of the dampened inverse Hessian (H + d I)^-1 = U^T U -> (K, K).

  Dead channels (zero diagonal: the input never saw them) get H_ii = 1 so H stays invertible; d is
  `damp` times the mean diagonal (GPTQ's percdamp). If float32 Cholesky still fails (NaN), U = I,
  which makes `gptq_codes` round to nearest: a safe, deterministic fallback.
  """
  k = h.shape[0]
  eye = jnp.eye(k, dtype=jnp.float32)
  h = h.astype(jnp.float32)
  dead = jnp.diag(h) <= 0
  h = jnp.where(dead[:, None] | dead[None, :], 0.0, h) + jnp.diag(dead.astype(jnp.float32))
  h = h + damp * jnp.mean(jnp.diag(h)) * eye
  low = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((low, True), eye)
  u = jnp.linalg.cholesky(0.5 * (hinv + hinv.T)).T
  return jnp.where(jnp.all(jnp.isfinite(u)), u, eye)


def hessian_block_for(k: int, limit: int) -> int:
  """HB of a K-wide input's Hessian: K up to `limit`, else K's largest divisor <= limit (2048 for
  16384; SigLIP's 4304 -> 1076)."""
  return max(d for d in range(1, min(k, limit) + 1) if k % d == 0)


def _lazy_block(k: int, block: int) -> int:
  """The largest lazy-batch width <= block that divides K (K need not be a multiple of 128)."""
  return max(d for d in range(1, min(block, k) + 1) if k % d == 0)


def gptq_codes_dense(w: jax.Array, u: jax.Array, scale: jax.Array, zero: Optional[jax.Array], *,
                     qmin: int, qmax: int, block: int = 128) -> jax.Array:
  """GPTQ codes of w (N, K) with per-column scales, given U from `inverse_cholesky`.

  Args:
    w: (N, K) float32 weight (transposed view, out x in).
    u: (K, K) upper Cholesky factor of the inverse Hessian.
    scale, zero: (N, K) per-entry scale and zero point (zero None: symmetric).
    qmin, qmax: the integer range.
    block: lazy-batch width B (columns rounded before the rest of W is updated by one matmul).

  Returns:
    (N, K) float32 integer-valued codes in [qmin, qmax].
  """
  n, k = w.shape
  b = _lazy_block(k, block)
  z = jnp.zeros_like(scale) if zero is None else zero

  def quant(col, s, zc):
    q = jnp.clip(jnp.round(col / s) + zc, qmin, qmax)
    return q, (q - zc) * s

  def batch(i, carry):
    w, codes = carry
    start = i * b
    wb = jax.lax.dynamic_slice(w, (0, start), (n, b))
    sb = jax.lax.dynamic_slice(scale, (0, start), (n, b))
    zb = jax.lax.dynamic_slice(z, (0, start), (n, b))
    ub = jax.lax.dynamic_slice(u, (start, start), (b, b))

    def column(j, c):
      wb, qb, eb = c
      col = jax.lax.dynamic_index_in_dim(wb, j, axis=1, keepdims=False)
      q, deq = quant(col, jax.lax.dynamic_index_in_dim(sb, j, 1, False),
                     jax.lax.dynamic_index_in_dim(zb, j, 1, False))
      urow = jax.lax.dynamic_index_in_dim(ub, j, axis=0, keepdims=False)  # zero left of j
      e = (col - deq) / urow[j]
      wb = wb - e[:, None] * urow[None, :]
      return wb, qb.at[:, j].set(q), eb.at[:, j].set(e)

    zeros = jnp.zeros((n, b), jnp.float32)
    _, qb, eb = jax.lax.fori_loop(0, b, column, (wb, zeros, zeros))
    # The batch's error onto every later column (U's rows are zero left of the batch; the batch's
    # own columns are done and not read again).
    urows = jax.lax.dynamic_slice(u, (start, 0), (b, k))
    w = w - jnp.matmul(eb, urows, precision=_HIGHEST)
    return w, jax.lax.dynamic_update_slice(codes, qb, (0, start))

  _, codes = jax.lax.fori_loop(0, k // b, batch, (w.astype(jnp.float32), jnp.zeros((n, k), jnp.float32)))
  return codes


def act_order(h: jax.Array) -> jax.Array:
  """GPTQ's act-order of one Hessian block h (HB, HB): its columns by descending diagonal (the
  input channels with the most energy rounded first, while the most columns remain to absorb
  their error), ties in channel order -> (HB,) int32 permutation."""
  return jnp.argsort(-jnp.diag(h), stable=True).astype(jnp.int32)


def gptq_codes(w: jax.Array, h: jax.Array, scale: jax.Array, zero: Optional[jax.Array], *,
               qmin: int, qmax: int, damp: float = 0.01, block: int = 128,
               ordered: bool = False) -> jax.Array:
  """GPTQ codes of w (N, K) for fixed scales (N, G) / zero points (N, G) or None.

  Args:
    w: (N, K) float32 weight in the quantized basis.
    h: (NB, HB, HB) block-diagonal Hessian X^T X of the input in the same basis; NB > 1 runs GPTQ
      independently per block of HB columns (error feedback stays inside a block).
    scale, zero: (N, G) as from `numerics.quantize_weight`; group g covers columns
      [g K/G, (g+1) K/G).
    qmin, qmax: the integer range; damp: GPTQ's percdamp; block: lazy-batch width.
    ordered: round each Hessian block's columns in `act_order` (the codes come back in channel
      order, so storage and the matmul are unchanged; the scales stay fixed per channel).

  Returns:
    (N, K) float32 integer-valued codes, dequantized as scale * (codes - zero) per group.
  """
  n, k = w.shape
  nb, hb, _ = h.shape
  if nb * hb != k:
    raise ValueError(f"gptq_codes: Hessian blocks {h.shape} do not cover K={k} ({w.shape=})")
  g = scale.shape[-1]
  per_col = lambda a: None if a is None else jnp.repeat(a.astype(jnp.float32), k // g, axis=1)
  s, z = per_col(scale), per_col(zero)
  cols = lambda a: None if a is None else a.reshape(n, nb, hb).transpose(1, 0, 2)

  def run(hh, wb, sb, zb):
    p = act_order(hh) if ordered else None
    take = lambda a: a if a is None or p is None else a[:, p]
    hh = hh if p is None else hh[p][:, p]
    codes = gptq_codes_dense(take(wb), inverse_cholesky(hh, damp), take(sb), take(zb),
                             qmin=qmin, qmax=qmax, block=block)
    return codes if p is None else codes[:, jnp.argsort(p)]

  codes = jax.vmap(run, in_axes=(0, 0, 0, None if z is None else 0))(h, cols(w), cols(s), cols(z))
  return codes.transpose(1, 0, 2).reshape(n, k)
