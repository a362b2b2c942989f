"""The pi0 / pi0.5 model: openpi's param layout, sample_actions, input validation, rollouts."""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax.models import Observation, get_config, get_policy
from duquant_jax.treepath import describe
from duquant_jax.models.rollout import ToyEnv, rollout, rollout_batches

from conftest import demo_params

LAYOUT = pathlib.Path(__file__).parent / "data" / "openpi_param_layout.txt"


def _openpi_layout():
  sections = re.split(r"^=== .*$", LAYOUT.read_text(), flags=re.M)[1:]
  out = {}
  for model, sec in zip(["pi0", "pi05"], sections, strict=True):
    rows = [line.split("  ") for line in sec.strip().splitlines()]
    out[model] = [(p, tuple(ast.literal_eval(s)), d) for p, s, d in rows]
  return out


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_full_layout_matches_openpi(model):
  expected = _openpi_layout()[model]
  got = describe(get_policy(model, "full").param_shapes())
  assert [p for p, _, _ in got] == [p for p, _, _ in expected]
  assert got == expected


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_dummy_and_demo_have_openpi_paths(model):
  full = {p for p, _, _ in _openpi_layout()[model]}
  for size in ("dummy", "demo"):
    assert {p for p, _, _ in describe(get_policy(model, size).param_shapes())} == full
  dummy = dict((p, s) for p, s, _ in describe(get_policy(model, "dummy").param_shapes()))
  assert dummy["PaliGemma/llm/layers/attn/q_einsum/w"] == (4, 8, 64, 16)


def test_demo_size_keeps_the_real_structure():
  cfg = get_config("pi0", "demo")
  assert cfg.llm.num_heads > 1 and cfg.llm.num_kv_heads == 1
  assert cfg.llm.head_dim >= 32 and cfg.llm.depth >= 2


def test_sample_actions_deterministic_and_jits_once(demo, demo_obs):
  policy, params = demo
  traces = []

  def f(params, obs, rng):
    traces.append(1)
    return policy.sample_actions(params, obs, rng, num_steps=3)

  jf = jax.jit(f)
  a1 = jf(params, demo_obs, jax.random.key(2))
  a2 = jf(params, demo_obs, jax.random.key(2))
  a3 = jf(params, demo_obs, jax.random.key(3))
  assert len(traces) == 1
  assert a1.shape == (2, policy.cfg.action_horizon, policy.cfg.action_dim)
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
  assert not np.allclose(np.asarray(a1), np.asarray(a3))
  assert np.all(np.isfinite(np.asarray(a1)))


def test_kv_cache_equals_no_cache_reference(demo, demo_obs):
  policy, params = demo
  rng = jax.random.key(4)
  cached = jax.jit(policy.sample_actions, static_argnames="num_steps")(params, demo_obs, rng, num_steps=3)
  ref = jax.jit(policy.sample_actions_no_cache, static_argnames="num_steps")(
      params, demo_obs, rng, num_steps=3)
  scale = float(jnp.abs(ref).max())
  np.testing.assert_allclose(np.asarray(cached), np.asarray(ref), atol=1e-4 * scale)


def test_unrolled_layers_equal_the_scanned_policy(demo, demo_obs):
  """`unroll_layers` changes only how XLA runs the layer stack: same params, same actions."""
  from duquant_jax.config import get_preset
  from duquant_jax.quantize import quantize_params
  from duquant_jax.runtime import PackedRuntime
  float_policy, params = demo
  policy = get_policy(float_policy.cfg.name, "demo", runtime=PackedRuntime())
  unrolled = get_policy(policy.cfg.name, "demo", unroll_layers=True, runtime=PackedRuntime())
  packed = quantize_params(params, get_preset("w4a8-rtn"))
  for tree in (params, packed):
    run = lambda p: jax.jit(p.sample_actions, static_argnames="num_steps")(
        tree, demo_obs, jax.random.key(5), num_steps=2)
    a, b = np.asarray(run(policy)), np.asarray(run(unrolled))
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())


def test_one_vision_call_equals_a_call_per_camera(demo, demo_obs):
  """The prefix runs SigLIP once over all cameras' images; each image's tokens are what a call
  per camera (openpi's) gives, to float32 rounding."""
  from duquant_jax.models import IMAGE_KEYS
  from duquant_jax.models.pi0 import Pi0
  policy, params = demo
  model = Pi0(policy.cfg)
  tokens = model.apply({"params": params}, demo_obs, method=Pi0.embed_prefix)[0]
  per_camera = model.apply({"params": params}, demo_obs, method=lambda m, obs: jnp.concatenate(
      [m.PaliGemma.img(obs.images[k]) for k in IMAGE_KEYS], axis=1))
  got = np.asarray(tokens[:, :per_camera.shape[1]], np.float32)
  ref = np.asarray(per_camera, np.float32)
  np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_missing_key_is_named():
  policy = get_policy("pi0", "demo")
  obs = policy.example_observation(jax.random.key(0))
  data = obs.to_dict()
  del data["state"]
  with pytest.raises(ValueError, match="'state'"):
    Observation.from_dict(data)
  images = dict(obs.images)
  del images["left_wrist_0_rgb"]
  with pytest.raises(ValueError, match="left_wrist_0_rgb"):
    policy.sample_actions(demo_params("pi0"), obs.replace(images=images), jax.random.key(0))


@pytest.mark.parametrize("field,bad,name", [
    ("state", jnp.zeros((1, 7)), "state"),
    ("tokenized_prompt", jnp.zeros((1, 3), jnp.int32), "tokenized_prompt"),
    ("tokenized_prompt_mask", jnp.zeros((1, 16), jnp.int32), "tokenized_prompt_mask"),
])
def test_wrong_shapes_are_named(field, bad, name):
  policy = get_policy("pi0", "demo")
  obs = policy.example_observation(jax.random.key(0)).replace(**{field: bad})
  with pytest.raises(ValueError, match=name):
    policy.sample_actions(demo_params("pi0"), obs, jax.random.key(0))


def test_wrong_image_size_is_named():
  policy = get_policy("pi0", "demo")
  obs = policy.example_observation(jax.random.key(0))
  images = dict(obs.images, base_0_rgb=jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="base_0_rgb.*shape"):
    policy.sample_actions(demo_params("pi0"), obs.replace(images=images), jax.random.key(0))


def test_variables_dict_instead_of_params_is_refused():
  policy = get_policy("pi0", "demo")
  obs = policy.example_observation(jax.random.key(0))
  with pytest.raises(ValueError, match="params"):
    policy.sample_actions({"params": demo_params("pi0")}, obs, jax.random.key(0))


def test_rollout_is_deterministic_and_closed_loop():
  policy = get_policy("pi0", "demo")
  params = demo_params("pi0")
  env = ToyEnv(policy.cfg)
  tasks = jnp.arange(2)
  obs1, states1, _ = rollout(policy, params, env, jax.random.key(0), tasks, 3, 2)
  obs2, states2, _ = rollout(policy, params, env, jax.random.key(0), tasks, 3, 2)
  np.testing.assert_array_equal(np.asarray(states1), np.asarray(states2))
  assert states1.shape == (4, 2, policy.cfg.action_dim)
  # The observation follows the state the policy's own actions produced.
  np.testing.assert_array_equal(np.asarray(obs1.state), np.asarray(states1[:-1]))
  assert not np.allclose(states1[0], states1[-1])
  batches = rollout_batches(policy, params, jax.random.key(0), num_episodes=2, num_chunks=2,
                            batch_size=2, num_steps=2)
  assert batches.state.shape == (1, 2, 2, policy.cfg.action_dim)
