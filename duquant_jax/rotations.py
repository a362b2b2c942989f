"""Block-diagonal orthogonal rotations for DuQuant's input transform.

DuQuant (Lin et al., "DuQuant: Distributing Outliers via Dual Transformation Makes Stronger Quantized
LLMs", NeurIPS 2024, arXiv:2406.01721) rotates a linear's input channels in blocks of b: x' = x R with
R = diag(R_0, ..., R_{G-1}), G = K // b, each R_g a (b, b) orthogonal matrix. This module builds those
blocks; `transforms.py` composes them with smoothing and the zigzag permutation.

Layout: channels are the LAST axis K; a block rotation is an array (..., G, b, b) acting on x reshaped
to (..., M, G, b) by `einsum('...mgb,...gbc->...mgc')` (row vector times matrix). Leading axes `...`
(layers, projections) are batched with jnp, never looped over in Python.

What follows the paper and what does not:
- `greedy_rotation` is the paper's activation-aware construction (section 3.1): repeatedly take the
  channel with the largest |x| in a block, apply an orthogonal matrix whose row for that channel is
  uniform 1/sqrt(b) (so that channel is spread evenly over the block), compose, and keep the prefix of
  steps with the smallest block max. Differences from the official PyTorch code, on purpose: one
  rotation per block (the paper's formulation; the official code shares one rotation across all
  blocks of a layer), and the non-uniform rows come from the QR of a Gaussian (the paper's random
  orthogonal factor Q) rather than a fixed Givens chain, so the whole search is batched over blocks
  and layers in one `lax.scan`.
- `random_block_rotation` (QR of Gaussians, Haar) and `hadamard_block_rotation` are the usual
  data-free baselines (QuaRot-style Hadamard).
- `weight_svd_rotation` / `weight_qr_rotation` reproduce the seed documents' weight-based rotations
  (../shared/seeds/DUQUANT_QR_OPTIMIZATION.md) for comparison only. They ignore activations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def check_block_size(num_channels: int, block_size: int, where: str = "input") -> int:
  """Returns the number of blocks G = K // b.

  Args:
    num_channels: K, the channel (last) axis length.
    block_size: b.
    where: what is being blocked, for the error message.

  Returns:
    G = K // b.

  Raises:
    ValueError: b < 1 or b does not divide K.
  """
  if block_size < 1:
    raise ValueError(f"{where}: block size must be >= 1, got {block_size}")
  if num_channels % block_size:
    raise ValueError(
        f"{where}: block size {block_size} does not divide the channel count {num_channels}")
  return num_channels // block_size


def _qr_fixed(a: jax.Array, mode: str = "reduced") -> jax.Array:
  """Q of the QR of a (..., m, n) with the signs of R's diagonal made positive.

  QR is unique only up to those signs; fixing them makes Q a deterministic function of `a`, and for a
  Gaussian `a` Haar-distributed (Mezzadri 2007, "How to generate random matrices from the classical
  compact groups").
  """
  q = jnp.linalg.qr(a, mode=mode)[0]
  n = min(a.shape[-2], a.shape[-1])
  # diag(R)_i = q_i . a_i since R = Q^T A: read the signs off Q so the program holds only Q-only QR
  # calls (jaxlib 0.10.2 XLA:CPU programs with two batched QRs whose R outputs were both used were
  # seen to hang; see the transforms report).
  d = jnp.sum(q[..., :, :n] * a[..., :, :n], axis=-2)
  sign = jnp.where(d < 0, -1.0, 1.0).astype(q.dtype)
  if q.shape[-1] > n:  # complete mode, m > n: the extra columns are an arbitrary complement basis.
    sign = jnp.concatenate([sign, jnp.ones((*sign.shape[:-1], q.shape[-1] - n), q.dtype)], -1)
  return q * sign[..., None, :]


@functools.partial(jax.jit, static_argnames=("shape",))
def _random_orthogonal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return _qr_fixed(jax.random.normal(key, shape, jnp.float32))


def random_orthogonal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Haar-random orthogonal matrices from the batched QR of Gaussian matrices.

  Args:
    key: PRNG key; the result is a deterministic function of it.
    shape: (..., b, b).

  Returns:
    (..., b, b) float32 orthogonal matrices.

  Raises:
    ValueError: shape is not (..., b, b).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2 or shape[-1] != shape[-2] or shape[-1] < 1:
    raise ValueError(f"random_orthogonal: shape must be (..., b, b), got {shape}")
  return _random_orthogonal(key, shape)


def block_hadamard(b: int) -> jax.Array:
  """Normalized Sylvester Hadamard matrix H (b, b), H H^T = I.

  Args:
    b: order, a power of 2.

  Returns:
    (b, b) float32 with entries +-1/sqrt(b).

  Raises:
    ValueError: b is not a power of 2.
  """
  b = int(b)
  if b < 1 or b & (b - 1):
    raise ValueError(f"block_hadamard: size {b} is not a power of 2 (Sylvester construction)")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < b:
    h = np.block([[h, h], [h, -h]])
  return jnp.asarray(h / np.sqrt(b, dtype=np.float32))


def random_block_rotation(key: jax.Array, batch_shape: tuple[int, ...], num_channels: int,
                          block_size: int) -> jax.Array:
  """Independent Haar-random rotation per block (a data-free baseline).

  Args:
    key: PRNG key.
    batch_shape: leading axes `...` (e.g. (L,) for stacked layers).
    num_channels: K.
    block_size: b, dividing K.

  Returns:
    (*batch_shape, K // b, b, b) float32.

  Raises:
    ValueError: b does not divide K.
  """
  g = check_block_size(num_channels, block_size, "random_block_rotation")
  return random_orthogonal(key, (*tuple(batch_shape), g, block_size, block_size))


def hadamard_block_rotation(batch_shape: tuple[int, ...], num_channels: int,
                            block_size: int) -> jax.Array:
  """The same normalized Hadamard matrix on every block (a data-free baseline, QuaRot-style).

  Args:
    batch_shape: leading axes `...`.
    num_channels: K.
    block_size: b, a power of 2 dividing K.

  Returns:
    (*batch_shape, K // b, b, b) float32.

  Raises:
    ValueError: b does not divide K, or b is not a power of 2.
  """
  g = check_block_size(num_channels, block_size, "hadamard_block_rotation")
  h = block_hadamard(block_size)
  return jnp.broadcast_to(h, (*tuple(batch_shape), g, block_size, block_size))


def _weight_blocks(w: jax.Array, block_size: int, name: str) -> jax.Array:
  if w.ndim < 2:
    raise ValueError(f"{name}: w must be (..., K, N), got {w.shape=}")
  k, n = w.shape[-2:]
  g = check_block_size(k, block_size, name)
  # (..., G, b, N): block g holds input rows g*b .. (g+1)*b - 1 of W.
  return w.astype(jnp.float32).reshape(*w.shape[:-2], g, block_size, n)


@functools.partial(jax.jit, static_argnames=("block_size",))
def weight_svd_rotation(w: jax.Array, block_size: int) -> jax.Array:
  """The seed documents' first rotation: U of the SVD of each (b, N) block of W's input rows.

  Comparison only: it IGNORES ACTIVATIONS, so it does nothing targeted about activation outliers.
  Folded as W' = R^T W, block g becomes U^T W_g = S V^T: the block's energy is concentrated into its
  first rows, which is what made the seed's per-channel int4 weights worse (docs/design.md, "DuQuant, as published and as the seeds coded it").

  Args:
    w: (..., K, N) weight of y = x W.
    block_size: b, dividing K.

  Returns:
    (..., K // b, b, b) float32, block g = U_g with W_g = U_g S_g V_g^T (full U).

  Raises:
    ValueError: bad shape or b does not divide K.
  """
  blocks = _weight_blocks(w, block_size, "weight_svd_rotation")
  u, _, _ = jnp.linalg.svd(blocks, full_matrices=True)
  return u


@functools.partial(jax.jit, static_argnames=("block_size",))
def weight_qr_rotation(w: jax.Array, block_size: int) -> jax.Array:
  """The seed documents' faster replacement: Q of the complete QR of each (b, N) block of W.

  Comparison only: it IGNORES ACTIVATIONS, and it is not "almost the same" as the SVD's U (folded, block
  g becomes Q_g^T W_g = R_g, upper triangular: a different energy layout).

  Args:
    w: (..., K, N) weight of y = x W.
    block_size: b, dividing K.

  Returns:
    (..., K // b, b, b) float32, block g = Q_g with W_g = Q_g R_g (complete Q, sign-fixed).

  Raises:
    ValueError: bad shape or b does not divide K.
  """
  blocks = _weight_blocks(w, block_size, "weight_qr_rotation")
  return _qr_fixed(blocks, mode="complete")


@functools.partial(jax.jit, static_argnames=("shape",))
def spreading_factors(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Random orthogonal matrices whose row 0 is uniform 1/sqrt(b): the greedy step's building block.

  x @ F sends x's channel 0 to every output channel with weight 1/sqrt(b) (an outlier there is spread
  evenly over the block); rows 1.. are a random orthonormal basis of the complement, from the QR of a
  Gaussian matrix whose first column was replaced by ones.

  Args:
    key: PRNG key.
    shape: (..., b, b).

  Returns:
    (..., b, b) float32 F, F F^T = I, F[..., 0, :] = 1/sqrt(b).
  """
  b = shape[-1]
  g = jax.random.normal(key, shape, jnp.float32)
  g = g.at[..., :, 0].set(1.0)
  # With R's diagonal positive, Q's first column is exactly ones / ||ones||.
  q = _qr_fixed(g)
  f = jnp.swapaxes(q, -1, -2)
  # Remove QR's rounding from the row that matters; the matrix stays orthogonal to float32 precision.
  return f.at[..., 0, :].set(1.0 / math.sqrt(b))


def _block_stats(xb: jax.Array) -> tuple[jax.Array, jax.Array]:
  """xb (..., R, G, b) -> (block max |x| (..., G), channel of that max (..., G) int32)."""
  chan_max = jnp.max(jnp.abs(xb), axis=-3)  # (..., G, b)
  return jnp.max(chan_max, axis=-1), jnp.argmax(chan_max, axis=-1).astype(jnp.int32)


def _swap_values(v: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
  """The transposition (i j) applied to the values of v (elementwise; i, j broadcast)."""
  return jnp.where(v == i, j, jnp.where(v == j, i, v))


def greedy_rotation(x: jax.Array, block_size: int, key: jax.Array,
                    max_steps: int = 256) -> jax.Array:
  """DuQuant's activation-aware greedy block rotation R1 / R2 (paper section 3.1).

  For every block g (b channels) of every leading index, independently and all at once:
    R = I
    for s in 1..max_steps:
      c = channel of the largest |x R| in the block (over the R sample rows)
      R = R Q_s       # Q_s orthogonal, row c uniform 1/sqrt(b): channel c is spread evenly
      m_s = max |x R| over the block
  and returns the prefix R = Q_1 .. Q_k with the smallest m_k (k = 0, the identity, when no step
  helps; ties keep the shorter prefix), so max |x R| <= max |x| per block up to float32 rounding.

  Q_s = the rows of F_g reassigned to channels: row 0 of F_g (uniform, see `spreading_factors`) goes
  to channel c, rows 1.. to the other channels in an order drawn at random per step. F_g is drawn once
  per block by one batched QR over all blocks and leading axes; the per-step reassignment gives every
  step a different random orthogonal factor without a batched QR per step (which alone would cost
  about 0.4 s per step for the 4608 blocks below on 2 CPU cores).

  Two passes, both vectorised over blocks: a `lax.scan` runs the greedy search on the samples only
  (R * K * 2b flop per step) and records the chosen channels; a `fori_loop` then composes the rotation
  of each block's best prefix ((..., G, b, b) batched matmuls, 2 b^3 flop per block per step), stopping
  at the longest best prefix. Measured on 2 shared CPU cores (jax 0.10.2), x (18, 1, 16384), b = 64
  (4608 blocks), after compilation: 1.3 s for max_steps = 8, 2.4 s for 16 (about 0.13 s per composed
  step, plus ~0.4 s for the batched QR); first call about 3 s more for compilation. x (18, 1, 2048):
  0.45 s for 16 steps, 2 s for 256.

  Args:
    x: (..., R, K) activation samples; R = 1 with the per-channel abs-max vector is the common case.
    block_size: b, dividing K.
    key: PRNG key; the result is a deterministic function of (x, key, max_steps).
    max_steps: number of greedy steps (the paper uses up to 256; 8-16 is plenty for large layers).

  Returns:
    (..., K // b, b, b) float32 orthogonal blocks R_g; apply as x' = einsum('...rgb,...gbc->...rgc').

  Raises:
    ValueError: x is not (..., R, K), b does not divide K, or max_steps < 0.
  """
  if x.ndim < 2:
    raise ValueError(f"greedy_rotation: x must be (..., R, K), got {x.shape=}")
  max_steps = int(max_steps)
  if max_steps < 0:
    raise ValueError(f"greedy_rotation: max_steps must be >= 0, got {max_steps}")
  check_block_size(x.shape[-1], block_size, "greedy_rotation")
  # Jitted even when called eagerly: op-by-op dispatch of the two loops costs seconds per call.
  return _greedy_rotation(x, key, block_size=int(block_size), max_steps=max_steps)


@functools.partial(jax.jit, static_argnames=("block_size", "max_steps"))
def _greedy_rotation(x: jax.Array, key: jax.Array, *, block_size: int,
                     max_steps: int) -> jax.Array:
  k = x.shape[-1]
  g = k // block_size
  lead = x.shape[:-2]
  b = block_size
  xb = x.astype(jnp.float32).reshape(*lead, x.shape[-2], g, b)
  eye = jnp.broadcast_to(jnp.eye(b, dtype=jnp.float32), (*lead, g, b, b))
  if max_steps == 0:
    return eye
  k_factor, k_order = jax.random.split(key)
  factors = spreading_factors(k_factor, (*lead, g, b, b))
  # sigma_s: random assignment of F's rows to channels at step s (shared by all blocks); the chosen
  # channel c is then swapped with the channel that sigma_s gave row 0: a_s = sigma_s o (c p_s).
  sigma = jnp.argsort(jax.random.uniform(k_order, (max_steps, b)), axis=-1).astype(jnp.int32)
  sigma_inv = jnp.argsort(sigma, axis=-1).astype(jnp.int32)
  p = sigma_inv[:, 0]

  def search(carry, step):
    xc, chan = carry
    sig_inv, p_s = step
    # x Q = y F with y[j] = x[a^{-1}(j)], a^{-1} = (c p) o sigma^{-1}.
    src = _swap_values(sig_inv, chan[..., None], p_s)  # (..., G, b)
    y = jnp.take_along_axis(xc, jnp.broadcast_to(src[..., None, :, :], xc.shape), axis=-1)
    xc = jnp.einsum("...rgb,...gbc->...rgc", y, factors, precision=_HIGHEST)
    cur_max, new_chan = _block_stats(xc)
    return (xc, new_chan), (chan, cur_max)

  max0, chan0 = _block_stats(xb)
  _, (chans, maxes) = jax.lax.scan(search, (xb, chan0), (sigma_inv, p))
  maxes = jnp.concatenate([max0[None], maxes], axis=0)  # (S + 1, ..., G)
  best_len = jnp.argmin(maxes, axis=0)  # first minimum: the shortest best prefix, (..., G)

  def compose(s, rot):
    # Row i of Q_s is F[a_s(i)], a_s(i) = sigma_s[(c p_s)(i)].
    c = chans[s]
    rows = sigma[s][_swap_values(jnp.arange(b, dtype=jnp.int32), c[..., None], p[s])]
    q = jnp.take_along_axis(factors, rows[..., None], axis=-2)
    new = jnp.einsum("...gab,...gbc->...gac", rot, q, precision=_HIGHEST)
    return jnp.where((s < best_len)[..., None, None], new, rot)

  # Past the longest best prefix every block is frozen: stop there instead of at max_steps.
  return jax.lax.fori_loop(0, jnp.max(best_len), compose, eye)


@functools.partial(jax.jit, static_argnames=("precision",))
def apply_block_rotation(x: jax.Array, rot: jax.Array, *, precision=None) -> jax.Array:
  """x (..., M, K) times the block-diagonal rot (..., K // b, b, b): x' = x diag(R_0, .., R_{G-1}).

  Leading axes of x (excluding M) and rot broadcast against each other.

  Args:
    x: (..., M, K).
    rot: (..., G, b, b) with G * b = K.
    precision: `lax.Precision` for the einsum (None: backend default, which may be TF32 on GPU).

  Returns:
    (..., M, K) in the promoted dtype of x and rot.

  Raises:
    ValueError: the blocks do not tile K.
  """
  g, b = rot.shape[-3], rot.shape[-1]
  k = x.shape[-1]
  if g * b != k or rot.shape[-2] != b:
    raise ValueError(f"block rotation {rot.shape=} does not tile the channel axis of {x.shape=}")
  xb = x.reshape(*x.shape[:-1], g, b)
  return jnp.einsum("...mgb,...gbc->...mgc", xb, rot, precision=precision).reshape(
      *xb.shape[:-2], k)


@functools.partial(jax.jit, static_argnames=("precision",))
def apply_block_rotation_transposed(w: jax.Array, rot: jax.Array, *, precision=None) -> jax.Array:
  """diag(R_g)^T w for w (..., K, N): the weight-side fold of `apply_block_rotation`.

  Args:
    w: (..., K, N).
    rot: (..., G, b, b) with G * b = K.
    precision: `lax.Precision` for the einsum.

  Returns:
    (..., K, N).

  Raises:
    ValueError: the blocks do not tile K.
  """
  g, b = rot.shape[-3], rot.shape[-1]
  k, n = w.shape[-2:]
  if g * b != k or rot.shape[-2] != b:
    raise ValueError(f"block rotation {rot.shape=} does not tile the input axis of {w.shape=}")
  wb = w.reshape(*w.shape[:-2], g, b, n)
  return jnp.einsum("...gcb,...gcn->...gbn", rot, wb, precision=precision).reshape(
      *wb.shape[:-3], k, n)
