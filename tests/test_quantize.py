"""quantize_params: rules, layouts, int4 packing, exactness of folds, error bounds, refusals."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax import runtime
from duquant_jax.config import PRESETS, LayerRule, QuantConfig, get_preset, match_rules
from duquant_jax.lab.demo import action_rel_err
from duquant_jax.kernels.xla import (quantize_per_token, w4a8_matmul,
                                     w4a8_matmul_reference_f64)
from duquant_jax.layouts import linear_layouts
from duquant_jax.models import get_policy
from duquant_jax.packed import PackedLinear
from duquant_jax.numerics import quantize_weight
from duquant_jax.quantize import quantize_params, summarize
from duquant_jax.runtime import quantized_apply

from conftest import demo_params, demo_stats, held_out, packed_sample_actions

ALL_GEMMA = r"PaliGemma/llm/layers/(attn/.*_einsum(_1)?/w|mlp(_1)?/(gating_einsum|linear))"


def _actions(model, params, obs=None):
  obs = held_out(model) if obs is None else obs
  return packed_sample_actions(model)(params, obs, jax.random.key(5))


# ---------------------------------------------------------------------------------------------
# Rules and layouts.


def test_rules_first_match_wins_and_reports():
  layouts = linear_layouts(get_policy("pi0", "demo").param_shapes())
  cfg = QuantConfig(rules=(LayerRule(pattern=r".*/q_einsum_1/w", weight_bits=6),
                           LayerRule(pattern=ALL_GEMMA), LayerRule(pattern=r"nothing/.*"),
                           LayerRule(pattern=r".*/q_einsum/w", weight_bits=8)))
  assert cfg.rule_for("PaliGemma/llm/layers/attn/q_einsum_1/w").weight_bits == 6
  assert cfg.rule_for("PaliGemma/llm/layers/attn/q_einsum/w").weight_bits == 4
  report = match_rules(cfg, layouts)
  assert report.unused_rules == ["nothing/.*", ".*/q_einsum/w"]
  assert report.shadowed_rules == {".*/q_einsum/w": ["PaliGemma/llm/layers/attn/q_einsum/w"]}
  assert report.unused_lines() == [
      "rules that matched nothing: ['nothing/.*']",
      "rules whose layers all match an earlier rule (the first match wins): ['.*/q_einsum/w']"]
  assert len(report.matched[ALL_GEMMA]) == 9
  with_optional = dataclasses.replace(cfg, rules=cfg.rules + (
      LayerRule(pattern=r"other_model/.*", optional=True),))
  assert match_rules(with_optional, layouts).unused_lines()[1] == (
      "optional rules that matched nothing (layers these params lack): ['other_model/.*']")
  assert "action_in_proj/kernel" in report.unmatched_layers


def test_bad_rules_are_refused():
  with pytest.raises(ValueError, match="not a valid regex"):
    LayerRule(pattern="(")
  with pytest.raises(ValueError, match="unknown rotation"):
    LayerRule(pattern=".*", rotation="svd-ish")
  with pytest.raises(ValueError, match="weight_bits"):
    LayerRule(pattern=".*", weight_bits=9)
  with pytest.raises(ValueError, match="unknown layer rule fields"):
    QuantConfig.from_dict({"rules": [{"pattern": ".*", "blocksize": 16}]})
  with pytest.raises(ValueError, match="unknown preset"):
    get_preset("w3a3")


def test_presets_round_trip_through_json():
  for cfg in PRESETS.values():
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_full_size_layouts():
  layouts = linear_layouts(get_policy("pi0", "full").param_shapes())
  q = layouts["PaliGemma/llm/layers/attn/q_einsum/w"]
  assert (q.in_features, q.out_features, q.head_role, q.head_dim, q.num_stack) == (
      2048, 2048, "out", 256, 1)
  o = layouts["PaliGemma/llm/layers/attn/attn_vec_einsum_1/w"]
  assert (o.in_features, o.out_features, o.head_role) == (2048, 1024, "in")
  g = layouts["PaliGemma/llm/layers/mlp/gating_einsum"]
  assert (g.in_features, g.out_features, g.norm_kind) == (2048, 32768, "rms")
  kv1 = layouts["PaliGemma/llm/layers/attn/kv_einsum_1/w"]
  assert kv1.group == layouts["PaliGemma/llm/layers/attn/q_einsum_1/w"].group
  gemma = [p for p in layouts if p.startswith("PaliGemma/llm/layers/") and "norm" not in p]
  assert len(gemma) == 10


# ---------------------------------------------------------------------------------------------
# Quantizers.


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_round_trip_error_is_at_most_half_a_step(symmetric, bits):
  w = jax.random.normal(jax.random.key(0), (32, 64))
  codes, scale, zero = quantize_weight(w, None, bits=bits, symmetric=symmetric, rows=1, cols=64,
                                       clip_grid=(1.0,))
  lo = -(2 ** (bits - 1)) + (1 if symmetric else 0)
  assert int(codes.min()) >= lo and int(codes.max()) <= 2 ** (bits - 1) - 1
  deq = scale * (codes - (0 if zero is None else zero))
  assert np.all(np.abs(np.asarray(deq - w)) <= np.asarray(scale) / 2 + 1e-6)


def test_int4_storage_round_trip():
  codes = jax.random.randint(jax.random.key(0), (16, 64), -8, 8).astype(jnp.int8)
  stored = codes.astype(jnp.int4)
  assert stored.dtype == jnp.int4
  np.testing.assert_array_equal(np.asarray(stored.astype(jnp.int8)), np.asarray(codes))


def test_clip_search_lowers_output_error():
  w = jax.random.t(jax.random.key(0), 3.0, (64, 128))
  x = jax.random.normal(jax.random.key(1), (32, 128))
  errs = []
  for grid in [(1.0,), (1.0, 0.9, 0.8, 0.7)]:
    c, s, z = quantize_weight(w, x, bits=4, symmetric=False, rows=1, cols=128, clip_grid=grid)
    deq = s * (c - z)
    errs.append(float(jnp.sum((x @ (deq - w).T) ** 2)))
  assert errs[1] < errs[0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a8_matmul_matches_float64_reference(symmetric):
  x = jax.random.normal(jax.random.key(0), (7, 64)) * jnp.linspace(0.1, 3, 64)
  xq, sx, zx = quantize_per_token(x, symmetric=symmetric)
  q = jax.random.randint(jax.random.key(1), (24, 64), -8, 8).astype(jnp.int4)
  sw = jax.random.uniform(jax.random.key(2), (24, 2), minval=0.01, maxval=0.1)
  zw = None if symmetric else jnp.round(jax.random.uniform(jax.random.key(3), (24, 2)) * 6 - 3)
  y = np.asarray(w4a8_matmul(xq, sx, zx, q, sw, zw))
  ref = w4a8_matmul_reference_f64(xq, sx, zx, q, sw, zw)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# The transform on the demo model.


def _transform_rule(**kw):
  base = dict(weight_bits=8, act_bits=None, block_size=16, rotation_steps=4, clip_search=False)
  base.update(kw)
  return QuantConfig(rules=(LayerRule(pattern=ALL_GEMMA, **base),))


def test_packing_an_adaptive_norm_keeps_the_smoothing_folded_into_it():
  """pi0.5's adaptive norms are Dense layers (linears), and the expert's smoothing is folded into
  them: packing them too (weight-only W8, next to W8 everything else) must pack the folded kernel,
  so the policy stays as close to FP as without it. (Packing the unfolded kernel, as before the
  fix, moved the actions by 0.05.)"""
  from duquant_jax.quantize import folded_smoothing
  params, stats = demo_params("pi05"), demo_stats("pi05")
  adarms = LayerRule(pattern=r"PaliGemma/llm/(layers/)?\w+_norm_1/Dense_0/kernel", weight_bits=8,
                     act_bits=None, rotation="none", permutation="none", smooth_alpha=None,
                     clip_search=False)
  base = _transform_rule(rotation="none", permutation="none")  # the smoothing is what folds
  packed = quantize_params(params, dataclasses.replace(base, rules=(adarms,) + base.rules), stats)
  dense = packed["PaliGemma"]["llm"]["layers"]["pre_ffw_norm_1"]["Dense_0"]["kernel"]
  assert isinstance(dense, PackedLinear)
  err = action_rel_err(_actions("pi05", packed), _actions("pi05", params))
  assert err.max() < 0.01, err
  # The evaluation harness reads the folded smoothing back through the Dense's float bias.
  lay = linear_layouts(params)["PaliGemma/llm/layers/mlp_1/gating_einsum"]
  lam_packed = folded_smoothing(params, packed, lay)
  lam_float = folded_smoothing(params, quantize_params(params, base, stats), lay)
  np.testing.assert_allclose(np.asarray(lam_packed), np.asarray(lam_float), rtol=1e-4)
  assert float(jnp.max(jnp.abs(jnp.log(lam_float)))) > 0.1  # a smoothing was folded at all


def test_packed_tree_structure_and_bytes():
  params = demo_params("pi0")
  packed = quantize_params(params, get_preset("w4a8-rtn"))
  leaf = packed["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"]["w"]
  assert isinstance(leaf, PackedLinear)
  assert leaf.codes.dtype == jnp.int4 and leaf.codes.shape == (3, 256, 256)  # (L, N, K)
  assert leaf.shape == params["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"]["w"].shape
  s = summarize(packed)
  assert s.layers_quantized == 3 * 7 + 3 * 3  # LLM: 7 linears per layer; expert MLP: gate, up, down
  assert s.weight_bytes_packed <= 0.27 * s.weight_bytes_fp
  # The input tree is untouched (a pure function).
  assert not isinstance(params["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"]["w"], PackedLinear)


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_folded_transforms_leave_the_policy_unchanged_without_low_bit_error(model):
  """Smoothing folded into (adaptive) norms, rotations, zigzag, output rotation: W8, no act quant."""
  params = demo_params(model)
  cfg = _transform_rule(output_rotation="restore")
  packed = quantize_params(params, cfg, demo_stats(model))
  err = action_rel_err(_actions(model, packed), _actions(model, params))
  assert err.max() < 0.01, err


def test_demo_error_bounds_recommended_vs_rtn_and_documents():
  params, stats = demo_params("pi0"), demo_stats("pi0")
  a_fp = _actions("pi0", params)
  err = {name: action_rel_err(_actions("pi0", quantize_params(params, get_preset(name), stats)),
                              a_fp).mean() for name in ("w4a8-rtn", "recommended")}
  assert err["recommended"] <= err["w4a8-rtn"] / 3, err
  assert err["recommended"] < 0.08, err


def test_simulate_mode_has_the_same_numerics():
  params, stats = demo_params("pi0"), demo_stats("pi0")
  cfg = get_preset("recommended")
  path = ("PaliGemma", "llm", "layers", "mlp", "linear")
  leaf_int = quantize_params(params, cfg, stats)
  leaf_sim = quantize_params(params, dataclasses.replace(cfg, mode="simulate"), stats)
  for k in path:
    leaf_int, leaf_sim = leaf_int[k], leaf_sim[k]
  one = lambda t: jax.tree.map(lambda a: a[1], t)  # layer 1 of the stack
  x = jax.random.normal(jax.random.key(0), (50, leaf_int.in_features)) * 3
  y_int = runtime.matmul(one(leaf_int), x)
  y_sim = runtime.matmul(one(leaf_sim), x)
  np.testing.assert_allclose(np.asarray(y_int), np.asarray(y_sim), rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(y_sim).max()))


def test_deterministic_for_a_seed():
  params, stats = demo_params("pi0"), demo_stats("pi0")
  cfg = _transform_rule(weight_bits=4)
  a = jax.tree.leaves(quantize_params(params, cfg, stats))
  b = jax.tree.leaves(quantize_params(params, cfg, stats))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_vision_dense_layers_run_through_the_interceptor():
  params = demo_params("pi0")
  rule = LayerRule(pattern=r"PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_\d/kernel",
                   weight_bits=8, rotation="none", permutation="none", smooth_alpha=None,
                   clip_search=False)
  packed = quantize_params(params, QuantConfig(rules=(rule,)))
  assert isinstance(packed["PaliGemma"]["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]
                    ["Dense_0"]["kernel"], PackedLinear)
  err = action_rel_err(_actions("pi0", packed), _actions("pi0", params))
  assert 0 < err.max() < 0.05


def test_quantized_apply_on_a_plain_flax_module():
  module = nn.Dense(64)
  x = jax.random.normal(jax.random.key(0), (5, 32))
  variables = module.init(jax.random.key(1), x)
  rule = LayerRule(pattern="kernel", weight_bits=8, act_bits=8, rotation="hadamard",
                   permutation="none", smooth_alpha=None, block_size=16, clip_search=False)
  packed = quantize_params(variables["params"], QuantConfig(rules=(rule,)))
  assert isinstance(packed["kernel"], PackedLinear)  # a root-level Dense's path is just `kernel`
  y = quantized_apply(module, {"params": packed}, x)
  ref = module.apply(variables, x)
  err = float(jnp.abs(y - ref).max()) / float(jnp.abs(ref).max())
  assert 1e-5 < err < 0.05, err  # W8A8 really ran (nonzero), and it is close


# ---------------------------------------------------------------------------------------------
# Refusals.


def test_block_size_not_dividing_head_dim_is_an_error():
  params, stats = demo_params("pi0"), demo_stats("pi0")
  cfg = QuantConfig(rules=(LayerRule(pattern=r".*/attn_vec_einsum/w", block_size=128),))
  with pytest.raises(ValueError, match="head_dim 64"):
    quantize_params(params, cfg, stats)
  cfg = QuantConfig(rules=(LayerRule(pattern=r".*/mlp/linear", block_size=48),))
  with pytest.raises(ValueError, match="48"):
    quantize_params(params, cfg, stats)


def test_nan_weights_are_named():
  params = jax.tree.map(lambda x: x, demo_params("pi0"))
  w = np.array(params["PaliGemma"]["llm"]["layers"]["mlp"]["linear"])
  w[1, 3, 5] = np.nan
  params["PaliGemma"]["llm"]["layers"]["mlp"]["linear"] = w
  with pytest.raises(ValueError, match="mlp/linear.*NaN"):
    quantize_params(params, get_preset("w4a8-rtn"))


def test_missing_stats_are_refused():
  with pytest.raises(ValueError, match="no calibration stats"):
    quantize_params(demo_params("pi0"), get_preset("recommended"), None)


def test_per_head_scales_need_heads():
  cfg = QuantConfig(rules=(LayerRule(pattern=r".*/mlp/linear", weight_granularity="head",
                                     rotation="none", permutation="none", smooth_alpha=None),))
  with pytest.raises(ValueError, match="per-head"):
    quantize_params(demo_params("pi0"), cfg)


def test_float_member_of_a_smoothed_group_is_compensated():
  """Only q is quantized: the smoothing folded into the shared norm must be undone in kv's weight."""
  params, stats = demo_params("pi0"), demo_stats("pi0")
  cfg = QuantConfig(rules=(LayerRule(pattern=r".*/attn/q_einsum/w", weight_bits=8, act_bits=None,
                                     block_size=16, rotation_steps=2, clip_search=False),))
  packed = quantize_params(params, cfg, stats)
  kv = packed["PaliGemma"]["llm"]["layers"]["attn"]["kv_einsum"]["w"]
  assert not isinstance(kv, PackedLinear)
  assert not np.allclose(np.asarray(kv), params["PaliGemma"]["llm"]["layers"]["attn"]["kv_einsum"]["w"])
  err = action_rel_err(_actions("pi0", packed), _actions("pi0", params))
  assert err.max() < 0.01, err


def test_folded_norms_keep_the_param_dtype():
  """Smoothing folded into pi0.5's adaptive norms (and the RMS norms) must not widen bf16 leaves:
  whole-tree bytes on the device equal the summary's count (float leaves at 2 bytes)."""
  from duquant_jax.packed import tree_nbytes
  from duquant_jax.lab.synthetic_stats import synthetic_stats
  policy = get_policy("pi05", "demo")
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                        policy.param_shapes())
  packed = jax.eval_shape(lambda p: quantize_params(p, get_preset("deploy"), synthetic_stats(p)),
                          shapes)
  norms = {k: v for k, v in jax.tree_util.tree_flatten_with_path(packed)[0]
           if "pre_attention_norm" in jax.tree_util.keystr(k)}
  assert norms and all(v.dtype == jnp.bfloat16 for v in norms.values())
  assert summarize(packed).tree_bytes_packed == tree_nbytes(packed)


# ---------------------------------------------------------------------------------------------
# act_min_tokens: small calls run the same packed weights weight-only.


def test_act_min_tokens_small_calls_run_weight_only_and_large_calls_w4a8():
  from duquant_jax.config import EXPERT_MLP
  from duquant_jax.lab.synthetic_stats import synthetic_stats
  params = demo_params("pi0")
  cfg = QuantConfig(rules=(LayerRule(pattern=EXPERT_MLP, block_size=16, act_min_tokens=8),))
  packed = quantize_params(params, cfg, synthetic_stats(params))
  w = packed["PaliGemma"]["llm"]["layers"]["mlp_1"]["linear"]
  assert w.act_min_tokens == 8 and w.act_bits == 8
  w = w.at_layer(0)
  assert not w.quantizes(7) and w.quantizes(8)
  x = jax.random.normal(jax.random.key(0), (16, w.in_features), jnp.bfloat16)
  small, large = x[:7], x[:8]
  weight_only, w4a8 = w.replace(act_bits=None, act_min_tokens=0), w.replace(act_min_tokens=0)
  np.testing.assert_array_equal(np.asarray(runtime.matmul(w, small), np.float32),
                                np.asarray(runtime.matmul(weight_only, small), np.float32))
  np.testing.assert_array_equal(np.asarray(runtime.matmul(w, large), np.float32),
                                np.asarray(runtime.matmul(w4a8, large), np.float32))
  # The two really differ (the activation quantizer runs in one of them only).
  assert not np.array_equal(np.asarray(runtime.matmul(w4a8, small)),
                            np.asarray(runtime.matmul(w, small)))
  # In the policy: with a threshold above every call's token count the actions equal the
  # weight-only tree's, bit for bit (the same program); with 0 they differ.
  is_packed = lambda v: isinstance(v, PackedLinear)
  with_fields = lambda **kw: jax.tree.map(lambda v: v.replace(**kw) if is_packed(v) else v,
                                          packed, is_leaf=is_packed)
  obs = get_policy("pi0", "demo").example_observation(jax.random.key(1), batch_size=1)
  a = _actions("pi0", with_fields(act_min_tokens=10**6), obs)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(
      _actions("pi0", with_fields(act_bits=None, act_min_tokens=0), obs)))
  assert not np.array_equal(np.asarray(a), np.asarray(_actions("pi0", with_fields(act_min_tokens=0),
                                                                obs)))


@pytest.mark.parametrize("kw, match", [
    (dict(act_min_tokens=-1), "act_min_tokens must be an int >= 0"),
    (dict(act_min_tokens=2.5), "act_min_tokens must be an int >= 0"),
    (dict(act_bits=None, act_min_tokens=64), "needs act_bits"),
])
def test_act_min_tokens_refuses_bad_values(kw, match):
  with pytest.raises(ValueError, match=match):
    LayerRule(pattern="x", **kw)
