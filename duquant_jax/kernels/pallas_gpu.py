"""W4A8 matmul as a Pallas GPU kernel (Triton backend): packed int4 weights, int8 MMA, fused
dequantization.

Computes exactly what `duquant_jax.kernels.xla.w4a8_matmul` computes (see its docstring for the
quantizer conventions of DuQuant / SmoothQuant W4A8):

  y[m, n] = sx[m] * sum_g sw[n, g] * ( sum_{k in g} xq q  - zw[n, g] * sum_{k in g} xq
                                       - zx[m] * (sum_{k in g} q - group_size * zw[n, g]) )

Design (small-M policy steps are bound by reading weights; docs/kernels.md, "Pallas W4A8 kernel"):
- The weight is the packed format's `jnp.int4` (N, K) array, stored (out, in). It is viewed as
  (N, K/2) int8 nibble pairs with `lax.bitcast_convert_type` (byte j of row n holds k = 2j in its
  low nibble and k = 2j + 1 in its high nibble); on GPU XLA stores int4 two per byte, so the view
  moves no data. The kernel reads only these packed bytes from device memory.
- Each program owns a (block_m, block_n) output tile and walks K in steps of block_k: it loads
  (block_n, block_k / 2) packed bytes, unpacks both nibbles with arithmetic shifts on int8 in
  registers, interleaves them back to (block_n, block_k) and runs an int8 x int8 -> int32 dot.
- Zero-point corrections (row sums of xq, column sums of q) are accumulated beside the dot, and the
  float32 epilogue (per-token x per-channel or per-group scales) runs before the single store.
- Rows of the last M tile past M are masked on load and store (M need not divide block_m).
- A stacked (L, N, K) weight (an `nn.scan` layer stack) can be read in place at a traced layer
  index: no per-layer slice copy.

`weight_only_matmul` is the same structure for weight-only linears: float x, int4 or int8 codes
upcast in registers with the zero points folded in, a bf16 MMA. It is exact to float32 rounding;
auto-dispatch does not pick it (`weight_only.AUTO`).

The Triton backend runs the same kernel source in Pallas interpret mode on CPU (for CI) and
compiles on jax 0.10.x and 0.11.x alike.

Pallas' Triton API moved between jax versions; imports are guarded and done lazily so that importing
this module never fails on a CPU-only install.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from duquant_jax.kernels import xla as _xla
from duquant_jax.models.pallas_backend import triton_api as _triton_api


@dataclasses.dataclass(frozen=True, kw_only=True)
class TritonTiles:
  """Static tuning parameters of the kernel (hashable: a static jit argument).

  Attributes:
    block_m: rows of x (tokens) per program; a power of two >= 16 (the MMA's minimum).
    block_n: output channels per program; a power of two >= 16 dividing N.
    block_k: input channels (unpacked) per K step; a power of two >= 32 dividing K (and the group
      size).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth of the K loop.
    split_k: programs sharing one output tile along K (more programs for small M); partial results
      are summed with float32 atomic adds, so with split_k > 1 the float rounding order differs from
      XLA's (still float32 rounding) and a non-float32 output is cast after the kernel.
    unpack: "interleave" re-interleaves the two nibbles of each byte into a (block_n, block_k) tile
      and runs one dot; "split_x" keeps them apart and runs two half-K dots against the even and odd
      columns of x (split in registers; no interleave of the weight tile).
  """
  block_m: int
  block_n: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 3
  split_k: int = 1
  unpack: str = "interleave"

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"TritonTiles.{name}={v} must be a power of two >= 16")
    if self.unpack not in ("interleave", "split_x"):
      raise ValueError(f"TritonTiles.unpack={self.unpack!r} must be 'interleave' or 'split_x'")
    if self.split_k < 1:
      raise ValueError(f"TritonTiles.split_k={self.split_k} must be >= 1")
    if self.block_k < 32:
      raise ValueError(f"TritonTiles.block_k={self.block_k} must be >= 32 (int8 MMA K step)")


def choose_tiles(m: int, n: int, k: int, group_size: int | None = None) -> TritonTiles:
  """Tile choice per shape regime (docs/kernels.md, "Pallas tiles").

  Small M (policy steps, M <= 64) is bound by reading the packed weights: a narrow block_n gives
  enough programs to occupy every SM, a long block_k gives wide loads, and long-K shapes
  (down-projection) split K. Larger M uses larger M tiles.

  Args:
    m, n, k: the matmul's rows (tokens), output channels and input channels.
    group_size: K // G of the weight scales; block_k is capped to divide it.

  Returns:
    A TritonTiles; it may not divide (n, k): `supports()` says whether the kernel applies.
  """
  # Small M: enough programs (N / block_n x split_k) to cover 132 SMs; long-K (down-projection)
  # shapes split K instead of narrowing block_n below 16.
  if m <= 16:
    if k >= 4 * n:
      cfg = dict(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=4, split_k=2)
    elif n >= 8192:
      cfg = dict(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)
    else:
      cfg = dict(block_m=16, block_n=32, block_k=512, num_warps=4, num_stages=4)
  elif m <= 64:
    bn = 64 if n >= 8192 else 32 if n > 2048 else 16
    cfg = dict(block_m=64, block_n=bn, block_k=512 if bn == 16 else 256, num_warps=4, num_stages=4)
  elif m <= 256:
    cfg = dict(block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=4)
  elif n >= 8192:
    cfg = dict(block_m=256, block_n=128, block_k=128, num_warps=8, num_stages=3)
  else:
    cfg = dict(block_m=128, block_n=64, block_k=128, num_warps=4, num_stages=4)
  bk = min(cfg["block_k"], _largest_pow2_divisor(k))
  if group_size is not None:
    bk = min(bk, _largest_pow2_divisor(group_size))
  cfg["block_k"] = max(bk, 32)
  if cfg.get("split_k", 1) > 1 and (group_size not in (None, k)
                                    or (k // cfg["split_k"]) % cfg["block_k"]):
    cfg["split_k"] = 1
  while n % cfg["block_n"] and cfg["block_n"] > 16:
    cfg["block_n"] //= 2
  return TritonTiles(**cfg)


# Shared memory a Triton program may use on Hopper (232448 bytes), less headroom for its epilogue.
SHARED_MEMORY_BUDGET = 200 * 1024


def fit_shared_memory(tiles: TritonTiles, x_bytes: int, w_bytes: float) -> TritonTiles:
  """`tiles` with fewer pipeline stages, then a shorter block_k, until the pipelined x and weight
  tiles fit `SHARED_MEMORY_BUDGET` (choose_tiles' picks assume 1-byte int8 x; a bf16 x tile of
  the weight-only kernel is twice that, and 64 x 512 x 2 bytes x 4 stages exceed Hopper's shared
  memory)."""
  def smem(t):
    return t.num_stages * (t.block_m * t.block_k * x_bytes + t.block_n * t.block_k * w_bytes)
  while smem(tiles) > SHARED_MEMORY_BUDGET and tiles.num_stages > 2:
    tiles = dataclasses.replace(tiles, num_stages=tiles.num_stages - 1)
  while smem(tiles) > SHARED_MEMORY_BUDGET and tiles.block_k > 32:
    tiles = dataclasses.replace(tiles, block_k=tiles.block_k // 2)
  return tiles


def _largest_pow2_divisor(v: int) -> int:
  return v & -v


def supports(m: int, n: int, k: int, g: int, tiles: TritonTiles) -> bool:
  """Whether the kernel handles this shape with these tiles (else use the XLA path)."""
  del m
  if k % g or k % tiles.split_k:
    return False
  gs = k // g
  if g == 1:  # one group, split into split_k ranges of K
    return n % tiles.block_n == 0 and (k // tiles.split_k) % tiles.block_k == 0
  return n % tiles.block_n == 0 and gs % tiles.block_k == 0 and g % tiles.split_k == 0


def pack_int4_pairs(q: jax.Array) -> jax.Array:
  """View int4 codes (..., N, K) as (..., N, K/2) int8 nibble pairs (k = 2j low, 2j + 1 high).

  A bitcast: on GPU (int4 stored two per byte) it moves no data.

  Raises:
    TypeError: if q is not int4.  ValueError: if K is odd.
  """
  if q.dtype != jnp.int4:
    raise TypeError(f"weight codes must be int4, got {q.dtype} {q.shape}")
  if q.shape[-1] % 2:
    raise ValueError(f"weight codes need an even K, got {q.shape}")
  return jax.lax.bitcast_convert_type(q.reshape(*q.shape[:-1], q.shape[-1] // 2, 2), jnp.int8)


def reference(xq, sx, zx, q, sw, zw, *, out_dtype=jnp.float32, layer=None):
  """Plain-jnp reference of `w4a8_matmul` (the XLA integer path); q may be stacked (L, N, K)."""
  if layer is not None:
    q = q[layer]
    sw = sw[layer]
    zw = None if zw is None else zw[layer]
  return _xla.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype)


def _unpack_nibbles(wp: jax.Array) -> jax.Array:
  """(bn, bk/2) int8 nibble pairs -> (bn, bk) int8 codes, in registers."""
  lo = jnp.right_shift(jnp.left_shift(wp, 4), 4)  # arithmetic shift: sign-extends the low nibble
  hi = jnp.right_shift(wp, 4)
  bn, half = wp.shape
  return jnp.stack([lo, hi], axis=-1).reshape(bn, 2 * half)


def _kernel(*refs, m, n_groups, steps_per_group, group_size, scale_groups, tiles, has_zx, has_zw,
            has_layer, interpret):
  """One (block_m, block_n) output tile.

  Refs (in order; optional ones present per the static flags):
    layer_ref (1,) int32 [has_layer]; x_ref (bm, K) int8; sx_ref (bm, 1) f32;
    zx_ref (bm, 1) f32 [has_zx];
    w_ref (L, bn, K/2) int8; sw_ref (L, bn, G) f32; zw_ref (L, bn, G) f32 [has_zw];
    [split_k > 1: init_ref (bm, bn) f32, the zeroed output it aliases]; o_ref (bm, bn).
  Program (i, j, s) covers rows i, output channels j, and groups [s * n_groups, (s + 1) * n_groups)
  (with G = 1: the s-th K range of length group_size = K / split_k).
  """
  from jax.experimental import pallas as pl
  plgpu = _triton_api()

  refs = list(refs)
  layer_ref = refs.pop(0) if has_layer else None
  x_ref, sx_ref = refs.pop(0), refs.pop(0)
  zx_ref = refs.pop(0) if has_zx else None
  w_ref, sw_ref = refs.pop(0), refs.pop(0)
  zw_ref = refs.pop(0) if has_zw else None
  o_ref = refs[-1]

  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  layer = layer_ref[0] if has_layer else jnp.int32(0)
  rows = pl.program_id(0) * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
  row_ok = rows < m  # (bm, 1)
  x_mask = jnp.broadcast_to(row_ok, (bm, bk))

  sx = plgpu.load(sx_ref, mask=row_ok, other=0.0)  # (bm, 1)
  zx = plgpu.load(zx_ref, mask=row_ok, other=0.0) if has_zx else None

  split = pl.program_id(2) if tiles.split_k > 1 else 0
  group0 = split * n_groups  # first (global) group of this program

  def k_step(g, s, carry):
    acc, xsum, wsum = carry
    kk = (group0 + g) * steps_per_group + s
    k0 = pl.multiple_of(kk * bk, bk)
    kp0 = pl.multiple_of(kk * (bk // 2), bk // 2)
    wp = plgpu.load(w_ref.at[layer, :, pl.ds(kp0, bk // 2)])
    if tiles.unpack == "interleave":
      xs = [plgpu.load(x_ref.at[:, pl.ds(k0, bk)], mask=x_mask, other=0)]
      ws = [_unpack_nibbles(wp)]
    else:  # even columns of x meet the low nibbles, odd columns the high nibbles
      x = plgpu.load(x_ref.at[:, pl.ds(k0, bk)], mask=x_mask, other=0)
      xs = list(jnp.unstack(x.reshape(bm, bk // 2, 2), axis=-1))
      ws = [jnp.right_shift(jnp.left_shift(wp, 4), 4), jnp.right_shift(wp, 4)]
    for x, w in zip(xs, ws):
      acc = acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.int32)
      if has_zw:
        xsum = xsum + jnp.sum(x.astype(jnp.int32), axis=1, keepdims=True)
      if has_zx:
        wsum = wsum + jnp.sum(w.astype(jnp.int32), axis=1)[None, :]
    return acc, xsum, wsum

  def group_epilogue(g, acc, xsum, wsum):
    """int32 partial sums of group g -> float32 (bm, bn), XLA's order of operations."""
    accf = acc.astype(jnp.float32)
    gq = 0 if scale_groups == 1 else group0 + g  # column of sw / zw
    sw_g = plgpu.load(sw_ref.at[layer, :, pl.ds(gq, 1)]).reshape(1, bn)
    zw_g = plgpu.load(zw_ref.at[layer, :, pl.ds(gq, 1)]).reshape(1, bn) if has_zw else None
    if has_zw:
      accf = accf - zw_g * xsum.astype(jnp.float32)
    if has_zx:
      corr = wsum.astype(jnp.float32)
      if has_zw:
        corr = corr - group_size * zw_g
      accf = accf - zx * corr
    return accf * sw_g

  def zeros():
    return (jnp.zeros((bm, bn), jnp.int32), jnp.zeros((bm, 1), jnp.int32),
            jnp.zeros((1, bn), jnp.int32))

  y = _sum_groups(n_groups, steps_per_group, lambda g: functools.partial(k_step, g), zeros,
                  lambda g, carry: group_epilogue(g, *carry), (bm, bn))
  _store(o_ref, y * sx, row_ok, tiles, interpret)


def _sum_groups(n_groups, steps_per_group, k_step_of, zeros, epilogue, shape):
  """sum over scale groups g of epilogue(g, K loop of group g): the float32 (bm, bn) tile."""
  if n_groups == 1:
    return epilogue(0, jax.lax.fori_loop(0, steps_per_group, k_step_of(0), zeros()))

  def group_body(g, out):
    return out + epilogue(g, jax.lax.fori_loop(0, steps_per_group, k_step_of(g), zeros()))
  return jax.lax.fori_loop(0, n_groups, group_body, jnp.zeros(shape, jnp.float32))


def _store(o_ref, y, row_ok, tiles, interpret):
  """Write the (bm, bn) tile, rows past M masked; with split-K, add it atomically."""
  plgpu = _triton_api()
  out_mask = jnp.broadcast_to(row_ok, y.shape)
  if tiles.split_k > 1:
    # Interpret mode pads blocks and cannot discharge a masked atomic: zero the padded rows instead.
    if interpret:
      plgpu.atomic_add(o_ref, (slice(None), slice(None)), jnp.where(out_mask, y, 0.0))
    else:
      plgpu.atomic_add(o_ref, (slice(None), slice(None)), y, mask=out_mask)
  else:
    plgpu.store(o_ref, y.astype(o_ref.dtype), mask=out_mask)


def _weight_only_kernel(*refs, m, n_groups, steps_per_group, group_size, scale_groups, tiles,
                        has_zw, has_layer, nibbles, interpret):
  """One (block_m, block_n) tile of the weight-only matmul: float x times dequantized codes.

  Refs: layer_ref (1,) int32 [has_layer]; x_ref (bm, K) float; w_ref (L, bn, K/2) int8 nibble
  pairs [nibbles] or (L, bn, K) int8 codes; sw_ref (L, bn, G) f32; zw_ref (L, bn, G) f32
  [has_zw]; [split_k > 1: init_ref]; o_ref (bm, bn).
  Each K step upcasts the codes in registers to x's dtype with the group's zero point folded in
  (q - zw: an integer below 2^8 in magnitude, exact in bfloat16), so no row sums are needed, and
  runs one MMA with float32 accumulation; the group's scale multiplies its partial sums.
  """
  from jax.experimental import pallas as pl
  plgpu = _triton_api()
  del group_size  # the zero points are folded into the codes, not corrected by row sums

  refs = list(refs)
  layer_ref = refs.pop(0) if has_layer else None
  x_ref, w_ref, sw_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  zw_ref = refs.pop(0) if has_zw else None
  o_ref = refs[-1]

  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  layer = layer_ref[0] if has_layer else jnp.int32(0)
  rows = pl.program_id(0) * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
  row_ok = rows < m
  x_mask = jnp.broadcast_to(row_ok, (bm, bk))
  split = pl.program_id(2) if tiles.split_k > 1 else 0
  group0 = split * n_groups

  def column(ref, g):
    gq = 0 if scale_groups == 1 else group0 + g
    return plgpu.load(ref.at[layer, :, pl.ds(gq, 1)])  # (bn, 1)

  def k_step(g, zw_g, s, acc):
    kk = (group0 + g) * steps_per_group + s
    k0 = pl.multiple_of(kk * bk, bk)
    x = plgpu.load(x_ref.at[:, pl.ds(k0, bk)], mask=x_mask, other=0)
    if nibbles:
      kp0 = pl.multiple_of(kk * (bk // 2), bk // 2)
      w = _unpack_nibbles(plgpu.load(w_ref.at[layer, :, pl.ds(kp0, bk // 2)]))
    else:
      w = plgpu.load(w_ref.at[layer, :, pl.ds(k0, bk)])
    w = w.astype(jnp.float32)
    if has_zw:
      w = w - zw_g
    return acc + jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  def k_step_of(g):
    return functools.partial(k_step, g, column(zw_ref, g) if has_zw else None)

  y = _sum_groups(n_groups, steps_per_group, k_step_of,
                  lambda: jnp.zeros((bm, bn), jnp.float32),
                  lambda g, acc: acc * column(sw_ref, g).reshape(1, bn), (bm, bn))
  _store(o_ref, y, row_ok, tiles, interpret)


def _check_inputs(xq, sx, zx, q, sw, zw, layer):
  """Validate dtypes and shapes; returns (M, K, L, N, G)."""
  if xq.ndim != 2 or xq.dtype != jnp.int8:
    raise TypeError(f"xq must be (M, K) int8, got {xq.dtype} {xq.shape}")
  m, k = xq.shape
  if sx.shape != (m, 1) or (zx is not None and zx.shape != (m, 1)):
    raise ValueError(f"sx / zx must be (M, 1) = {(m, 1)}, got {sx.shape} / "
                     f"{None if zx is None else zx.shape}")
  if q.dtype != jnp.int4:
    raise TypeError(f"q must be int4 codes, got {q.dtype} {q.shape}")
  return _check_weight(q, sw, zw, layer, xq.shape)


def _check_weight(q, sw, zw, layer, x_shape):
  """Validate the codes / scales against activations of shape (M, K); returns (M, K, L, N, G)."""
  m, k = x_shape
  if layer is None:
    if q.ndim != 2:
      raise ValueError(f"q must be (N, K) without a layer index, got {q.shape}")
    lq = 1
  else:
    if q.ndim != 3:
      raise ValueError(f"q must be stacked (L, N, K) with a layer index, got {q.shape}")
    lq = q.shape[0]
  n, kq = q.shape[-2:]
  if kq != k:
    raise ValueError(f"q {q.shape} does not match the activations (M, K)={x_shape}")
  g = sw.shape[-1]
  if sw.shape != (*q.shape[:-1], g) or k % g:
    raise ValueError(f"sw {sw.shape} must be (..., N, G) with G dividing K; q {q.shape}")
  if zw is not None and zw.shape != sw.shape:
    raise ValueError(f"zw {zw.shape} must match sw {sw.shape}")
  return m, k, lq, n, g


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiles", "interpret"))
def w4a8_matmul(xq, sx, zx, q, sw, zw, *, out_dtype=jnp.float32, tiles: TritonTiles | None = None,
                interpret: bool = False, layer: jax.Array | None = None):
  """W4A8 matmul with the Pallas kernel; same result as `xla.w4a8_matmul`.

  Args:
    xq: (M, K) int8 activation codes; sx (M, 1) float32 scales; zx (M, 1) float32 zero points
      or None.
    q: (N, K) int4 weight codes, stored (out, in); or (L, N, K) stacked layers when `layer` is
      given.
    sw: (N, G) (or (L, N, G)) float32 scales; zw the same shape, zero points, or None.
    out_dtype: dtype of the result.
    tiles: static tile choice; default `choose_tiles(M, N, K, K // G)`.
    interpret: run in Pallas interpret mode (CPU tests).
    layer: optional int32 scalar: which layer of a stacked q to read, in place.

  Returns:
    (M, N) array of out_dtype.

  Raises:
    TypeError / ValueError: bad dtypes or shapes. NotImplementedError: tiles that do not divide
      (N, K/G).
  """
  m, k, lq, n, g = _check_inputs(xq, sx, zx, q, sw, zw, layer)
  act_args = [xq, sx.astype(jnp.float32)] + ([] if zx is None else [zx.astype(jnp.float32)])
  act_widths = [k, 1] + ([] if zx is None else [1])
  return _call(functools.partial(_kernel, has_zx=zx is not None), act_args, act_widths,
               pack_int4_pairs(q), sw, zw, m=m, k=k, lq=lq, n=n, g=g, tiles=tiles,
               out_dtype=out_dtype, interpret=interpret, layer=layer, name="w4a8_matmul")


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiles", "interpret"))
def weight_only_matmul(x, q, sw, zw, *, out_dtype=jnp.float32, tiles: TritonTiles | None = None,
                       interpret: bool = False, layer: jax.Array | None = None):
  """Weight-only matmul with the Pallas kernel: float x (M, K) times dequant(q) (N, K).

  The same product as `xla.weight_only_matmul` (to float32 summation order): the int4 (or int8)
  codes are read packed, upcast in registers to x's dtype with the zero points folded in, and
  multiplied on the tensor cores with float32 accumulation; one kernel, no row sums and no
  separate epilogue, and with `layer` a stacked weight is read in place.

  Args:
    x: (M, K) activations (bfloat16 on the GPU; the MMA's input dtype).
    q: (N, K) int4 or int8 codes, or (L, N, K) stacked with `layer`; sw (N, G) / (L, N, G) float32
      scales; zw the same shape, zero points, or None.
    out_dtype, tiles, interpret, layer: as `w4a8_matmul`.

  Returns:
    (M, N) array of out_dtype.
  """
  if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be (M, K) float, got {x.dtype} {x.shape}")
  if q.dtype not in (jnp.int4, jnp.int8):
    raise TypeError(f"q must be int4 or int8 codes, got {q.dtype} {q.shape}")
  m, k, lq, n, g = _check_weight(q, sw, zw, layer, x.shape)
  nibbles = q.dtype == jnp.int4
  w = pack_int4_pairs(q) if nibbles else q
  if tiles is None:
    tiles = fit_shared_memory(choose_tiles(m, n, k, k // g), x.dtype.itemsize,
                              0.5 if nibbles else 1.0)
  return _call(functools.partial(_weight_only_kernel, nibbles=nibbles), [x], [k], w, sw, zw,
               m=m, k=k, lq=lq, n=n, g=g, tiles=tiles, out_dtype=out_dtype, interpret=interpret,
               layer=layer, name="weight_only_matmul")


def _call(kernel, act_args, act_widths, w, sw, zw, *, m, k, lq, n, g, tiles, out_dtype, interpret,
          layer, name):
  """The pallas_call of either kernel: a grid of (M / bm, N / bn[, split_k]) programs, each
  reading its rows of the activation arrays (`act_args`, widths `act_widths`) and its output
  channels of the codes `w` (L, N, K') and scales, at `layer` of a stack."""
  from jax.experimental import pallas as pl
  plgpu = _triton_api()

  gs = k // g
  tiles = tiles or choose_tiles(m, n, k, gs)
  if not supports(m, n, k, g, tiles):
    raise NotImplementedError(f"tiles {tiles} do not divide N={n}, group size {gs}; use the XLA "
                              "path")
  bm, bn = tiles.block_m, tiles.block_n
  kw = w.shape[-1]
  w3 = w.reshape(lq, n, kw)
  sw3 = sw.reshape(lq, n, g).astype(jnp.float32)
  zw3 = None if zw is None else zw.reshape(lq, n, g).astype(jnp.float32)

  sk = tiles.split_k
  grid = (pl.cdiv(m, bm), n // bn) + ((sk,) if sk > 1 else ())
  row_map = lambda i, j, *s: (i, 0)
  w_map = lambda i, j, *s: (0, j, 0)
  args, specs = [], []
  if layer is not None:
    args.append(jnp.asarray(layer, jnp.int32).reshape(1))
    specs.append(pl.BlockSpec((1,), lambda i, j, *s: (0,)))
  args += act_args
  specs += [pl.BlockSpec((bm, width), row_map) for width in act_widths]
  args += [w3, sw3]
  specs += [pl.BlockSpec((lq, bn, kw), w_map), pl.BlockSpec((lq, bn, g), w_map)]
  if zw is not None:
    args.append(zw3)
    specs.append(pl.BlockSpec((lq, bn, g), w_map))
  out_spec = pl.BlockSpec((bm, bn), lambda i, j, *s: (i, j))
  aliases = {}
  if sk > 1:  # float32 partial sums added atomically into a zeroed output
    aliases = {len(args): 0}
    args.append(jnp.zeros((m, n), jnp.float32))
    specs.append(out_spec)

  if g == 1:
    n_groups, group_len = 1, k // sk
  else:
    n_groups, group_len = g // sk, gs
  kernel = functools.partial(
      kernel, m=m, n_groups=n_groups, steps_per_group=group_len // tiles.block_k,
      group_size=group_len, scale_groups=g, tiles=tiles, has_zw=zw is not None,
      has_layer=layer is not None, interpret=interpret)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32 if sk > 1 else out_dtype),
      grid=grid,
      in_specs=specs,
      out_specs=out_spec,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
      interpret=interpret,
      name=name,
  )(*args)
  return y.astype(out_dtype)


def flops_and_bytes(m: int, n: int, k: int, g: int = 1, out_bytes: int = 4) -> tuple[int, int]:
  """(integer ops, fewest device-memory bytes) of one W4A8 matmul: packed weights read once."""
  flops = 2 * m * n * k
  nbytes = m * k + n * k // 2 + 4 * m * 2 + 4 * n * g * 2 + out_bytes * m * n
  return flops, nbytes


__all__ = ["TritonTiles", "choose_tiles", "fit_shared_memory", "supports", "pack_int4_pairs",
           "reference", "w4a8_matmul", "weight_only_matmul", "flops_and_bytes"]
