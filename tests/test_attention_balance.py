"""Attention temperature matching and output balancing: the fold is exact, the calibrated scalars
move the packed policy's attention statistics to the FP policy's, refusals."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax.lab import evaluate as ev
from duquant_jax.attention_balance import (attention_moments, attention_paths, balance_attention,
                                           scale_outputs)
from duquant_jax.config import EXPERT_ATTN, AttentionBalance, LayerRule, QuantConfig
from duquant_jax.models import get_policy
from duquant_jax.quantize import quantize_params
from duquant_jax.runtime import apply_packed

from conftest import demo_params

Q, O = attention_paths(1)
L, N, D, H = 2, 4, 32, 16


def _tree(seed=0):
  """The action expert's q (L, N, D, H) and attention output (L, N, H, D) weights alone."""
  kq, ko = jax.random.split(jax.random.key(seed))
  attn = {"q_einsum_1": {"w": jax.random.normal(kq, (L, N, D, H))},
          "attn_vec_einsum_1": {"w": jax.random.normal(ko, (L, N, H, D))}}
  return {"PaliGemma": {"llm": {"layers": {"attn": attn}}}}


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@functools.cache
def _packed():
  """Both weights W4A8 (round to nearest, no input transform: the fold is on the output side),
  then given a random output rotation of blocks of 16 channels (inside q's heads; packing one with
  `output_rotation` compiles slowly on the CPU)."""
  rule = dict(rotation="none", permutation="none", smooth_alpha=None, clip_search=False)
  packed = quantize_params(_tree(), QuantConfig(rules=(LayerRule(pattern=EXPERT_ATTN, **rule),)))
  rng = np.random.default_rng(0)
  attn = packed["PaliGemma"]["llm"]["layers"]["attn"]
  for v in attn.values():
    w = v["w"]
    blocks = np.linalg.qr(rng.normal(size=(L, w.out_features // 16, 16, 16)))[0]
    v["w"] = w.replace(out_rot=jnp.asarray(blocks, jnp.float16))
  return packed


def _compact(packed):
  """`packed` with float16 weight scales, as `LayerRule.compact` stores them."""
  attn = packed["PaliGemma"]["llm"]["layers"]["attn"]
  half = {k: {"w": v["w"].replace(scale=v["w"].scale.astype(jnp.float16))} for k, v in attn.items()}
  return {"PaliGemma": {"llm": {"layers": {"attn": half}}}}


@pytest.mark.parametrize("compact", [False, True])
def test_fold_into_packed_scales_is_exact(compact):
  packed = _compact(_packed()) if compact else _packed()
  s_q = jax.random.uniform(jax.random.key(1), (L, N), minval=0.5, maxval=2.0)
  s_o = jnp.asarray([[0.7], [1.3]])
  scaled = scale_outputs(packed, {Q: s_q, O: s_o})
  x = jax.random.normal(jax.random.key(2), (8, D))
  for path, s in ((Q, s_q), (O, s_o)):
    w0, w1 = _get(packed, path), _get(scaled, path)
    assert w1.codes is w0.codes and w1.zero is w0.zero and w1.scale.dtype == w0.scale.dtype
    for l in range(L):
      xl = x if path == Q else jax.random.normal(jax.random.key(3), (8, N * H))
      y0, y1 = apply_packed(w0.at_layer(l), xl), apply_packed(w1.at_layer(l), xl)
      want = y0 * jnp.repeat(s[l], w0.out_features // s.shape[-1])
      # float16 scales (compact) are rounded once more after the product (2^-11 relative per
      # channel), and the output rotation sums channels of one block: an error of that order of
      # the block's largest output.
      tol = 2e-3 if compact else 1e-5
      np.testing.assert_allclose(y1, want, rtol=tol, atol=tol * float(jnp.abs(want).max()))


def test_fold_into_float_weights_matches_the_einsum():
  tree = _tree()
  s_q = jax.random.uniform(jax.random.key(1), (L, N), minval=0.5, maxval=2.0)
  s_o = jnp.asarray([[0.7], [1.3]])
  scaled = scale_outputs(tree, {Q: s_q, O: s_o})
  x = jax.random.normal(jax.random.key(2), (1, 3, D))
  z = jax.random.normal(jax.random.key(3), (1, 3, N, H))
  for l in range(L):
    q0 = jnp.einsum("BTD,NDH->BTNH", x, _get(tree, Q)[l])
    q1 = jnp.einsum("BTD,NDH->BTNH", x, _get(scaled, Q)[l])
    np.testing.assert_allclose(q1, q0 * s_q[l][:, None], rtol=1e-5, atol=1e-5)
    o0 = jnp.einsum("BTNH,NHD->BTD", z, _get(tree, O)[l])
    o1 = jnp.einsum("BTNH,NHD->BTD", z, _get(scaled, O)[l])
    np.testing.assert_allclose(o1, o0 * s_o[l], rtol=1e-5, atol=1e-5)
  assert _get(tree, Q) is not _get(scaled, Q)  # pure: the input tree is unchanged


def test_fold_refusals():
  packed = _packed()
  with pytest.raises(ValueError, match="not a linear weight"):
    scale_outputs(packed, {"PaliGemma/llm/layers/attn/nope/w": jnp.ones((L, 1))})
  with pytest.raises(ValueError, match="does not fit"):
    scale_outputs(packed, {Q: jnp.ones((L, 3))})  # 3 groups do not divide N * H = 64
  with pytest.raises(ValueError, match="does not fit"):
    scale_outputs(packed, {Q: jnp.ones((N,))})  # no layer axis
  with pytest.raises(ValueError, match="finite and positive"):
    scale_outputs(packed, {O: jnp.asarray([[1.0], [0.0]])})
  with pytest.raises(NotImplementedError, match="straddle"):
    scale_outputs(packed, {Q: jnp.ones((L, 8))})  # groups of 8 channels, rotation blocks of 16


def test_config_checks_and_round_trip():
  for bad in (dict(temperature=False, output=False), dict(experts=()), dict(experts=(1, 1)),
              dict(experts=(-1,)), dict(fit="l1"), dict(num_steps=0)):
    with pytest.raises(ValueError):
      AttentionBalance(**bad)
  with pytest.raises(TypeError):
    QuantConfig(attention_balance={"temperature": True})
  cfg = QuantConfig(attention_balance=AttentionBalance(experts=[0, 1], fit="least_squares"))
  assert cfg.attention_balance.experts == (0, 1)
  assert QuantConfig.from_dict(cfg.to_dict()) == cfg
  hash(cfg)


def test_variant_overrides():
  v = ev.parse_variant("recommended+attn=temp+attnllm=on")
  ab = v.cfg.attention_balance
  assert (ab.temperature, ab.output, ab.experts, ab.fit) == (True, False, (0, 1), "energy")
  assert ev.parse_variant("recommended+attn=both+attnfit=least_squares").cfg.attention_balance.fit \
      == "least_squares"
  assert ev.parse_variant("recommended+attn=off").cfg.attention_balance is None
  for bad in ("recommended+attn=all", "recommended+attnfit=energy", "recommended+attn=both+attnllm=x",
              "recommended+attn=off+attnfit=energy"):
    with pytest.raises(ValueError):
      ev.parse_variant(bad)


@pytest.fixture(scope="module")
def coarse_pi0():
  """The pi0 demo with only the expert attention quantized, coarsely (3-bit symmetric RTN with
  a 0.8 clip: it shrinks the logits and outputs visibly), and one calibration batch of one
  observation."""
  policy = get_policy("pi0", "demo")
  params = demo_params("pi0")
  cfg = QuantConfig(rules=(LayerRule(pattern=EXPERT_ATTN, weight_bits=3, act_bits=None,
                                     rotation="none", permutation="none", smooth_alpha=None,
                                     weight_symmetric=True, clip_search=False, clip_grid=(0.8,)),))
  batches = jax.tree.map(lambda x: x[None], policy.example_observation(jax.random.key(5), 1))
  return policy, params, quantize_params(params, cfg), batches


STEPS = 2  # flow steps of the calibration in these tests (one compiled program for all)


def _balanced(**fields):
  return QuantConfig(attention_balance=AttentionBalance(num_steps=STEPS, **fields))


def _log_ratio(policy, packed, params, batches):
  m = attention_moments(policy, packed, params, batches, rng=jax.random.key(0), num_steps=STEPS)
  return {p: np.log(np.asarray(v.rms) / np.asarray(v.reference_rms)) for p, v in m.items()}


def test_balance_moves_attention_statistics_to_fp(coarse_pi0):
  policy, params, packed, batches = coarse_pi0
  before = _log_ratio(policy, packed, params, batches)
  fp = _log_ratio(policy, params, params, batches)
  assert all(np.abs(v).max() < 1e-6 for v in fp.values())  # FP against itself: ratio 1
  assert np.abs(before[Q]).max() > 0.02 and np.abs(before[O]).max() > 0.02
  balanced, scalars = balance_attention(policy, params, packed, batches, _balanced(),
                                        rng=jax.random.key(0))
  assert scalars[Q].shape == (3, 4) and scalars[O].shape == (3, 1)
  after = _log_ratio(policy, balanced, params, batches)
  # Layer 0 reads inputs no scalar changed: matched to float rounding; later layers' inputs
  # moved with the folds above them, so they come close rather than exact.
  for p in (Q, O):
    assert np.abs(after[p][0]).max() < 1e-4, p
    assert np.abs(after[p]).max() < 0.25 * np.abs(before[p]).max(), p
  # Deterministic: the same inputs give the same scalars.
  _, again = balance_attention(policy, params, packed, batches, _balanced(),
                               rng=jax.random.key(0))
  for p in scalars:
    np.testing.assert_array_equal(scalars[p], again[p])


def test_balance_refusals(coarse_pi0):
  policy, params, packed, batches = coarse_pi0
  assert balance_attention(policy, params, packed, batches, QuantConfig(),
                           rng=jax.random.key(0)) == (packed, {})  # nothing asked: unchanged
  with pytest.raises(ValueError, match="expert 2"):
    balance_attention(policy, params, packed, batches, _balanced(experts=(2,)),
                      rng=jax.random.key(0))
  with pytest.raises(TypeError, match="Observation"):
    balance_attention(policy, params, packed, {"state": 1}, _balanced(), rng=jax.random.key(0))
  nan = dataclasses.replace(batches, state=batches.state * np.nan)
  with pytest.raises(ValueError, match="NaN"):
    balance_attention(policy, params, packed, nan, _balanced(), rng=jax.random.key(0))


def test_streamed_conversion_refuses_balancing(tmp_path):
  from duquant_jax.openpi_checkpoint import convert_checkpoint
  with pytest.raises(NotImplementedError, match="balance_attention"):
    convert_checkpoint(tmp_path / "src", tmp_path / "dst",
                       QuantConfig(attention_balance=AttentionBalance()))
