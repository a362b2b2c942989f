"""`Pi0Config.attention`: the fused forms compute openpi's einsum attention, calibration keeps the
einsum form, and (on a GPU) cuDNN flash attention matches it in bf16."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax.models import get_config, get_policy, make_attn_mask
from duquant_jax.models.config import GEMMA
from duquant_jax.models.gemma import Attention
from duquant_jax.models.pi0 import Pi0

from conftest import demo_params

ON_GPU = jax.default_backend() == "gpu"
# jax asks for the cuDNN version while tracing a cudnn call, so it cannot even be exported for
# CUDA from a machine without one.
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN attention traces only where cuDNN is")


def _actions(policy, params, obs, num_steps=2):
  # Full float32 dots: a GPU runs them in TF32 by default, and the two forms' dots differ in shape.
  with jax.default_matmul_precision("highest"):
    run = jax.jit(policy.sample_actions, static_argnames="num_steps")
    return np.asarray(run(params, obs, jax.random.key(5), num_steps=num_steps), np.float32)


def test_xla_attention_equals_einsum(demo, demo_obs):
  """Same params, obs and noise: float32 rounding apart (measured on the CPU: max abs diff 9.5e-6
  of actions up to 4.9 for pi0, 2.5e-6 of 6.0 for pi0.5)."""
  policy, params = demo
  fused = get_policy(policy.cfg.name, "demo", attention="xla")
  a, b = _actions(policy, params, demo_obs), _actions(fused, params, demo_obs)
  np.testing.assert_allclose(b, a, atol=2e-5 * np.abs(a).max(), rtol=0)


def test_xla_attention_equals_einsum_packed():
  """The same through the packed runtime (measured: 4.5e-6 of 5.0)."""
  from duquant_jax.config import get_preset
  from duquant_jax.quantize import quantize_params
  from duquant_jax.runtime import PackedRuntime
  packed = quantize_params(demo_params("pi0"), get_preset("w4a8-rtn"))
  policy = get_policy("pi0", "demo", runtime=PackedRuntime())
  fused = get_policy("pi0", "demo", attention="xla", runtime=PackedRuntime())
  obs = policy.example_observation(jax.random.key(1), batch_size=2)
  a, b = _actions(policy, packed, obs), _actions(fused, packed, obs)
  np.testing.assert_allclose(b, a, atol=2e-5 * np.abs(a).max(), rtol=0)


def test_bad_attention_is_named():
  with pytest.raises(ValueError, match="attention must be one of"):
    get_config("pi0", "demo", attention="flash")
  with pytest.raises(ValueError, match="attention='cudnn' needs dtype bfloat16"):
    get_config("pi0", "demo", attention="cudnn")  # the demo computes in float32
  assert get_config("pi0", "full", attention="cudnn").attention == "cudnn"


def _prefix_and_step(policy, params, obs, mutable):
  """fill_cache, then one flow step, with "intermediates" mutable or not -> (velocity, (what
  each sowed))."""
  def apply(*args, method):
    out = policy.module.apply({"params": params}, *args, method=method,
                              mutable=["intermediates"] if mutable else False)
    return out if mutable else (out, {})
  (kv, mask), s0 = apply(obs, method=Pi0.fill_cache)
  x = jnp.zeros((obs.state.shape[0], policy.cfg.action_horizon, policy.cfg.action_dim))
  v, s1 = apply(obs, kv, mask, x, jnp.ones(x.shape[:1]), method=Pi0.velocity)
  return v, (s0, s1)


def test_calibration_runs_the_einsum_attention():
  """While "intermediates" is mutable (calibration), every attention form traces the einsum
  program, so the logits are sown, and attention balancing reads the same statistics."""
  from duquant_jax.attention_balance import attention_moments, attention_paths
  params = demo_params("pi0")
  einsum, fused = get_policy("pi0", "demo"), get_policy("pi0", "demo", attention="xla")
  obs = einsum.example_observation(jax.random.key(1), batch_size=1)
  jaxpr = lambda p, mutable: str(jax.make_jaxpr(
      lambda params: _prefix_and_step(p, params, obs, mutable))(params))
  assert jaxpr(fused, True) == jaxpr(einsum, True)
  assert jaxpr(fused, False) != jaxpr(einsum, False)
  # cuDNN is never reached while calibrating: this traces on any machine.
  cudnn = get_policy("pi0", "demo", dtype="bfloat16", attention="cudnn")
  _, (s0, s1) = jax.eval_shape(lambda p: _prefix_and_step(cudnn, p, obs, True), params)
  assert s0["intermediates"]["PaliGemma"]["llm"]["layers"]["attn"]["logits"][0].shape == (
      3, 1, 1, 4, cudnn.cfg.prefix_len, cudnn.cfg.prefix_len)
  assert "logits_1" in s1["intermediates"]["PaliGemma"]["llm"]["layers"]["attn"]

  # Attention balancing reads those logits: both experts' statistics, the tree against itself.
  batches = jax.tree.map(lambda x: x[None], obs)
  moments = attention_moments(fused, params, params, batches, rng=jax.random.key(0),
                              experts=(0, 1), num_steps=1)
  assert {attention_paths(0)[0], attention_paths(1)[0]} <= set(moments)
  for path, m in moments.items():
    assert np.all(np.asarray(m.xx) > 0), path
    np.testing.assert_array_equal(np.asarray(m.xx), np.asarray(m.rr))


PREFIX, SUFFIX = 816, 51  # pi0's prefix (3 images and 48 prompt tokens) and flow-step tokens


def _flow_step_case(batch: int):
  """gemma_300m's attention (N 8, K 1, H 256) on one pi0 flow step in bf16: 51 query tokens
  against 816 cached prefix tokens, of which the last 30 x (b + 1) of row b are padding (holding
  values of 100, so that any attention they get shows) -> (params, args of Attention)."""
  cfg = GEMMA["gemma_300m"]
  kx, kc, kp = jax.random.split(jax.random.key(batch), 3)
  x = jax.random.normal(kx, (batch, SUFFIX, cfg.width), jnp.bfloat16)
  k, v = 2 * jax.random.normal(kc, (2, batch, PREFIX, 1, cfg.head_dim))
  valid = jnp.arange(PREFIX)[None] < PREFIX - 30 * jnp.arange(1, batch + 1)[:, None]
  v = jnp.where(valid[..., None, None], v, 100.0)
  suffix = make_attn_mask(jnp.ones((batch, SUFFIX), bool), jnp.arange(SUFFIX) < 2)
  mask = jnp.concatenate([jnp.broadcast_to(valid[:, None], (batch, SUFFIX, PREFIX)), suffix], -1)
  positions = jnp.sum(valid, axis=-1, keepdims=True) + jnp.arange(SUFFIX)
  cache = (k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
  args = ([x], positions, mask, cache)
  return Attention((cfg,)).init(kp, *args), args


@needs_gpu
@pytest.mark.parametrize("batch", [1, 2])
def test_cudnn_attention_equals_einsum_in_bf16(batch):
  """Within 2% of the output's largest magnitude: about 5x what the bf16 einsum form itself
  is from a float32 computation (0.4%, CPU), and far below a padding leak (30-60x)."""
  params, args = _flow_step_case(batch)
  run = lambda a: np.asarray(jax.jit(lambda p, *xs: Attention(
      (GEMMA["gemma_300m"],), attention=a).apply(p, *xs)[0][0])(params, *args), np.float32)
  ref, got = run("einsum"), run("cudnn")
  np.testing.assert_allclose(got, ref, atol=2e-2 * np.abs(ref).max(), rtol=0)


@needs_gpu
def test_cudnn_policy_runs_flash_attention():
  """The whole bf16 demo policy: Gemma (prefix and flow steps) and SigLIP call cuDNN, and the
  actions move from the einsum form's by less than twice what bf16 moves them from float32."""
  params = demo_params("pi0")
  cudnn = get_policy("pi0", "demo", dtype="bfloat16", attention="cudnn")
  obs = cudnn.example_observation(jax.random.key(1), batch_size=2)
  text = jax.jit(cudnn.sample_actions).lower(params, obs, jax.random.key(5)).as_text()
  assert re.search(r"@__cudnn\$fmhaScaleBiasSoftmax\b", text)  # Gemma: the mask, as a bias
  assert re.search(r"@__cudnn\$fmhaSoftmax\b", text)  # SigLIP: no mask
  f32 = _actions(get_policy("pi0", "demo"), params, obs)
  bf16 = _actions(get_policy("pi0", "demo", dtype="bfloat16"), params, obs)
  got = _actions(cudnn, params, obs)
  assert np.abs(got - bf16).max() <= 2 * np.abs(bf16 - f32).max()
