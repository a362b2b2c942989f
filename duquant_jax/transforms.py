"""DuQuant's input transform: smoothing, block rotation, zigzag permutation, block rotation.

Follows DuQuant (Lin et al., "DuQuant: Distributing Outliers via Dual Transformation Makes Stronger
Quantized LLMs", NeurIPS 2024, arXiv:2406.01721), section 3, with the corrections of docs/design.md
("DuQuant, as published and as the seeds coded it"). For a linear y = x W (W: (K, N), in x out)
the input transform is

    x' = ((x / lam) R1)[perm] R2 = (x / lam) T,     T = R1 P R2 orthogonal,
    W' = T^T diag(lam) W,                           so x' W' = x W exactly (in exact arithmetic).

- lam: SmoothQuant / DuQuant smoothing factors (`smoothing_factors`);
- R1, R2: block-diagonal rotations (rotations.py), by default DuQuant's greedy activation-aware blocks;
- perm: the zigzag permutation (`zigzag_permutation`), sorting channels by their max after R1 and
  dealing them to blocks so that every block gets a similar share of outliers; `head_constrained_zigzag`
  keeps every channel inside its attention head, for inputs where head structure matters.
W' is quantized per output channel, x' per token (at run time).

Layout: channels are the LAST axis K; block rotations are (..., G, b, b) with G = K // b; leading axes
`...` (layers, projections) are batched, broadcasting against the leading axes of x (..., M, K) and
w (..., K, N). Everything here is pure jnp and jittable; static arguments (block sizes, method names,
step counts) are Python values.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.rotations import (
    apply_block_rotation,
    apply_block_rotation_transposed,
    block_hadamard,
    check_block_size,
    greedy_rotation,
    hadamard_block_rotation,
    random_block_rotation,
    random_orthogonal,
    spreading_factors,
    weight_qr_rotation,
    weight_svd_rotation,
)

__all__ = [
    "InputTransform",
    "OutputRotation",
    "ROTATIONS",
    "PERMUTATIONS",
    "apply_block_rotation",
    "block_hadamard",
    "block_inverse",
    "build_duquant_transform",
    "check_block_alignment",
    "greedy_rotation",
    "hadamard_block_rotation",
    "head_constrained_zigzag",
    "random_block_rotation",
    "random_orthogonal",
    "restore_output",
    "rotate_output",
    "smoothing_factors",
    "spreading_factors",
    "weight_qr_rotation",
    "weight_svd_rotation",
    "zigzag_permutation",
]

ROTATIONS = ("greedy", "random", "hadamard", "weight_svd", "weight_qr", "none")
PERMUTATIONS = ("zigzag", "head_zigzag", "none")

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Smoothing.


@functools.partial(jax.jit, static_argnames=("alpha", "eps", "min_scale", "max_scale"))
def smoothing_factors(act_absmax: jax.Array, w_absmax: jax.Array, alpha: float, *,
                      eps: float = 1e-5, min_scale: float = 1e-4,
                      max_scale: float = 1e4) -> jax.Array:
  """SmoothQuant / DuQuant smoothing: lam_j = max|x_j|^alpha / max|W_j|^(1 - alpha).

  Convention: x' = x / lam, W' = diag(lam) W (row j of W scaled by lam_j), so x' W' = x W.

  Guards: channels whose activation or weight max is non-finite or below `eps` (dead channels: no
  information to balance) get lam = 1; the others are clipped to [min_scale, max_scale] so neither
  side can underflow to denormals or overflow in bf16 after folding.

  Args:
    act_absmax: (..., K) per-channel max |x| over the calibration tokens.
    w_absmax: (..., K) per-input-channel max |W| over the output channels (and over every linear
      sharing this input).
    alpha: migration strength in [0, 1] (DuQuant uses 0.5-0.6).
    eps: below this a channel counts as dead.
    min_scale: lower clip of lam.
    max_scale: upper clip of lam.

  Returns:
    lam (..., K) float32, broadcast shape of the two inputs.

  Raises:
    ValueError: alpha outside [0, 1], or the channel axes differ.
  """
  alpha = float(alpha)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"smoothing_factors: alpha must be in [0, 1], got {alpha}")
  if act_absmax.shape[-1:] != w_absmax.shape[-1:]:
    raise ValueError(
        f"smoothing_factors: channel axes differ, {act_absmax.shape=} vs {w_absmax.shape=}")
  a = jnp.abs(act_absmax.astype(jnp.float32))
  w = jnp.abs(w_absmax.astype(jnp.float32))
  alive = jnp.isfinite(a) & jnp.isfinite(w) & (a >= eps) & (w >= eps)
  # Compute in log space: a^alpha / w^(1-alpha) overflows float32 for massive activations otherwise.
  a_safe = jnp.where(alive, a, 1.0)
  w_safe = jnp.where(alive, w, 1.0)
  log_lam = alpha * jnp.log(a_safe) - (1.0 - alpha) * jnp.log(w_safe)
  lam = jnp.exp(jnp.clip(log_lam, np.log(min_scale), np.log(max_scale)))
  return jnp.where(alive, lam, 1.0)


# ----------------------------------------------------------------------------------------------
# Permutations.


def _zigzag_slots(num_channels: int, num_blocks: int) -> np.ndarray:
  """slot_of_rank[i]: where the channel of rank i (0 = largest) lands in the permuted vector."""
  n = num_blocks
  b = num_channels // n
  i = np.arange(num_channels)
  pos = i % (2 * n)
  block = np.where(pos < n, pos, 2 * n - 1 - pos)
  # Each sweep over the n blocks hands every block exactly one channel, so rank i is the (i // n)-th
  # channel of its block, and blocks stay sorted by decreasing max like the official code's.
  return block * b + i // n


@functools.partial(jax.jit, static_argnames=("num_blocks",))
def zigzag_permutation(channel_max: jax.Array, num_blocks: int) -> jax.Array:
  """DuQuant's zigzag permutation (paper section 3.2).

  Sorts channels by max descending and deals them to blocks 0, 1, .., n-1, n-1, .., 0, 0, 1, ...
  so the few largest channels land in different blocks and every block's sum of channel maxes is about
  the same; the second rotation then has an even share of outliers to spread in every block.

  Args:
    channel_max: (..., K) per-channel max |x| (after smoothing and R1).
    num_blocks: n, dividing K (n = K // block_size).

  Returns:
    perm (..., K) int32: `x[..., perm]` is the permuted activation; block j of it is channels
    perm[..., j*b:(j+1)*b] with b = K // n.

  Raises:
    ValueError: n < 1 or n does not divide K.
  """
  k = channel_max.shape[-1]
  if num_blocks < 1 or k % num_blocks:
    raise ValueError(f"zigzag_permutation: {num_blocks} blocks do not divide the {k} channels")
  order = jnp.argsort(-channel_max.astype(jnp.float32), axis=-1, stable=True).astype(jnp.int32)
  slots = _zigzag_slots(k, num_blocks)
  # perm[slot_of_rank[i]] = order[i]  <=>  perm = order[rank_of_slot].
  rank_of_slot = np.argsort(slots)
  return jnp.take(order, jnp.asarray(rank_of_slot, jnp.int32), axis=-1)


def check_block_alignment(block_size: int, head_dim: int, where: str) -> None:
  """Refuses a block size that would let a rotation or permutation straddle two attention heads.

  Head alignment is never silently "fixed": a transform acting across head structure (q/k/v output
  channels, the attention-output projection's input, per-head scales) must stay inside one head.

  Args:
    block_size: b.
    head_dim: H.
    where: the param path or site, for the message.

  Raises:
    ValueError: b does not divide H.
  """
  if block_size < 1 or head_dim < 1 or head_dim % block_size:
    divisors = [d for d in (16, 32, 64, 128, 256) if head_dim >= 1 and head_dim % d == 0]
    raise ValueError(
        f"block size {block_size} does not divide head_dim {head_dim} at {where}; a block would "
        f"straddle two attention heads. Use a block size that divides {head_dim}"
        + (f" (e.g. {', '.join(map(str, divisors))})" if divisors else ""))


def head_constrained_zigzag(channel_max: jax.Array, block_size: int, head_dim: int) -> jax.Array:
  """Zigzag within each attention head: channels never leave their head.

  Args:
    channel_max: (..., K) per-channel max, K = num_heads * head_dim, head h = channels
      h*head_dim .. (h+1)*head_dim - 1.
    block_size: b, dividing head_dim.
    head_dim: H, dividing K.

  Returns:
    perm (..., K) int32 with perm[h*H:(h+1)*H] a permutation of head h's channels, zigzagged over
    its H // b blocks.

  Raises:
    ValueError: b does not divide H, or H does not divide K.
  """
  k = channel_max.shape[-1]
  check_block_alignment(block_size, head_dim, "head_constrained_zigzag")
  if k % head_dim:
    raise ValueError(f"head_constrained_zigzag: head_dim {head_dim} does not divide K = {k}")
  heads = k // head_dim
  local = zigzag_permutation(channel_max.reshape(*channel_max.shape[:-1], heads, head_dim),
                             head_dim // block_size)
  offset = (jnp.arange(heads, dtype=jnp.int32) * head_dim)[:, None]
  return (local + offset).reshape(*channel_max.shape[:-1], k)


@functools.partial(jax.jit, static_argnames=("axis",))
def _gather_channels(x: jax.Array, perm: jax.Array, axis: int) -> jax.Array:
  """x[..., perm] along `axis` (-1 or -2), broadcasting perm's leading axes with x's."""
  if axis == -1:
    lead = jnp.broadcast_shapes(x.shape[:-2], perm.shape[:-1])
    x = jnp.broadcast_to(x, (*lead, *x.shape[-2:]))
    idx = jnp.broadcast_to(perm[..., None, :], x.shape)
  else:
    lead = jnp.broadcast_shapes(x.shape[:-2], perm.shape[:-1])
    x = jnp.broadcast_to(x, (*lead, *x.shape[-2:]))
    idx = jnp.broadcast_to(perm[..., :, None], x.shape)
  return jnp.take_along_axis(x, idx, axis=axis)


# ----------------------------------------------------------------------------------------------
# The transform pytree.


@flax.struct.dataclass
class InputTransform:
  """DuQuant's online input transform of one linear (or a stack of them), as a pytree.

  Invariant: apply(x) @ fold(w) == x @ w up to float32 rounding, with
    apply(x) = ((x / smooth) R1)[perm] R2      (each step skipped when its field is None)
    fold(w)  = R2^{-1} P^T R1^{-1} diag(smooth) w,
  where R^{-1} is the exact inverse of the block as stored (`block_inverse`): a rotation rounded
  to float16 is not orthogonal, so its transpose would leave ~1e-3 relative error.
  Leading axes `...` broadcast with those of x (..., M, K) and w (..., K, N), e.g. a per-layer
  transform (L, ...) with x (L, M, K).

  Attributes:
    smooth: (..., K) smoothing factors lam (x is divided by them), or None.
    rot1: (..., K // b, b, b) first block rotation, or None. After `merged()` it is diag(1/lam) R1
      (rows scaled, still block diagonal, no longer orthogonal).
    perm: (..., K) int32, x' = x[..., perm], or None.
    rot2: (..., K // b, b, b) second block rotation, or None.
    rot1_scale / rot2_scale: (..., K // b, b, 1) float16 row scales of a rotation stored as int8
      codes (block row i = codes[i] * scale[i]; `compact`), or None for a float rotation.
    merged_smooth: static; True when rot1 carries the smoothing (see `merged()`).
    hadamard: static (b1, b2): block size of a generated normalized Hadamard rot1 / rot2 (not
      stored; rot1 / rot2 are then None), or 0.
    width: static K, set when generated blocks leave no array to read it from.
  Storage forms (int8 rotations, generated Hadamard blocks, int16 perm) are what `materialized()`
  turns into the plain float32 / int32 form that kernels read.
  """
  smooth: Optional[jax.Array] = None
  rot1: Optional[jax.Array] = None
  perm: Optional[jax.Array] = None
  rot2: Optional[jax.Array] = None
  merged_smooth: bool = flax.struct.field(pytree_node=False, default=False)
  rot1_scale: Optional[jax.Array] = None
  rot2_scale: Optional[jax.Array] = None
  hadamard: tuple[int, int] = flax.struct.field(pytree_node=False, default=(0, 0))
  width: int = flax.struct.field(pytree_node=False, default=0)

  def materialized(self) -> "InputTransform":
    """The same transform with float32 rotations (int8 codes dequantized, Hadamard blocks
    generated) and an int32 perm; itself when already in that form."""
    compact = (self.rot1_scale is not None or self.rot2_scale is not None or any(self.hadamard)
               or (self.perm is not None and self.perm.dtype != jnp.int32))
    if not compact:
      return self
    k = self.num_channels

    def rot(r, scale, b):
      if b:
        return hadamard_block_rotation((), k, b)
      if r is not None and scale is not None:
        return r.astype(jnp.float32) * scale.astype(jnp.float32)
      return r

    perm = None if self.perm is None else self.perm.astype(jnp.int32)
    return InputTransform(smooth=self.smooth, rot1=rot(self.rot1, self.rot1_scale, self.hadamard[0]),
                          perm=perm, rot2=rot(self.rot2, self.rot2_scale, self.hadamard[1]),
                          merged_smooth=self.merged_smooth)

  def compact(self) -> "InputTransform":
    """Narrow storage: rotations as int8 codes with float16 row scales (the fold inverts the
    stored blocks exactly, so only the spreading of outliers sees the 0.4% rounding), Hadamard
    blocks not stored (`generate_hadamard` marks them), perm as int16 when K < 2**15."""
    def q8(r):
      if r is None:
        return None, None
      r = r.astype(jnp.float32)
      scale = (jnp.max(jnp.abs(r), axis=-1, keepdims=True) / 127.0).astype(jnp.float16)
      safe = jnp.maximum(scale.astype(jnp.float32), 1e-30)
      return jnp.clip(jnp.round(r / safe), -127, 127).astype(jnp.int8), scale

    (r1, s1), (r2, s2) = q8(self.rot1), q8(self.rot2)
    perm = self.perm
    if perm is not None and perm.shape[-1] < 2 ** 15:
      perm = perm.astype(jnp.int16)
    return self.replace(rot1=r1, rot1_scale=s1, perm=perm, rot2=r2, rot2_scale=s2)

  def generate_hadamard(self, block_size: int) -> "InputTransform":
    """The transform with its (Hadamard, unmerged) rot1 / rot2 dropped and marked generated."""
    if self.merged_smooth:
      raise ValueError("generate_hadamard: rot1 carries the smoothing; it is not a Hadamard block")
    k = self.num_channels
    b1 = block_size if self.rot1 is not None else 0
    b2 = block_size if self.rot2 is not None else 0
    return self.replace(rot1=None, rot2=None, rot1_scale=None, rot2_scale=None, hadamard=(b1, b2),
                        width=k)

  @property
  def num_channels(self) -> Optional[int]:
    if self.width:
      return self.width
    for a in (self.smooth, self.perm):
      if a is not None:
        return a.shape[-1]
    for r in (self.rot1, self.rot2):
      if r is not None:
        return r.shape[-3] * r.shape[-1]
    return None

  def validate(self) -> None:
    """Checks that the fields agree on K and on their block layout.

    Raises:
      ValueError: inconsistent shapes or dtypes.
    """
    k = self.num_channels
    for name in ("rot1", "rot2"):
      scale = getattr(self, f"{name}_scale")
      r = getattr(self, name)
      if scale is not None and (r is None or r.dtype != jnp.int8 or scale.shape != r.shape[:-1] + (1,)):
        raise ValueError(f"InputTransform.{name}_scale {getattr(scale, 'shape', None)} needs int8 "
                         f"{name} codes of shape (..., G, b, b)")
    self = self.materialized()
    for name in ("smooth", "perm"):
      a = getattr(self, name)
      if a is not None and a.shape[-1] != k:
        raise ValueError(f"InputTransform.{name}: {a.shape=} but K = {k}")
    if self.perm is not None and not jnp.issubdtype(self.perm.dtype, jnp.integer):
      raise ValueError(f"InputTransform.perm must be integer, got {self.perm.dtype}")
    for name in ("rot1", "rot2"):
      r = getattr(self, name)
      if r is not None and (r.ndim < 3 or r.shape[-1] != r.shape[-2]
                            or r.shape[-3] * r.shape[-1] != k):
        raise ValueError(f"InputTransform.{name}: {r.shape=} is not (..., K // b, b, b), K = {k}")
    if self.merged_smooth and self.smooth is not None:
      raise ValueError("InputTransform: merged_smooth with smooth still set")

  def apply(self, x: jax.Array, *, precision=None) -> jax.Array:
    """x (..., M, K) -> x' (..., M, K) = ((x / smooth) R1)[perm] R2.

    Args:
      x: activations, channels last.
      precision: `lax.Precision` of the block matmuls (None: backend default; on GPU float32 that can
        mean TF32, so pass HIGHEST where exactness matters).

    Returns:
      x' with the leading axes of x and of the transform broadcast.
    """
    self = self.materialized()
    if self.smooth is not None:
      x = x / self.smooth[..., None, :]
    if self.rot1 is not None:
      x = apply_block_rotation(x, self.rot1, precision=precision)
    if self.perm is not None:
      x = _gather_channels(x, self.perm, axis=-1)
    if self.rot2 is not None:
      x = apply_block_rotation(x, self.rot2, precision=precision)
    return x

  def fold(self, w: jax.Array, *, precision=_HIGHEST) -> jax.Array:
    """w (..., K, N) -> W' = T^{-1} diag(smooth) w, so apply(x) @ fold(w) == x @ w.

    Args:
      w: weight of y = x w, input channels on axis -2.
      precision: `lax.Precision` of the block matmuls (offline: HIGHEST by default).

    Returns:
      (..., K, N) float32 (or w's dtype if wider), leading axes broadcast.
    """
    self = self.materialized()
    w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    if self.smooth is not None:
      w = w * self.smooth[..., :, None]
    # apply_block_rotation_transposed(w, X) is X^T w per block; X = (R^{-1})^T gives R^{-1} w.
    inv_t = lambda r: jnp.swapaxes(block_inverse(r), -1, -2)
    if self.rot1 is not None:
      w = apply_block_rotation_transposed(w, inv_t(self.rot1), precision=precision)
    if self.perm is not None:
      w = _gather_channels(w, self.perm, axis=-2)
    if self.rot2 is not None:
      w = apply_block_rotation_transposed(w, inv_t(self.rot2), precision=precision)
    return w

  def merged(self) -> "InputTransform":
    """Folds the smoothing into rot1 when both exist: rot1 <- diag(1/lam) R1 (still block diagonal).

    The online cost is then two block matmuls and one gather, with no separate division. Without a
    rot1 (or without smoothing) the transform is returned unchanged. `fold` stays exact.

    Returns:
      An equivalent `InputTransform` with smooth=None and merged_smooth=True.
    """
    if self.smooth is None or (self.rot1 is None and not self.hadamard[0]):
      return self
    self = self.materialized()
    g, b = self.rot1.shape[-3], self.rot1.shape[-1]
    inv = (1.0 / self.smooth).reshape(*self.smooth.shape[:-1], g, b)[..., :, None]
    return self.replace(smooth=None, rot1=inv * self.rot1, merged_smooth=True)


@jax.jit
def block_inverse(rot: jax.Array) -> jax.Array:
  """The exact inverse (to float32 rounding) of every block of rot (..., G, b, b), as float32.

  The blocks are near-orthogonal up to a row scaling: a rotation rounded to float16, or
  diag(1/lam) R after `InputTransform.merged` (rows of norm 1/lam_i, however far apart).
  With r_i the row norms, M = diag(r) Q and Q near-orthogonal, so M^{-1} = Q^{-1} diag(1/r), and
  Q^{-1} is three Newton-Schulz steps X <- X (2I - Q X) from X = Q^T (each squares the residual
  I - Q X, ~1e-3 for a float16 rounding): matmuls only, no pivoting, as exact as float32 allows.
  """
  m = rot.astype(jnp.float32)
  r = jnp.sqrt(jnp.sum(m * m, axis=-1, keepdims=True))
  q = m / r
  x = jnp.swapaxes(q, -1, -2)
  eye2 = 2.0 * jnp.eye(m.shape[-1], dtype=jnp.float32)
  for _ in range(3):
    x = jnp.matmul(x, eye2 - jnp.matmul(q, x, precision=_HIGHEST), precision=_HIGHEST)
  return x / jnp.swapaxes(r, -1, -2)


@flax.struct.dataclass
class OutputRotation:
  """Optional output-side block rotation with restore: y = (x (W R)) R^T.

  Invariant: restore(x @ rotate(w)) == x @ w in exact arithmetic.

  Attributes:
    rot: (..., N // b, b, b) orthogonal blocks on the output channels N.
  """
  rot: jax.Array

  def rotate(self, w: jax.Array, *, precision=_HIGHEST) -> jax.Array:
    return rotate_output(w, self.rot, precision=precision)

  def restore(self, y: jax.Array, *, precision=None) -> jax.Array:
    return restore_output(y, self.rot, precision=precision)


def rotate_output(w: jax.Array, rot: jax.Array, *, precision=_HIGHEST) -> jax.Array:
  """W R on the output channels: w (..., K, N), rot (..., N // b, b, b) -> (..., K, N).

  Raises:
    ValueError: the blocks do not tile N.
  """
  return apply_block_rotation(w, rot, precision=precision)


def restore_output(y: jax.Array, rot: jax.Array, *, precision=None) -> jax.Array:
  """y R^T for y (..., M, N): undoes `rotate_output` after the matmul.

  Raises:
    ValueError: the blocks do not tile N.
  """
  return apply_block_rotation(y, jnp.swapaxes(rot, -1, -2), precision=precision)


# ----------------------------------------------------------------------------------------------
# The builder.


def _build_rotation(kind: str, x: jax.Array, w: Optional[jax.Array], block_size: int,
                    key: jax.Array, max_steps: int) -> Optional[jax.Array]:
  """One block rotation of the chosen kind for activations x (..., R, K) / weight w (..., K, N)."""
  lead, k = x.shape[:-2], x.shape[-1]
  if kind == "none":
    return None
  if kind == "greedy":
    return greedy_rotation(x, block_size, key, max_steps)
  if kind == "random":
    return random_block_rotation(key, lead, k, block_size)
  if kind == "hadamard":
    return hadamard_block_rotation(lead, k, block_size)
  if kind == "weight_svd":
    return weight_svd_rotation(w, block_size)
  if kind == "weight_qr":
    return weight_qr_rotation(w, block_size)
  raise AssertionError(kind)


def build_duquant_transform(samples: Optional[jax.Array], absmax: jax.Array,
                            w_absmax: Optional[jax.Array] = None, *, block_size: int,
                            key: jax.Array, alpha: Optional[float] = 0.5,
                            rotation: str = "greedy", permutation: str = "zigzag",
                            head_dim: Optional[int] = None, w: Optional[jax.Array] = None,
                            max_steps: int = 256) -> InputTransform:
  """DuQuant's full input transform: smoothing, R1, zigzag, R2 (paper section 3; docs/design.md).

  1. lam = smoothing_factors(absmax, w_absmax, alpha) (skipped when alpha is None);
  2. R1 built on samples / lam (greedy: activation-aware; or a comparison baseline);
  3. perm = zigzag of the channel max of (samples / lam) R1 over the sample rows;
  4. R2 built the same way on ((samples / lam) R1)[perm] (weight_* kinds: on the correspondingly
     transformed weight).
  With permutation "none" there is no R2 either (a second rotation of the same blocks is just more
  greedy steps); with rotation "none" only smoothing and (optionally) the permutation remain.

  Every piece is jitted on its own, so calling this function un-jitted costs one compile per shape.
  Caution (jaxlib 0.10.2, XLA:CPU, 2 busy cores): wrapping the WHOLE builder in one `jax.jit` with the
  random or weight_* rotations at (8..18, 2048) sometimes never returned (a futex wait with idle
  CPUs); the same sizes called un-jitted ran. Not understood yet; prefer calling it un-jitted.

  Args:
    samples: (..., R, K) activation samples, or None to use absmax[..., None, :] (the common case:
      the per-channel abs-max vector as the single sample; zigzag then sorts by the rotated maxima).
    absmax: (..., K) per-channel max |x| over the calibration set.
    w_absmax: (..., K) per-input-channel max |W| (needed when alpha is not None).
    block_size: b, dividing K (and head_dim when given).
    key: PRNG key; the result is deterministic for a key.
    alpha: smoothing strength in [0, 1], or None for no smoothing.
    rotation: one of ROTATIONS.
    permutation: one of PERMUTATIONS.
    head_dim: when given, blocks must not straddle heads (checked) and "head_zigzag" keeps channels in
      their head.
    w: (..., K, N) weight, needed for the weight_* rotations.
    max_steps: greedy steps per rotation.

  Returns:
    InputTransform with float32 smooth / rot1 / rot2 and int32 perm (unused fields None).

  Raises:
    ValueError: unknown method names, bad shapes, non-dividing block sizes, missing inputs.
  """
  if rotation not in ROTATIONS:
    raise ValueError(f"build_duquant_transform: unknown rotation {rotation!r}, expected {ROTATIONS}")
  if permutation not in PERMUTATIONS:
    raise ValueError(
        f"build_duquant_transform: unknown permutation {permutation!r}, expected {PERMUTATIONS}")
  k = absmax.shape[-1]
  num_blocks = check_block_size(k, block_size, "build_duquant_transform")
  if head_dim is not None:
    check_block_alignment(block_size, head_dim, "build_duquant_transform")
    if k % head_dim:
      raise ValueError(f"build_duquant_transform: head_dim {head_dim} does not divide K = {k}")
  if permutation == "head_zigzag" and head_dim is None:
    raise ValueError("build_duquant_transform: permutation 'head_zigzag' needs head_dim")
  if samples is None:
    samples = absmax[..., None, :]
  if samples.ndim < 2 or samples.shape[-1] != k or samples.shape[:-2] != absmax.shape[:-1]:
    raise ValueError(
        f"build_duquant_transform: samples must be (..., R, K) matching absmax (..., K); got "
        f"{samples.shape=}, {absmax.shape=}")
  if rotation.startswith("weight_"):
    if w is None:
      raise ValueError(f"build_duquant_transform: rotation {rotation!r} needs the weight w")
    if w.shape[-2] != k:
      raise ValueError(f"build_duquant_transform: {w.shape=} is not (..., K={k}, N)")

  x = samples.astype(jnp.float32)
  smooth = None
  if alpha is not None:
    if w_absmax is None:
      raise ValueError("build_duquant_transform: smoothing (alpha is not None) needs w_absmax")
    smooth = smoothing_factors(absmax, w_absmax, alpha)
    x = x / smooth[..., None, :]
  wt = None
  if w is not None and rotation.startswith("weight_"):
    wt = w.astype(jnp.float32)
    if smooth is not None:
      wt = wt * smooth[..., :, None]

  k1, k2 = jax.random.split(key)
  rot1 = _build_rotation(rotation, x, wt, block_size, k1, max_steps)
  if rot1 is not None:
    x = apply_block_rotation(x, rot1, precision=_HIGHEST)
    if wt is not None:
      wt = apply_block_rotation_transposed(wt, rot1, precision=_HIGHEST)

  perm = None
  rot2 = None
  if permutation != "none":
    channel_max = jnp.max(jnp.abs(x), axis=-2)
    if permutation == "zigzag":
      perm = zigzag_permutation(channel_max, num_blocks)
    else:
      perm = head_constrained_zigzag(channel_max, block_size, head_dim)
    x = _gather_channels(x, perm, axis=-1)
    if wt is not None:
      wt = _gather_channels(wt, perm, axis=-2)
    rot2 = _build_rotation(rotation, x, wt, block_size, k2, max_steps)
  return InputTransform(smooth=smooth, rot1=rot1, perm=perm, rot2=rot2)
