"""pi0 / pi0.5 flow-matching policy in openpi's param layout, and `sample_actions`.

Follows openpi's `models/pi0.py`: the prefix (3 images through SigLIP, then the text prompt) runs
through the Gemma LLM once to fill a KV cache; each of `num_steps` Euler steps of the flow ODE
(t from 1 to 0) runs only the action expert on the suffix (pi0: state token + action tokens), attending
to the cache, and predicts the velocity v_t; x_{t+dt} = x_t + dt v_t with dt = -1 / num_steps.

The policy's `runtime` (`models.runtime.Runtime`) applies the weights: float einsums by default;
`Policy(cfg, runtime=duquant_jax.runtime.PackedRuntime())` runs packed (quantized) param trees.

Axes: B batch, T prefix tokens, A action horizon, S suffix tokens, D width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from duquant_jax.models.config import IMAGE_KEYS, Pi0Config
from duquant_jax.models.gemma import Gemma
from duquant_jax.models.observation import (Observation, as_observation, make_observation,
                                            validate_observation)
from duquant_jax.models.runtime import FloatRuntime, Runtime
from duquant_jax.models.siglip import SigLIP

Params = dict[str, Any]


def make_attn_mask(input_mask: jax.Array, mask_ar: jax.Array) -> jax.Array:
  """(B, N) token validity and (B, N) or (N,) "starts a new causal block" flags -> (B, N, N) mask."""
  mask_ar = jnp.broadcast_to(mask_ar, input_mask.shape)
  cumsum = jnp.cumsum(mask_ar, axis=1)
  attn_mask = cumsum[:, None, :] <= cumsum[:, :, None]
  valid = input_mask[:, None, :] * input_mask[:, :, None]
  return jnp.logical_and(attn_mask, valid)


def posemb_sincos(pos: jax.Array, dim: int, min_period: float, max_period: float) -> jax.Array:
  """Sine-cosine embedding (B,) -> (B, dim) of scalar positions (the flow time)."""
  fraction = jnp.linspace(0.0, 1.0, dim // 2)
  period = min_period * (max_period / min_period) ** fraction
  x = jnp.einsum("i,j->ij", pos, 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


class PaliGemma(nn.Module):
  cfg: Pi0Config
  runtime: Runtime = FloatRuntime()

  def setup(self):
    c = self.cfg
    self.llm = Gemma(configs=(c.llm, c.expert), vocab_size=c.vocab_size,
                     unroll_layers=c.unroll_layers, runtime=self.runtime, attention=c.attention,
                     name="llm")
    self.img = SigLIP(c.vision, out_dim=c.llm.width, unroll_layers=c.unroll_layers,
                      dtype_mm=c.dtype, attention=c.attention, name="img")


class Pi0(nn.Module):
  """The policy network. Methods are applied with `Pi0(cfg).apply(..., method=...)`; `runtime`
  applies the Gemma weights (`models.runtime`)."""

  cfg: Pi0Config
  runtime: Runtime = FloatRuntime()

  def setup(self):
    c = self.cfg
    w = c.expert.width
    self.PaliGemma = PaliGemma(c, self.runtime)
    self.action_in_proj = nn.Dense(w, name="action_in_proj")
    self.action_out_proj = nn.Dense(c.action_dim, name="action_out_proj")
    if c.pi05:
      self.time_mlp_in = nn.Dense(w, name="time_mlp_in")
      self.time_mlp_out = nn.Dense(w, name="time_mlp_out")
    else:
      self.state_proj = nn.Dense(w, name="state_proj")
      self.action_time_mlp_in = nn.Dense(w, name="action_time_mlp_in")
      self.action_time_mlp_out = nn.Dense(w, name="action_time_mlp_out")

  @property
  def dtype(self):
    return jnp.dtype(self.cfg.dtype)

  def embed_prefix(self, obs: Observation):
    """-> tokens (B, T, D_llm), input mask (B, T), autoregressive flags (T,) (all False: bidirectional)."""
    tokens, masks = [], []
    # One SigLIP call over all cameras' images (the same per-image math as openpi's call per
    # camera): a third of the kernels, and batch-3 GEMMs for the tower's linears.
    b = obs.images[IMAGE_KEYS[0]].shape[0]
    imgs = self.PaliGemma.img(jnp.concatenate([obs.images[k] for k in IMAGE_KEYS], axis=0))
    for i, key in enumerate(IMAGE_KEYS):
      img = imgs[i * b:(i + 1) * b]
      tokens.append(img)
      masks.append(jnp.broadcast_to(obs.image_masks[key][:, None], img.shape[:2]))
    tokens.append(self.PaliGemma.llm.embed(obs.tokenized_prompt))
    masks.append(obs.tokenized_prompt_mask)
    tokens = jnp.concatenate(tokens, axis=1).astype(self.dtype)
    mask = jnp.concatenate(masks, axis=1)
    return tokens, mask, jnp.zeros((tokens.shape[1],), bool)

  def embed_suffix(self, obs: Observation, x_t: jax.Array, t: jax.Array):
    """noisy actions x_t (B, A, action_dim) at time t (B,) -> tokens (B, S, D), mask, ar flags, adarms cond."""
    c = self.cfg
    w = c.expert.width
    tokens, ar = [], []
    if not c.pi05:
      tokens.append(self.state_proj(obs.state)[:, None, :])
      ar.append(jnp.ones((1,), bool))
    action_tokens = self.action_in_proj(x_t)
    time_emb = posemb_sincos(t, w, min_period=4e-3, max_period=4.0)
    if c.pi05:
      cond = nn.swish(self.time_mlp_out(nn.swish(self.time_mlp_in(time_emb))))
      expert_tokens = action_tokens
    else:
      cond = None
      time_tokens = jnp.broadcast_to(time_emb[:, None, :], action_tokens.shape)
      h = self.action_time_mlp_in(jnp.concatenate([action_tokens, time_tokens], axis=-1))
      expert_tokens = self.action_time_mlp_out(nn.swish(h))
    tokens.append(expert_tokens)
    ar.append(jnp.arange(c.action_horizon) == 0)
    tokens = jnp.concatenate(tokens, axis=1).astype(self.dtype)
    mask = jnp.ones(tokens.shape[:2], bool)
    cond = None if cond is None else cond.astype(self.dtype)
    return tokens, mask, jnp.concatenate(ar), cond

  def fill_cache(self, obs: Observation):
    """Runs the prefix through the LLM -> (kv cache (k, v) each (L, B, T, K, H), prefix mask (B, T))."""
    tokens, mask, ar = self.embed_prefix(obs)
    attn_mask = make_attn_mask(mask, ar)
    positions = jnp.cumsum(mask, axis=1) - 1
    _, kv_cache = self.PaliGemma.llm([tokens, None], positions=positions, attn_mask=attn_mask)
    return kv_cache, mask

  def velocity(self, obs: Observation, kv_cache, prefix_mask, x_t, t):
    """One flow step of the expert on the suffix, attending to the cached prefix -> v_t (B, A, action_dim)."""
    tokens, mask, ar, cond = self.embed_suffix(obs, x_t, t)
    s = tokens.shape[1]
    suffix_attn = make_attn_mask(mask, ar)
    prefix_attn = jnp.broadcast_to(prefix_mask[:, None, :], (mask.shape[0], s, prefix_mask.shape[1]))
    attn_mask = jnp.concatenate([prefix_attn, suffix_attn], axis=-1)
    positions = jnp.sum(prefix_mask, axis=-1)[:, None] + jnp.cumsum(mask, axis=-1) - 1
    (_, out), _ = self.PaliGemma.llm([None, tokens], positions=positions, attn_mask=attn_mask,
                                     kv_cache=kv_cache, adarms_cond=[None, cond])
    return self.action_out_proj(out[:, -self.cfg.action_horizon:]).astype(jnp.float32)

  def velocity_no_cache(self, obs: Observation, x_t, t):
    """The same velocity computed by one joint pass over prefix and suffix (reference for tests)."""
    p_tokens, p_mask, p_ar = self.embed_prefix(obs)
    s_tokens, s_mask, s_ar, cond = self.embed_suffix(obs, x_t, t)
    mask = jnp.concatenate([p_mask, s_mask], axis=1)
    ar = jnp.concatenate([p_ar, s_ar])
    attn_mask = make_attn_mask(mask, ar)
    positions = jnp.cumsum(mask, axis=1) - 1
    (_, out), _ = self.PaliGemma.llm([p_tokens, s_tokens], positions=positions, attn_mask=attn_mask,
                                     adarms_cond=[None, cond])
    return self.action_out_proj(out[:, -self.cfg.action_horizon:]).astype(jnp.float32)

  def __call__(self, obs: Observation, x_t, t):
    """Used by `init`: touches every param (prefix, cache, and one suffix step)."""
    kv_cache, prefix_mask = self.fill_cache(obs)
    return self.velocity(obs, kv_cache, prefix_mask, x_t, t)


def flow_times(num_steps: int) -> jax.Array:
  """(num_steps,) times t_i = 1 - i / num_steps of the Euler steps."""
  return 1.0 - jnp.arange(num_steps, dtype=jnp.float32) / num_steps


@dataclasses.dataclass(frozen=True)
class Policy:
  """A pi0 / pi0.5 policy of a given config: init, and jittable `sample_actions`.

  `runtime` applies the weights (`models.runtime.Runtime`): float einsums by default; packed trees
  run with `duquant_jax.runtime.PackedRuntime` (which runs float trees too).

  Example:
    policy = Policy(get_config("pi0", "demo"))
    params = policy.init(jax.random.key(0))
    obs = policy.example_observation(jax.random.key(1), batch_size=2)
    actions = jax.jit(policy.sample_actions)(params, obs, jax.random.key(2))  # (2, 50, 32)
  """

  cfg: Pi0Config
  runtime: Runtime = FloatRuntime()

  @property
  def module(self) -> Pi0:
    return Pi0(self.cfg, self.runtime)

  def example_observation(self, rng: jax.Array, batch_size: int = 1) -> Observation:
    return make_observation(self.cfg, rng, batch_size)

  def init(self, rng: jax.Array, batch_size: int = 1) -> Params:
    """Fresh params (float32, openpi's init: zero adaptive-norm and vision-head Dense layers)."""
    obs = make_observation(self.cfg, jax.random.key(0), batch_size)
    x_t = jnp.zeros((batch_size, self.cfg.action_horizon, self.cfg.action_dim))
    t = jnp.ones((batch_size,))
    # Jitted: flax's eager init dispatches thousands of small ops (20 s on 2 cores for the demo).
    return jax.jit(self.module.init)(rng, obs, x_t, t)["params"]

  def param_shapes(self) -> Params:
    """Shapes and dtypes of the params, without allocating them (`jax.eval_shape`)."""
    return jax.eval_shape(self.init, jax.random.key(0))

  def _check(self, params: Params, obs: Observation) -> None:
    validate_observation(obs, self.cfg)
    if not isinstance(params, dict) or "PaliGemma" not in params:
      keys = list(params)[:5] if isinstance(params, dict) else type(params).__name__
      raise ValueError(f"params must be the param tree with a 'PaliGemma' entry (got {keys}); "
                       "pass variables['params'], not the variables dict")

  def sample_actions(self, params: Params, observation: Observation, rng: jax.Array,
                     num_steps: int = 10, *, noise: jax.Array | None = None,
                     return_trajectory: bool = False) -> jax.Array:
    """Samples an action chunk (B, action_horizon, action_dim) by `num_steps` Euler flow steps.

    `observation` is ours, openpi's `Observation` or its dict form (uint8 or float images; see
    `as_observation`). The prefix is encoded once into a KV cache; the steps run as a `lax.scan`. With
    `return_trajectory`, also returns the per-step velocities (num_steps, B, A, action_dim).
    `noise` overrides the x_1 ~ N(0, I) drawn from `rng`.
    """
    observation = as_observation(observation)
    self._check(params, observation)
    b = observation.batch_size
    c = self.cfg
    if noise is None:
      noise = jax.random.normal(rng, (b, c.action_horizon, c.action_dim))
    module = self.module
    variables = self.runtime.variables(params)
    with self.runtime.context():  # entered once per traced call
      return self._sample(module, variables, observation, noise, num_steps, return_trajectory)

  @staticmethod
  def _sample(module, variables, observation, noise, num_steps, return_trajectory):
    b = observation.batch_size
    kv_cache, prefix_mask = module.apply(variables, observation, method=Pi0.fill_cache)
    dt = -1.0 / num_steps

    def step(x_t, t):
      v_t = module.apply(variables, observation, kv_cache, prefix_mask, x_t,
                         jnp.broadcast_to(t, (b,)), method=Pi0.velocity)
      return x_t + dt * v_t, v_t

    x_0, velocities = jax.lax.scan(step, noise, flow_times(num_steps))
    return (x_0, velocities) if return_trajectory else x_0

  def sample_actions_no_cache(self, params: Params, observation: Observation, rng: jax.Array,
                              num_steps: int = 10, *, noise: jax.Array | None = None) -> jax.Array:
    """Reference `sample_actions` that re-runs the whole prefix with the suffix at every step."""
    observation = as_observation(observation)
    self._check(params, observation)
    b = observation.batch_size
    c = self.cfg
    if noise is None:
      noise = jax.random.normal(rng, (b, c.action_horizon, c.action_dim))
    module, variables = self.module, self.runtime.variables(params)
    x_t = noise
    with self.runtime.context():
      for t in flow_times(num_steps):
        v_t = module.apply(variables, observation, x_t, jnp.broadcast_to(t, (b,)),
                           method=Pi0.velocity_no_cache)
        x_t = x_t + (-1.0 / num_steps) * v_t
    return x_t


@functools.cache
def get_policy(model: str = "pi0", size: str = "demo", *, runtime: Optional[Runtime] = None,
               **overrides) -> Policy:
  """`Policy(get_config(model, size, **overrides), runtime)`, e.g.
  `get_policy("pi0", "full", unroll_layers=True, attention="cudnn")`; `runtime` None: float
  einsums."""
  from duquant_jax.models.config import get_config
  return Policy(get_config(model, size, **overrides), runtime or FloatRuntime())
