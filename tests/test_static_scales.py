"""Static activation scales (`LayerRule.act_scale="static"`), folds into producers, the `fast` preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import demo_params, demo_stats, fast_packed, held_out
from duquant_jax import checkpoint as ck
from duquant_jax import kernels
from duquant_jax.config import LayerRule, QuantConfig, get_preset
from duquant_jax.lab.demo import action_rel_err
from duquant_jax.lab.evaluate import layer_output_errors
from duquant_jax.kernels.xla import dequantize_per_token, quantize_per_token, quantize_static
from duquant_jax.numerics import static_range
from duquant_jax.models import get_policy
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize import quantize_params
from duquant_jax.runtime import PackedRuntime

DOWN = r"PaliGemma/llm/layers/mlp(_1)?/linear"
is_packed = lambda v: isinstance(v, PackedLinear)


def _actions(model, params):
  policy = get_policy(model, "demo", runtime=PackedRuntime())
  return jax.jit(policy.sample_actions)(params, held_out(model), jax.random.key(5))


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_quantizer_round_trip_and_clipping(symmetric):
  rows = jax.random.normal(jax.random.key(0), (3, 64, 32)) * jnp.array([1.0, 2.0, 4.0])[:, None, None]
  scale, zero = static_range(rows, symmetric=symmetric, percentile=100.0)
  assert scale.shape == (3, 1) and (zero is None) == symmetric
  # At the 100th percentile every calibration row is inside the range: at most half a step off.
  for layer in range(3):
    z = None if zero is None else zero[layer]
    xq, sx, zx = quantize_static(rows[layer], scale[layer], z)
    assert xq.dtype == jnp.int8 and sx.shape == (1, 1)
    err = jnp.abs(dequantize_per_token(xq, sx, zx) - rows[layer])
    assert float(jnp.max(err)) <= 0.5 * float(scale[layer, 0]) * (1 + 1e-5)
  # A value beyond the range is clipped to the largest code, not wrapped.
  xq, *_ = quantize_static(jnp.full((1, 4), 1e6), scale[0], None if zero is None else zero[0])
  assert int(xq.min()) == 127
  # A lower percentile gives a smaller range.
  assert float(static_range(rows, symmetric=symmetric, percentile=50.0)[0][2, 0]) < float(scale[2, 0])


def test_static_quantizer_has_no_reduction_over_the_activation():
  """Elementwise, so XLA can fuse it into the producer (the per-token quantizer reduces)."""
  x = jnp.ones((8, 16))
  prims = lambda f: {e.primitive.name for e in jax.make_jaxpr(f)(x).eqns}
  static = prims(lambda v: quantize_static(v, jnp.ones((1,)), jnp.zeros((1,))))
  per_token = prims(lambda v: quantize_per_token(v, symmetric=False))
  assert not {p for p in static if p.startswith("reduce")}, static
  assert {p for p in per_token if p.startswith("reduce")}, per_token


@pytest.mark.parametrize("implementation", [None, "xla", "mosaic", "pallas_interpret"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_layer_static_scales_equal_the_layer_slice(implementation, symmetric):
  """A stack's (L, 1, 1) static scales with a layer index (what the runtime hands the kernels)
  give what the layer's (1, 1) scales give on its slice, through every implementation."""
  kx, kq, ks = jax.random.split(jax.random.key(7), 3)
  layers, i, m, k, n = 3, 2, 51, 256, 128
  scale = jnp.array([[0.02], [0.03], [0.05]])
  zero = None if symmetric else jnp.array([[1.0], [-2.0], [3.0]])
  xq, sx, zx = quantize_static(jax.random.normal(kx, (m, k)), scale[i],
                               None if zero is None else zero[i])
  assert sx.shape == (1, 1)
  q = jax.random.randint(kq, (layers, n, k), -8, 8).astype(jnp.int4)
  sw = 0.01 + 0.01 * jax.random.uniform(ks, (layers, n, 1))
  zw = jnp.round(4 * jax.random.uniform(ks, (layers, n, 1)) - 2)
  per_layer = lambda a: None if a is None else a.reshape(layers, 1, 1)
  y = jax.jit(lambda l: kernels.w4a8_matmul(xq, per_layer(scale), per_layer(zero), q, sw, zw,
                                            implementation=implementation, layer=l))(jnp.int32(i))
  ref = kernels.w4a8_matmul(xq, sx, zx, q[i], sw[i], zw[i], implementation="xla")
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6,
                             atol=1e-6 * float(jnp.abs(ref).max()))
  with pytest.raises(ValueError, match="need a layer index"):
    kernels.w4a8_matmul(xq, per_layer(scale), None, q[i], sw[i], zw[i])


@pytest.mark.parametrize("kw, match", [
    (dict(act_scale="minmax"), "act_scale must be"),
    (dict(act_scale="static", act_bits=None), "needs act_bits"),
    (dict(act_percentile=20.0), "act_percentile must be in"),
])
def test_bad_static_rules_are_refused(kw, match):
  with pytest.raises(ValueError, match=match):
    LayerRule(pattern="x", **kw)


def test_static_scales_need_stats():
  cfg = QuantConfig(rules=(LayerRule(pattern=DOWN, rotation="none", permutation="none",
                                     smooth_alpha=None, act_scale="static"),))
  with pytest.raises(ValueError, match="act_scale='static' needs calibration stats"):
    quantize_params(demo_params("pi0"), cfg)


def test_group_members_must_agree_on_the_activation_quantizer():
  rule = dict(rotation="none", permutation="none", smooth_alpha=None)
  cfg = QuantConfig(rules=(
      LayerRule(pattern=r".*/q_einsum/w", act_scale="static", **rule),
      LayerRule(pattern=r".*/kv_einsum/w", **rule)))
  with pytest.raises(ValueError, match="quantize it differently"):
    quantize_params(demo_params("pi0"), cfg, demo_stats("pi0"))


def test_down_projection_smoothing_folds_into_the_up_projection():
  """With no permutation the smoothing of gelu(gate) * up goes into up's columns: the packed down
  projection runs no online division, and at W8 weight-only the actions stay put."""
  params, stats = demo_params("pi0"), demo_stats("pi0")
  cfg = QuantConfig(rules=(LayerRule(pattern=DOWN, rotation="none", permutation="none",
                                     weight_bits=8, act_bits=None),))
  packed = quantize_params(params, cfg, stats)
  down = packed["PaliGemma"]["llm"]["layers"]["mlp"]["linear"]
  assert down.transform is None
  up0 = np.asarray(params["PaliGemma"]["llm"]["layers"]["mlp"]["gating_einsum"])
  up1 = np.asarray(packed["PaliGemma"]["llm"]["layers"]["mlp"]["gating_einsum"])
  np.testing.assert_array_equal(up0[:, 0], up1[:, 0])  # the gate half is untouched
  assert not np.allclose(up0[:, 1], up1[:, 1])
  err = action_rel_err(_actions("pi0", packed), _actions("pi0", params))
  assert err.max() < 0.01, err
  # The per-layer error reads the fold back (from the float up projection): what is left is W8
  # rounding, about 1%, where a reference without the fold is off by O(1).
  errs = layer_output_errors(params, packed, stats, cfg=cfg)
  assert errs and max(errs.values()) < 0.03, errs
  wrong = layer_output_errors(params, packed, stats)  # without cfg: the fold is not read back
  assert min(wrong.values()) > 0.1, wrong


def test_layer_error_of_an_adaptive_norm_dense_reads_its_fold_back():
  """pi0.5's adaptive-norm Dense packed at W8 after the expert MLP's smoothing folded into it:
  its per-layer error is W8 rounding against the folded weights, not the fold itself."""
  from duquant_jax.calib_data import calibration_batches
  from duquant_jax.calibrate import CalibConfig, calibrate, select_for
  params, policy = demo_params("pi05"), get_policy("pi05", "demo")
  plain = dict(rotation="none", permutation="none")
  cfg = QuantConfig(rules=(
      LayerRule(pattern=r"PaliGemma/llm/layers/pre_ffw_norm_1/Dense_0/kernel", weight_bits=8,
                act_bits=None, smooth_alpha=None, **plain),
      LayerRule(pattern=r"PaliGemma/llm/layers/mlp_1/gating_einsum", weight_bits=8,
                act_bits=None, **plain)))
  batches = calibration_batches(policy, params, jax.random.key(0), num_batches=1, batch_size=2,
                                num_chunks=1)
  stats = calibrate(policy, params, batches, CalibConfig(progress=False, chunk_size=1,
                                                         select=select_for(cfg, params)),
                    rng=jax.random.key(1))
  packed = quantize_params(params, cfg, stats)
  errs = layer_output_errors(params, packed, stats, cfg=cfg)
  dense = {k: v for k, v in errs.items() if "pre_ffw_norm_1" in k}
  assert dense and max(errs.values()) < 0.03, errs


_fast_packed = fast_packed


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_fast_preset_runs_nothing_online_and_bounds_the_error(model):
  params, stats = demo_params(model), demo_stats(model)
  cfg = get_preset("fast")
  packed = _fast_packed(model)
  linears = [v for v in jax.tree.leaves(packed, is_leaf=is_packed) if is_packed(v)]
  w4a8 = [v for v in linears if v.act_bits is not None]
  assert w4a8 and all(v.act_scale is not None and v.transform is None for v in w4a8)
  # Symmetric activation codes (no zero point); the weights keep theirs (EVALUATION.md).
  assert all(v.act_zero is None and v.zero is not None for v in w4a8)
  if model == "pi0":  # every Gemma linear of pi0 reads a rotated or folded input
    gemma = packed["PaliGemma"]["llm"]["layers"]
    assert all(v.transform is None for v in jax.tree.leaves(gemma, is_leaf=is_packed)
               if is_packed(v))
  a_fp = _actions(model, params)
  err = action_rel_err(_actions(model, packed), a_fp).mean()
  rtn = action_rel_err(_actions(model, quantize_params(params, get_preset("w4a8-rtn"), stats)),
                       a_fp).mean()
  # (With these tests' 4 calibration batches; EVALUATION.md has the 128-batch numbers.)
  assert err < 0.12 and err < 0.6 * rtn, (err, rtn)
  # Per-layer errors are measured against the rotated float model: all small.
  errs = layer_output_errors(params, packed, stats, cfg=cfg)
  assert max(errs.values()) < 0.3, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


def test_static_scales_survive_the_checkpoint_round_trip(tmp_path):
  params, stats = demo_params("pi0"), demo_stats("pi0")
  cfg = QuantConfig(rules=(LayerRule(pattern=DOWN, rotation="none", permutation="none",
                                     act_scale="static"),))
  packed = quantize_params(params, cfg, stats)
  ck.save_packed(tmp_path / "q", packed, cfg)
  packed2, cfg2, *_ = ck.load_packed(tmp_path / "q")
  assert cfg2 == cfg
  a = packed["PaliGemma"]["llm"]["layers"]["mlp"]["linear"]
  b = packed2["PaliGemma"]["llm"]["layers"]["mlp"]["linear"]
  assert a.act_scale is not None and a.act_zero is not None
  np.testing.assert_array_equal(a.act_scale, b.act_scale)
  np.testing.assert_array_equal(a.act_zero, b.act_zero)
  np.testing.assert_array_equal(np.asarray(_actions("pi0", packed)),
                                np.asarray(_actions("pi0", packed2)))


def test_fast_packs_are_bit_identical_for_a_seed_and_differ_across_seeds():
  params, stats = demo_params("pi0"), demo_stats("pi0")
  cfg = get_preset("fast")
  a, b = _fast_packed("pi0"), quantize_params(params, cfg, stats)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c = quantize_params(params, dataclasses.replace(cfg, seed=1), stats)
  q = lambda t: np.asarray(t["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"]["w"].codes, np.int8)
  assert not np.array_equal(q(a), q(c))  # the seed picks the rotations


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_fast_mlps_run_fused_and_equal_the_unfused_form(model, monkeypatch):
  """Under `fast` the Gemma MLPs take `runtime.gated_mlp` (one pass to the down projection's int8
  codes); in float32 it is the same arithmetic as gate/up -> gelu * up -> static quantizer."""
  from duquant_jax import runtime
  packed = _fast_packed(model)
  fused_calls = []
  real = runtime.gated_mlp

  def counting(*a):
    y = real(*a)
    fused_calls.append(y is not None)
    return y

  monkeypatch.setattr(runtime, "gated_mlp", counting)
  fused = np.asarray(_actions(model, packed))
  assert fused_calls and all(fused_calls), fused_calls  # both Gemmas' MLPs, prefix and steps
  monkeypatch.setattr(runtime, "gated_mlp", lambda *a: None)
  unfused = np.asarray(_actions(model, packed))
  np.testing.assert_allclose(fused, unfused, rtol=1e-5, atol=1e-6)


def test_w8_mlps_run_fused_and_equal_the_unfused_form(monkeypatch):
  """The fused MLP takes int8 gate/up codes too (W8A8 expert MLP): the same arithmetic."""
  from duquant_jax import runtime
  w8 = LayerRule(pattern=r"PaliGemma/llm/layers/mlp_1/(gating_einsum|linear)", weight_bits=8,
                 act_scale="static", act_symmetric=True, rotation="none", permutation="none")
  cfg = dataclasses.replace(get_preset("fast"), rules=(w8, *get_preset("fast").rules))
  packed = quantize_params(demo_params("pi0"), cfg, demo_stats("pi0"))
  assert packed["PaliGemma"]["llm"]["layers"]["mlp_1"]["gating_einsum"].codes.dtype == jnp.int8
  calls = []
  real = runtime.gated_mlp

  def recording(w_gating, *a):
    y = real(w_gating, *a)
    calls.append((w_gating.codes.dtype, y is not None))
    return y

  monkeypatch.setattr(runtime, "gated_mlp", recording)
  fused = np.asarray(_actions("pi0", packed))
  assert (jnp.int8, True) in calls and all(ok for _, ok in calls), calls
  monkeypatch.setattr(runtime, "gated_mlp", lambda *a: None)
  np.testing.assert_allclose(fused, np.asarray(_actions("pi0", packed)), rtol=1e-5, atol=1e-6)
