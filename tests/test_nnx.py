"""Flax NNX models (`duquant_jax.nnx_models`): their params as rule paths, calibration equal to the
linen capture of the same layers, the packed run inside the module's forward, transforms-only
exactness, and the errors on layers or trees that cannot run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from duquant_jax.capture import calibrate_apply
from duquant_jax.config import LayerRule, QuantConfig, generic_config, transforms_only
from duquant_jax.nnx_models import calibrate_nnx, nnx_params, quantized_nnx_apply
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize import quantize_params, summarize
from duquant_jax.runtime import quantized_apply

# The BERT-style encoder of test_generic.py (widths and config; its packing programs are reused),
# with an Einsum intermediate projection so that every routed layer kind is in it.
D, N, H, F, LAYERS, VOCAB = 64, 4, 16, 256, 2, 100


def _attention(q, k, v):
  a = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(H), axis=-1)
  return jnp.einsum("BNTS,BSNH->BTNH", a, v)


class Layer(nnx.Module):
  """Post-LayerNorm attention and MLP: LinearGeneral q / k / v (D, N, H) and output (N, H, D), an
  Einsum intermediate (D, F), a Linear output (F, D)."""

  def __init__(self, rngs: nnx.Rngs):
    self.query, self.key, self.value = (nnx.LinearGeneral(D, (N, H), rngs=rngs) for _ in range(3))
    self.attention_out = nnx.LinearGeneral((N, H), D, axis=(-2, -1), rngs=rngs)
    self.attention_norm = nnx.LayerNorm(D, rngs=rngs)
    self.intermediate = nnx.Einsum("BTD,DF->BTF", (D, F), (F,), rngs=rngs)
    self.output = nnx.Linear(F, D, rngs=rngs)
    self.output_norm = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, x):
    x = self.attention_norm(x + self.attention_out(_attention(
        self.query(x), self.key(x), self.value(x))))
    return self.output_norm(x + self.output(jax.nn.gelu(self.intermediate(x))))


class Encoder(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.embed_norm = nnx.LayerNorm(D, rngs=rngs)
    self.layers = nnx.List([Layer(rngs) for _ in range(LAYERS)])

  def __call__(self, tokens):
    x = self.embed_norm(self.embed(tokens))
    for layer in self.layers:
      x = layer(x)
    return x


class LinenLayer(nn.Module):
  """`Layer` in linen: the same param names and shapes, the same ops."""

  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.DenseGeneral((N, H), name=n)(x) for n in ("query", "key", "value"))
    out = nn.DenseGeneral(D, axis=(-2, -1), name="attention_out")(_attention(q, k, v))
    x = nn.LayerNorm(name="attention_norm")(x + out)
    h = jax.nn.gelu(nn.Einsum((D, F), "BTD,DF->BTF", name="intermediate")(x))
    return nn.LayerNorm(name="output_norm")(x + nn.Dense(D, name="output")(h))


class LinenEncoder(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.LayerNorm(name="embed_norm")(nn.Embed(VOCAB, D, name="embed")(tokens))
    for i in range(LAYERS):
      x = LinenLayer(name=f"layers_{i}")(x)
    return x


def _model() -> Encoder:
  """Random weights with planted outliers: two LayerNorm channels 25x (the q / k / v and
  intermediate inputs) and two intermediate units 15x (the output projection's input)."""
  model = Encoder(nnx.Rngs(0))
  boost = lambda a, idx, f: a.at[..., jnp.array(idx)].multiply(f)
  for norm in (model.embed_norm, *(layer.attention_norm for layer in model.layers)):
    norm.scale[...] = boost(norm.scale[...], [3, 17], 25.0)
  for layer in model.layers:
    layer.intermediate.kernel[...] = boost(layer.intermediate.kernel[...], [5, 100], 15.0)
  return model


def _batches():
  """(5, B=4, T=16) token ids: 4 calibration batches and 1 held out."""
  return jax.random.randint(jax.random.key(0), (5, 4, 16), 0, VOCAB)


def _linen_params(params):
  """The nnx tree with linen's names (`layers_0` for `layers/0`); leaves shared."""
  return {("layers_" + k if k.isdigit() else k): v for k, v in
          {**{k: v for k, v in params.items() if k != "layers"}, **params["layers"]}.items()}


def _linen_path(path: str) -> str:
  return path.replace("layers/", "layers_", 1)


CFG = generic_config(rotation_steps=8)


@pytest.fixture(scope="module")
def calibrated():
  """(model, params, batches, stats under CFG); no test changes the model."""
  model, x = _model(), _batches()
  params = nnx_params(model)
  return model, params, x, calibrate_nnx(model, x[:-1], CFG, num_samples=64)


def test_nnx_params_are_the_state_paths_the_rules_match(calibrated):
  model, params, _, _ = calibrated
  assert set(params["layers"]) == {"0", "1"}  # list indices as string keys
  assert params["layers"]["1"]["query"]["kernel"].shape == (D, N, H)
  assert params["layers"]["1"]["query"]["kernel"] is model.layers[1].query.kernel.get_value()
  assert jax.tree.structure(nnx_params(nnx.state(model))) == jax.tree.structure(params)
  assert CFG.rule_for("layers/1/output/kernel") is not None
  assert CFG.input_group("layers/1/key/kernel") == "layers/1/*/kernel"
  with pytest.raises(TypeError, match="nnx.Module or nnx.State"):
    nnx_params(params)


def test_calibration_equals_the_linen_capture_of_the_same_layers(calibrated):
  """The same weights as a linen model: calibrate_nnx's statistics equal calibrate_apply's field
  for field (rows, maxima, histograms, reservoir samples); the model is left as it was."""
  model, params, x, stats = calibrated
  linen = lambda p, b: LinenEncoder().apply({"params": p}, b)
  ref = calibrate_apply(linen, _linen_params(params), x[:-1], CFG, num_samples=64)
  assert len(stats) == 6 * LAYERS and {_linen_path(p) for p in stats} == set(ref)
  for path, st in stats.items():
    for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(ref[_linen_path(path)]), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
  assert int(stats["layers/0/output/kernel"].count) == 4 * 4 * 16
  assert stats["layers/0/query/kernel"] is stats["layers/0/value/kernel"]  # one shared input
  assert type(model.layers[0].intermediate) is nnx.Einsum  # no router left behind
  kernel = params["layers"]["0"]["intermediate"]["kernel"]
  assert nnx_params(model)["layers"]["0"]["intermediate"]["kernel"] is kernel


def test_a_packed_nnx_model_beats_round_to_nearest_and_transforms_only_is_exact(calibrated):
  """generic_config's DuQuant W4A8 against plain round-to-nearest W4A8 on held-out tokens, both
  run in the module's own forward under one jit (the same numbers as the linen twin's packed
  run); with quantization off (`transforms_only`) the packed model equals the float one to
  float32 rounding."""
  model, params, x, stats = calibrated
  run = jax.jit(lambda p, t: quantized_nnx_apply(model, p, t))
  ref = np.asarray(model(x[-1]), np.float64)
  rtn = dict(rotation="none", permutation="none", smooth_alpha=None, weight_symmetric=True,
             act_symmetric=True, clip_search=False)
  err = {}
  for name, c in (("duquant", CFG), ("rtn", generic_config(**rtn))):
    packed = quantize_params(params, c, stats)
    assert summarize(packed).layers_quantized == 6 * LAYERS
    q = packed["layers"]["0"]["query"]["kernel"]
    assert isinstance(q, PackedLinear) and q.w_shape == (D, N, H) and q.input_group is not None
    y = np.asarray(run(packed, x[-1]))
    err[name] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    if name == "duquant":
      linen = quantized_apply(LinenEncoder(), {"params": _linen_params(packed)}, x[-1])
      np.testing.assert_allclose(y, np.asarray(linen), rtol=0, atol=1e-5 * np.abs(y).max())
  assert err["duquant"] < 0.07 and err["rtn"] > 2 * err["duquant"], err

  exact = quantize_params(params, transforms_only(CFG), stats)
  assert exact["layers"]["1"]["intermediate"]["kernel"].transform is not None
  before = run._cache_size()
  y = np.asarray(run(exact, x[-1]))
  assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5
  run(exact, (x[-1] + 1) % VOCAB)  # new values, same shapes and format: no new trace
  assert run._cache_size() == before + 1


class _Gated(nnx.Module):
  """A 2-D `kernel` that is no Linear: a rule selecting it must not pack what cannot run."""

  def __init__(self, rngs: nnx.Rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (D, D)))

  def __call__(self, x):
    return x @ self.kernel[...] * jax.nn.sigmoid(x)


class _Scaled(nnx.Linear):
  def __call__(self, x):
    return 2.0 * super().__call__(x)


class _Head(nnx.Module):
  def __init__(self, layer):
    self.body = nnx.Linear(D, D, rngs=nnx.Rngs(0))
    self.head = layer

  def __call__(self, x):
    return self.head(self.body(x))


_PLAIN = dict(rotation="none", permutation="none", smooth_alpha=None, clip_search=False)


@pytest.mark.parametrize("head", ["gated", "subclass"])
def test_layers_that_cannot_run_packed_are_refused(head):
  model = _Head(_Gated(nnx.Rngs(1)) if head == "gated" else _Scaled(D, D, rngs=nnx.Rngs(1)))
  x = jnp.ones((2, 3, D))
  cfg = QuantConfig(rules=(LayerRule(pattern=".*kernel", **_PLAIN),))
  with pytest.raises(ValueError, match=r"^head/kernel: .* cannot run packed"):
    calibrate_nnx(model, x, cfg)
  with pytest.raises(ValueError, match=r"^head/kernel: packed, but an nnx _"):
    quantized_nnx_apply(model, quantize_params(nnx_params(model), cfg), x[0])
  keep = QuantConfig(rules=(LayerRule(pattern="head/kernel", skip=True), *cfg.rules))
  stats = calibrate_nnx(model, x, keep)
  assert set(stats) == {"body/kernel"}
  y = jax.jit(lambda p, b: quantized_nnx_apply(model, p, b))(
      quantize_params(nnx_params(model), keep, stats), x[0])
  ref = model(x[0])
  assert float(jnp.abs(y - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_calls_and_trees_a_packed_layer_cannot_run_are_refused():
  x = jnp.ones((2, 3, 4, 8))
  cfg = QuantConfig(rules=(LayerRule(pattern=".*kernel", **_PLAIN),))
  einsum = nnx.Einsum("BTNH,HND->BTD", (8, 4, 16), rngs=nnx.Rngs(0))  # contracts N, H out of order
  with pytest.raises(NotImplementedError, match=r"^kernel: a packed Einsum needs the form"):
    calibrate_nnx(einsum, x[None], cfg)
  inner = nnx.LinearGeneral(4, 16, axis=-2, rngs=nnx.Rngs(0))  # contracts N, not the last axis
  with pytest.raises(NotImplementedError, match="needs trailing contraction axes"):
    calibrate_nnx(inner, x[None], cfg)
  with pytest.raises(ValueError, match="called no linear that config 'custom' quantizes"):
    calibrate_nnx(inner, x[None], QuantConfig(rules=(LayerRule(pattern="nowhere"),)))

  model = _Head(nnx.Linear(D, D, rngs=nnx.Rngs(1)))
  params = nnx_params(model)
  missing = {"body": params["body"], "head": {"kernel": params["head"]["kernel"]}}
  with pytest.raises(ValueError, match=r"^head/bias: missing from params"):
    quantized_nnx_apply(model, missing, jnp.ones((2, D)))
  wrong = {**params, "head": {**params["head"], "bias": jnp.zeros((D + 1,))}}
  with pytest.raises(ValueError, match=rf"^head/bias: shape \({D + 1},\) in params, \({D},\) in"):
    quantized_nnx_apply(model, wrong, jnp.ones((2, D)))
  extra = {**params, "tail": {"kernel": jnp.zeros((D, D))}}
  with pytest.raises(ValueError, match="no Param of the model: tail/kernel"):
    quantized_nnx_apply(model, extra, jnp.ones((2, D)))

  @nnx.vmap(in_axes=0, out_axes=0)
  def stacked(key):
    return nnx.Linear(D, D, rngs=nnx.Rngs(key))

  with pytest.raises(NotImplementedError, match="stacked"):
    calibrate_nnx(stacked(jax.random.split(jax.random.key(0), 3)), jnp.ones((1, 2, D)), cfg)
