"""W4A8 matmul as a Pallas Mosaic GPU (Hopper) kernel: int4 weights upcast in registers, int8 wgmma.

Computes what `duquant_jax.kernels.xla.w4a8_matmul` computes for per-channel weight scales (G = 1),
with the same float32 epilogue order:

  y[m, n] = ((acc[m, n] - zw[n] * rx[m] - zx[m] * (cq[n] - K zw[n])) * sw[n]) * sx[m]
  acc = xq @ q.T (int32),  rx[m] = sum_k xq[m, k],  cq[n] = sum_k q[n, k]

Why this shape of kernel (DESIGN.md section 5, BENCHMARKS.md "anatomy"): XLA's W4A8 loses to bf16
at prefix sizes because it casts int4 to int8 in a separate pass and round-trips the int32 product
through memory before the epilogue. Hopper's wgmma takes its A operand from registers, so the kernel
computes the transposed product

  acc^T (tile_n, tile_m) += W (tile_n, tile_k) @ x^T (tile_k, tile_m)

with the weight tile as A: TMA copies the packed int4 tile into shared memory, each warpgroup loads
it into registers in wgmma's 8-bit fragment layout, upcasts int4 -> int8 there, and issues an int8
wgmma against the int8 token tile (B, read from shared memory, K-major as 8-bit wgmma requires).
The weight is read from device memory once, as 4-bit codes. The epilogue scales the int32
accumulator in registers and stores bf16 (or float32) once. Tokens are the wgmma N dimension, so a
50-token policy step is one 56-/64-wide MMA, not a 128-row tile mostly padding.

Mosaic GPU exists only for NVIDIA Hopper-class GPUs; its Pallas API moves between jax versions. The
module imports nothing GPU-specific at import time; `supports` says which shapes the kernel takes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
  """Static tiling of the kernel (hashable: a static jit argument).

  Attributes:
    tile_n: weight rows (output channels) per CTA; a multiple of 64 (wgmma's M).
    tile_m: tokens per CTA (wgmma's N); a multiple of 8 up to 256.
    tile_k: input channels per pipeline step; 128 (one 128-byte swizzled int8 row).
    stages: TMA pipeline depth (shared-memory buffers in flight).
  """
  tile_n: int = 128
  tile_m: int = 64
  tile_k: int = 128
  stages: int = 4

  def __post_init__(self):
    if self.tile_n % 64 or self.tile_n < 64:
      raise ValueError(f"TileConfig.tile_n={self.tile_n} must be a positive multiple of 64")
    if self.tile_m % 8 or not 8 <= self.tile_m <= 256:
      raise ValueError(f"TileConfig.tile_m={self.tile_m} must be a multiple of 8 in [8, 256]")
    if self.tile_k != 128:
      raise ValueError(f"TileConfig.tile_k={self.tile_k} must be 128")
    if self.stages < 1:
      raise ValueError(f"TileConfig.stages={self.stages} must be >= 1")


def choose_tiles(m: int, n: int, k: int) -> TileConfig:
  """Tiles per shape regime: tokens rounded up to the MMA's N granule for a small M."""
  # int8 wgmma takes N in multiples of 8 up to 32, then of 16.
  tile_m = (-(-m // 8) * 8 if m <= 32 else min(256, -(-m // 16) * 16)) if m <= 256 else 128
  tile_n = 128 if n % 128 == 0 else 64
  return TileConfig(tile_n=tile_n, tile_m=tile_m)


def supports(m: int, n: int, k: int, g: int, tiles: TileConfig | None = None) -> bool:
  """Whether the kernel takes (M, K) x (N, K) with G scale groups."""
  tiles = tiles or choose_tiles(m, n, k)
  return g == 1 and n % tiles.tile_n == 0 and k % tiles.tile_k == 0 and m >= 1


def w4a8_matmul(xq, sx, zx, q, sw, zw, *, out_dtype=jnp.bfloat16, tiles: TileConfig | None = None,
                interpret: bool = False):
  """W4A8 matmul on Hopper; arguments as `xla.w4a8_matmul` (per-channel scales only, G = 1).

  Raises:
    ValueError: shapes the kernel does not take (G > 1, N or K not a multiple of the tiles).
  """
  m, k = xq.shape
  n, g = sw.shape
  if q.shape != (n, k):
    raise ValueError(f"weight codes {q.shape} do not match activations {xq.shape} and scales {sw.shape}")
  tiles = tiles or choose_tiles(m, n, k)
  if not supports(m, n, k, g, tiles):
    raise ValueError(f"the Mosaic W4A8 kernel does not take (M, K)={xq.shape} x (N, K)={q.shape} "
                     f"with {g} scale groups and {tiles} (needs G = 1, N % tile_n == 0, "
                     f"K % tile_k == 0)")
  mp = -(-m // tiles.tile_m) * tiles.tile_m
  xq_p = jnp.pad(xq, ((0, mp - m), (0, 0))) if mp != m else xq
  f32 = jnp.float32
  zeros_n = jnp.zeros((n,), f32)
  zw_n = zeros_n if zw is None else zw[:, 0].astype(f32)
  if zx is not None:
    cq = jnp.sum(q.astype(jnp.int32), axis=1).astype(f32)
    cq = cq if zw is None else cq - k * zw_n
  else:
    cq = zeros_n
  # A fourth zero row keeps every TMA copy of a column slice a multiple of 128 bytes.
  rows = jnp.stack([sw[:, 0].astype(f32), zw_n, cq, zeros_n])  # (4, N)
  rx = jnp.sum(xq_p.astype(jnp.int32), axis=1).astype(f32)
  pad = lambda v: jnp.pad(v.reshape(-1).astype(f32), (0, mp - m))
  zeros_m = jnp.zeros((mp,), f32)
  cols = jnp.stack([pad(sx), rx, pad(zx) if zx is not None else zeros_m, zeros_m])  # (4, Mp)
  yt = _kernel(xq_p, q, rows, cols, tiles=tiles, out_dtype=jnp.dtype(out_dtype),
               asym_w=zw is not None, asym_x=zx is not None, interpret=interpret)
  return yt[:, :m].T


@functools.partial(jax.jit, static_argnames=("tiles", "out_dtype", "asym_w", "asym_x", "interpret"))
def _kernel(xq, q, rows, cols, *, tiles: TileConfig, out_dtype, asym_w: bool, asym_x: bool,
            interpret: bool):
  """y^T (N, Mp) from xq (Mp, K) int8, q (N, K) int4, rows (4, N) = (sw, zw, cq', 0), cols (4, Mp) =
  (sx, rx, zx, 0)."""
  import jax.experimental.pallas as pl
  from jax import lax
  from jax.experimental.pallas import mosaic_gpu as plgpu

  mp, k = xq.shape
  n = q.shape[0]
  tn, tm, tk = tiles.tile_n, tiles.tile_m, tiles.tile_k
  # 128-byte rows of int8 tokens; 64-byte rows of int4 weights.
  x_swz = plgpu.find_swizzle(tk * 8)
  w_swz = plgpu.find_swizzle(tk * 4)
  x_tr = (plgpu.TilingTransform((8, x_swz)), plgpu.SwizzleTransform(x_swz))
  w_tr = (plgpu.TilingTransform((8, w_swz * 2)), plgpu.SwizzleTransform(w_swz))
  row_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row (weight row n)
  col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per accumulator column (token m)

  def body(x_gmem, w_gmem, rows_gmem, cols_gmem, o_gmem, rows_smem, cols_smem, o_smem, bar):
    ni, mi = lax.axis_index("n"), lax.axis_index("m")
    n_sl, m_sl = pl.ds(ni * tn, tn), pl.ds(mi * tm, tm)
    bar = bar.at[0] if bar.shape else bar  # one barrier: shape (1,) on jax 0.10, () on 0.11
    plgpu.copy_gmem_to_smem(rows_gmem.at[:, n_sl], rows_smem, bar)
    plgpu.copy_gmem_to_smem(cols_gmem.at[:, m_sl], cols_smem, bar)

    def compute(acc_ref):
      def step(_, w_smem, x_smem):
        w = plgpu.load(w_smem, (), layout=plgpu.Layout.WGMMA_8BIT).astype(jnp.int8)
        plgpu.wgmma(acc_ref, w, plgpu.transpose_ref(x_smem, (1, 0)))
        plgpu.wgmma_wait(0)  # the pipeline refills this step's buffers next

      plgpu.emit_pipeline(
          step, grid=(k // tk,), max_concurrent_steps=tiles.stages,
          in_specs=[plgpu.BlockSpec((tn, tk), lambda kk: (0, kk), transforms=w_tr),
                    plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=x_tr)],
      )(w_gmem.at[n_sl, :], x_gmem.at[m_sl, :])
      return acc_ref[...]

    acc = pl.run_scoped(compute, plgpu.ACC((tn, tm), jnp.int32)).astype(jnp.float32)
    plgpu.barrier_wait(bar)
    row = lambda i: lax.broadcast_in_dim(
        plgpu.load(rows_smem.at[i], (), layout=row_layout), (tn, tm), [0])
    col = lambda i: lax.broadcast_in_dim(
        plgpu.load(cols_smem.at[i], (), layout=col_layout), (tn, tm), [1])
    if asym_w:
      acc = acc - row(1) * col(1)
    if asym_x:
      acc = acc - col(2) * row(2)
    y = (acc * row(0)) * col(0)
    o_smem[...] = y.astype(out_dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[n_sl, m_sl])
    plgpu.wait_smem_to_gmem(0)

  kw = dict(interpret=_interpret_params()) if interpret else {}
  yt = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((n, mp), out_dtype),
      grid=(n // tn, mp // tm), grid_names=("n", "m"),
      scratch_types=[plgpu.SMEM((4, tn), jnp.float32), plgpu.SMEM((4, tm), jnp.float32),
                     plgpu.SMEM((tn, tm), out_dtype), plgpu.Barrier(num_arrivals=2)],
      **kw)(xq, q, rows, cols)
  return yt


def _interpret_params():
  """The Mosaic GPU interpreter's parameters (a simulated GPU on the CPU; jax keeps it private)."""
  from jax._src.pallas.mosaic_gpu.interpret import params
  return params.InterpretGPUParams()
