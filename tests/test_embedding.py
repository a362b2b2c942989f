"""PackedEmbedding: row-wise 2-bit / int4 / int8 token tables, the packed Embedder, the `deploy` preset."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import demo_params, held_out
from duquant_jax import checkpoint as ck
from duquant_jax import runtime
from duquant_jax.calibrate import CalibConfig, calibrate, select_for
from duquant_jax.config import EmbeddingRule, LayerRule, QuantConfig, get_preset
from duquant_jax.lab.demo import action_rel_err
from duquant_jax.embedding import PackedEmbedding, pack_2bit, quantize_embedding, unpack_2bit
from duquant_jax.models import get_policy
from duquant_jax.models.gemma import Embedder
from duquant_jax.models.pi0 import Pi0
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize import quantize_params, summarize
from duquant_jax.runtime import PackedRuntime

EMB = "PaliGemma/llm/embedder/input_embedding"


def _table(v=300, d=256, seed=0, dtype=jnp.float32):
  return (jax.random.normal(jax.random.key(seed), (v, d)) * 0.05).astype(dtype)


# Relative Frobenius bounds: a uniform rounding error of step / sqrt(12) on Gaussian rows gives
# 0.10 (int4, asym, group 128), 0.126 (int4, sym, per row: 2^3 - 1 positive levels), 0.005 (int8),
# 0.23 (int3, sym), 0.40 (2 bits, asym, group 64); the bounds leave ~15% margin.
@pytest.mark.parametrize("bits,group,symmetric,scale_dtype,bound",
                         [(4, 128, False, "float16", 0.115), (4, None, True, "float32", 0.145),
                          (8, 64, False, "float16", 0.0062), (3, 32, True, "float16", 0.26),
                          (2, 64, False, "float16", 0.46)])
def test_error_within_half_a_step(bits, group, symmetric, scale_dtype, bound):
  table = _table()
  pe = quantize_embedding(table, bits=bits, group_size=group, symmetric=symmetric,
                          scale_dtype=scale_dtype)
  assert pe.codes.dtype == {2: jnp.uint8, 3: jnp.int4, 4: jnp.int4}.get(bits, jnp.int8)
  assert pe.shape == table.shape
  stored_bits = {2: 2, 3: 4, 4: 4}.get(bits, 8)
  assert pe.nbytes() == 300 * 256 * stored_bits // 8 + pe.scale.nbytes + (0 if symmetric else pe.zero.nbytes)
  assert pe.scale.dtype == jnp.dtype(scale_dtype) and pe.scale.shape == (300, 256 // (group or 256))
  assert (pe.zero is None) == symmetric
  err = np.abs(np.asarray(pe.dequantize()) - np.asarray(table))
  step = np.repeat(np.asarray(pe.scale, np.float32), pe.group_size, axis=1)
  # Round-to-nearest: half a step, plus the float16 rounding of the scale over at most 2^b steps.
  slack = 2.0 ** (bits - 11) if scale_dtype == "float16" else 1e-5
  assert (err <= step * (0.5 + slack) + 1e-7).all()
  rel = np.linalg.norm(err) / np.linalg.norm(np.asarray(table))
  assert rel < bound


def test_2bit_codes_pack_four_to_a_byte_and_back():
  codes = jnp.array(np.random.default_rng(0).integers(-2, 2, size=(5, 64)), jnp.int8)
  packed = pack_2bit(codes)
  assert packed.shape == (5, 16) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(unpack_2bit(packed)), np.asarray(codes))
  # every byte value is the packing of exactly one code quadruple
  every = jnp.arange(256, dtype=jnp.uint8)[None]
  np.testing.assert_array_equal(np.asarray(pack_2bit(unpack_2bit(every))), np.asarray(every))
  # code d in bits 2 (d % 4) .. 2 (d % 4) + 1 of byte d // 4 (the stored format)
  assert int(pack_2bit(jnp.array([[-2, -1, 0, 1]], jnp.int8))[0, 0]) == 0 | 1 << 2 | 2 << 4 | 3 << 6
  # checkpoint formats 2-3 held 2-bit codes as int4: the same table either way
  scale = jnp.full((5, 1), 0.5, jnp.float16)
  four, nibbles = (PackedEmbedding(codes=c, scale=scale, zero=None, bits=2)
                   for c in (packed, codes.astype(jnp.int4)))
  four.validate(), nibbles.validate()
  assert four.shape == nibbles.shape == (5, 64)
  np.testing.assert_array_equal(np.asarray(four.dequantize()), np.asarray(nibbles.dequantize()))


@pytest.mark.parametrize("bits", [2, 4])
def test_packed_embedder_equals_gather_of_dequantized_table(bits):
  table = _table(v=64, d=32, dtype=jnp.bfloat16)
  pe = quantize_embedding(table, bits=bits, group_size=16)
  assert pe.dtype == "bfloat16"
  tokens = jnp.array([[0, 5, 63, 5], [1, 2, 3, 62]])
  module = Embedder(vocab_size=64, embed_dim=32, runtime=PackedRuntime())
  enc = lambda t: module.apply({"params": {"input_embedding": t}}, tokens, method=Embedder.encode)
  got = enc(pe)
  want = enc(pe.dequantize().astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 4, 32)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  # and close to the float table
  ref = np.asarray(enc(table), np.float32)
  assert np.abs(np.asarray(got, np.float32) - ref).max() < (0.1 if bits == 4 else 0.4) * np.abs(ref).max()


def test_deterministic_and_abstract_shapes_match():
  table = _table()
  a, b = quantize_embedding(table), quantize_embedding(table)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  abstract = jax.eval_shape(quantize_embedding, jax.ShapeDtypeStruct(table.shape, table.dtype))
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(abstract)] == [
      (x.shape, x.dtype) for x in jax.tree.leaves(a)]


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="bits must be in 2..8"):
    EmbeddingRule(pattern=EMB, bits=16)
  with pytest.raises(ValueError, match="group_size"):
    EmbeddingRule(pattern=EMB, group_size=0)
  with pytest.raises(ValueError, match="scale_dtype"):
    EmbeddingRule(pattern=EMB, scale_dtype="bfloat16")
  with pytest.raises(ValueError, match="not a valid regex"):
    EmbeddingRule(pattern="(")
  with pytest.raises(ValueError, match="clip ratios"):
    EmbeddingRule(pattern=EMB, clip_grid=(1.0, 1.5))
  with pytest.raises(TypeError, match="EmbeddingRule"):
    QuantConfig(embeddings=(LayerRule(pattern=EMB),))
  with pytest.raises(ValueError, match="unknown embedding rule fields"):
    QuantConfig.from_dict({"embeddings": [{"pattern": EMB, "group": 64}]})
  params = demo_params("pi0")
  with pytest.raises(ValueError, match="matches no embedding table"):
    quantize_params(params, QuantConfig(embeddings=(EmbeddingRule(pattern=".*/embedder/oops"),)))
  with pytest.raises(ValueError, match=r"input_embedding: group_size 96 does not divide.*D=256"):
    quantize_params(params, QuantConfig(embeddings=(EmbeddingRule(pattern=EMB, group_size=96),)))
  bad = np.array(_table(v=10, d=8))
  bad[7, 3] = np.nan
  with pytest.raises(ValueError, match=r"2-bit codes are stored four to a byte.*D=6 must be"):
    quantize_embedding(_table(v=4, d=6), bits=2, group_size=None)
  with pytest.raises(ValueError, match="4-bit codes must be stored as int4, got uint8"):
    PackedEmbedding(codes=jnp.zeros((4, 2), jnp.uint8), scale=jnp.ones((4, 1), jnp.float16),
                    zero=None, bits=4).validate()
  with pytest.raises(ValueError, match="NaN or Inf.*row 7"):
    quantize_embedding(jnp.asarray(bad), group_size=None)
  with pytest.raises(ValueError, match="overflow float16"):
    quantize_embedding(_table(v=4, d=8) * 1e8, group_size=None)


@pytest.mark.parametrize("bits", [4, 2])
def test_summary_and_checkpoint_roundtrip(tmp_path, bits):
  """An embedding-only config: bytes counted, bit-exact save / load, the same actions."""
  policy = get_policy("pi0", "demo", runtime=PackedRuntime())
  params = demo_params("pi0")
  cfg = QuantConfig(name="emb", embeddings=(EmbeddingRule(pattern=EMB, bits=bits),))
  packed = quantize_params(params, cfg)
  pe = packed["PaliGemma"]["llm"]["embedder"]["input_embedding"]
  assert isinstance(pe, PackedEmbedding) and pe.shape == (1024, 256)
  s = summarize(packed)
  assert s.layers_quantized == 0 and s.bits == {EMB: bits}
  assert s.weight_bytes_fp == 2 * 1024 * 256
  assert s.weight_bytes_packed == 1024 * 256 * bits // 8 + 2 * 2 * 1024 * 2  # codes + f16 scale and zero
  assert s.tree_bytes_bf16 - s.tree_bytes_packed == s.weight_bytes_fp - s.weight_bytes_packed
  abstract = jax.eval_shape(lambda p: quantize_params(p, cfg), params)
  assert summarize(abstract) == s

  ck.save_packed(tmp_path / "q", packed, cfg, metadata={"created": "2026-11-23T00:00:00+00:00"})
  assert ck.read_info(tmp_path / "q")["format_version"] == (4 if bits == 2 else 2)
  packed2, cfg2, _, meta = ck.load_packed(tmp_path / "q")
  assert cfg2 == cfg and meta["bits"] == {EMB: bits}
  pe2 = packed2["PaliGemma"]["llm"]["embedder"]["input_embedding"]
  assert isinstance(pe2, PackedEmbedding) and (pe2.bits, pe2.dtype) == (pe.bits, pe.dtype)
  for x, y in zip(jax.tree.leaves(pe), jax.tree.leaves(pe2), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  obs = policy.example_observation(jax.random.key(1), batch_size=1)
  f = jax.jit(policy.sample_actions)
  np.testing.assert_array_equal(np.asarray(f(packed, obs, jax.random.key(2))),
                                np.asarray(f(packed2, obs, jax.random.key(2))))


@pytest.fixture(scope="module")
def deploy_pi05():
  """The deploy preset on the pi0.5 demo, calibrated on 2 tiny batches (with SigLIP's linears)."""
  policy = get_policy("pi05", "demo", runtime=PackedRuntime())
  params = demo_params("pi05")
  cfg = get_preset("deploy")
  batches = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]),
                         policy.example_observation(jax.random.key(3), batch_size=2))
  stats = calibrate(policy, params, batches,
                    CalibConfig(select=select_for(cfg, params), progress=False, num_samples=32),
                    rng=jax.random.key(4))
  return policy, params, cfg, stats, quantize_params(params, cfg, stats)


def test_deploy_runs_end_to_end(deploy_pi05):
  policy, params, cfg, stats, packed = deploy_pi05
  llm, img = packed["PaliGemma"]["llm"], packed["PaliGemma"]["img"]
  assert isinstance(llm["embedder"]["input_embedding"], PackedEmbedding)
  assert isinstance(llm["layers"]["attn"]["q_einsum_1"]["w"], PackedLinear)
  block = img["Transformer"]["encoderblock"]
  assert isinstance(block["MultiHeadDotProductAttention_0"]["query"]["kernel"], PackedLinear)
  assert isinstance(block["MlpBlock_0"]["Dense_1"]["kernel"], PackedLinear)
  s = summarize(packed)
  assert s.tree_ratio < summarize(quantize_params(params, QuantConfig())).tree_ratio
  # The full-size byte counts in EVALUATION.md come from jax.eval_shape: it must agree exactly.
  abstract = jax.eval_shape(lambda p: quantize_params(p, cfg, stats), params)
  assert summarize(abstract) == s
  obs = held_out("pi05")
  f = jax.jit(policy.sample_actions)
  a_q = np.asarray(f(packed, obs, jax.random.key(5)))
  a_fp = np.asarray(f(params, obs, jax.random.key(5)))
  assert np.isfinite(a_q).all()
  # Loose: 2 calibration batches; EVALUATION.md has the measured errors with full calibration.
  assert 0 < action_rel_err(a_q, a_fp).mean() < 0.2


def test_shared_input_groups_quantize_their_input_once(deploy_pi05):
  """q / kv of a Gemma attention and SigLIP's query / key / value carry one input group: the model
  runs their online transform and activation quantizer once, with the same actions as running it
  per linear."""
  policy, params, cfg, stats, packed = deploy_pi05
  attn = packed["PaliGemma"]["llm"]["layers"]["attn"]
  q, kv = attn["q_einsum"]["w"], attn["kv_einsum"]["w"]
  assert runtime.share_key(q) is not None and runtime.share_key(q) == runtime.share_key(kv)
  assert runtime.share_key(attn["q_einsum_1"]["w"]) is None  # the expert's weight-only attention
  mha = packed["PaliGemma"]["img"]["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]
  keys = {runtime.share_key(mha[n]["kernel"]) for n in ("query", "key", "value")}
  assert len(keys) == 1 and None not in keys
  assert runtime.share_key(mha["out"]["kernel"]) is None  # reads its input alone

  unshared = jax.tree.map(
      lambda l: l.replace(input_group=None) if isinstance(l, PackedLinear) else l, packed,
      is_leaf=lambda l: isinstance(l, PackedLinear))
  obs = policy.example_observation(jax.random.key(6), batch_size=1)
  f = jax.jit(policy.sample_actions)
  np.testing.assert_allclose(np.asarray(f(packed, obs, jax.random.key(7))),
                             np.asarray(f(unshared, obs, jax.random.key(7))), rtol=1e-5, atol=1e-5)
  # The traced program holds fewer quantizers: count their rounding ops (sub-jaxprs included).
  rounds = lambda tree: _count_primitive(
      jax.make_jaxpr(policy.sample_actions)(tree, obs, jax.random.key(7)).jaxpr, "round")
  q0 = jax.tree.map(lambda a: a[0], q)  # one layer of the stack
  per_quantizer = _count_primitive(jax.make_jaxpr(functools.partial(runtime.quantize_input, q0))(
      jnp.ones((4, q.in_features), jnp.float32)).jaxpr, "round")
  saved = rounds(unshared) - rounds(packed)
  assert per_quantizer > 0 and saved > 0 and saved % per_quantizer == 0


def test_weight_only_group_transforms_its_input_once(deploy_pi05):
  """Weight-only linears behind a rotation (SigLIP's query / key / value in `deploy`)
  share the rotated input like W4A8 groups share their quantizer: one transform per group, the
  same prefix tokens as one per linear."""
  policy, _, _, _, packed = deploy_pi05
  mha = packed["PaliGemma"]["img"]["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]
  keys = {runtime.share_key(mha[n]["kernel"]) for n in ("query", "key", "value")}
  assert len(keys) == 1 and None not in keys and mha["query"]["kernel"].act_bits is None
  img = jax.tree.map(  # SigLIP's linears each transforming their input alone
      lambda l: l.replace(input_group=None) if isinstance(l, PackedLinear) else l,
      packed["PaliGemma"]["img"], is_leaf=lambda l: isinstance(l, PackedLinear))
  unshared = {**packed, "PaliGemma": {**packed["PaliGemma"], "img": img}}
  obs = policy.example_observation(jax.random.key(6), batch_size=1)

  @jax.jit
  def prefix(tree):  # SigLIP's tokens and the prompt's: where the groups are
    with policy.runtime.context():
      return policy.module.apply(policy.runtime.variables(tree), obs,
                                 method=Pi0.embed_prefix)[0]
  np.testing.assert_array_equal(np.asarray(prefix(packed)), np.asarray(prefix(unshared)))
  # Two transforms fewer in the traced program (key and value reuse the query's): count gathers.
  gathers = lambda tree: _count_primitive(
      jax.make_jaxpr(policy.sample_actions)(tree, obs, jax.random.key(7)).jaxpr, "gather")
  q0 = jax.tree.map(lambda a: a[0], mha["query"]["kernel"])
  per_transform = _count_primitive(jax.make_jaxpr(functools.partial(runtime.quantize_input, q0))(
      jnp.ones((4, q0.in_features), jnp.float32)).jaxpr, "gather")
  assert per_transform > 0 and gathers(unshared) - gathers(packed) == 2 * per_transform


def _count_primitive(jaxpr, name: str) -> int:
  """Occurrences of primitive `name` in a jaxpr, sub-jaxprs (scan, cond, pjit bodies) included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          n += _count_primitive(inner, name)
  return n
