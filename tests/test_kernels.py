"""Tests of the W4A8 kernels: the Pallas kernel in interpret mode vs the XLA integer path, and dispatch.

Bounds: the kernel runs the same integer dot and the same float32 epilogue as `xla.w4a8_matmul`, so
without split-K the results agree to float32 rounding of that epilogue (pinned at 1e-6 relative to the
output's max magnitude); with split-K the partial sums are added in another order (pinned at 1e-5);
both are checked against a float64 reference too.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax import kernels
from duquant_jax.kernels import gated, pallas_gpu, xla


def _case(m, n, k, g, sym_x, sym_w, seed=0, layers=None):
  """Random W4A8 inputs with an outlier channel; q (N, K) int4 or (L, N, K) when layers is set."""
  r = np.random.default_rng(seed)
  x = r.normal(size=(m, k)) * (1 + 8 * (np.arange(k) == 3))
  xq, sx, zx = xla.quantize_per_token(jnp.asarray(x, jnp.float32), symmetric=sym_x)
  lead = () if layers is None else (layers,)
  q = jnp.asarray(r.integers(-8, 8, size=lead + (n, k)), jnp.int4)
  sw = jnp.asarray(r.uniform(0.001, 0.01, size=lead + (n, g)), jnp.float32)
  zw = None if sym_w else jnp.asarray(r.integers(-4, 4, size=lead + (n, g)), jnp.float32)
  return xq, sx, zx, q, sw, zw


# On the GPU, XLA runs a float32 dot at the default precision in TF32 (10 mantissa bits: every
# float32 operand rounded by up to 2^-11 relative, 2^-10 if truncated); float32 dots on the CPU and
# dots of bfloat16 or integer operands are exact to float32 rounding. Where a library path itself
# runs a float32 x float32 dot at the default precision (by design: `xla.weight_only_matmul` on float32
# x), its result on the GPU is checked to TF32's rounding instead: at most 2^-10 x sum |x w| in the
# worst case, 1e-4 to 3e-4 of max |ref| as measured on the H200 (jax 0.11.2).
TF32_TOL = 2e-3


def _f32_dot_tol(tol, dtype=jnp.float32):
  """`tol` for a path running a `dtype` dot at the default precision: on the GPU, a float32 dot's
  tolerance widened to TF32 rounding (`TF32_TOL`); unchanged on other backends and for other dtypes."""
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) == jnp.float32:
    return max(tol, TF32_TOL)
  return tol


def _rel(y, ref):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(y - ref)) / np.max(np.abs(ref))


SMALL = pallas_gpu.TritonTiles(block_m=16, block_n=32, block_k=64)


@pytest.mark.parametrize("m,n,k,g,sym_x,sym_w", [
    (1, 32, 128, 1, True, True), (50, 64, 256, 1, True, True), (50, 64, 256, 1, False, False),
    (51, 32, 128, 1, False, True), (70, 64, 256, 2, False, False), (17, 32, 256, 4, True, True)])
def test_kernel_matches_xla(m, n, k, g, sym_x, sym_w):
  args = _case(m, n, k, g, sym_x, sym_w, seed=m + n + g)
  y = pallas_gpu.w4a8_matmul(*args, tiles=SMALL, interpret=True)
  ref = xla.w4a8_matmul(*args)
  assert y.shape == (m, n) and y.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(y)))
  assert _rel(y, ref) <= 1e-6
  assert _rel(y, xla.w4a8_matmul_reference_f64(*args)) <= 1e-5


@pytest.mark.parametrize("tiles,m,g", [
    (pallas_gpu.TritonTiles(block_m=32, block_n=32, block_k=64, unpack="split_x"), 50, 1),
    (pallas_gpu.TritonTiles(block_m=16, block_n=32, block_k=64, split_k=2), 50, 1),
    (pallas_gpu.TritonTiles(block_m=64, block_n=16, block_k=32, split_k=4, unpack="split_x"), 33, 4),
], ids=["split_x", "split_k2", "split_k4_split_x_groups"])
def test_kernel_variants(tiles, m, g):
  args = _case(m, 64, 512, g, False, False, seed=g)
  y = pallas_gpu.w4a8_matmul(*args, tiles=tiles, interpret=True)
  assert _rel(y, xla.w4a8_matmul(*args)) <= 1e-5


def test_kernel_bf16_output_and_default_tiles():
  args = _case(816 // 16, 64, 256, 1, True, True)
  y = pallas_gpu.w4a8_matmul(*args, out_dtype=jnp.bfloat16, interpret=True)
  ref = xla.w4a8_matmul(*args, out_dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  assert _rel(y, ref) <= 1e-2  # bf16 rounding of the same float32 values


def test_kernel_stacked_layer_index():
  xq, sx, zx, q, sw, zw = _case(40, 64, 256, 2, False, False, layers=3)
  f = jax.jit(lambda i: pallas_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, tiles=SMALL, interpret=True,
                                               layer=i))
  for i in range(3):
    assert _rel(f(jnp.int32(i)), pallas_gpu.reference(xq, sx, zx, q, sw, zw, layer=i)) <= 1e-6


def test_pack_int4_pairs_nibble_order():
  q = jnp.asarray([[1, -2, 3, -8, 7, 0]], jnp.int4)
  b = np.asarray(pallas_gpu.pack_int4_pairs(q)).view(np.uint8)
  assert b.tolist() == [[0xE1, 0x83, 0x07]]


def test_kernel_rejects_bad_inputs():
  xq, sx, zx, q, sw, zw = _case(16, 32, 128, 1, True, True)
  with pytest.raises(TypeError):
    pallas_gpu.w4a8_matmul(xq, sx, zx, q.astype(jnp.int8), sw, zw, interpret=True)
  with pytest.raises(ValueError):
    pallas_gpu.w4a8_matmul(xq[:, :64], sx, zx, q, sw, zw, interpret=True)
  with pytest.raises(NotImplementedError):  # N = 32 not a multiple of block_n = 64
    pallas_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, interpret=True,
                           tiles=pallas_gpu.TritonTiles(block_m=16, block_n=64, block_k=64))
  with pytest.raises(ValueError):
    pallas_gpu.TritonTiles(block_m=24, block_n=32, block_k=64)


@pytest.mark.parametrize("impl", [None, "xla", "pallas_interpret"])
def test_dispatch(impl):
  args = _case(50, 64, 256, 1, False, False)
  y = jax.jit(lambda *a: kernels.w4a8_matmul(*a, implementation=impl))(*args)
  assert _rel(y, xla.w4a8_matmul(*args)) <= 1e-6


def test_dispatch_auto_is_xla_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU-only check")
  args = _case(50, 64, 256, 1, True, True)
  hlo = jax.jit(lambda *a: kernels.w4a8_matmul(*a)).lower(*args).as_text()
  assert "triton" not in hlo and "pallas" not in hlo
  with pytest.raises(ValueError):
    kernels.w4a8_matmul(*args, implementation="cuda")


def test_reexports():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32)), jnp.float32)
  xq, sx, zx = kernels.quantize_per_token(x, symmetric=False)
  assert np.max(np.abs(np.asarray(kernels.dequantize_per_token(xq, sx, zx) - x))) < 0.05


@pytest.mark.parametrize("m,n,k,g,sym_x,sym_w", [(50, 64, 256, 1, True, True),
                                                 (17, 32, 256, 4, False, False)])
def test_bf16_tensor_core_dot_is_bit_identical(m, n, k, g, sym_x, sym_w):
  """dot="bf16" runs the same integer sums on bf16 operands; every value is exact in float32."""
  args = _case(m, n, k, g, sym_x, sym_w, seed=3)
  np.testing.assert_array_equal(np.asarray(xla.w4a8_matmul(*args, dot="bf16")),
                                np.asarray(xla.w4a8_matmul(*args)))
  y = kernels.w4a8_matmul(*args, implementation="xla_bf16")
  assert _rel(y, xla.w4a8_matmul_reference_f64(*args)) <= 1e-6
  with pytest.raises(ValueError, match="dot"):
    xla.w4a8_matmul(*args, dot="fp8")


@pytest.mark.parametrize("m,n,k,g,sym_x,sym_w", [(50, 64, 256, 1, True, True),
                                                 (50, 64, 256, 1, False, False),
                                                 (17, 32, 256, 4, False, False)])
def test_unpacked_dot_is_bit_identical(m, n, k, g, sym_x, sym_w):
  """dot="int8_unpacked" (an int8 copy of the codes, column sums reduced from it) gives the
  bits of the plain int8 dot, one layer and a layer of a stack."""
  args = _case(m, n, k, g, sym_x, sym_w, seed=5)
  want = np.asarray(xla.w4a8_matmul(*args))
  np.testing.assert_array_equal(np.asarray(xla.w4a8_matmul(*args, dot="int8_unpacked")), want)
  np.testing.assert_array_equal(
      np.asarray(kernels.w4a8_matmul(*args, implementation="xla_unpacked")), want)
  assert _rel(want, xla.w4a8_matmul_reference_f64(*args)) <= 1e-6
  xq, sx, zx, q, sw, zw = _case(m, n, k, g, sym_x, sym_w, seed=6, layers=3)
  got = kernels.w4a8_matmul(xq, sx, zx, q, sw, zw, implementation="xla_unpacked",
                            layer=jnp.int32(2))
  np.testing.assert_array_equal(
      np.asarray(got), np.asarray(xla.w4a8_matmul(xq, sx, zx, q[2], sw[2],
                                                  None if zw is None else zw[2])))


def test_unpacked_gated_reference_is_bit_identical():
  xq, sx, zx, q, sw, zw = _case(24, 64, 128, 1, False, False, seed=7)
  scale, zero = jnp.array([0.02], jnp.float32), jnp.array([3.0], jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(gated.reference(xq, sx, zx, q, sw, zw, scale, zero, dot="int8_unpacked")),
      np.asarray(gated.reference(xq, sx, zx, q, sw, zw, scale, zero)))


def test_bf16_dot_refuses_inexact_group_length():
  xq = jnp.zeros((2, 32768), jnp.int8)
  q = jnp.zeros((4, 32768), jnp.int4)
  with pytest.raises(ValueError, match="exact only"):
    xla.w4a8_matmul(xq, jnp.ones((2, 1)), None, q, jnp.ones((4, 1)), None, dot="bf16")


@pytest.mark.parametrize("codes,fold_zero", [(jnp.int4, None), (jnp.int4, True), (jnp.int8, False),
                                             (jnp.int8, True)])  # zero points after / folded
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("g,symmetric", [(1, True), (1, False), (4, False)])
def test_weight_only_matmul_equals_dequantized_reference(codes, fold_zero, dtype, g, symmetric):
  m, k, n = 5, 128, 24
  keys = jax.random.split(jax.random.key(7), 4)
  x = jax.random.normal(keys[0], (m, k)).astype(dtype)
  q = jax.random.randint(keys[1], (n, k), -8, 8).astype(codes)
  sw = jax.random.uniform(keys[2], (n, g), minval=0.01, maxval=0.1)
  zw = None if symmetric else jnp.round(jax.random.uniform(keys[3], (n, g)) * 6 - 3)
  y = np.asarray(jax.jit(functools.partial(xla.weight_only_matmul, fold_zero=fold_zero))(x, q, sw, zw))
  w = np.repeat(np.asarray(sw, np.float64), k // g, axis=1) * (
      np.asarray(q, np.float64) - (0.0 if zw is None else np.repeat(np.asarray(zw), k // g, axis=1)))
  ref = np.asarray(x, np.float64) @ w.T  # exact: the error is the library path's own
  # Float32 x: the path's dot runs at the default precision, TF32 on the GPU (`_f32_dot_tol`).
  tol = _f32_dot_tol(1e-5, dtype)
  np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_weight_only_matmul_rejects_mismatched_codes():
  with pytest.raises(ValueError, match="do not match"):
    xla.weight_only_matmul(jnp.ones((2, 64)), jnp.ones((8, 32), jnp.int8), jnp.ones((8, 1)), None)


# ---------------------------------------------------------------------------------------------
# The Pallas weight-only kernel (interpret mode) against the XLA weight-only path.


def _weight_only_case(m, n, k, g, codes, symmetric, layers=None, dtype=jnp.bfloat16, seed=3):
  keys = jax.random.split(jax.random.key(seed), 4)
  lead = () if layers is None else (layers,)
  lim = 8 if codes == jnp.int4 else 128
  x = jax.random.normal(keys[0], (m, k)).astype(dtype)
  q = jax.random.randint(keys[1], lead + (n, k), -lim, lim).astype(codes)
  sw = jax.random.uniform(keys[2], lead + (n, g), minval=0.01, maxval=0.1)
  zw = None if symmetric else jnp.round(jax.random.uniform(keys[3], lead + (n, g)) * 6 - 3)
  return x, q, sw, zw


@pytest.mark.parametrize("m,n,k,g,codes,symmetric,layers", [
    (5, 64, 256, 1, jnp.int4, False, None),   # per-channel int4, asymmetric
    (51, 64, 512, 4, jnp.int4, False, 3),     # grouped, a layer of a stack (policy flow step)
    (20, 32, 256, 1, jnp.int8, False, 2),     # int8 codes (expert attention in `deploy`)
    (3, 32, 512, 2, jnp.int8, True, None),
    (70, 64, 256, 1, jnp.int4, True, None),   # M past one 64-row tile, masked
])
def test_weight_only_kernel_matches_xla(m, n, k, g, codes, symmetric, layers):
  x, q, sw, zw = _weight_only_case(m, n, k, g, codes, symmetric, layers)
  layer = None if layers is None else jnp.int32(layers - 1)
  y = pallas_gpu.weight_only_matmul(x, q, sw, zw, interpret=True, layer=layer)
  one = lambda a: a if a is None or layers is None else a[layers - 1]
  ref = xla.weight_only_matmul(x, one(q), one(sw), one(zw))
  # Zero points folded into the bf16 operand vs subtracted after the dot: float32 rounding.
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6,
                             atol=1e-6 * float(jnp.abs(ref).max()))


def test_weight_only_kernel_split_k_and_bf16_output():
  x, q, sw, zw = _weight_only_case(8, 32, 1024, 1, jnp.int4, False)
  tiles = pallas_gpu.TritonTiles(block_m=16, block_n=32, block_k=256, split_k=2)
  y = pallas_gpu.weight_only_matmul(x, q, sw, zw, interpret=True, tiles=tiles,
                                    out_dtype=jnp.bfloat16)
  ref = xla.weight_only_matmul(x, q, sw, zw)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=1e-2,
                             atol=1e-2 * float(jnp.abs(ref).max()))


def test_weight_only_dispatch():
  x, q, sw, zw = _weight_only_case(51, 64, 512, 4, jnp.int4, False, layers=2)
  layer = jnp.int32(1)
  ref = xla.weight_only_matmul(x, q[1], sw[1], zw[1])
  # Auto is the XLA path (sliced), bit for bit; the kernel agrees to float32 rounding.
  auto = kernels.weight_only_matmul(x, q, sw, zw, layer=layer)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
  kern = kernels.weight_only_matmul(x, q, sw, zw, layer=layer, implementation="pallas_interpret")
  np.testing.assert_allclose(np.asarray(kern), np.asarray(ref), rtol=1e-6,
                             atol=1e-6 * float(jnp.abs(ref).max()))


def test_weight_only_kernel_rejects_bad_inputs():
  x, q, sw, zw = _weight_only_case(4, 32, 256, 1, jnp.int4, False)
  with pytest.raises(TypeError, match="x must be"):
    pallas_gpu.weight_only_matmul(x.astype(jnp.int8), q, sw, zw, interpret=True)
  with pytest.raises(TypeError, match="int4 or int8"):
    pallas_gpu.weight_only_matmul(x, q.astype(jnp.int32), sw, zw, interpret=True)
  with pytest.raises(ValueError, match="does not match"):
    pallas_gpu.weight_only_matmul(x[:, :128], q, sw, zw, interpret=True)
  with pytest.raises(ValueError, match="stacked"):
    kernels.weight_only_matmul(x, q, sw, zw, layer=jnp.int32(0))
  with pytest.raises(ValueError, match="implementation must be"):
    kernels.weight_only_matmul(x, q, sw, zw, implementation="cuda")


def test_weight_only_tiles_fit_shared_memory():
  """A bf16 x tile is twice an int8 one: the 64 x 512, 4-stage pick for N = 1024 overflowed the
  H100's shared memory (303104 > 232448 bytes) until the stages were cut."""
  t = pallas_gpu.choose_tiles(51, 1024, 2048, 2048)
  assert (t.block_m, t.block_k, t.num_stages) == (64, 512, 4)
  f = pallas_gpu.fit_shared_memory(t, 2, 1.0)
  assert f.num_stages * (f.block_m * f.block_k * 2 + f.block_n * f.block_k) <= \
      pallas_gpu.SHARED_MEMORY_BUDGET
  assert f.block_k == t.block_k and f.num_stages < t.num_stages
  small = pallas_gpu.choose_tiles(51, 8192, 1024, 1024)  # 4 x (64 x 256 + 64 x 128) bytes fit
  assert pallas_gpu.fit_shared_memory(small, 2, 0.5) == small
  assert pallas_gpu.supports(51, 1024, 2048, 1, f)
