"""Tests of the fused transform + per-token quantization kernel (Pallas interpret mode on CPU).

The kernel must give the codes of the XLA chain `InputTransform.apply` (HIGHEST precision) followed
by `quantize_per_token`: it sums the same products in another order, so a code may differ by one
where x' / sx lands within float32 rounding of a .5 boundary; on these seeded inputs none does, and
the tests pin exact equality of codes and zero points and 1 ulp on the scales. Its CUDA lowering
(Pallas -> Triton IR) is checked on CPU through `jax.export`, which needs no GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax import kernels, runtime
from duquant_jax.kernels import pallas_transform as pt
from duquant_jax.packed import PackedLinear
from duquant_jax.transforms import InputTransform

_HIGHEST = jax.lax.Precision.HIGHEST


def _transform(k, b, seed=0, perm=True, rot2=True):
  r = np.random.default_rng(seed)
  q1 = np.linalg.qr(r.normal(size=(k // b, b, b)))[0] * r.uniform(0.5, 2.0, size=(k // b, b, 1))
  q2 = np.linalg.qr(r.normal(size=(k // b, b, b)))[0]
  return InputTransform(
      rot1=jnp.asarray(q1, jnp.float16),
      perm=jnp.asarray(r.permutation(k), jnp.int32) if perm else None,
      rot2=jnp.asarray(q2, jnp.float16) if rot2 else None, merged_smooth=True)


def _x(m, k, seed=1, dtype=jnp.bfloat16):
  r = np.random.default_rng(seed)
  x = r.normal(size=(m, k)) * np.where(np.arange(k) % 37 == 0, 25.0, 1.0)
  return jnp.asarray(x, dtype)


def _reference(x, tr, symmetric, clip=1.0):
  xt = tr.apply(x.astype(jnp.float32), precision=_HIGHEST)
  return kernels.quantize_per_token(xt, 8, symmetric=symmetric, clip_ratio=clip)


def _assert_same(got, ref):
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(ref[1]), rtol=2.5e-7)
  if ref[2] is None:
    assert got[2] is None
  else:
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(ref[2]))


@pytest.mark.parametrize("m,k,b,chunk,symmetric,perm,rot2", [
    (1, 64, 16, 32, False, True, True),
    (5, 128, 16, 64, True, True, True),
    (3, 128, 8, 128, False, False, True),
    (4, 64, 16, 64, False, True, False),
])
def test_fused_matches_xla_chain(m, k, b, chunk, symmetric, perm, rot2):
  tr = _transform(k, b, perm=perm, rot2=rot2)
  x = _x(m, k)
  got = pt.transform_quantize(x, tr.rot1, tr.perm, tr.rot2, symmetric=symmetric,
                              tiles=pt.TransformTiles(chunk=chunk), interpret=True)
  _assert_same(got, _reference(x, tr, symmetric))


def test_fused_clip_ratio_and_float32_input():
  tr = _transform(64, 16)
  x = _x(3, 64, dtype=jnp.float32)
  got = pt.transform_quantize(x, tr.rot1, tr.perm, tr.rot2, symmetric=False, clip_ratio=0.9,
                              interpret=True)
  _assert_same(got, _reference(x, tr, False, clip=0.9))


def test_round_half_even_matches_jnp_round():
  v = jnp.asarray([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, -3.49, 2.51, 0.0, 126.5, -127.5])
  np.testing.assert_array_equal(np.asarray(pt._round_half_even(v)), np.asarray(jnp.round(v)))


def test_dispatch_and_packed_linear_use_the_kernel_identically():
  k, n = 64, 32
  tr = _transform(k, 16)
  x = _x(4, k)
  ref = kernels.transform_quantize(x, tr, 8, implementation="xla")
  got = kernels.transform_quantize(x, tr, 8, implementation="pallas_interpret")
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
  auto = jax.jit(lambda x: kernels.transform_quantize(x, tr, 8))(x)  # auto: the XLA chain
  np.testing.assert_array_equal(np.asarray(auto[0]), np.asarray(ref[0]))
  r = np.random.default_rng(2)
  lin = PackedLinear(codes=jnp.asarray(r.integers(-8, 8, (n, k)), jnp.int4),
                     scale=jnp.asarray(r.uniform(0.01, 0.02, (n, 1)), jnp.float32), zero=None,
                     transform=tr, out_rot=None, w_shape=(k, n), w_spec="ij")
  y = runtime.matmul(lin, x)
  assert y.shape == (4, n) and y.dtype == x.dtype and bool(jnp.all(jnp.isfinite(y)))


def test_fused_rejects_what_it_cannot_take():
  tr = _transform(64, 16)
  x = _x(2, 64)
  with pytest.raises(ValueError, match="rot1"):
    pt.transform_quantize(x, tr.rot1[:2], tr.perm, tr.rot2, interpret=True)
  with pytest.raises(ValueError, match="perm"):
    pt.transform_quantize(x, tr.rot1, tr.perm[:8], tr.rot2, interpret=True)
  with pytest.raises(ValueError, match="powers of two"):
    pt.transform_quantize(_x(2, 48), _transform(48, 16).rot1, None, None, interpret=True)
  with pytest.raises(ValueError, match="chunk"):
    pt.TransformTiles(chunk=96)
  unmerged = InputTransform(smooth=jnp.ones(64), rot1=tr.rot1)
  assert not kernels.fused_transform_applies((2, 64), unmerged)
  with pytest.raises(ValueError, match="does not take"):
    kernels.transform_quantize(x, unmerged, 8, implementation="pallas_interpret")
  with pytest.raises(ValueError, match="implementation"):
    kernels.transform_quantize(x, tr, 8, implementation="triton")


@pytest.mark.parametrize("symmetric", [False, True])
def test_fused_kernel_lowers_to_triton_for_cuda(symmetric):
  """Pallas -> Triton IR lowering of the GPU kernel, checked without a GPU via jax.export."""
  from jax import export
  s = jax.ShapeDtypeStruct
  m, k, b = 51, 2048, 16
  fn = jax.jit(lambda x, r1, p, r2: pt.transform_quantize(x, r1, p, r2, symmetric=symmetric))
  exported = export.export(fn, platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          s((m, k), jnp.bfloat16), s((k // b, b, b), jnp.float16), s((k,), jnp.int32),
          s((k // b, b, b), jnp.float16))
  assert "xla.gpu.triton" in exported.mlir_module()


@pytest.mark.parametrize("perm,rot2", [(True, True), (False, True), (True, False)])
def test_multiply_reduce_form_equals_einsum_form(perm, rot2):
  tr = _transform(128, 16, perm=perm, rot2=rot2)
  x = _x(6, 128)
  ref = tr.apply(x.astype(jnp.float32), precision=_HIGHEST)
  got = kernels.xla.transform_reduce(x, tr)
  assert float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))) < 1e-6
  codes = kernels.transform_quantize(x, tr, 8, implementation="xla_reduce")[0]
  d = np.abs(np.asarray(codes, np.int32) - np.asarray(_reference(x, tr, False)[0], np.int32))
  assert d.max() <= 1 and (d > 0).mean() < 1e-2


def test_cli_bench_runs_a_script_and_rejects_unknown_names(capsys):
  from duquant_jax.cli import main
  with pytest.raises(SystemExit) as e:
    main(["bench", "transform", "--interpret", "--ms", "2", "--ks", "64", "--copies", "1",
          "--iters", "1"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "| 64 | 16 | 2 |" in out and "XLA chain us" in out and "channel-major chain us" in out
  with pytest.raises(SystemExit) as e:
    main(["bench", "nope"])
  assert e.value.code == 2
  assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_execution_overrides_the_dispatch():
  k, n = 64, 32
  r = np.random.default_rng(4)
  lin = PackedLinear(codes=jnp.asarray(r.integers(-8, 8, (n, k)), jnp.int4),
                     scale=jnp.asarray(r.uniform(0.01, 0.02, (n, 1)), jnp.float32),
                     zero=jnp.asarray(r.integers(-3, 3, (n, 1)), jnp.float32),
                     transform=_transform(k, 16), out_rot=None, w_shape=(k, n), w_spec="ij",
                     act_symmetric=False)
  x = _x(5, k)
  forced = runtime.Execution(matmul="pallas_interpret", transform="pallas_interpret")
  y_auto = runtime.matmul(lin, x)
  y_forced = runtime.matmul(lin, x, forced)
  # Same codes, same integer sums, same float32 epilogue order: identical outputs.
  np.testing.assert_array_equal(np.asarray(y_forced, np.float32), np.asarray(y_auto, np.float32))
  with pytest.raises(ValueError, match="Execution.matmul"):
    runtime.Execution(matmul="cuda")
  with pytest.raises(ValueError, match="Execution.transform"):
    runtime.Execution(transform="fast")


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_channel_major_forms_equal_the_einsum_chain(reduce, symmetric):
  """x^T forms: the same codes as the row-major chain (float32 sums in another order)."""
  tr = _transform(256, 16)
  x = _x(9, 256)
  form = "xla_cm_reduce" if reduce else "xla_cm"
  xq, sx, zx = kernels.transform_quantize(x, tr, 8, symmetric=symmetric, implementation=form)
  rq, rs, rz = _reference(x, tr, symmetric)
  assert xq.shape == (9, 256) and xq.dtype == jnp.int8 and sx.shape == (9, 1)
  d = np.abs(np.asarray(xq, np.int32) - np.asarray(rq, np.int32))
  assert d.max() <= 1 and (d > 0).mean() < 1e-2
  np.testing.assert_allclose(np.asarray(sx), np.asarray(rs), rtol=1e-6)
  if symmetric:
    assert zx is None
  else:
    np.testing.assert_array_equal(np.asarray(zx), np.asarray(rz))


@pytest.mark.parametrize("m,k,dots", [(51, 256, False), (2048, 256, True), (51, 16384, True)])
def test_auto_transform_on_cuda_is_channel_major(m, k, dots):
  """Auto on CUDA: x^T forms, multiply-reduce (no dot) up to REDUCE_FORM_MAX_TOKENS tokens and
  REDUCE_FORM_MAX_CHANNELS channels, the einsum form beyond."""
  from jax import export
  assert (m > kernels.REDUCE_FORM_MAX_TOKENS or k > kernels.REDUCE_FORM_MAX_CHANNELS) == dots
  tr = _transform(k, 16)
  fn = jax.jit(lambda x, tr: kernels.transform_quantize(x, tr, 8))
  text = export.export(fn, platforms=["cuda"])(
      jax.ShapeDtypeStruct((m, k), jnp.bfloat16), tr).mlir_module()
  cpu_text = export.export(fn, platforms=["cpu"])(
      jax.ShapeDtypeStruct((m, k), jnp.bfloat16), tr).mlir_module()
  assert ("stablehlo.dot_general" in text) == dots
  assert "stablehlo.dot_general" in cpu_text  # CPUs keep the row-major einsum chain
  assert "stablehlo.transpose" in text
