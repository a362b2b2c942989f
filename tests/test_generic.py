"""Quantizing models other than openpi's: rule reports, generic rules, shared inputs, calibration
by interception, transforms-only packs, packed linears on raw arrays, storage, a BERT-style encoder."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax.config import LayerRule, QuantConfig, get_preset
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize import quantize_params


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(32, name="out")(nn.gelu(nn.Dense(64, name="up")(x)))


def _mlp_params():
  return _Mlp().init(jax.random.key(0), jnp.zeros((1, 32)))["params"]


_PLAIN = dict(rotation="none", permutation="none", smooth_alpha=None, clip_search=False)


def test_a_rule_matching_nothing_warns_with_its_pattern():
  cfg = QuantConfig(rules=(LayerRule(pattern=r"nowhere/.*", **_PLAIN),
                           LayerRule(pattern=r"up/kernel", **_PLAIN)))
  with pytest.warns(UserWarning, match=r"rule 'nowhere/\.\*' matches no linear"):
    packed = quantize_params(_mlp_params(), cfg)
  assert isinstance(packed["up"]["kernel"], PackedLinear)
  # ...unless the rule says that some models lack its layers
  optional = QuantConfig(rules=(LayerRule(pattern=r"nowhere/.*", optional=True, **_PLAIN),
                                LayerRule(pattern=r"up/kernel", **_PLAIN)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    packed = quantize_params(_mlp_params(), optional)
  assert isinstance(packed["up"]["kernel"], PackedLinear)
  with pytest.raises(ValueError, match="optional must be a bool"):
    LayerRule(pattern=r"up/kernel", optional="yes")


def test_a_rule_shadowed_by_earlier_rules_warns_so():
  cfg = QuantConfig(rules=(LayerRule(pattern=r"up/kernel", **_PLAIN),
                           LayerRule(pattern=r"(up|out)/kernel", **_PLAIN),
                           LayerRule(pattern=r"up/.*", **_PLAIN)))
  with pytest.warns(UserWarning, match=r"rule 'up/\.\*' takes no layer: the 1 linear\(s\) it "
                    r"matches \(e\.g\. up/kernel\) all match an earlier rule"):
    quantize_params(_mlp_params(), cfg)


def test_a_config_quantizing_nothing_is_an_error():
  with pytest.warns(UserWarning), pytest.raises(ValueError, match="quantizes nothing"):
    quantize_params(_mlp_params(), get_preset("recommended"))
  # Skip rules only, or no rules: nothing was asked for, nothing is refused.
  quantize_params(_mlp_params(), QuantConfig(rules=(LayerRule(pattern=".*", skip=True),)))
  quantize_params(_mlp_params(), QuantConfig())


# ---------------------------------------------------------------------------------------------
# A small BERT-style encoder (post-LayerNorm), random weights with planted outlier channels.

D, HEADS, F, LAYERS = 64, 4, 256, 2


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, x):
    # q / k / v kernels (D, N, H) and the output kernel (N, H, D), as flax's attention has them.
    q, k, v = (nn.DenseGeneral((HEADS, D // HEADS), name=n)(x) for n in ("query", "key", "value"))
    a = nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(D // HEADS), axis=-1)
    z = jnp.einsum("BNTS,BSNH->BTNH", a, v)
    out = nn.DenseGeneral(D, axis=(-2, -1), name="attention_out")(z)
    x = nn.LayerNorm(name="attention_norm")(x + out)
    h = nn.gelu(nn.Dense(F, name="intermediate")(x))
    return nn.LayerNorm(name="output_norm")(x + nn.Dense(D, name="output")(h))


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.LayerNorm(name="embed_norm")(nn.Embed(100, D, name="embed")(tokens))
    for i in range(LAYERS):
      x = _Layer(name=f"layer_{i}")(x)
    return x


# ---------------------------------------------------------------------------------------------
# Calibration by interception, and transforms-only packs.


def _mlp_batches(n=3):
  """(n, 16, 32) inputs with two outlier channels."""
  x = jax.random.normal(jax.random.key(2), (n, 16, 32))
  return x.at[..., jnp.array([3, 20])].mul(30.0)


def test_calibrate_apply_captures_the_inputs_of_selected_linears():
  from duquant_jax.capture import calibrate_apply
  params, x = _mlp_params(), _mlp_batches()
  cfg = QuantConfig(rules=(LayerRule(pattern="up/kernel", **_PLAIN),))
  stats = calibrate_apply(lambda p, b: _Mlp().apply({"params": p}, b), params, x, cfg,
                          num_samples=8)
  assert set(stats) == {"up/kernel"}  # `out` is not quantized: not captured
  st = stats["up/kernel"]
  np.testing.assert_allclose(np.asarray(st.absmax), np.abs(np.asarray(x)).max(axis=(0, 1)))
  assert int(st.count) == 48 and st.samples.shape == (8, 32)
  rows = np.asarray(x).reshape(-1, 32)  # every kept sample is one of the rows
  assert all(np.isclose(rows, r).all(axis=1).any() for r in np.asarray(st.samples))


TRANSFORMS = {  # every transform kind, alone or composed, in both storage forms
    "smoothing": dict(rotation="none", permutation="none", smooth_alpha=0.5),
    "permutation": dict(rotation="none", permutation="zigzag", smooth_alpha=None),
    "hadamard": dict(rotation="hadamard", permutation="none", smooth_alpha=None),
    "random+smoothing": dict(rotation="random", permutation="none", smooth_alpha=0.5),
    "greedy+zigzag+smoothing": dict(rotation="greedy", permutation="zigzag", smooth_alpha=0.5),
    "output rotation": dict(rotation="random", permutation="zigzag", smooth_alpha=None,
                            output_rotation="restore"),
    "compact: int8 greedy": dict(rotation="greedy", permutation="zigzag", smooth_alpha=0.5,
                                 compact=True),
    "compact: generated hadamard": dict(rotation="hadamard", permutation="zigzag",
                                        smooth_alpha=0.5, compact=True),
}


def test_transforms_only_packs_equal_the_float_model():
  """Quantization off: rounded rotations (float16, or int8 codes) are folded with the exact
  inverse of what is stored, so every transform kind leaves the linear unchanged to float32
  rounding (folding the transpose of a float16-rounded rotation left ~3e-4)."""
  from duquant_jax.capture import calibrate_apply
  from duquant_jax.config import transforms_only
  from duquant_jax.runtime import apply_packed
  params, x = _mlp_params(), _mlp_batches()
  rules = lambda **kw: (LayerRule(pattern="up/kernel", block_size=16, rotation_steps=4, **kw),)
  stats = calibrate_apply(lambda p, b: _Mlp().apply({"params": p}, b), params, x,
                          QuantConfig(rules=rules()), num_samples=16)
  ref = np.asarray(x[0] @ params["up"]["kernel"], np.float64)
  for name, kw in TRANSFORMS.items():
    w = quantize_params(params, transforms_only(QuantConfig(rules=rules(**kw))), stats)["up"]["kernel"]
    assert w.bits is None and w.transform is not None, name
    err = np.abs(np.asarray(apply_packed(w, x[0])) - ref).max() / np.abs(ref).max()
    assert err < 2e-6, (name, err)


def test_a_packed_linear_runs_on_raw_arrays_jitted_once():
  from duquant_jax.runtime import apply_packed
  params = _mlp_params()
  cfg = QuantConfig(rules=(LayerRule(pattern="up/kernel", rotation="hadamard", block_size=16,
                                     permutation="none", smooth_alpha=None, clip_search=False),))
  w = quantize_params(params, cfg)["up"]["kernel"]
  x = jax.random.normal(jax.random.key(0), (2, 3, 32))
  ref = x @ params["up"]["kernel"]
  y = apply_packed(w, x)
  assert y.shape == (2, 3, 64)
  assert float(jnp.abs(y - ref).max()) < 0.15 * float(jnp.abs(ref).max())
  before = apply_packed._cache_size()
  apply_packed(w, x + 1.0)  # new values, same shapes and format: no new trace
  assert apply_packed._cache_size() == before
  with pytest.raises(ValueError, match="does not end in K=32"):
    apply_packed(w, jnp.zeros((2, 16)))


def _encoder_params():
  """Random encoder weights with planted outliers: two LayerNorm channels 25x (the q / k / v and
  intermediate inputs) and two intermediate units 15x (the output projection's input)."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(Encoder().init)(jax.random.key(1), tokens)["params"]
  boost = lambda a, idx, f: a.at[..., jnp.array(idx)].multiply(f)
  for name in ("embed_norm", "layer_0/attention_norm", "layer_1/attention_norm"):
    node = params
    for k in name.split("/"):
      node = node[k]
    node["scale"] = boost(node["scale"], [3, 17], 25.0)
  for i in range(LAYERS):
    node = params[f"layer_{i}"]["intermediate"]
    node["kernel"] = boost(node["kernel"], [5, 100], 15.0)
  return params


def test_a_bert_style_encoder_beats_round_to_nearest():
  """The README's worked example: generic rules, calibration by interception, W4A8 packing; the
  encoder's output error against float, DuQuant vs plain round-to-nearest W4A8."""
  from duquant_jax.capture import calibrate_apply
  from duquant_jax.config import generic_config
  from duquant_jax.runtime import quantized_apply
  from duquant_jax.quantize import summarize
  model, params = Encoder(), _encoder_params()
  tokens = jax.random.randint(jax.random.key(0), (5, 4, 16), 0, 100)  # 4 batches + 1 held out
  apply = lambda p, b: model.apply({"params": p}, b)
  ref = apply(params, tokens[-1])
  rtn = dict(rotation="none", permutation="none", smooth_alpha=None, weight_symmetric=True,
             act_symmetric=True, clip_search=False)
  cfg = generic_config(rotation_steps=8)
  stats = calibrate_apply(apply, params, tokens[:-1], cfg, num_samples=64)
  run = jax.jit(lambda p, t: quantized_apply(model, {"params": p}, t))
  err = {}
  # The stats also declare the 3-axis kernels' contraction (RTN needs no more of them).
  for name, packed in (("duquant", quantize_params(params, cfg, stats)),
                       ("rtn", quantize_params(params, generic_config(**rtn), stats))):
    assert summarize(packed).layers_quantized == 6 * LAYERS
    q, v = packed["layer_0"]["query"]["kernel"], packed["layer_0"]["value"]["kernel"]
    assert q.w_shape == (D, HEADS, D // HEADS) and q.in_features == D
    assert q.input_group == v.input_group is not None  # q, k, v: one transform, one quantizer
    y = run(packed, tokens[-1])
    err[name] = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
  assert err["duquant"] < 0.08 and err["rtn"] > 2 * err["duquant"], err


@pytest.mark.parametrize("rotation", ["random", "hadamard"])
def test_compact_packs_round_trip_through_checkpoints(rotation, tmp_path):
  """Compact storage (int8 rotations with row scales, or generated Hadamard blocks; float16 scales,
  int8 zero points, int16 perm) is written as format version 3 and restored bit for bit; a
  non-compact pack stays version 1, as older readers read it."""
  import json
  from duquant_jax.checkpoint import load_packed, save_packed
  from duquant_jax.runtime import apply_packed
  params = _mlp_params()
  rule = dict(pattern=".*kernel", rotation=rotation, permutation="zigzag", smooth_alpha=None,
              block_size=16, clip_search=False)
  x = jax.random.normal(jax.random.key(0), (4, 32))
  for compact, version in ((True, 3), (False, 1)):
    cfg = QuantConfig(rules=(LayerRule(compact=compact, **rule),))
    packed = quantize_params(params, cfg)
    w = packed["up"]["kernel"]
    if compact:
      assert w.scale.dtype == jnp.float16 and w.zero.dtype == jnp.int8
      assert w.transform.perm.dtype == jnp.int16
      assert (w.transform.rot1 is None) == (rotation == "hadamard")
    path = save_packed(tmp_path / f"{rotation}-{compact}", packed, cfg)
    assert json.loads((path / "duquant.json").read_text())["format_version"] == version
    back = load_packed(path)[0]
    np.testing.assert_array_equal(np.asarray(apply_packed(back["up"]["kernel"], x)),
                                  np.asarray(apply_packed(w, x)))


def test_rule_fields_of_generic_configs_are_checked():
  with pytest.raises(ValueError, match="clip_rows"):
    LayerRule(pattern="x", clip_rows=0)
  with pytest.raises(ValueError, match="needs a named group"):
    QuantConfig(shared_inputs=(r".*/(q|k|v)/kernel",))
  cfg = QuantConfig(shared_inputs=(r".*/(?P<member>q|k|v)/kernel",))
  assert cfg.input_group("enc/attn/k/kernel") == "enc/attn/*/kernel"
  assert cfg.input_group("enc/mlp/kernel") is None
  assert QuantConfig.from_dict(get_preset("generic-w4a8").to_dict()) == get_preset("generic-w4a8")


def test_declared_shared_inputs_that_read_different_arrays_are_refused():
  from duquant_jax.capture import calibrate_apply

  class Cross(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name="query")(x) + nn.Dense(8, name="key")(2.0 * x)

  params = Cross().init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
  cfg = QuantConfig(rules=(LayerRule(pattern=".*kernel", **_PLAIN),),
                    shared_inputs=(r"(?P<member>query|key)/kernel",))
  with pytest.raises(ValueError, match="read different arrays"):
    calibrate_apply(lambda p, b: Cross().apply({"params": p}, b), params, jnp.ones((2, 3, 16)), cfg)


def test_gptq_rounding_on_a_generic_model_lowers_the_error():
  """`calibrate_apply` keeps each input's Hessian when a rule rounds with GPTQ, so GPTQ runs on
  any flax model: on the encoder it lowers the output error against round-to-nearest of the same
  transforms and scales (measured 0.057 -> 0.034)."""
  from duquant_jax.capture import calibrate_apply
  from duquant_jax.config import generic_config
  from duquant_jax.runtime import quantized_apply
  model, params = Encoder(), _encoder_params()
  tokens = jax.random.randint(jax.random.key(0), (9, 4, 16), 0, 100)  # 8 batches + 1 held out
  apply = lambda p, b: model.apply({"params": p}, b)
  ref = apply(params, tokens[-1])
  gptq = generic_config(rotation_steps=8, rounding="gptq")
  stats = calibrate_apply(apply, params, tokens[:-1], gptq, num_samples=64)
  hessian = stats["layer_0/intermediate/kernel"].hessian
  assert hessian is not None and hessian.shape == (1, D, D)
  run = jax.jit(lambda p, t: quantized_apply(model, {"params": p}, t))
  err = {}
  for name, cfg in (("nearest", generic_config(rotation_steps=8)), ("gptq", gptq)):
    y = run(quantize_params(params, cfg, stats), tokens[-1])
    err[name] = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
  assert err["gptq"] < 0.8 * err["nearest"], err
