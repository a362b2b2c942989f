"""`PackedEmbedding`: a weight-only 2 / 4 / 8-bit token embedding table, gathered then dequantized.

The token embedding (V, D) of pi0's LLM (`PaliGemma/llm/embedder/input_embedding`, 257152 x 2048,
about 1 GiB in bf16) is the largest single param and is only ever read by a gather
(`Embedder.encode`). A gather needs no DuQuant transform and no activation quantizer: each row is
quantized on its own (per row, or per group of `group_size` channels along D) and only the gathered
rows are dequantized at run time (`duquant_jax.runtime.lookup`), so the float table never exists
on the device.

2-bit codes are stored four to a uint8 byte (`pack_2bit`): a layout every backend and orbax
store as is, and a gathered row unpacks with a shift and a mask per code.

Follows qwix's QArray style (arrays as pytree leaves, the format as static fields). Axis letters:
V vocabulary rows, D width, G scale groups per row (D // group), B batch, T tokens.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from duquant_jax.numerics import dequantize_weight, quantize_weight
from duquant_jax.packed import PackedLinear, tree_nbytes

# Rows quantized per step of `quantize_embedding` (bounds float32 work to ~rows x D x 4 bytes x a
# few copies: 8192 x 2048 is 64 MiB per copy for the full table).
_ROW_CHUNK = 8192
# 2-bit codes per stored uint8 byte, and the bias that makes the codes (-2..1) unsigned.
_CODES_PER_BYTE = 4
_BIAS_2BIT = 2


@flax.struct.dataclass
class PackedEmbedding:
  """A token embedding table E (V, D) quantized row-wise, weight-only.

  Invariant: E[v, d] ~ scale[v, g] * (codes[v, d] - zero[v, g]) with g = d // (D // G); zero is None
  for symmetric codes. Data only: `runtime.lookup` gathers codes, scales and zero points of the
  requested rows and dequantizes only those.

  Attributes:
    codes: (V, D) int4 (3-4 bits) or int8 (5-8 bits) codes; for 2 bits (V, D // 4) uint8, four
      codes to a byte (`pack_2bit`).
    scale: (V, G) float16 or float32 scales.
    zero: (V, G) zero points (integer-valued, in the scale dtype), or None (symmetric).
    bits: static, code bits (2..8).
    dtype: static, the float table's dtype name: `runtime.lookup` returns rows in it, as the float
      table would (so the model's dtypes do not change when the table is packed).
  """

  codes: jax.Array
  scale: jax.Array
  zero: Optional[jax.Array]
  bits: int = flax.struct.field(pytree_node=False, default=4)
  dtype: str = flax.struct.field(pytree_node=False, default="float32")

  @property
  def shape(self) -> tuple[int, ...]:
    """The float table's shape (V, D)."""
    v, stored = self.codes.shape
    return (v, stored * _CODES_PER_BYTE if self.codes.dtype == jnp.uint8 else stored)

  @property
  def group_size(self) -> int:
    return self.shape[-1] // self.scale.shape[-1]

  def nbytes(self) -> int:
    """Bytes as stored on the device (int4 codes count half a byte, 2-bit codes a quarter)."""
    return tree_nbytes(self)

  def validate(self) -> None:
    """Checks shapes and dtypes agree; raises ValueError naming the field."""
    if self.codes.ndim != 2:
      raise ValueError(f"PackedEmbedding.codes must be (V, D), got shape {self.codes.shape}")
    if not 2 <= self.bits <= 8:
      raise ValueError(f"PackedEmbedding.bits must be in 2..8, got {self.bits}")
    # int4 also holds 2-bit codes: the storage of checkpoint formats 2-3.
    stored = ((jnp.uint8, jnp.int4) if self.bits == 2 else (jnp.int4,) if self.bits <= 4
              else (jnp.int8,))
    if self.codes.dtype not in stored:
      raise ValueError(f"PackedEmbedding: {self.bits}-bit codes must be stored as "
                       f"{' or '.join(jnp.dtype(t).name for t in stored)}, got {self.codes.dtype}")
    v, d = self.shape
    if self.scale.ndim != 2 or self.scale.shape[0] != v or d % self.scale.shape[1]:
      raise ValueError(f"PackedEmbedding.scale {self.scale.shape} does not match codes {(v, d)} "
                       "(expected (V, G) with G dividing D)")
    if self.scale.dtype not in (jnp.float16, jnp.float32):
      raise ValueError(f"PackedEmbedding.scale must be float16 or float32, got {self.scale.dtype}")
    if self.zero is not None and (self.zero.shape != self.scale.shape
                                  or self.zero.dtype != self.scale.dtype):
      raise ValueError(f"PackedEmbedding.zero {self.zero.shape} {self.zero.dtype} != scale "
                       f"{self.scale.shape} {self.scale.dtype}")
    if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
      raise ValueError(f"PackedEmbedding.dtype must be a float dtype, got {self.dtype!r}")

  def dequantize(self) -> jax.Array:
    """The whole table (V, D) float32 (for tests and diagnostics: the memory a gather of rows saves)."""
    return dequantize_rows(self.codes, self.scale, self.zero)


def pack_2bit(codes: jax.Array) -> jax.Array:
  """2-bit codes (..., D) int8 in [-2, 1] -> (..., D // 4) uint8; code d sits in bits 2 (d % 4)
  to 2 (d % 4) + 1 of byte d // 4."""
  u = (codes.astype(jnp.int32) + _BIAS_2BIT).reshape(*codes.shape[:-1], -1, _CODES_PER_BYTE)
  shifts = 2 * jnp.arange(_CODES_PER_BYTE, dtype=jnp.int32)
  return jnp.sum(u << shifts, axis=-1).astype(jnp.uint8)


def unpack_2bit(packed: jax.Array) -> jax.Array:
  """Inverse of `pack_2bit`: (..., D // 4) uint8 -> (..., D) int8 codes in [-2, 1]."""
  shifts = 2 * jnp.arange(_CODES_PER_BYTE, dtype=jnp.uint8)
  u = (packed[..., None] >> shifts) & jnp.uint8(3)
  return (u.astype(jnp.int8) - _BIAS_2BIT).reshape(*packed.shape[:-1], -1)


def dequantize_rows(codes: jax.Array, scale: jax.Array, zero: Optional[jax.Array]) -> jax.Array:
  """codes (..., D) (or 2-bit codes packed (..., D // 4) uint8), scale / zero (..., G) of some
  rows -> (..., D) float32."""
  if codes.dtype == jnp.uint8:
    codes = unpack_2bit(codes)
  return dequantize_weight(codes, scale.astype(jnp.float32),
                           None if zero is None else zero.astype(jnp.float32))


def quantize_embedding(table: jax.Array, *, bits: int = 4, group_size: Optional[int] = 128,
                       symmetric: bool = False, scale_dtype: str = "float16",
                       clip_grid: tuple[float, ...] = (1.0,), name: str = "embedding"
                       ) -> PackedEmbedding:
  """Quantizes an embedding table row-wise (weight-only round-to-nearest, optional clip search).

  Args:
    table: (V, D) float embedding table.
    bits: code bits, 2..8 (2: four to a uint8 byte; 3-4: int4; else int8).
    group_size: channels along D sharing one scale (must divide D), or None for one scale per row.
    symmetric: no zero point (codes in [-(2^(b-1) - 1), 2^(b-1) - 1]) instead of asymmetric.
    scale_dtype: "float16" or "float32" storage of scales and zero points. The scales are rounded
      to this dtype before the codes are computed, so the codes fit the stored scales.
    clip_grid: clip ratios searched per (row, group) to minimise the squared reconstruction error
      ((1.0,): plain round-to-nearest).
    name: the table's path, for error messages.

  Returns:
    A validated PackedEmbedding with `dtype` the table's dtype.

  Raises:
    ValueError: a table that is not (V, D) float, NaN / Inf entries, a group size that does not
      divide D, bad bits or scale dtype.
  """
  if getattr(table, "ndim", None) != 2 or not jnp.issubdtype(table.dtype, jnp.floating):
    raise ValueError(f"{name}: an embedding table must be a (V, D) float array, got "
                     f"{getattr(table, 'shape', None)} {getattr(table, 'dtype', type(table).__name__)}")
  if not 2 <= bits <= 8:
    raise ValueError(f"{name}: bits must be in 2..8, got {bits}")
  if scale_dtype not in ("float16", "float32"):
    raise ValueError(f"{name}: scale_dtype must be 'float16' or 'float32', got {scale_dtype!r}")
  v, d = table.shape
  cols = d if group_size is None else group_size
  if cols < 1 or d % cols:
    raise ValueError(f"{name}: group_size {group_size} does not divide the width D={d} "
                     f"(table {table.shape})")
  if bits == 2 and d % _CODES_PER_BYTE:
    raise ValueError(f"{name}: 2-bit codes are stored four to a byte, so the width D={d} must be "
                     f"a multiple of {_CODES_PER_BYTE} (table {table.shape})")
  if not isinstance(table, jax.core.Tracer):
    _check_finite_rows(name, table)
  sdt = jnp.dtype(scale_dtype)

  def chunk(t):
    t = t.astype(jnp.float32)
    _, scale, zero = quantize_weight(t, None, bits=bits, symmetric=symmetric, rows=1, cols=cols,
                                     clip_grid=tuple(clip_grid))
    # Round scales (and zero points) to their storage dtype first, then recompute the codes for them.
    # The floor keeps all-zero rows (scale ~0) from rounding to a zero float16 scale.
    scale = jnp.maximum(scale, jnp.finfo(sdt).tiny).astype(sdt).astype(jnp.float32)
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (
        -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    q = jnp.round(t.reshape(t.shape[0], -1, cols) / scale[..., None])
    if zero is not None:
      zero = zero.astype(sdt).astype(jnp.float32)
      q = q + zero[..., None]
    codes = jnp.clip(q, qmin, qmax).reshape(t.shape).astype(jnp.int8)
    return codes, scale.astype(sdt), None if zero is None else zero.astype(sdt)

  rows = min(v, _ROW_CHUNK)
  if v % rows:  # pad to whole chunks; padded rows are dropped after
    table = jnp.concatenate([table, jnp.zeros((rows - v % rows, d), table.dtype)])
  codes, scale, zero = jax.lax.map(chunk, table.reshape(-1, rows, d))
  flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])[:v]
  codes = flat(codes)
  codes = pack_2bit(codes) if bits == 2 else codes.astype(jnp.int4 if bits <= 4 else jnp.int8)
  packed = PackedEmbedding(codes=codes,
                           scale=flat(scale), zero=flat(zero), bits=bits,
                           dtype=jnp.dtype(table.dtype).name)
  packed.validate()
  if not isinstance(packed.scale, jax.core.Tracer) and not bool(jnp.isfinite(packed.scale).all()):
    raise ValueError(f"{name}: scales overflow {scale_dtype} (entries up to "
                     f"{float(jnp.abs(table).max()):.3g}); use scale_dtype='float32'")
  return packed


def _check_finite_rows(name: str, table) -> None:
  import numpy as np
  # On the host in row blocks: a float32 copy of the full table is 2 GiB.
  for start in range(0, table.shape[0], 1 << 16):
    block = np.asarray(table[start:start + (1 << 16)], np.float32)
    if not np.isfinite(block).all():
      bad = start + int(np.argwhere(~np.isfinite(block))[0, 0])
      raise ValueError(f"{name}: contains NaN or Inf (row {bad})")


def is_packed(x) -> bool:
  """Whether a tree node is a packed tensor (`PackedLinear` or `PackedEmbedding`): a leaf to the
  tree walkers, which would otherwise descend into its arrays."""
  return isinstance(x, (PackedLinear, PackedEmbedding))
