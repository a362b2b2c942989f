"""`openpi_runtime`: openpi-contract linen modules (params created by shape in `setup()`) run packed
leaves under the interceptor, and an NNX model holding them through `nnx_bridge.ToNNX` loads them.

openpi is not on the package index: the modules below are written here from openpi's module
contract (`lora.Einsum`: param `w`, `__call__(eqn, x)`, optional LoRA `lora_a` / `lora_b`;
`lora.FeedForward`: `gating_einsum` (2, D, F), `linear` (F, D), gelu(gate) * up; `Embedder`:
`input_embedding` (V, D), `encode`), under openpi's param paths so the library's layouts apply.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge as nnx_bridge

from duquant_jax import (EmbeddingRule, LayerRule, PackedEmbedding, PackedLinear, QuantConfig,
                         quantize_params, quantized_apply)
from duquant_jax.models import gemma as our_gemma
from duquant_jax.openpi_runtime import load_into_openpi, openpi_interceptor, run_packed_in_openpi
from duquant_jax.runtime import Execution, PackedRuntime

D, F, N, H, L, V = 32, 64, 2, 16, 2, 50  # width, MLP hidden, heads, head dim, layers, vocabulary
OURS = PackedRuntime()  # what our own modules (`ours`) apply their weights with
ACT = dict(rotation="hadamard", permutation="none", smooth_alpha=None,  # no calibration needed
           clip_search=False)


def _cfg(bits: int) -> QuantConfig:
  """W{bits}A8 on every Gemma linear and the Dense head, the token table weight-only at `bits`."""
  return QuantConfig(
      rules=(LayerRule(pattern=r"PaliGemma/(llm/layers/.*|head/kernel)", weight_bits=bits,
                       block_size=16, **ACT),),
      embeddings=(EmbeddingRule(pattern=r"PaliGemma/llm/embedder/input_embedding", bits=bits,
                                group_size=16),))


def _lora_eqns(eqn: str) -> tuple[str, str]:
  """x W with W's last two axes (a, b) factored as A (.., a, R) B (.., R, b)."""
  lhs, out = eqn.split("->")
  x, w = lhs.split(",")
  a, b = w[-2], w[-1]
  mid = out.replace(b, "R")
  return f"{x},{w.replace(b, 'R')}->{mid}", f"{mid},{w.replace(a, 'R')}->{out}"


class Einsum(nn.Module):
  """openpi's einsum contract: `w` of `shape` created in setup(), optional rank-R LoRA."""

  shape: tuple[int, ...]
  lora_rank: int = 0

  def setup(self):
    self.w = self.param("w", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1), self.shape)
    if self.lora_rank:
      self.w_a = self.param("lora_a", nn.initializers.normal(0.01),
                            self.shape[:-1] + (self.lora_rank,))
      self.w_b = self.param("lora_b", nn.initializers.normal(0.01),
                            self.shape[:-2] + (self.lora_rank, self.shape[-1]))

  def __call__(self, eqn: str, x: jax.Array, memo=None) -> jax.Array:  # memo: our Gemma passes one
    y = jnp.einsum(eqn, x, self.w.astype(x.dtype))
    if self.lora_rank:
      eqn_a, eqn_b = _lora_eqns(eqn)
      y = y + jnp.einsum(eqn_b, jnp.einsum(eqn_a, x, self.w_a.astype(x.dtype)),
                         self.w_b.astype(x.dtype))
    return y


class FeedForward(nn.Module):
  """openpi's gated-MLP contract: (2, D, F) gate / up and (F, D) down, created in setup()."""

  features: int
  hidden_dim: int

  def setup(self):
    init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1)
    self.w_gating = self.param("gating_einsum", init, (2, self.features, self.hidden_dim))
    self.w_linear = self.param("linear", init, (self.hidden_dim, self.features))

  def __call__(self, x: jax.Array) -> jax.Array:
    g = self.w_gating.astype(x.dtype)
    return jnp.dot(nn.gelu(jnp.dot(x, g[0])) * jnp.dot(x, g[1]), self.w_linear.astype(x.dtype))


class Embedder(nn.Module):
  """openpi's embedder contract: `input_embedding` (V, D) created in setup(); `encode`."""

  vocab_size: int
  embed_dim: int

  def setup(self):
    self.input_embedding_table = self.param("input_embedding", nn.initializers.normal(),
                                            (self.vocab_size, self.embed_dim))

  def encode(self, tokens: jax.Array) -> jax.Array:
    x = self.input_embedding_table[(tokens,)]
    return x * jnp.sqrt(self.embed_dim).astype(x.dtype)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = self.param("scale", nn.initializers.normal(0.1), (x.shape[-1],))
    return (x * jax.lax.rsqrt(var + 1e-6) * (1 + scale)).astype(x.dtype)


class Attention(nn.Module):
  """Multi-query attention (one kv head) over (B, T, D)."""

  lora_rank: int = 0
  ours: bool = False

  @nn.compact
  def __call__(self, x):
    ein = (functools.partial(our_gemma.Einsum, runtime=OURS) if self.ours
           else functools.partial(Einsum, lora_rank=self.lora_rank))
    q = ein((N, D, H), name="q_einsum")("BTD,NDH->BTNH", x)
    k, v = ein((2, 1, D, H), name="kv_einsum")("BSD,2KDH->2BSKH", x)
    p = jax.nn.softmax(jnp.einsum("BTNH,BSH->BNTS", q, k[:, :, 0]) * H**-0.5, axis=-1)
    o = jnp.einsum("BNTS,BSH->BTNH", p, v[:, :, 0])
    return ein((N, H, D), name="attn_vec_einsum")("BTNH,NHD->BTD", o)


class Block(nn.Module):
  """A pre-norm layer, (B, T, D) -> (B, T, D). `ours`: our own weight()-aware modules
  (`models.gemma`) in place of the contract ones: the library applying the packed weights itself."""

  lora_rank: int = 0
  ours: bool = False

  @nn.compact
  def __call__(self, x, _):
    x = x + Attention(self.lora_rank, self.ours, name="attn")(RMSNorm(name="pre_attention_norm")(x))
    ff = functools.partial(our_gemma.FeedForward, runtime=OURS) if self.ours else FeedForward
    return x + ff(D, F, name="mlp")(RMSNorm(name="pre_ffw_norm")(x)), None


class Llm(nn.Module):
  """Embedder + `nn.scan`-ed layers: params under embedder/ and layers/ as in openpi's Gemma."""

  lora_rank: int = 0
  ours: bool = False

  def setup(self):
    self.embedder = (functools.partial(our_gemma.Embedder, runtime=OURS) if self.ours
                     else Embedder)(V, D)
    self.layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                          length=L)(self.lora_rank, self.ours)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.layers(self.embedder.encode(tokens), None)[0]


class PaliGemma(nn.Module):
  """tokens (B, T) -> (B, T, 8); params under PaliGemma/llm/... and a Dense `head`."""

  lora_rank: int = 0
  ours: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    y = Llm(self.lora_rank, self.ours, name="llm")(tokens)
    return nn.Dense(8, name="head")(y)  # a flax Dense, as SigLIP's


def _model(**kw):
  """Wrapped so the params sit under 'PaliGemma' like openpi's."""
  class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      return PaliGemma(name="PaliGemma", **kw)(tokens)
  return Model()


TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, V)


@pytest.fixture(scope="module")
def float_params():
  return jax.jit(_model().init)(jax.random.key(0), TOKENS)["params"]  # eager init: 2x slower


@pytest.fixture(scope="module")
def packed(float_params):
  return quantize_params(float_params, _cfg(4))


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_contract_modules_run_packed_leaves(float_params, packed):
  """(a) contract modules on packed leaves == our own modules on them; (b) near the float model."""
  leaves = jax.tree.leaves(packed, is_leaf=lambda x: isinstance(x, (PackedLinear, PackedEmbedding)))
  assert sum(isinstance(x, PackedLinear) for x in leaves) == 6
  assert sum(isinstance(x, PackedEmbedding) for x in leaves) == 1
  with pytest.raises(Exception):  # what openpi users hit today (shape check, or a table gather)
    _model().apply({"params": packed}, TOKENS)
  ours = quantized_apply(_model(ours=True), {"params": packed}, TOKENS)
  with run_packed_in_openpi():
    got = _model().apply({"params": packed}, TOKENS)
  np.testing.assert_allclose(got, ours, rtol=1e-5, atol=1e-5)
  # Near the float model: W8A8 with an int8 table within 3% (measured 1.1%; at W4A8 and an int4
  # table this random 2-layer model is 42% off, 31% of it the table, too coarse a check).
  ref = _model().apply({"params": float_params}, TOKENS)
  with run_packed_in_openpi():
    w8 = _model().apply({"params": quantize_params(float_params, _cfg(8))}, TOKENS)
  assert _rel(w8, ref) < 0.03


def test_float_leaves_run_their_own_code(float_params):
  """(d) float leaves, alone or beside packed ones, run the modules' own code."""
  ref = _model().apply({"params": float_params}, TOKENS)
  with run_packed_in_openpi():
    np.testing.assert_array_equal(_model().apply({"params": float_params}, TOKENS), ref)
    # Only the MLPs packed: the attention einsums and the table stay float.
    mlp_only = quantize_params(float_params, QuantConfig(rules=(
        LayerRule(pattern=r"PaliGemma/llm/layers/mlp/.*", block_size=16, **ACT),)))
    got = _model().apply({"params": mlp_only}, TOKENS)
  np.testing.assert_allclose(got, _model(ours=True).apply({"params": mlp_only}, TOKENS),
                             rtol=1e-5, atol=1e-5)


def test_lora_beside_a_packed_weight_is_refused(packed):
  """(c) LoRA must be merged before quantizing: a packed w with lora_a / lora_b is an error."""
  params = jax.eval_shape(_model(lora_rank=2).init, jax.random.key(0), TOKENS)["params"]
  lora = params["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"]
  assert set(lora) == {"w", "lora_a", "lora_b"}
  with_lora = jax.tree.map(lambda x: x, packed)  # copies the dicts
  q = with_lora["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"]
  q.update(lora_a=jnp.zeros(lora["lora_a"].shape), lora_b=jnp.zeros(lora["lora_b"].shape))
  with run_packed_in_openpi(), pytest.raises(
      ValueError, match=r"layers/attn/q_einsum: LoRA params \['lora_a', 'lora_b'\] beside packed"):
    _model(lora_rank=2).apply({"params": with_lora}, TOKENS)


def test_unsupported_methods_and_calls_are_refused(packed):
  class Tied(Embedder):  # a tied-embedding decode of a packed table is not built
    def decode(self, x):
      return jnp.dot(x, self.input_embedding_table.T)

  class Decode(nn.Module):
    def setup(self):
      self.embedder = Tied(V, D)

    def __call__(self, x):
      return self.embedder.decode(x)

  table = {"embedder": packed["PaliGemma"]["llm"]["embedder"]}
  with run_packed_in_openpi(), pytest.raises(NotImplementedError, match=r"embedder.decode"):
    Decode().apply({"params": table}, jnp.ones((1, D)))

  w = jax.tree.map(lambda a: a[0], packed["PaliGemma"]["llm"]["layers"]["mlp"]["linear"])
  class NoEqn(nn.Module):  # a packed `w` called without an einsum string
    @nn.compact
    def __call__(self, x):
      return Einsum((F, D), name="e")(x)
  with nn.intercept_methods(openpi_interceptor), pytest.raises(ValueError, match="e/w is packed"):
    NoEqn().apply({"params": {"e": {"w": w}}}, jnp.ones((1, 2, F)))


class TinyPi(nnx.Module):
  """An NNX model as openpi's Pi0 is built: linen LLM through `nnx_bridge.ToNNX`, NNX head."""

  def __init__(self, rngs: nnx.Rngs):
    llm = nnx_bridge.ToNNX(Llm(), rngs=rngs)
    llm.lazy_init(TOKENS)
    self.PaliGemma = nnx.Dict(llm=llm)
    self.action_out_proj = nnx.Linear(D, 4, rngs=rngs)

  def __call__(self, tokens):
    return self.action_out_proj(self.PaliGemma["llm"](tokens))


@dataclasses.dataclass(frozen=True)
class TinyPiConfig:
  def create(self, rng):
    return TinyPi(nnx.Rngs(rng))


def test_nnx_bridge_model_loads_and_runs_packed_params():
  """openpi's load path (eval_shape, structure check, replace_by_pure_dict) with packed leaves;
  the loaded model under `nnx.jit` matches the linen contract model on the same leaves."""
  fresh = TinyPiConfig().create(jax.random.key(0))
  params = nnx.to_pure_dict(nnx.state(fresh))
  packed = quantize_params(params, _cfg(4))
  run = nnx.jit(lambda m, t: m(t))
  with run_packed_in_openpi():
    got = run(load_into_openpi(TinyPiConfig(), packed), TOKENS)
    again = run(load_into_openpi(fresh, packed), TOKENS)  # a built model's params replaced
    llm = Llm().apply({"params": packed["PaliGemma"]["llm"]}, TOKENS)
  head = packed["action_out_proj"]
  np.testing.assert_allclose(got, llm @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(again, got)

  bad = quantize_params(params, QuantConfig(rules=(
      LayerRule(pattern="action_out_proj/kernel", block_size=16, **ACT),)))
  with pytest.raises(ValueError, match=r"action_out_proj/kernel: a packed weight in an NNX module"):
    load_into_openpi(TinyPiConfig(), bad)
  missing = {**packed, "action_out_proj": {"kernel": head["kernel"]}}
  with pytest.raises(ValueError, match=r"action_out_proj/bias: missing from params"):
    load_into_openpi(TinyPiConfig(), missing)
  wrong = {**packed, "action_out_proj": {**head, "bias": jnp.zeros(5)}}
  with pytest.raises(ValueError, match=r"action_out_proj/bias: shape \(5,\) but the openpi model"):
    load_into_openpi(TinyPiConfig(), wrong)
  extra = {**packed, "extra": packed["PaliGemma"]["llm"]["layers"]["mlp"]["linear"]}
  with pytest.raises(ValueError, match=r"extra: not a param of the openpi model"):
    load_into_openpi(TinyPiConfig(), extra)


def _taking_runtime(cls: type) -> type:
  """A contract module with the `runtime` field our Gemma hands its modules, unused: the
  interceptor runs the packed weights."""
  return type(cls.__name__, (cls,), {"__annotations__": {"runtime": Any}, "runtime": None,
                                     "__module__": __name__})


def test_our_policy_with_contract_modules_matches_its_packed_actions(monkeypatch):
  """Our demo pi0 with its Gemma's einsum, MLP and embedder modules swapped for the contract
  ones (which know nothing of packed weights), run under the interceptor, samples the same
  actions from the packed tree as the policy itself (SigLIP's Dense layers packed too)."""
  from conftest import demo_params
  from duquant_jax.config import EMBEDDING, EXPERT_ATTN, EXPERT_MLP, LLM, SIGLIP
  from duquant_jax.models import get_policy
  # openpi's layer scan slices every layer param, and its modules read them in setup(): our model
  # stands in for it with the packed weights sliced per layer, not read in place.
  policy = get_policy("pi0", "demo", runtime=PackedRuntime(Execution(stacked_in_place=False)))
  rule = dict(block_size=16, **ACT)
  cfg = QuantConfig(rules=tuple(LayerRule(pattern=p, **rule)
                                for p in (LLM, EXPERT_MLP, EXPERT_ATTN, SIGLIP)),
                    embeddings=(EmbeddingRule(pattern=EMBEDDING, bits=4, group_size=64),))
  packed = quantize_params(demo_params("pi0"), cfg)
  obs = policy.example_observation(jax.random.key(1), batch_size=1)
  ours = jax.jit(policy.sample_actions)(packed, obs, jax.random.key(2))
  for name, cls in (("Einsum", Einsum), ("FeedForward", FeedForward), ("Embedder", Embedder)):
    monkeypatch.setattr(our_gemma, name, _taking_runtime(cls))
  with pytest.raises(TypeError):  # the contract modules alone cannot read packed leaves
    jax.jit(policy.sample_actions)(packed, obs, jax.random.key(2))
  with run_packed_in_openpi():
    got = jax.jit(policy.sample_actions)(packed, obs, jax.random.key(2))
  np.testing.assert_allclose(got, ours, rtol=1e-5, atol=1e-5)  # measured: identical
