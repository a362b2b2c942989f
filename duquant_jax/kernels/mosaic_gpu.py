"""W4A8 matmul as a Pallas Mosaic GPU (Hopper) kernel: int4 weights upcast in registers, int8 wgmma.

Computes what `duquant_jax.kernels.xla.w4a8_matmul` computes for per-channel weight scales (G = 1),
with the same float32 epilogue order:

  y[m, n] = ((acc[m, n] - zw[n] * rx[m] - zx[m] * (cq[n] - K zw[n])) * sw[n]) * sx[m]
  acc = xq @ q.T (int32),  rx[m] = sum_k xq[m, k],  cq[n] = sum_k q[n, k]

Why this shape of kernel (docs/kernels.md, "Mosaic W4A8 kernel"): XLA's W4A8 path casts int4 to
int8 in a separate pass and round-trips the int32 product through memory before the epilogue.
Hopper's wgmma takes its A operand from registers, so the kernel computes the transposed product

  acc^T (tile_n, tile_m) += W (tile_n, tile_k) @ x^T (tile_k, tile_m)

with the weight tile as A: TMA copies the packed int4 tile into shared memory, each warpgroup loads
it into registers in wgmma's 8-bit fragment layout, upcasts int4 -> int8 there, and issues an int8
wgmma against the int8 token tile (B, read from shared memory, K-major as 8-bit wgmma requires).
The weight is read from device memory once, as 4-bit codes. The epilogue scales the int32
accumulator in registers and stores bf16 (or float32) once. Tokens are the wgmma N dimension, so a
50-token policy step is one 64-wide MMA, not a 128-row tile mostly padding. Split-K adds CTAs for
small M x N with a long K; a warp-specialised variant (two MMA warpgroups, one TMA warpgroup) runs
the long-K prefix shapes.

Mosaic GPU exists only for NVIDIA Hopper-class GPUs; its Pallas API moves between jax versions. The
module imports nothing GPU-specific at import time; `supports` says which shapes the kernel takes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from duquant_jax.kernels import dispatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicTiles:
  """Static tiling of the kernel (hashable: a static jit argument).

  Attributes:
    tile_n: weight rows (output channels) per CTA; a multiple of 64 (wgmma's M).
    tile_m: tokens per CTA (wgmma's N); a multiple of 8 up to 32, then of 16, up to 256.
    tile_k: input channels per pipeline step: 128 (one 128-byte swizzled int8 row) or 256 (two,
      half the pipeline steps).
    stages: TMA pipeline depth (shared-memory buffers in flight).
    splits: K slices run by separate CTAs (split-K, for a small M x N with a long K); float32
      partials summed by XLA.
    compute_wgs: 1: one warpgroup per CTA loads, upcasts and multiplies in turn (plain pipeline);
      2: warp-specialised, two compute warpgroups (tile_n weight rows each, so a CTA covers
      2 * tile_n rows; gated: of gate and of up) and one that issues the TMA copies; int8
      codes are read by the MMA from shared memory, int4 codes upcast in registers.
    inflight: one warpgroup: the MMA reads the weight tile from shared memory (no register
      fragment) and each step's MMAs stay in flight while the next step's are issued, their
      buffers released one step later; otherwise every step waits for its MMAs, as a register
      fragment must live until its MMA completes. int8 codes are read as loaded; int4 codes are
      widened in registers into one of two int8 shared-memory tiles (the other is read by the
      step in flight): exact, and slower than the int4 default (BENCHMARKS.md, "The fused gated
      MLP kernel"), so only int8 codes take it by default (`gated_tiles`).
  """
  tile_n: int = 128
  tile_m: int = 64
  tile_k: int = 128
  stages: int = 4
  splits: int = 1
  compute_wgs: int = 1
  inflight: bool = False

  def __post_init__(self):
    if self.tile_n % 64 or self.tile_n < 64:
      raise ValueError(f"MosaicTiles.tile_n={self.tile_n} must be a positive multiple of 64")
    if not 8 <= self.tile_m <= 256 or self.tile_m % (8 if self.tile_m <= 32 else 16):
      raise ValueError(f"MosaicTiles.tile_m={self.tile_m} must be a multiple of 8 up to 32, "
                       "then of 16, up to 256 (int8 wgmma's N)")
    if self.tile_k not in (128, 256):
      raise ValueError(f"MosaicTiles.tile_k={self.tile_k} must be 128 or 256")
    if self.compute_wgs not in (1, 2):
      raise ValueError(f"MosaicTiles.compute_wgs={self.compute_wgs} must be 1 or 2")
    if self.stages < 1 or self.splits < 1:
      raise ValueError(f"MosaicTiles.stages={self.stages} and splits={self.splits} must be >= 1")
    if self.inflight and (self.compute_wgs != 1 or self.stages < 2):
      raise ValueError("MosaicTiles.inflight needs compute_wgs=1 and stages >= 2 (a buffer held "
                       f"one step longer), got compute_wgs={self.compute_wgs}, "
                       f"stages={self.stages}")


# Streaming multiprocessors to fill (H100 SXM).
_SMS = 132
# Calls of more than 256 and up to this many tokens (the flow steps at batch 8: 408) take token
# tiles of 64, so per-tensor activation scales are read as scalars and the token rows summed in
# the kernel (`scalar_scales`); 128-token tiles leave XLA a per-token column block to compute in
# every call (2.0 ms of a batch-8 pi0 call). BENCHMARKS.md, "Policy latency (H100)".
TILE64_MAX_TOKENS = 512
_SQRT_2_OVER_PI = 0.7978845608028654  # float32(sqrt(2 / pi)), as jax.nn.gelu


def choose_tiles(m: int, n: int, k: int) -> MosaicTiles:
  """Tiles per shape regime (docs/kernels.md, "Mosaic tiles").

  Tokens are rounded up to int8 wgmma's N granule for a small M; below a full wave of CTAs,
  64-row weight tiles and then split-K add CTAs (a 50-token step is bound by reading the weight,
  which needs every SM streaming). Long K at prefix sizes runs the warp-specialised variant.
  """
  if m <= 256:
    tile_m = -(-m // 8) * 8 if m <= 32 else -(-m // 16) * 16
  else:
    tile_m = 128
  if 256 < m <= 1024 and k >= 8192 and n % 128 == 0:
    return MosaicTiles(tile_n=64, tile_m=128, stages=4, compute_wgs=2)
  tile_n = 128 if n % 128 == 0 and (n // 128) * -(-m // tile_m) >= _SMS else 64
  stages = 3 if tile_n == 128 and m > 256 else 4  # 3: two 128 x 128 CTAs fit one SM's smem
  ctas = (n // tile_n) * -(-m // tile_m)
  splits = 1
  while ctas * splits * 2 <= 2 * _SMS and k % (2 * splits * 128) == 0 and k // (2 * splits) >= 1024:
    splits *= 2
  if 256 < m <= TILE64_MAX_TOKENS:
    tile_m, stages = 64, 4
  return MosaicTiles(tile_n=tile_n, tile_m=tile_m, stages=stages, splits=splits)


def supports(m: int, n: int, k: int, g: int, tiles: MosaicTiles | None = None) -> bool:
  """Whether the kernel takes (M, K) x (N, K) with G scale groups."""
  tiles = tiles or choose_tiles(m, n, k)
  return (g == 1 and m >= 1 and n % (tiles.tile_n * tiles.compute_wgs) == 0
          and k % (tiles.tile_k * tiles.splits) == 0)


def per_tensor(sx: jax.Array) -> bool:
  """Whether activation scales `sx` are one per tensor ((1, 1), or (L, 1, 1): one per stacked
  layer) rather than one per token ((M, 1)); for M = 1 the two forms are the same numbers."""
  return sx.shape[-2:] == (1, 1)


def scalar_scales(tiles: MosaicTiles) -> bool:
  """Whether the kernel reads per-tensor activation scales as scalars and sums the token rows
  itself, for these tiles: token tiles of up to 64 on one warpgroup (the flow steps, where each
  op outside the kernel costs as much as the kernel). The row sums' accumulator needs 64 x tile_m
  more registers, which the 128-token prefix tiles do not have to spare (measured slower)."""
  return tiles.tile_m <= 64 and tiles.compute_wgs == 1


def _operands(xq, sx, zx, sw, zw, tiles: MosaicTiles, layer):
  """The kernel's operands: (xq padded to M8 rows, sw (L, N), zw (L, N), act).

  sw, zw: (L, N, 1) stacked or (N, 1) per-channel scales and zero points (L = 1).
  act, per-token scales: cols (4, Mp) float32, per token (sx, rx, zx, 0), rx the row sums of xq,
  zero-padded to Mp = M rounded up to tile_m (a fourth zero row keeps every TMA copy of a column
  slice a multiple of 128 bytes); per-tensor scales, (1, 1) or (L, 1, 1), are broadcast into it.
  Per-tensor scales where `scalar_scales(tiles)`: (sx, zx), each (La,) float32 (La = L when they
  are stacked, else 1); the kernel reads them as scalars and sums the token rows itself, so
  nothing is computed outside it. layer: None, or the layer index the caller was given.
  """
  m, n = xq.shape[0], sw.shape[-2]
  stack = sw.shape[:-2] or (1,)
  # Tokens are padded only to a multiple of 8 (TMA's row tiling); past that, the TMA copies
  # zero-fill the token tile and clip the output store.
  m8 = -(-m // 8) * 8
  xq8 = jnp.pad(xq, ((0, m8 - m), (0, 0))) if m8 != m else xq
  f32 = jnp.float32
  sw_n = sw.reshape(*stack, n).astype(f32)
  zw_n = sw_n if zw is None else zw.reshape(*stack, n).astype(f32)  # (unread when zw is None)
  if per_tensor(sx) and scalar_scales(tiles):
    if layer is None:
      dispatch.act_at_layer(None, sx, zx)  # refuses per-layer scales without a layer index
    sx_v = sx.reshape(-1).astype(f32)
    zx_v = sx_v if zx is None else zx.reshape(-1).astype(f32)  # (unread when zx is None)
    return xq8, sw_n, zw_n, (sx_v, zx_v)
  sx, zx = dispatch.per_token(layer, sx, zx, m)
  mp = -(-m // tiles.tile_m) * tiles.tile_m
  zeros_m = jnp.zeros((mp,), f32)
  pad = lambda v: jnp.pad(v.reshape(-1).astype(f32), (0, mp - m))
  rx = pad(jnp.sum(xq.astype(jnp.int32), axis=1)) if zw is not None else zeros_m
  cols = jnp.stack([pad(sx), rx, pad(zx) if zx is not None else zeros_m, zeros_m])
  return xq8, sw_n, zw_n, cols


def w4a8_matmul(xq, sx, zx, q, sw, zw, *, out_dtype=jnp.bfloat16, tiles: MosaicTiles | None = None,
                layer=None):
  """W4A8 matmul on Hopper; arguments as `xla.w4a8_matmul` (per-channel scales only, G = 1).

  Args:
    xq: (M, K) int8 activation codes; sx (M, 1) float32 scales per token, or (1, 1) per tensor,
      or with `layer` (L, 1, 1) per layer of the stack (read in place); zx the same form of zero
      points, or None. Per-tensor scales take `scalar_scales`' path where the tiles allow it.
    q: (N, K) int4 weight codes (int8: W8A8, the same kernel without the register upcast); sw
      (N, 1) float32 scales; zw (N, 1) zero points or None.
      With `layer`: the stacked (L, N, K) / (L, N, 1) arrays of an `nn.scan` layer stack.
    out_dtype: dtype of the (M, N) result.
    tiles: a `MosaicTiles`, or None for `choose_tiles`.
    layer: None, or an int32 scalar (traced): the layer of the stacked arrays to multiply. The
      kernel reads that layer's codes and scales in place, where a slice would be a copy of the
      weight per call (XLA materialises a custom call's operands).

  (No interpret mode: Mosaic GPU's interpreter does not run this kernel's transformed
  shared-memory loads; CPU tests check its CUDA lowering instead, the device probe its numbers.)

  Raises:
    ValueError: shapes the kernel does not take (G > 1, N or K not a multiple of the tiles).
  """
  m, k = xq.shape
  n, g = sw.shape[-2:]
  q, sw, zw, index = _stacked(q, sw, zw, layer)
  if q.shape[-2:] != (n, k):
    raise ValueError(f"weight codes {q.shape} do not match activations {xq.shape} and scales "
                     f"{sw.shape}")
  tiles = tiles or choose_tiles(m, n, k)
  if not supports(m, n, k, g, tiles):
    raise ValueError(f"the Mosaic W4A8 kernel does not take (M, K)={xq.shape} x (N, K)={q.shape} "
                     f"with {g} scale groups and {tiles} (needs G = 1, "
                     f"N % (tile_n * compute_wgs) == 0, K % (tile_k * splits) == 0)")
  xq8, sw_n, zw_n, act = _operands(xq, sx, zx, sw, zw, tiles, layer)
  out = _kernel(xq8, q, sw_n, zw_n, act, (), index, tiles=tiles, out_dtype=jnp.dtype(out_dtype),
                asym_w=zw is not None, asym_x=zx is not None,
                act_stacked=isinstance(act, tuple) and sx.ndim == 3)
  y = jnp.sum(out, axis=0) if tiles.splits > 1 else out[0]
  return (y[:m] if y.shape[0] != m else y).astype(out_dtype)


def _stacked(q, sw, zw, layer):
  """(q, sw, zw) with one leading stack axis, and the (1,) int32 layer index to read."""
  if layer is None:
    if q.ndim != 2:
      raise ValueError(f"weight codes {q.shape} have stack axes; pass the layer to read")
    q, sw, zw = q[None], sw[None], None if zw is None else zw[None]
    layer = 0
  elif q.ndim != 3 or sw.ndim != 3:
    raise ValueError(f"a layer index needs stacked (L, N, K) codes and (L, N, 1) scales, got "
                     f"{q.shape} and {sw.shape}")
  return q, sw, zw, jnp.asarray(layer, jnp.int32).reshape(1)


def gated_tiles(m: int, f: int, k: int, w_bits: int = 4) -> MosaicTiles:
  """Tiles of `gated_w4a8`: 64 gate rows and the same 64 up rows per CTA (two int32 accumulators
  in one warpgroup's registers), token tiles as `choose_tiles`. int8 codes (w_bits 8) keep each
  step's MMAs in flight over three stages: 921 against 1403 us at 6528 tokens, 154 against 220 at
  816 for gemma_2b's MLP (H100, BENCHMARKS.md, "The fused gated MLP kernel")."""
  t = choose_tiles(m, 2 * f, k)
  if w_bits == 8:
    return MosaicTiles(tile_n=64, tile_m=t.tile_m, stages=3, inflight=True)
  return MosaicTiles(tile_n=64, tile_m=t.tile_m, stages=4)


def supports_gated(m: int, f: int, k: int, g: int) -> bool:
  """Whether `gated_w4a8` takes (M, K) tokens against a (2F, K) gate/up weight with G groups."""
  t = gated_tiles(m, f, k)
  return g == 1 and m >= 1 and f % t.tile_n == 0 and k % t.tile_k == 0


def gated_w4a8(xq, sx, zx, q, sw, zw, out_scale, out_zero, *, tiles: MosaicTiles | None = None,
               layer=None):
  """The gated MLP's hidden activation as int8 codes, from one W4A8 pass over gate and up.

  hq = quantize_static(gelu(y[:, :F]) * y[:, F:], out_scale, out_zero), y the float32 result of
  `w4a8_matmul(xq, sx, zx, q, sw, zw)`: the gate and up halves of a CTA's tile meet in registers,
  so the (M, 2F) product never reaches device memory, only the (M, F) int8 codes the down
  projection reads. gelu is the tanh approximation (flax's and Gemma's default).

  Args:
    xq, sx, zx: (M, K) int8 token codes and their scales and zero points (zx None: symmetric),
      in any form `w4a8_matmul` takes.
    q: (2F, K) int4 (or int8) weight codes, gate rows then up rows; sw, zw (2F, 1) float32 (zw
      None).
    out_scale, out_zero: (1,) float32 static scale and zero point of the hidden activation's
      int8 quantizer, or with `layer` (L, 1), one per layer (out_zero None: symmetric); the
      kernel reads them as scalars.
    tiles: a `MosaicTiles` (tile_n rows of gate and of up per CTA, splits = 1, compute_wgs = 1),
      or None for `gated_tiles`.
    layer: None, or an int32 scalar: q, sw, zw are stacked (L, 2F, K) / (L, 2F, 1) and the
      kernel reads this layer in place.

  Returns:
    (M, F) int8 codes.

  Raises:
    ValueError: shapes the kernel does not take.
  """
  m, k = xq.shape
  n, g = sw.shape[-2:]
  f = n // 2
  tiles = tiles or gated_tiles(m, f, k, jnp.iinfo(q.dtype).bits)
  q, sw, zw, index = _stacked(q, sw, zw, layer)
  if q.shape[-2:] != (n, k) or n % 2:
    raise ValueError(f"gate/up weight codes {q.shape} do not match activations {xq.shape} and "
                     f"scales {sw.shape} (an even number of rows: gate then up)")
  if (g != 1 or f % (tiles.tile_n * tiles.compute_wgs) or k % tiles.tile_k
      or tiles.splits != 1):
    raise ValueError(f"the gated Mosaic kernel does not take (M, K)={xq.shape} x (2F, K)={q.shape} "
                     f"with {g} scale groups and {tiles} (needs G = 1, "
                     f"F % (tile_n * compute_wgs) == 0, K % tile_k == 0, no split-K)")
  if out_scale.ndim == 2 and layer is None:
    raise ValueError(f"per-layer output scales {out_scale.shape} need a layer index")
  xq8, sw_n, zw_n, act = _operands(xq, sx, zx, sw, zw, tiles, layer)
  # The output quantizer's scale and zero point are read in the kernel as scalars.
  os_v = out_scale.reshape(-1).astype(jnp.float32)
  oz_v = os_v if out_zero is None else out_zero.reshape(-1).astype(jnp.float32)
  out = _kernel(xq8, q, sw_n, zw_n, act, (os_v, oz_v), index, tiles=tiles,
                out_dtype=jnp.dtype(jnp.int8), asym_w=zw is not None, asym_x=zx is not None,
                gated=True, out_symmetric=out_zero is None,
                act_stacked=isinstance(act, tuple) and sx.ndim == 3,
                out_stacked=out_scale.ndim == 2)
  y = out[0]
  return y[:m] if y.shape[0] != m else y


@functools.partial(jax.jit, static_argnames=("tiles", "out_dtype", "asym_w", "asym_x", "gated",
                                             "out_symmetric", "act_stacked", "out_stacked"))
def _kernel(xq, q, sw, zw, act, out_q, layer, *, tiles: MosaicTiles, out_dtype, asym_w: bool,
            asym_x: bool, gated: bool = False, out_symmetric: bool = True,
            act_stacked: bool = False, out_stacked: bool = False):
  """The Pallas call.

  Args:
    xq: (M, K) int8 tokens, M a multiple of 8; q: (L, N, K) int4 (or int8) weight codes of L
      stacked layers; int4 codes widen to int8 in registers, int8 ones load as they are.
    sw, zw: (L, N) float32 per-channel scales and zero points (zw unread unless asym_w).
    act: the activation quantizer, per token: cols (4, Mp) float32, (sx, rx, zx, 0) per token,
      rx the row sums of xq, zero-padded to Mp = M rounded up to tile_m; or per tensor: (sx, zx),
      (La,) float32 each, read as scalars at the layer (act_stacked) or at 0, with rx summed in
      the kernel (a wgmma of 64 rows of ones against the token tile). (The weight's code sums, for
      zx, come out of the kernel's MMA either way.)
    out_q: gated only: the output quantizer's (scale, zero), (Lo,) float32 each, read as scalars at
      the layer (out_stacked) or at 0.
    layer: (1,) int32, the layer of q, sw, zw to multiply (read by every CTA before its copies).
    tiles.splits: K is cut into slices run by separate CTAs (more CTAs for a small M x N); each
      writes its scaled float32 partial and the caller sums them.

    gated: q holds gate rows then up rows (2F, K); each CTA multiplies tile_n gate rows and the
      same tile_n up rows and writes int8 codes of gelu(gate) * up (out_symmetric: no zero point,
      codes in +-127).

  Returns:
    (splits, M, N) of out_dtype (float32 when splits > 1); gated: (1, M, F) int8.
  """
  import jax.experimental.pallas as pl
  from jax import lax
  from jax.experimental.pallas import mosaic_gpu as plgpu

  m, k = xq.shape
  n = q.shape[1]
  n_out = n // 2 if gated else n
  tn, tm, tk = tiles.tile_n, tiles.tile_m, tiles.tile_k
  mp, splits = -(-m // tm) * tm, tiles.splits
  ks = k // splits
  if ks % tk:
    raise ValueError(f"K={k} in {splits} slices is not a multiple of tile_k={tk}")
  tensor_scales = isinstance(act, tuple)
  rx_in_kernel = tensor_scales and asym_w
  # 128-byte rows of int8 tokens; 64-byte rows of int4 weights (128-byte of int8 ones).
  w_bits = jnp.iinfo(q.dtype).bits
  x_swz = plgpu.find_swizzle(tk * 8)
  w_swz = plgpu.find_swizzle(tk * w_bits)
  x_tr = (plgpu.TilingTransform((8, x_swz)), plgpu.SwizzleTransform(x_swz))
  w_tr = (plgpu.TilingTransform((8, w_swz * 8 // w_bits)), plgpu.SwizzleTransform(w_swz))
  row_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row (weight row n)
  col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per accumulator column (token m)
  # Eight rows of ones as a second B operand: W @ ones^T gives the weight's code sums per row
  # (the asymmetric-activation correction) from the tile already in registers, where XLA would
  # re-read the whole weight. With per-tensor scales, 64 rows of ones as an A operand give the
  # token rows' sums (the weight zero points' correction) from the token tile in shared memory,
  # where XLA would run a reduction before the kernel.
  ones = jnp.ones((8, tk), jnp.int8)
  ones_a = (jnp.ones((64, tk), jnp.int8),) if rx_in_kernel else ()

  wgs = tiles.compute_wgs
  cta_n = wgs * tn  # weight rows per CTA
  # inflight: a step's buffers are refilled one step later, after the next step's wait.
  hold = dict(delay_release=1) if tiles.inflight else {}
  w_spec = plgpu.BlockSpec((cta_n, tk), lambda kk: (0, kk), transforms=w_tr, **hold)
  in_specs = [w_spec] * (2 if gated else 1) + [
      plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=x_tr, **hold)]
  # MMAs issued per pipeline step (each its own wgmma group).
  step_mmas = (2 if gated else 1) * (2 if asym_x else 1) + rx_in_kernel
  # inflight int4: the widened tiles of a step, two slots (steps alternate between them).
  widen_smem = tiles.inflight and w_bits != 8
  n_acc = 2 if gated else 1  # weight tiles and accumulators per step: gate and up, or one

  def mma(step, w_smems, x_smem, ones_smem, ones_a_smem, wide_smem, acc_refs, csum_refs, rx_ref):
    for j, (w_smem, acc_ref, csum_ref) in enumerate(zip(w_smems, acc_refs, csum_refs)):
      if w_bits == 8 and (tiles.inflight or wgs > 1):
        # Read by the MMA as loaded. Warp-specialised, each step still waits for its MMAs, and
        # the other compute warpgroup's MMAs run meanwhile.
        w = w_smem
      else:
        w = plgpu.load(w_smem, (), layout=plgpu.Layout.WGMMA_8BIT).astype(jnp.int8)
        if widen_smem:
          # The slot written here was last read by the MMAs of two steps ago, which are complete
          # (each step leaves only its own in flight).
          w_wide = wide_smem.at[lax.rem(step, 2), j]
          w_wide[...] = w
          plgpu.commit_smem()
          w = w_wide
      plgpu.wgmma(acc_ref, w, x_smem.T)
      if asym_x:
        plgpu.wgmma(csum_ref, w, ones_smem.T)
    if rx_ref is not None:
      plgpu.wgmma(rx_ref, ones_a_smem, x_smem.T)
    # Without `inflight` the pipeline refills this step's buffers next, so the MMA must be done:
    # keeping one in flight would need the register fragment of its weight tile kept live until
    # it completes, not only its shared-memory buffers (docs/kernels.md, "Mosaic W4A8 kernel").
    # With it, this step's MMAs stay in flight and the previous step's are complete.
    plgpu.wgmma_wait(step_mmas if tiles.inflight else 0)

  def scaled(acc, csum, rx, row, sx, zx, r, first):
    """int32 acc^T (tn, tm) -> float32 y^T, weight rows' scale / zero point in rows r, r + 1;
    sx, rx, zx per-token column vectors or scalars broadcast over the tile."""
    acc = acc.astype(jnp.float32)
    if asym_w:
      # rx summed outside the kernel is the whole row's, so it is taken once (first slice);
      # summed in the kernel it is this K slice's own.
      acc = acc - (row(r + 1) if rx_in_kernel else row(r + 1) * first) * rx
    if asym_x:
      cq = lax.broadcast_in_dim(jnp.max(csum.astype(jnp.float32), axis=1), (tn, tm), [0])
      if asym_w:
        cq = cq - float(ks) * row(r + 1)
      acc = acc - zx * cq
    return (acc * row(r)) * sx

  def epilogue(accs, csums, rx_acc, rows_smem, cols_smem, scalars, o_smem, first):
    """int32 acc^T (tn, tm) -> the scaled y tile (gated: the int8 codes of gelu(gate) * up),
    stored in o_smem (tm, tn) through a transposed view."""
    row = lambda i: lax.broadcast_in_dim(
        plgpu.load(rows_smem.at[i], (), layout=row_layout), (tn, tm), [0])
    col = lambda i: lax.broadcast_in_dim(
        plgpu.load(cols_smem.at[i], (), layout=col_layout), (tn, tm), [1])
    if tensor_scales:
      sx, zx = scalars[0], scalars[1]
      rx = None if rx_acc is None else lax.broadcast_in_dim(
          jnp.max(rx_acc.astype(jnp.float32), axis=0), (tn, tm), [1])
    else:
      sx, rx, zx = col(0), col(1), col(2)
    y = scaled(accs[0], csums[0], rx, row, sx, zx, 0, first)
    if gated:
      g = y
      u = scaled(accs[1], csums[1], rx, row, sx, zx, 2, first)
      inv, zero = 1.0 / scalars[2], scalars[3]  # as xla.quantize_static: x * (1 / scale)
      # jax.nn.gelu(approximate=True), in its operation order.
      cdf = 0.5 * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * (g * g * g))))
      h = jnp.round((g * cdf) * u * inv)
      if out_symmetric:
        h = jnp.clip(h, -127.0, 127.0)
      else:
        h = jnp.clip(h + zero, -128.0, 127.0)
      # The transposed register layout exists for 32-bit values; the codes are narrowed after it.
      h = plgpu.layout_cast(h, plgpu.Layout.WGMMA_TRANSPOSED)
      o_smem.T[...] = h.astype(jnp.int32).astype(jnp.int8)
      plgpu.commit_smem()
      return
    o_smem.T[...] = plgpu.layout_cast(y.astype(o_smem.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
    plgpu.commit_smem()

  n_act = 2 if tensor_scales else 1
  n_out_q = 2 if gated else 0

  def body(x_gmem, w_gmem, sw_gmem, zw_gmem, *refs):
    act_gmem, refs = refs[:n_act], refs[n_act:]
    out_q_gmem, refs = refs[:n_out_q], refs[n_out_q:]
    ones_gmem, refs = refs[0], refs[1:]
    ones_a_gmem, refs = (refs[0], refs[1:]) if rx_in_kernel else (None, refs)
    layer_gmem, o_gmem, rows_smem, refs = refs[0], refs[1], refs[2], refs[3:]
    cols_smem, refs = (None, refs) if tensor_scales else (refs[0], refs[1:])
    ones_smem, refs = refs[0], refs[1:]
    ones_a_smem, refs = (refs[0], refs[1:]) if rx_in_kernel else (None, refs)
    wide_smem, refs = (refs[0], refs[1:]) if widen_smem else (None, refs)
    o_smem, bar = refs

    ni, mi, si = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("s")
    li = layer_gmem[0]
    w_gmem, sw_gmem, zw_gmem = w_gmem.at[li], sw_gmem.at[li], zw_gmem.at[li]
    n_sl, m_sl, k_sl = pl.ds(ni * cta_n, cta_n), pl.ds(mi * tm, tm), pl.ds(si * ks, ks)
    first = (si == 0).astype(jnp.float32)
    bar = bar.at[0] if bar.shape else bar  # one barrier: shape (1,) on jax 0.10, () on 0.11
    # Per-tensor quantizer scalars, read from device memory by every thread.
    scalars = ()
    if tensor_scales:
      ai = li if act_stacked else 0
      scalars = (act_gmem[0][ai], act_gmem[1][ai])
    if gated:
      oi = li if out_stacked else 0
      scalars = (scalars or (None, None)) + (out_q_gmem[0][oi], out_q_gmem[1][oi])
    # gated: this CTA's gate rows and the same rows of the up half.
    weights = lambda k_sl: ((w_gmem.at[n_sl, k_sl],
                             w_gmem.at[pl.ds(n_out + ni * cta_n, cta_n), k_sl])
                            if gated else (w_gmem.at[n_sl, k_sl],))

    def copy_vectors():
      plgpu.copy_gmem_to_smem(sw_gmem.at[n_sl], rows_smem.at[0], bar)
      plgpu.copy_gmem_to_smem(zw_gmem.at[n_sl], rows_smem.at[1], bar)
      if gated:  # the up rows' scales and zero points
        up_sl = pl.ds(n_out + ni * cta_n, cta_n)
        plgpu.copy_gmem_to_smem(sw_gmem.at[up_sl], rows_smem.at[2], bar)
        plgpu.copy_gmem_to_smem(zw_gmem.at[up_sl], rows_smem.at[3], bar)
      if not tensor_scales:
        plgpu.copy_gmem_to_smem(act_gmem[0].at[:, m_sl], cols_smem, bar)
      plgpu.copy_gmem_to_smem(ones_gmem, ones_smem, bar)
      if rx_in_kernel:
        plgpu.copy_gmem_to_smem(ones_a_gmem, ones_a_smem, bar)

    rx_acc_type = [plgpu.ACC((64, tm), jnp.int32)] if rx_in_kernel else []
    if wgs == 1:
      copy_vectors()
      # The ones tiles are read by the first MMA.
      plgpu.barrier_wait(bar)

      def compute(*refs):
        accs, csums = refs[:n_acc], refs[n_acc:2 * n_acc]
        rx_ref = refs[2 * n_acc] if rx_in_kernel else None
        plgpu.emit_pipeline(
            lambda idx, *smems: mma(idx[0], smems[:-1], smems[-1], ones_smem, ones_a_smem,
                                    wide_smem, accs, csums, rx_ref),
            grid=(ks // tk,), max_concurrent_steps=tiles.stages, in_specs=in_specs,
        )(*weights(k_sl), x_gmem.at[m_sl, k_sl])
        if tiles.inflight:
          plgpu.wgmma_wait(0)  # the last step's MMAs
        return ([r[...] for r in accs], [r[...] for r in csums],
                None if rx_ref is None else rx_ref[...])

      accs, csums, rx_acc = pl.run_scoped(compute, *[plgpu.ACC((tn, tm), jnp.int32)] * n_acc,
                                          *[plgpu.ACC((tn, 8), jnp.int32)] * n_acc, *rx_acc_type)
      epilogue(accs, csums, rx_acc, rows_smem, cols_smem, scalars, o_smem, first)
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, m_sl, n_sl])
      plgpu.wait_smem_to_gmem(0)
      return

    wg = lax.axis_index("wg")
    # Warp-specialised: warpgroups 0..wgs-1 upcast and multiply their tile_n rows of the weight
    # tile (gated: of the gate and of the up tile), warpgroup `wgs` only issues the TMA copies,
    # so loads run ahead of the MMAs.
    wg_rows = pl.ds(wg * tn, tn)
    pl.when(wg == 0)(copy_vectors)

    def compute_context(eval_pipeline):
      def scope(*refs):
        accs, csums, rx_ref = refs[:n_acc], refs[n_acc:2 * n_acc], refs[2 * n_acc:]
        plgpu.barrier_wait(bar)
        eval_pipeline(refs)
        epilogue([r[...] for r in accs], [r[...] for r in csums],
                 rx_ref[0][...] if rx_ref else None, rows_smem.at[:, wg_rows], cols_smem,
                 scalars, o_smem.at[wg], first)
        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[si, m_sl, pl.ds(ni * cta_n + wg * tn, tn)])
        plgpu.wait_smem_to_gmem(0)
      pl.run_scoped(scope, *[plgpu.ACC((tn, tm), jnp.int32)] * n_acc,
                    *[plgpu.ACC((tn, 8), jnp.int32)] * n_acc, *rx_acc_type)

    def step(_, *refs):
      w_smems, x_smem, carry = refs[:-2], refs[-2], refs[-1]
      mma(None, [w.at[wg_rows] for w in w_smems], x_smem, ones_smem, ones_a_smem, None,
          list(carry[:n_acc]), list(carry[n_acc:2 * n_acc]),
          carry[2 * n_acc] if rx_in_kernel else None)
      return carry

    plgpu.emit_pipeline_warp_specialized(
        step, grid=(ks // tk,), memory_registers=40, in_specs=in_specs, wg_axis="wg",
        num_compute_wgs=wgs, max_concurrent_steps=tiles.stages, compute_context=compute_context,
    )(*weights(k_sl), x_gmem.at[m_sl, k_sl])

  if gated and splits != 1:
    raise ValueError(f"the gated kernel runs without split-K, got {tiles}")
  kw = dict(num_threads=wgs + 1, thread_name="wg") if wgs > 1 else {}
  dtype = jnp.float32 if splits > 1 else out_dtype
  o_tile = (tm, tn) if wgs == 1 else (wgs, tm, tn)
  act = act if tensor_scales else (act,)
  copies = (4 if gated else 2) + (0 if tensor_scales else 1) + 1 + (1 if rx_in_kernel else 0)
  scratch = ([plgpu.SMEM((4 if gated else 2, cta_n), jnp.float32)]
             + ([] if tensor_scales else [plgpu.SMEM((act[0].shape[0], tm), jnp.float32)])
             + [plgpu.SMEM((8, tk), jnp.int8, transforms=x_tr)]
             + ([plgpu.SMEM((64, tk), jnp.int8, transforms=x_tr)] if rx_in_kernel else [])
             + ([plgpu.SMEM((2, n_acc, cta_n, tk), jnp.int8, transforms=x_tr)] if widen_smem
                else [])
             + [plgpu.SMEM(o_tile, dtype), plgpu.Barrier(num_arrivals=copies)])
  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((splits, m, n_out), dtype),
      grid=(n_out // cta_n, mp // tm, splits), grid_names=("n", "m", "s"),
      scratch_types=scratch, **kw)(xq, q, sw, zw, *act, *out_q, ones, *ones_a, layer)
