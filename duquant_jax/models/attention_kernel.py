"""Masked multi-query attention as one Pallas GPU kernel (Triton backend), for the policy's
Gemma attention: openpi's einsum form in fewer, fuller kernels.

Axis legend (openpi's): B batch, T query tokens, S key tokens, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim.

    attention(q, k, v, mask) = softmax(where(mask, q k^T, BIG_NEG)) v      per query head n,
                               with kv head n // G; q arrives scaled (openpi scales it by H^-0.5)

A flow step of pi0 is 51 query tokens against 867 keys (816 cached prefix tokens and its own 51),
8 query heads sharing one kv head of H = 256. openpi's einsum form runs it on an H100 as 7 XLA
kernels of 1.4-3.8 us each (the cache concatenation, logits, mask + softmax, two pads,
probabilities x V, a reduction; about 18 us together), which the flow steps pay 180 times per
action chunk (device profile, `results/h100_2026-12-06b/run2/profile_pi0.json`). This kernel is
one program per (batch, query head, tile of T, slice of the keys): it walks its keys in blocks
with the online softmax of flash attention, reading q, k, v and the mask in their own layouts, and
a KV cache where it lies, so nothing is concatenated, transposed or padded around it. With one
slice it writes the output in q's dtype and layout. With several (`kv_splits`, which give a small
batch enough programs to fill the GPU) the cache's keys are cut into slices and the step's own keys
are a slice of their own, so that no program walks more blocks than another; each slice writes its
normalized output (in `partial_dtype`) and its running max and sum of exponentials, in the output's
(B, T, N) order, and one XLA reduction over the slices merges them.

The masking follows the einsum form exactly: a masked logit becomes BIG_NEG, so a row that may
attend to nothing averages every value, as the einsum form's softmax does (merged slices too);
keys past S (padding of the last block) get zero weight.

`reference` is that einsum form in plain jnp at float32. The Triton backend runs the same kernel
source in Pallas interpret mode on CPU (tests); `implementation="auto"` uses the kernel where the
trace is lowered for CUDA and the einsum form elsewhere (`jax.lax.platform_dependent`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from duquant_jax.models.pallas_backend import triton_api

BIG_NEG = -2.3819763e38  # openpi's masked logit
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionTiles:
  """Static tuning parameters of the kernel (hashable: a static jit argument).

  Attributes:
    block_t: query tokens per program; a power of two >= 16 (the MMA's minimum).
    block_s: keys per step of a program's loop; a power of two >= 16.
    kv_splits: programs sharing one query tile along S, merged by their maxima and sums.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth of the key loop.
    partial_dtype: dtype of each slice's normalized output when there are several slices
      ("float32" or "bfloat16": half the bytes written and merged, one more rounding).
  """
  block_t: int = 64
  block_s: int = 64
  kv_splits: int = 1
  num_warps: int = 4
  num_stages: int = 2
  partial_dtype: str = "float32"

  def __post_init__(self):
    for name in ("block_t", "block_s"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"AttentionTiles.{name}={v} must be a power of two >= 16")
    if self.kv_splits < 1:
      raise ValueError(f"AttentionTiles.kv_splits={self.kv_splits} must be >= 1")
    if self.partial_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"AttentionTiles.partial_dtype={self.partial_dtype!r} must be 'float32' "
                       "or 'bfloat16'")


def choose_tiles(b: int, t: int, s: int, n: int, h: int = 256, *,
                 programs: int = 128) -> AttentionTiles:
  """Tiles for (B, T, S, N, H), as measured on an H100 (BENCHMARKS.md, "Attention kernel
  (H100)"): query tiles of up to 64 tokens, and enough slices of S that a small batch still runs
  about `programs` programs (one H100 / H200 has 132 SMs). Where that takes 8 or more slices (a
  flow step at batches 1-2: each program walks one or two blocks), blocks of 64 keys and 8 warps
  (H >= 128); otherwise (larger batches, the prefix) blocks of 32 keys, 4 warps and a 3-deep
  pipeline, which measured 1.2-1.4x faster there."""
  block_t = min(64, max(16, 1 << (t - 1).bit_length()))
  rows = b * n * -(-t // block_t)
  slices = lambda block_s: max(1, min(-(-s // block_s), programs // max(1, rows)))
  if slices(64) >= 8:
    return AttentionTiles(block_t=block_t, block_s=64, kv_splits=slices(64),
                          num_warps=8 if h >= 128 else 4)
  return AttentionTiles(block_t=block_t, block_s=32, kv_splits=slices(32), num_warps=4,
                        num_stages=3)


def reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """openpi's einsum attention at float32 and full dot precision: q (B, T, N, H), k / v
  (B, S, K, H), mask (B, T, S) -> (B, T, N, H) float32."""
  with jax.default_matmul_precision("highest"):
    return einsum_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     logits_hook=None) -> jax.Array:
  """openpi's einsum form in q's dtype (float32 logits and softmax, probabilities rounded to k's
  dtype): the fallback of `attention`, and Gemma's `attention="einsum"`.

  `logits_hook`, if given, is called with the unmasked float32 logits (B, K, G, T, S) (query
  head n = k * G + g), before the mask: calibration reads them there (`models.gemma.Attention`).
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
  if logits_hook is not None:
    logits_hook(logits)
  logits = jnp.where(mask[:, None, None], logits, BIG_NEG)
  probs = jax.nn.softmax(logits, axis=-1).astype(k.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
  return out.reshape(b, t, n, h)


def _check(q, k, v, mask, cache):
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"attention needs q (B, T, N, H) and k, v (B, S, K, H); got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  b, t, n, h = q.shape
  if k.shape[0] != b or k.shape[3] != h or n % k.shape[2]:
    raise ValueError(f"k / v {k.shape} do not match q {q.shape}: same B and H, and K dividing N")
  s = k.shape[1]
  if cache is not None:
    ck, cv = cache
    if ck.shape != cv.shape or ck.ndim != 4 or (ck.shape[0], *ck.shape[2:]) != (b, *k.shape[2:]):
      raise ValueError(f"cache k / v {ck.shape} / {cv.shape} do not match k {k.shape}: (B, S0, "
                       "K, H) with k's B, K and H")
    s += ck.shape[1]
  if mask.shape != (b, t, s):
    raise ValueError(f"attention mask {mask.shape} does not match (B, T, S) = {(b, t, s)}")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              cache: tuple[jax.Array, jax.Array] | None = None, implementation: str = "auto",
              tiles: AttentionTiles | None = None) -> jax.Array:
  """Masked multi-query attention, openpi's einsum semantics.

  Args:
    q: (B, T, N, H) queries, already scaled.
    k, v: (B, S, K, H) keys and values; query head n reads kv head n // (N / K).
    mask: (B, T, S0 + S) bool (or integer, nonzero = may attend).
    cache: optional (k, v) of S0 earlier tokens, (B, S0, K, H) each: the keys are the cache's,
      then k's (the kernel reads both where they are; no concatenation).
    implementation: "auto" (the kernel lowered for CUDA, the einsum form elsewhere), "xla" (the
      einsum form), "pallas" (the kernel), "pallas_interpret" (the kernel in Pallas' interpreter).
    tiles: kernel tiles; `choose_tiles` by default.

  Returns:
    (B, T, N, H) in q's dtype.

  Raises:
    ValueError: shapes that do not fit together, or an unknown implementation.
  """
  _check(q, k, v, mask, cache)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  cache = () if cache is None else tuple(x.astype(k.dtype) for x in cache)

  def einsum_form(q, k, v, mask, *cache):
    if cache:
      k, v = (jnp.concatenate([c, x], axis=1) for c, x in zip(cache, (k, v)))
    return einsum_attention(q, k, v, mask.astype(bool))

  if implementation == "xla":
    return einsum_form(q, k, v, mask, *cache)
  kernel = functools.partial(_attention_kernel_call, tiles=tiles,
                             interpret=implementation == "pallas_interpret")
  if implementation == "auto":
    return jax.lax.platform_dependent(q, k, v, mask, *cache, cuda=kernel, default=einsum_form)
  return kernel(q, k, v, mask, *cache)


def _squeezed():
  from jax.experimental import pallas as pl
  return getattr(pl, "squeezed", None)


def _kernel(*refs, t, s0, s1, chunk, tiles, split_out, has_cache):
  """One (block_t, H) query tile of one head against one slice of its keys.

  Slices: with one (`split_out` False), every cache key, then the S1 keys of k / v; with several,
  slice c < the last covers cache keys [c * chunk, (c + 1) * chunk), and with a cache the last
  slice covers the S1 keys of k / v.

  Refs: q_ref (bt, H); [has_cache] kc_ref, vc_ref (S0, H) of the head's kv head; k_ref, v_ref
  (S1, H); mask_ref (bt, S0 + S1) int8 rows; out: o_ref (bt, H) in q's dtype [one slice], or
  [split_out] o_ref (bt, H) the slice's normalized output, and max_ref, sum_ref (bt,) float32, its
  running max and sum of exponentials.
  Without a cache, k / v are the sliced keys (S0 = S, S1 = 0).
  """
  from jax.experimental import pallas as pl
  plgpu = triton_api()
  n_in = 6 if has_cache else 4
  q_ref, kc_ref, vc_ref, *new_kv, mask_ref = refs[:n_in]
  k_ref, v_ref = new_kv or (None, None)
  o_refs = refs[n_in:]
  bt, bs = tiles.block_t, tiles.block_s
  h = q_ref.shape[-1]
  rows = pl.program_id(2) * bt + jax.lax.broadcasted_iota(jnp.int32, (bt,), 0)
  row_ok = rows < t
  q = plgpu.load(q_ref, mask=jnp.broadcast_to(row_ok[:, None], (bt, h)), other=0)

  def step(kr, vr, first, length, col0, j, carry):
    """Keys [first + j * bs, + bs) of kr / vr (valid below `length`); mask columns + col0."""
    m_i, l_i, acc = carry
    k0 = pl.multiple_of(first + j * bs, bs)
    cols = k0 + jax.lax.broadcasted_iota(jnp.int32, (bs,), 0)
    key_ok = cols < length
    kv_ok = jnp.broadcast_to(key_ok[:, None], (bs, h))
    kb = plgpu.load(kr.at[pl.ds(k0, bs), :], mask=kv_ok, other=0)
    vb = plgpu.load(vr.at[pl.ds(k0, bs), :], mask=kv_ok, other=0)
    allowed = plgpu.load(mask_ref.at[:, pl.ds(k0 + col0, bs)],
                         mask=row_ok[:, None] & key_ok[None, :], other=0)
    logits = jax.lax.dot_general(q, kb, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    logits = jnp.where(allowed != 0, logits, BIG_NEG)
    m_new = jnp.maximum(m_i, jnp.max(logits, axis=1))
    p = jnp.where(key_ok[None, :], jnp.exp(logits - m_new[:, None]), 0.0)
    alpha = jnp.exp(m_i - m_new)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(vb.dtype), vb,
                                         preferred_element_type=jnp.float32)
    return m_new, l_i * alpha + jnp.sum(p, axis=1), acc

  init = (jnp.full((bt,), BIG_NEG, jnp.float32), jnp.zeros((bt,), jnp.float32),
          jnp.zeros((bt, h), jnp.float32))
  cached = functools.partial(step, kc_ref, vc_ref)

  def walk_new(c):  # the S1 keys of k / v (with a cache only)
    return jax.lax.fori_loop(0, -(-s1 // bs), functools.partial(step, k_ref, v_ref, 0, s1, s0), c)

  if not split_out:
    carry = jax.lax.fori_loop(0, -(-s0 // bs), functools.partial(cached, 0, s0, 0), init)
    if has_cache:
      carry = walk_new(carry)
  else:
    split = pl.program_id(3)

    def walk_slice(c):
      return jax.lax.fori_loop(0, chunk // bs, functools.partial(cached, split * chunk, s0, 0), c)

    last = split == pl.num_programs(3) - 1
    carry = jax.lax.cond(last, walk_new, walk_slice, init) if has_cache else walk_slice(init)
  m_i, l_i, acc = carry
  out_ok = jnp.broadcast_to(row_ok[:, None], (bt, h))
  # Every slice holds a key in range, so l >= exp(0) for each row's largest logit.
  out = acc / l_i[:, None]
  o_ref, *stat_refs = o_refs
  plgpu.store(o_ref, out.astype(o_ref.dtype), mask=out_ok)
  if split_out:
    max_ref, sum_ref = stat_refs
    plgpu.store(max_ref, m_i, mask=row_ok)
    plgpu.store(sum_ref, l_i, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def _attention_kernel_call(q, k, v, mask, *cache, tiles, interpret):
  from jax.experimental import pallas as pl
  plgpu = triton_api()
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  has_cache = bool(cache)
  # The sliced keys: the cache's when there is one (its own slice for the new keys).
  sliced = cache if has_cache else (k, v)
  s0, s1 = sliced[0].shape[1], (k.shape[1] if has_cache else 0)
  tiles = tiles or choose_tiles(b, t, s0 + s1, n, h)
  bt = tiles.block_t
  chunk = -(-(-(-s0 // tiles.kv_splits)) // tiles.block_s) * tiles.block_s  # whole blocks
  splits = -(-s0 // chunk) + (has_cache and tiles.kv_splits > 1)
  split_out = splits > 1
  sq = _squeezed()
  grid = (b, n, pl.cdiv(t, bt), splits)
  q_spec = pl.BlockSpec((sq, bt, sq, h), lambda i, j, r, c: (i, r, j, 0))
  kv_spec = lambda length: pl.BlockSpec((sq, length, sq, h), lambda i, j, r, c: (i, 0, j // g, 0))
  operands = [q, *sliced] + ([k, v] if has_cache else []) + [mask.astype(jnp.int8)]
  in_specs = ([q_spec, kv_spec(s0), kv_spec(s0)] + ([kv_spec(s1)] * 2 if has_cache else [])
              + [pl.BlockSpec((sq, bt, s0 + s1), lambda i, j, r, c: (i, r, 0))])
  if split_out:
    row_stat = jax.ShapeDtypeStruct((splits, b, t, n), jnp.float32)
    row_spec = pl.BlockSpec((sq, sq, bt, sq), lambda i, j, r, c: (c, i, r, j))
    out_shape = (jax.ShapeDtypeStruct((splits, b, t, n, h), jnp.dtype(tiles.partial_dtype)),
                 row_stat, row_stat)
    out_specs = (pl.BlockSpec((sq, sq, bt, sq, h), lambda i, j, r, c: (c, i, r, j, 0)),
                 row_spec, row_spec)
  else:
    out_shape = jax.ShapeDtypeStruct((b, t, n, h), q.dtype)
    out_specs = q_spec
  kernel = functools.partial(_kernel, t=t, s0=s0, s1=s1, chunk=chunk, tiles=tiles,
                             split_out=split_out, has_cache=has_cache)
  out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret, name="mq_attention",
  )(*operands)
  if not split_out:
    return out
  o, m, l = out  # (P, B, T, N, H), (P, B, T, N), (P, B, T, N)
  w = (jnp.exp(m - jnp.max(m, axis=0)) * l)[..., None]
  return (jnp.sum(w * o.astype(jnp.float32), axis=0) / jnp.sum(w, axis=0)).astype(q.dtype)


__all__ = ["AttentionTiles", "BIG_NEG", "IMPLEMENTATIONS", "attention", "choose_tiles",
           "einsum_attention", "reference"]
