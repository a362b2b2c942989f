"""The Mosaic GPU W4A8 kernel on a CPU-only machine: its tiling rules, its errors, that it lowers for
CUDA (through `jax.export`, which runs the whole Pallas -> Mosaic GPU lowering on the host), and
that the "mosaic" dispatch falls back to the XLA path bit-exactly where the kernel cannot run.

The kernel's numbers are checked on the H100 by `scripts/probe_mosaic_w4a8.py` (it equals the XLA
path to 0.0 relative error without split-K, BENCHMARKS.md); Mosaic GPU's own interpreter does not
yet run a pipelined wgmma kernel on the CPU (jax 0.10.2).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax import kernels
from duquant_jax.kernels import gated, mosaic_gpu, w4a8, xla

GEMMA_SHAPES = [(2048, 2048), (2048, 256), (2048, 16384), (16384, 2048), (1024, 4096), (4096, 1024)]


def _specs(m, k, n, *, asym):
  s = jax.ShapeDtypeStruct
  f32 = jnp.float32
  return (s((m, k), jnp.int8), s((m, 1), f32), s((m, 1), f32) if asym else None,
          s((n, k), jnp.int4), s((n, 1), f32), s((n, 1), f32) if asym else None)


def _cuda_module(fn, *specs) -> str:
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(*specs).mlir_module()


@pytest.mark.parametrize("m", [1, 16, 51, 64, 816, 968, 4096])
@pytest.mark.parametrize("k,n", GEMMA_SHAPES)
def test_choose_tiles_takes_every_gemma_shape(m, k, n):
  t = mosaic_gpu.choose_tiles(m, n, k)
  assert mosaic_gpu.supports(m, n, k, 1, t)
  assert t.tile_m >= min(m, 128) or m > 256  # small M: one token tile holds every token
  assert k // t.splits >= 1024  # split-K never cuts K below 8 pipeline steps


def test_batch8_flow_steps_take_64_token_tiles_read_scales_as_scalars():
  """257-512 tokens (408: a flow step at batch 8): 64-token tiles, so per-tensor scales are read
  in the kernel; the prefix's 128-token tiles and batch 1-4's tiles unchanged."""
  for m in (257, 408, 512):
    t = mosaic_gpu.choose_tiles(m, 4096, 1024)
    assert (t.tile_m, t.stages) == (64, 4) and mosaic_gpu.scalar_scales(t)
    assert mosaic_gpu.gated_tiles(m, 4096, 1024).tile_m == 64
  assert mosaic_gpu.choose_tiles(513, 4096, 1024).tile_m == 128
  assert mosaic_gpu.choose_tiles(204, 4096, 1024).tile_m == 208
  assert mosaic_gpu.choose_tiles(408, 2048, 16384).compute_wgs == 2  # warp-specialised: as it was


def test_gated_int8_codes_keep_their_mmas_in_flight():
  t8, t4 = mosaic_gpu.gated_tiles(6528, 16384, 2048, 8), mosaic_gpu.gated_tiles(6528, 16384, 2048)
  assert t8.inflight and t8.stages == 3 and not t4.inflight
  assert dataclasses.replace(t8, inflight=False, stages=4) == t4


def test_gated_mlp_on_an_int8_copy_equals_the_library_and_lowers_to_one_kernel():
  """implementation="mosaic_unpacked": a layer of a stack on a per-call int8 copy of its codes;
  the reference's numbers where the trace is not lowered for CUDA, and for CUDA one Mosaic call
  reading a (2F, K) int8 copy."""
  layers, m, k, f = 3, 32, 256, 128
  ks = jax.random.split(jax.random.key(0), 4)
  xq, _, _ = xla.quantize_per_token(jax.random.normal(ks[0], (m, k)))
  q = jax.random.randint(ks[1], (layers, 2 * f, k), -8, 8).astype(jnp.int4)
  sw = 0.01 + 0.01 * jax.random.uniform(ks[2], (layers, 2 * f, 1))
  zw = jnp.round(jax.random.uniform(ks[3], (layers, 2 * f, 1)) * 4 - 2)
  sx, out_scale = jnp.full((layers, 1, 1), 0.02), jnp.full((layers, 1), 0.05)
  for i in range(layers):
    got = kernels.gated_w4a8(xq, sx, None, q, sw, zw, out_scale, None, layer=jnp.int32(i),
                             implementation="mosaic_unpacked")
    want = gated.reference(*gated.one_layer(jnp.int32(i), xq, sx, None, q, sw, zw, out_scale,
                                            None))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  fn = lambda xq, sx, q, sw, zw, o, i: kernels.gated_w4a8(
      xq, sx, None, q, sw, zw, o, None, layer=i, implementation="mosaic_unpacked")
  text = _cuda_module(fn, xq, sx, q, sw, zw, out_scale, jnp.int32(0))
  [call] = re.findall(r"custom_call @mosaic_gpu\w*\(.*", text)
  assert re.search(rf"tensor<1x{2 * f}x{k}xi8>", call)


def test_tile_config_rejects_what_wgmma_cannot_run():
  with pytest.raises(ValueError, match="tile_n"):
    mosaic_gpu.MosaicTiles(tile_n=96)
  with pytest.raises(ValueError, match="tile_m"):
    mosaic_gpu.MosaicTiles(tile_m=40)  # int8 wgmma's N: multiples of 16 above 32
  with pytest.raises(ValueError, match="tile_k"):
    mosaic_gpu.MosaicTiles(tile_k=64)
  with pytest.raises(ValueError, match="splits"):
    mosaic_gpu.MosaicTiles(splits=0)
  with pytest.raises(ValueError, match="compute_wgs"):
    mosaic_gpu.MosaicTiles(compute_wgs=3)


def test_unsupported_shapes_raise_a_clear_error():
  xq = jnp.zeros((8, 256), jnp.int8)
  sx = jnp.ones((8, 1))
  with pytest.raises(ValueError, match="scale groups"):  # per-group scales: G = 2
    mosaic_gpu.w4a8_matmul(xq, sx, None, jnp.zeros((128, 256), jnp.int4), jnp.ones((128, 2)), None)
  with pytest.raises(ValueError, match="N % \\(tile_n"):  # SigLIP's MLP width 4304 is not 64-aligned
    mosaic_gpu.w4a8_matmul(xq, sx, None, jnp.zeros((4304 // 4, 256), jnp.int4),
                           jnp.ones((4304 // 4, 1)), None)
  with pytest.raises(ValueError, match="do not match"):
    mosaic_gpu.w4a8_matmul(xq, sx, None, jnp.zeros((128, 128), jnp.int4), jnp.ones((128, 1)), None)
  assert not kernels.mosaic_applies(8, 1076, 256, 1, jnp.int4)
  assert not kernels.mosaic_applies(8, 128, 256, 1, jnp.float32)
  # int8 weights (W8A8) on request only: auto-dispatch keeps them on XLA until measured.
  assert kernels.mosaic_applies(8, 128, 256, 1, jnp.int8)
  assert not kernels.mosaic_applies(8, 128, 256, 1, jnp.int8, w4a8.MOSAIC_AUTO_CODES)


@pytest.mark.parametrize("m,k,n,asym,tiles", [
    (51, 1024, 4096, True, None),                       # a policy step, gemma_300m gate/up
    (1, 2048, 2048, False, None),                       # M = 1: an 8-token tile
    (51, 16384, 2048, True, None),                      # split-K (8 slices), float32 partials
    (816, 16384, 2048, True, None),                     # warp-specialised: 2 MMA + 1 TMA warpgroups
    (816, 2048, 16384, True, mosaic_gpu.MosaicTiles(tile_n=128, tile_m=128, stages=3)),
    (816, 4096, 1024, False, mosaic_gpu.MosaicTiles(tile_n=64, tile_m=256)),
])
def test_kernel_lowers_for_cuda(m, k, n, asym, tiles):
  text = _cuda_module(lambda *a: mosaic_gpu.w4a8_matmul(*a, out_dtype=jnp.bfloat16, tiles=tiles),
                      *_specs(m, k, n, asym=asym))
  assert len(re.findall(r"custom_call @mosaic_gpu\w*", text)) == 1


def _int8_weights(specs):
  return tuple(jax.ShapeDtypeStruct(a.shape, jnp.int8) if a is not None and a.dtype == jnp.int4
               else a for a in specs)


@pytest.mark.parametrize("m,k,n", [(51, 1024, 4096), (51, 16384, 2048), (816, 16384, 2048),
                                   (816, 2048, 16384)])
def test_int8_weights_lower_for_cuda_on_request_only(m, k, n):
  """W8A8: the same kernel reads int8 codes (128-byte swizzled rows, no upcast) in every tiling
  regime, one layer, in place and gated; auto-dispatch leaves int8 weights to XLA."""
  specs = _int8_weights(_specs(m, k, n, asym=True))
  mosaic = lambda *a: kernels.w4a8_matmul(*a, implementation="mosaic")
  [call] = re.findall(r"custom_call @mosaic_gpu\w*\(.*", _cuda_module(mosaic, *specs))
  assert re.search(rf"tensor<1x{n}x{k}xi8>", call)
  auto = lambda *a: kernels.w4a8_matmul(*a)
  assert not re.search(r"custom_call @mosaic_gpu", _cuda_module(auto, *specs))
  stacked = _int8_weights(_stacked_specs(m, k, n, 18, asym=True))
  in_place = lambda xq, sx, zx, q, sw, zw, i: mosaic_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, layer=i)
  assert re.search(rf"tensor<18x{n}x{k}xi8>", _cuda_module(in_place, *stacked))
  if n % 128 == 0 and k <= 4096:
    fn = lambda *a: kernels.gated_w4a8(*a, implementation="mosaic")
    gated_specs = _int8_weights(_gated_specs(m, k, n // 2, asym=True, out_asym=False))
    assert len(re.findall(r"custom_call @mosaic_gpu\w*", _cuda_module(fn, *gated_specs))) == 1


@pytest.mark.parametrize("asym,tensor_scales", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernels_with_mmas_in_flight_lower_for_cuda(asym, tensor_scales, bits):
  """`MosaicTiles(inflight=True)`: the MMA reads the weight tile from shared memory (int8 codes
  as loaded, int4 ones widened there), buffers held a step; the plain and the gated kernel,
  per-token and per-tensor scales (the token row sums' MMA in flight too)."""
  m, k, n = 816, 2048, 16384
  specs = list(_specs(m, k, n, asym=asym))
  specs = list(_int8_weights(specs)) if bits == 8 else specs
  if tensor_scales:
    specs[1:3] = [jax.ShapeDtypeStruct((1, 1), jnp.float32)] * 2
  tiles = mosaic_gpu.MosaicTiles(tile_n=128, tile_m=128, stages=3, inflight=True)
  plain = lambda *a: mosaic_gpu.w4a8_matmul(*a, tiles=tiles)
  assert len(re.findall(r"custom_call @mosaic_gpu", _cuda_module(plain, *specs))) == 1
  gated_tiles = dataclasses.replace(tiles, tile_n=64, stages=4)
  out = (jax.ShapeDtypeStruct((1,), jnp.float32),) * 2
  gated = lambda *a: mosaic_gpu.gated_w4a8(*a, tiles=gated_tiles)
  assert len(re.findall(r"custom_call @mosaic_gpu", _cuda_module(gated, *specs, *out))) == 1
  with pytest.raises(ValueError, match="inflight needs"):
    mosaic_gpu.MosaicTiles(inflight=True, compute_wgs=2)


def test_mosaic_dispatch_lowers_to_the_kernel_for_cuda_and_xla_elsewhere():
  fn = lambda *a: kernels.w4a8_matmul(*a, out_dtype=jnp.bfloat16, implementation="mosaic")
  assert re.search(r"custom_call @mosaic_gpu", _cuda_module(fn, *_specs(51, 1024, 4096, asym=True)))
  # A shape the kernel does not take falls back to XLA on CUDA too.
  grouped = _specs(51, 1024, 4096, asym=True)[:4] + (jax.ShapeDtypeStruct((4096, 8), jnp.float32),
                                                     jax.ShapeDtypeStruct((4096, 8), jnp.float32))
  assert not re.search(r"custom_call @mosaic_gpu", _cuda_module(fn, *grouped))


@pytest.mark.parametrize("asym", [False, True])
def test_mosaic_dispatch_on_cpu_equals_xla(asym):
  key = jax.random.key(3)
  kx, kq, ks = jax.random.split(key, 3)
  m, k, n = 51, 256, 128
  xq, sx, zx = xla.quantize_per_token(jax.random.normal(kx, (m, k)), symmetric=not asym)
  q = jax.random.randint(kq, (n, k), -8, 8).astype(jnp.int4)
  sw = 0.01 + 0.01 * jax.random.uniform(ks, (n, 1))
  zw = jnp.round(3 * jax.random.uniform(ks, (n, 1))) if asym else None
  y = jax.jit(lambda *a: kernels.w4a8_matmul(*a, implementation="mosaic"))(xq, sx, zx, q, sw, zw)
  ref = xla.w4a8_matmul(xq, sx, zx, q, sw, zw)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def test_auto_dispatch_prefers_the_kernel_only_where_it_was_measured_to_win():
  # gemma_2b's MLP at any M; the attention projections only from M = 64; k/v (N = 256) never.
  assert kernels.mosaic_preferred(1, 16384, 2048) and kernels.mosaic_preferred(51, 2048, 16384)
  assert kernels.mosaic_preferred(816, 2048, 2048) and not kernels.mosaic_preferred(51, 2048, 2048)
  assert not kernels.mosaic_preferred(816, 256, 2048)
  assert kernels.mosaic_preferred(64, 4096, 1024) and not kernels.mosaic_preferred(50, 4096, 1024)


def _gated_specs(m, k, f, *, asym, out_asym):
  s, f32 = jax.ShapeDtypeStruct, jnp.float32
  return _specs(m, k, 2 * f, asym=asym) + (s((1,), f32), s((1,), f32) if out_asym else None)


@pytest.mark.parametrize("m,k,f,asym,out_asym", [
    (816, 2048, 16384, True, True),    # gemma_2b's MLP over the prefix
    (51, 1024, 4096, True, False),     # a flow step of gemma_300m, symmetric hidden codes
    (408, 1024, 4096, False, True),
])
def test_gated_kernel_lowers_for_cuda(m, k, f, asym, out_asym):
  fn = lambda *a: kernels.gated_w4a8(*a, implementation="mosaic")
  text = _cuda_module(fn, *_gated_specs(m, k, f, asym=asym, out_asym=out_asym))
  assert len(re.findall(r"custom_call @mosaic_gpu\w*", text)) == 1
  # The (M, 2F) product never leaves the kernel: its only output is the (M, F) int8 codes.
  out = jax.eval_shape(fn, *_gated_specs(m, k, f, asym=asym, out_asym=out_asym))
  assert out.shape == (m, f) and out.dtype == jnp.int8


@pytest.mark.parametrize("bits,asym,tensor_scales", [(4, True, False), (8, False, True),
                                                    (4, False, True)])
def test_warp_specialised_gated_kernel_lowers_for_cuda(bits, asym, tensor_scales):
  """compute_wgs=2: two MMA warpgroups of tile_n gate and tile_n up rows each, one TMA warpgroup;
  F must hold whole CTAs of 2 * tile_n rows."""
  m, k, f = 6528, 2048, 16384
  specs = list(_gated_specs(m, k, f, asym=asym, out_asym=False))
  specs = list(_int8_weights(specs)) if bits == 8 else specs
  if tensor_scales:
    specs[1:3] = [jax.ShapeDtypeStruct((1, 1), jnp.float32), None]
  tiles = mosaic_gpu.MosaicTiles(tile_n=64, tile_m=128, stages=4, compute_wgs=2)
  fn = lambda *a: mosaic_gpu.gated_w4a8(*a, tiles=tiles)
  assert len(re.findall(r"custom_call @mosaic_gpu", _cuda_module(fn, *specs))) == 1
  with pytest.raises(ValueError, match="F % \\(tile_n \\* compute_wgs\\)"):
    mosaic_gpu.gated_w4a8(jnp.zeros((8, 256), jnp.int8), jnp.ones((8, 1)), None,
                          jnp.zeros((192, 256), jnp.int4), jnp.ones((192, 1)), None,
                          jnp.ones((1,)), None, tiles=tiles)


def test_two_row_pipeline_steps_lower_for_cuda():
  """tile_k = 256: two 128-byte rows of tokens (and of int4 weights) per pipeline step."""
  tiles = mosaic_gpu.MosaicTiles(tile_n=64, tile_m=64, tile_k=256, stages=4, splits=4)
  plain = lambda *a: mosaic_gpu.w4a8_matmul(*a, out_dtype=jnp.bfloat16, tiles=tiles)
  text = _cuda_module(plain, *_specs(51, 4096, 1024, asym=True))
  assert len(re.findall(r"custom_call @mosaic_gpu\w*", text)) == 1
  gated_tiles = dataclasses.replace(tiles, splits=1)
  fn = lambda *a: mosaic_gpu.gated_w4a8(*a, tiles=gated_tiles)
  text = _cuda_module(fn, *_gated_specs(51, 1024, 4096, asym=False, out_asym=False))
  assert len(re.findall(r"custom_call @mosaic_gpu\w*", text)) == 1


def test_gated_kernel_refuses_what_it_cannot_run():
  xq, sx = jnp.zeros((8, 256), jnp.int8), jnp.ones((8, 1))
  one = jnp.ones((1,))
  with pytest.raises(ValueError, match="even number of rows"):
    mosaic_gpu.gated_w4a8(xq, sx, None, jnp.zeros((129, 256), jnp.int4), jnp.ones((129, 1)), None,
                          one, None)
  with pytest.raises(ValueError, match="scale groups"):
    mosaic_gpu.gated_w4a8(xq, sx, None, jnp.zeros((256, 256), jnp.int4), jnp.ones((256, 2)), None,
                          one, None)
  assert not mosaic_gpu.supports_gated(8, 4304 // 2, 1152, 1)  # SigLIP's MLP: F not 64-aligned
  with pytest.raises(ValueError, match="implementation"):
    kernels.gated_w4a8(xq, sx, None, jnp.zeros((256, 256), jnp.int4), jnp.ones((256, 1)), None,
                       one, None, implementation="triton")


@pytest.mark.parametrize("out_asym", [False, True])
def test_gated_dispatch_on_cpu_is_the_unfused_arithmetic(out_asym):
  kx, kq, ks = jax.random.split(jax.random.key(4), 3)
  m, k, f = 51, 256, 128
  xq, sx, zx = xla.quantize_per_token(jax.random.normal(kx, (m, k)), symmetric=False)
  q = jax.random.randint(kq, (2 * f, k), -8, 8).astype(jnp.int4)
  sw = 0.01 + 0.01 * jax.random.uniform(ks, (2 * f, 1))
  scale, zero = jnp.array([0.02]), jnp.array([3.0]) if out_asym else None
  hq = jax.jit(lambda *a: kernels.gated_w4a8(*a, implementation="mosaic"))(
      xq, sx, zx, q, sw, None, scale, zero)
  y = xla.w4a8_matmul(xq, sx, zx, q, sw, None, out_dtype=jnp.float32)
  h = jax.nn.gelu(y[:, :f], approximate=True) * y[:, f:]
  ref = xla.quantize_static(h, scale, zero)[0]
  np.testing.assert_array_equal(np.asarray(hq), np.asarray(ref))
  assert hq.dtype == jnp.int8 and 10 < len(np.unique(np.asarray(hq)))  # not a degenerate range


def _stacked_specs(m, k, n, layers, *, asym):
  s, f32 = jax.ShapeDtypeStruct, jnp.float32
  return _specs(m, k, n, asym=asym)[:3] + (
      s((layers, n, k), jnp.int4), s((layers, n, 1), f32), s((layers, n, 1), f32) if asym else None,
      s((), jnp.int32))


@pytest.mark.parametrize("m,k,n", [(51, 1024, 4096), (51, 16384, 2048), (816, 16384, 2048),
                                   (816, 2048, 16384)])
def test_kernel_reading_a_stacked_layer_in_place_lowers_for_cuda(m, k, n):
  """Every tiling regime (plain, split-K, warp-specialised, 128 x 128) takes the whole (L, N, K)
  stack and the layer index: no slice of the codes or scales before the kernel."""
  fn = lambda xq, sx, zx, q, sw, zw, i: mosaic_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, layer=i)
  text = _cuda_module(fn, *_stacked_specs(m, k, n, 18, asym=True))
  [call] = re.findall(r"custom_call @mosaic_gpu\w*\(.*", text)
  assert re.search(rf"tensor<18x{n}x{k}xi4>", call) and not re.search(r"dynamic_slice", text)
  gated = lambda xq, sx, zx, q, sw, zw, i: mosaic_gpu.gated_w4a8(
      xq, sx, zx, q, sw, zw, jnp.ones((1,)), jnp.zeros((1,)), layer=i)
  if n % 128 == 0:
    assert re.search(rf"tensor<18x{n}x{k}xi4>", _cuda_module(gated, *_stacked_specs(m, k, n, 18, asym=True)))


def test_kernel_refuses_a_layer_index_without_a_stack():
  xq, sx = jnp.zeros((8, 256), jnp.int8), jnp.ones((8, 1))
  with pytest.raises(ValueError, match="stacked"):
    mosaic_gpu.w4a8_matmul(xq, sx, None, jnp.zeros((128, 256), jnp.int4), jnp.ones((128, 1)), None,
                           layer=jnp.int32(0))
  with pytest.raises(ValueError, match="pass the layer"):
    mosaic_gpu.w4a8_matmul(xq, sx, None, jnp.zeros((2, 128, 256), jnp.int4),
                           jnp.ones((2, 128, 1)), None)


def _on_hopper():
  return jax.default_backend() == "gpu" and str(
      getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def _assert_layer_matmul(xq, sx, zx, q, sw, zw, i, ref):
  """The kernel at layer i of the stack equals `ref`: exactly, but for split-K, whose float32
  partials are summed in another order."""
  m, k, n = xq.shape[0], xq.shape[1], q.shape[1]
  y = jax.jit(lambda l: mosaic_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=jnp.float32,
                                               layer=l))(jnp.int32(i))
  tol = 0.0 if mosaic_gpu.choose_tiles(m, n, k).splits == 1 else 1e-6
  assert float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref))) <= tol


def _assert_within_one_code(h, h_ref):
  """tanh-gelu and rounding may put a value on the other side of a .5 boundary: one code."""
  d = jnp.abs(h.astype(jnp.int32) - h_ref.astype(jnp.int32))
  assert int(jnp.max(d)) <= 1 and float(jnp.mean(d > 0)) < 1e-5


@pytest.mark.skipif(not _on_hopper(), reason="runs the Mosaic GPU kernels: Hopper only")
@pytest.mark.parametrize("m,k,n", [(51, 1024, 4096), (51, 4096, 1024), (408, 1024, 4096),
                                   (816, 16384, 2048), (816, 2048, 16384)])
def test_in_place_kernels_equal_the_reference_on_hopper(m, k, n):
  layers, i = 4, 2
  kx, kq, ks, kz = jax.random.split(jax.random.key(m + k), 4)
  xq, sx, zx = xla.quantize_per_token(jax.random.normal(kx, (m, k)), symmetric=False)
  q = jax.random.randint(kq, (layers, n, k), -8, 8).astype(jnp.int4)
  sw = 0.01 + 0.01 * jax.random.uniform(ks, (layers, n, 1))
  zw = jnp.round(4 * jax.random.uniform(kz, (layers, n, 1)) - 2)
  _assert_layer_matmul(xq, sx, zx, q, sw, zw, i, xla.w4a8_matmul(xq, sx, zx, q[i], sw[i], zw[i]))
  if n % 128 == 0:
    scale, zero = jnp.array([0.05]), jnp.array([3.0])
    h = jax.jit(lambda l: mosaic_gpu.gated_w4a8(xq, sx, zx, q, sw, zw, scale, zero, layer=l))(
        jnp.int32(i))
    _assert_within_one_code(h, gated.reference(xq, sx, zx, q[i], sw[i], zw[i], scale, zero))


@pytest.mark.skipif(not _on_hopper(), reason="runs the Mosaic GPU kernels: Hopper only")
@pytest.mark.parametrize("m,k,n", [(51, 1024, 4096), (51, 4096, 1024), (102, 1024, 4096),
                                   (816, 16384, 2048), (816, 2048, 16384), (8, 2048, 2048)])
@pytest.mark.parametrize("asym_w,asym_x", [(True, False), (True, True), (False, False)])
def test_per_tensor_scales_equal_the_reference_on_hopper(m, k, n, asym_w, asym_x):
  """Static (per-tensor, per-layer) activation scales: the kernel reads them as scalars and sums
  the token rows itself; the numbers are the XLA path's."""
  layers, i = 3, 1
  kx, kq, ks, kz = jax.random.split(jax.random.key(m + k + n), 4)
  scale = jnp.array([[[0.03]], [[0.02]], [[0.04]]])
  zero = jnp.array([[[3.0]], [[-2.0]], [[1.0]]]) if asym_x else None
  xq, _, _ = xla.quantize_static(jax.random.normal(kx, (m, k)), scale[i, 0],
                                 None if zero is None else zero[i, 0])
  q = jax.random.randint(kq, (layers, n, k), -8, 8).astype(jnp.int4)
  sw = 0.01 + 0.01 * jax.random.uniform(ks, (layers, n, 1))
  zw = jnp.round(4 * jax.random.uniform(kz, (layers, n, 1)) - 2) if asym_w else None
  _assert_layer_matmul(xq, scale, zero, q, sw, zw, i, xla.w4a8_matmul(
      xq, scale[i], None if zero is None else zero[i], q[i], sw[i], None if zw is None else zw[i]))
  if n % 128 == 0 and k <= 4096:
    o_scale, o_zero = jnp.array([[0.05], [0.06], [0.07]]), jnp.array([[3.0], [0.0], [-1.0]])
    h = jax.jit(lambda l: mosaic_gpu.gated_w4a8(xq, scale, zero, q, sw, zw, o_scale, o_zero,
                                                layer=l))(jnp.int32(i))
    _assert_within_one_code(h, gated.reference(xq, scale[i], None if zero is None else zero[i],
                                               q[i], sw[i], None if zw is None else zw[i],
                                               o_scale[i], o_zero[i]))


@pytest.mark.skipif(not _on_hopper(), reason="runs the Mosaic GPU kernels: Hopper only")
@pytest.mark.parametrize("m,k,n", [(51, 1024, 4096), (816, 16384, 2048), (816, 2048, 16384)])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_int8_weights_equal_the_reference_on_hopper(m, k, n, per_tensor):
  """W8A8 through the same kernels (plain and gated, a layer read in place) equals the XLA path."""
  layers, i = 3, 1
  kx, kq, ks, kz = jax.random.split(jax.random.key(m + k + n + 8), 4)
  x = jax.random.normal(kx, (m, k))
  if per_tensor:
    scale = jnp.array([[[0.03]], [[0.02]], [[0.04]]])
    xq, _, _ = xla.quantize_static(x, scale[i, 0], None)
    sx, zx, sx_i, zx_i = scale, None, scale[i], None
  else:
    xq, sx, zx = xla.quantize_per_token(x, symmetric=False)
    sx_i, zx_i = sx, zx
  q = jax.random.randint(kq, (layers, n, k), -128, 128).astype(jnp.int8)
  sw = 0.001 + 0.001 * jax.random.uniform(ks, (layers, n, 1))
  zw = jnp.round(8 * jax.random.uniform(kz, (layers, n, 1)) - 4)
  _assert_layer_matmul(xq, sx, zx, q, sw, zw, i, xla.w4a8_matmul(xq, sx_i, zx_i, q[i], sw[i], zw[i]))
  if n % 128 == 0 and k <= 4096:
    o_scale, o_zero = jnp.array([[0.05], [0.06], [0.07]]), None
    h = jax.jit(lambda l: mosaic_gpu.gated_w4a8(xq, sx, zx, q, sw, zw, o_scale, o_zero,
                                                layer=l))(jnp.int32(i))
    _assert_within_one_code(h, gated.reference(xq, sx_i, zx_i, q[i], sw[i], zw[i], o_scale[i],
                                               None))


@pytest.mark.skipif(not _on_hopper(), reason="runs the Mosaic GPU kernels: Hopper only")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("asym", [True, False])
def test_kernels_with_mmas_in_flight_equal_the_reference_on_hopper(bits, asym):
  """`MosaicTiles(inflight=True)`, a long prefix's gated MLP and down projection: the plain kernel
  equals XLA exactly, the gated one its reference within one code."""
  m, k, f = 1024, 2048, 2048
  kx, kq, ks, kz = jax.random.split(jax.random.key(bits + asym), 4)
  xq, sx, zx = xla.quantize_per_token(jax.random.normal(kx, (m, k)), symmetric=not asym)
  lo = -8 if bits == 4 else -128
  q = jax.random.randint(kq, (2 * f, k), lo, -lo).astype(jnp.int4 if bits == 4 else jnp.int8)
  sw = 0.01 + 0.01 * jax.random.uniform(ks, (2 * f, 1))
  zw = jnp.round(jax.random.uniform(kz, (2 * f, 1)) * 4 - 2) if asym else None
  fly = mosaic_gpu.MosaicTiles(tile_n=128, tile_m=128, stages=3, inflight=True)
  y = mosaic_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=jnp.float32, tiles=fly)
  ref = xla.w4a8_matmul(xq, sx, zx, q, sw, zw)
  assert float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref))) == 0.0
  o_scale = jnp.array([0.05])
  h = mosaic_gpu.gated_w4a8(xq, sx, zx, q, sw, zw, o_scale, None,
                            tiles=dataclasses.replace(fly, tile_n=64))
  _assert_within_one_code(h, gated.reference(xq, sx, zx, q, sw, zw, o_scale, None))


@pytest.mark.skipif(not _on_hopper(), reason="runs the Mosaic GPU kernels: Hopper only")
@pytest.mark.parametrize("bits", [4, 8])
def test_warp_specialised_gated_kernel_equals_the_reference_on_hopper(bits):
  """compute_wgs=2 gated: within one code of the reference, per-token and per-tensor scales."""
  m, k, f = 1024, 2048, 2048
  kx, kq, ks, kz = jax.random.split(jax.random.key(bits), 4)
  x = jax.random.normal(kx, (m, k))
  lo = -8 if bits == 4 else -128
  q = jax.random.randint(kq, (2 * f, k), lo, -lo).astype(jnp.int4 if bits == 4 else jnp.int8)
  sw = 0.01 + 0.01 * jax.random.uniform(ks, (2 * f, 1))
  zw = jnp.round(jax.random.uniform(kz, (2 * f, 1)) * 4 - 2)
  tiles = mosaic_gpu.MosaicTiles(tile_n=64, tile_m=128, stages=4, compute_wgs=2)
  o_scale = jnp.array([0.05])
  xq, sx, zx = xla.quantize_per_token(x, symmetric=False)
  h = mosaic_gpu.gated_w4a8(xq, sx, zx, q, sw, zw, o_scale, None, tiles=tiles)
  _assert_within_one_code(h, gated.reference(xq, sx, zx, q, sw, zw, o_scale, None))
  st = jnp.array([[0.03]])
  xs, _, _ = xla.quantize_static(x, st, None)
  h = mosaic_gpu.gated_w4a8(xs, st, None, q, sw, zw, o_scale, None, tiles=tiles)
  _assert_within_one_code(h, gated.reference(xs, st, None, q, sw, zw, o_scale, None))
