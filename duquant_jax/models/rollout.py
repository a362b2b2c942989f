"""A small deterministic environment driven by the policy's own actions, and rollouts in it.

`ToyEnv` stands in for a robot task: the state is a point in R^action_dim; each task has a goal; an
action chunk (B, A, action_dim) moves the state through its first `execute_steps` actions with a damped
pull towards the goal. Observations are rendered from the state (smooth images that change with it,
the state itself, and a task prompt), so a policy that acts differently sees different inputs on the
next chunk: errors compound over the horizon as they do on long robot tasks. Everything is a pure
function of (params, env seed, rng), jitted with `lax.scan` over chunks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from duquant_jax.models.config import IMAGE_KEYS, Pi0Config
from duquant_jax.models.observation import BOS_TOKEN, Observation
from duquant_jax.models.pi0 import Policy


@dataclasses.dataclass(frozen=True)
class ToyEnv:
  """Deterministic point-mass tasks. `num_tasks` goals; `execute_steps` actions run per chunk."""

  cfg: Pi0Config
  num_tasks: int = 4
  execute_steps: int = 5
  seed: int = 0

  def _tables(self):
    key = jax.random.key(self.seed)
    k_goal, k_proj, k_tok = jax.random.split(key, 3)
    d = self.cfg.action_dim
    goals = jax.random.uniform(k_goal, (self.num_tasks, d), minval=-1.0, maxval=1.0)
    coarse = max(self.cfg.vision.image_size // 8, 1)
    proj = jax.random.normal(k_proj, (len(IMAGE_KEYS), d, coarse * coarse * 3)) / jnp.sqrt(d)
    prompts = jax.random.randint(k_tok, (self.num_tasks, self.cfg.max_token_len), 3,
                                 self.cfg.vocab_size)
    return goals, proj, prompts

  def reset(self, rng: jax.Array, tasks: jax.Array) -> jax.Array:
    """Initial states (B, action_dim) near the origin for task ids (B,)."""
    return 0.2 * jax.random.normal(rng, (tasks.shape[0], self.cfg.action_dim))

  def observe(self, state: jax.Array, tasks: jax.Array) -> Observation:
    """Renders the observation of states (B, action_dim) for tasks (B,)."""
    goals, proj, prompts = self._tables()
    b = state.shape[0]
    size = self.cfg.vision.image_size
    coarse = max(size // 8, 1)
    images, masks = {}, {}
    rel = state - goals[tasks]
    for i, key in enumerate(IMAGE_KEYS):
      low = jnp.tanh(rel @ proj[i]).reshape(b, coarse, coarse, 3)
      images[key] = jax.image.resize(low, (b, size, size, 3), "linear")
      masks[key] = jnp.ones((b,), bool)
    length = self.cfg.max_token_len // 2 + tasks % max(self.cfg.max_token_len // 2, 1)
    pos = jnp.arange(self.cfg.max_token_len)[None]
    mask = pos < length[:, None]
    tokens = jnp.where(pos == 0, BOS_TOKEN, prompts[tasks])
    return Observation(images=images, image_masks=masks, state=state.astype(jnp.float32),
                       tokenized_prompt=jnp.where(mask, tokens, 0).astype(jnp.int32),
                       tokenized_prompt_mask=mask)

  def step(self, state: jax.Array, tasks: jax.Array, actions: jax.Array) -> jax.Array:
    """Applies the first `execute_steps` actions of chunks (B, A, action_dim)."""
    goals, _, _ = self._tables()

    def one(s, a):
      s = s + 0.1 * jnp.tanh(a) + 0.05 * (goals[tasks] - s)
      return jnp.clip(s, -3.0, 3.0), None

    state, _ = jax.lax.scan(one, state, jnp.swapaxes(actions[:, :self.execute_steps], 0, 1))
    return state


@functools.partial(jax.jit, static_argnames=("policy", "env", "num_chunks", "num_steps"))
def rollout(policy: Policy, params: Any, env: ToyEnv, rng: jax.Array, tasks: jax.Array,
            num_chunks: int, num_steps: int = 10):
  """Closed-loop episodes of `num_chunks` action chunks for tasks (B,).

  The noise of chunk c comes from `fold_in(rng, c)`, so two policies rolled out from the same rng
  see the same start state and the same noise: their divergence is due to their actions alone.

  Returns:
    observations: Observation with leading axis (num_chunks, B, ...): what the policy saw;
    states: (num_chunks + 1, B, action_dim) the state trajectory;
    actions: (num_chunks, B, A, action_dim) the chunks the policy produced.
  """
  k_reset, rng = jax.random.split(rng)
  state0 = env.reset(k_reset, tasks)

  def chunk(state, c):
    obs = env.observe(state, tasks)
    actions = policy.sample_actions(params, obs, jax.random.fold_in(rng, c), num_steps)
    return env.step(state, tasks, actions), (obs, state, actions)

  last, (obs, states, actions) = jax.lax.scan(chunk, state0, jnp.arange(num_chunks))
  states = jnp.concatenate([states, last[None]], axis=0)
  return obs, states, actions


def rollout_batches(policy: Policy, params: Any, rng: jax.Array, *, num_episodes: int,
                    num_chunks: int, batch_size: int, env: ToyEnv | None = None,
                    num_steps: int = 10) -> Observation:
  """Observations from `num_episodes` episodes across tasks, grouped as calibration batches.

  Episode e runs task e % num_tasks; episodes run `batch_size` at a time. Returns an Observation
  whose leaves have leading axes (num_episodes // batch_size, num_chunks, batch_size, ...): batch
  group, time within the episode, episode within the group.
  """
  if num_episodes % batch_size:
    raise ValueError(f"num_episodes {num_episodes} must be a multiple of batch_size {batch_size}")
  env = env or ToyEnv(policy.cfg)
  groups = []
  for g in range(num_episodes // batch_size):
    tasks = (jnp.arange(batch_size) + g * batch_size) % env.num_tasks
    obs, _, _ = rollout(policy, params, env, jax.random.fold_in(rng, g), tasks, num_chunks, num_steps)
    groups.append(obs)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *groups)
