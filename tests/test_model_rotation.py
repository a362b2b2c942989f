"""Rotations folded into the model (`duquant_jax.model_rotation`): exactness, stats, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import demo_params
from duquant_jax.calibrate import capture_single_batch
from duquant_jax.model_rotation import (rotate_residual, rotate_stats, rotated_experts,
                                        walsh_hadamard)
from duquant_jax.models import get_policy
from duquant_jax.rotations import block_hadamard


@pytest.mark.parametrize("n", [1, 2, 16, 128])
def test_walsh_hadamard_is_the_normalized_hadamard_matrix_and_its_own_inverse(n):
  x = jax.random.normal(jax.random.key(0), (5, n, 3))
  y = walsh_hadamard(x, axis=1)
  ref = jnp.einsum("anc,nm->amc", x, block_hadamard(n), precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(walsh_hadamard(y, axis=1), x, rtol=1e-5, atol=1e-5)


def test_walsh_hadamard_refuses_a_length_that_is_not_a_power_of_two():
  with pytest.raises(ValueError, match="not a power of 2"):
    walsh_hadamard(jnp.ones((3, 12)))


def _actions(policy, params, obs):
  with jax.default_matmul_precision("highest"):
    return jax.jit(policy.sample_actions)(params, obs, jax.random.key(3))


@pytest.mark.parametrize("model, experts", [("pi0", ["", "_1"]), ("pi05", [""])])
def test_rotated_model_computes_the_same_actions(model, experts):
  policy = get_policy(model, "demo")
  params = demo_params(model)
  before = jax.tree.map(np.asarray, params)
  rotated, rotations = rotate_residual(params, key=jax.random.key(7))
  assert rotated_experts(params) == experts == sorted(rotations.residual_signs)
  obs = policy.example_observation(jax.random.key(2), batch_size=2)
  a, b = _actions(policy, params, obs), _actions(policy, rotated, obs)
  assert float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a)) < 1e-5  # float32 rounding
  # Every rewritten weight really changed, the input tree did not, and dtypes are kept.
  q = "PaliGemma/llm/layers/attn/q_einsum/w".split("/")
  get = lambda t, p: __import__("functools").reduce(lambda n, k: n[k], p, t)
  assert not np.allclose(get(rotated, q), get(params, q))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
  assert jax.tree.map(lambda x: x.dtype, rotated) == jax.tree.map(lambda x: x.dtype, params)
  # The same key gives the same tree, bit for bit; another key another one.
  again, _ = rotate_residual(params, key=jax.random.key(7))
  jax.tree.map(np.testing.assert_array_equal, rotated, again)
  other, _ = rotate_residual(params, key=jax.random.key(8))
  assert not np.array_equal(get(other, q), get(rotated, q))


def test_rotated_stats_are_the_rotated_models_inputs():
  policy = get_policy("pi0", "demo")
  params = demo_params("pi0")
  rotated, rotations = rotate_residual(params, key=jax.random.key(7))
  obs = policy.example_observation(jax.random.key(2), batch_size=1)
  with jax.default_matmul_precision("highest"):
    cap = capture_single_batch(policy, params, obs, rng=jax.random.key(0), num_steps=1)
    cap_r = capture_single_batch(policy, rotated, obs, rng=jax.random.key(0), num_steps=1)

  class Rows:  # the stats interface rotate_stats maps: sample rows (L, R, K)
    def __init__(self, rows):
      self.samples, self.absmax = rows, jnp.max(jnp.abs(rows), axis=-2)

  changed = ("PaliGemma/llm/layers/attn/q_einsum/w", "PaliGemma/llm/layers/mlp_1/gating_einsum",
             "PaliGemma/llm/layers/attn/attn_vec_einsum_1/w")
  unchanged = ("PaliGemma/llm/layers/mlp/linear",)
  for path in changed + unchanged:
    rows = cap[path].rows.reshape(-1, *cap[path].rows.shape[-3:])[0]  # (L, N, K), first phase
    rows_r = cap_r[path].rows.reshape(-1, *cap_r[path].rows.shape[-3:])[0]
    got = rotate_stats({path: Rows(rows)}, params, rotations)[path].samples
    scale = float(jnp.max(jnp.abs(rows_r)))
    np.testing.assert_allclose(got, rows_r, atol=2e-5 * scale, err_msg=path)
    assert (path in unchanged) == bool(np.allclose(rows, rows_r, atol=2e-5 * scale)), path


def test_rotating_a_tree_without_gemma_layers_is_refused():
  with pytest.raises(ValueError, match="not an openpi-layout tree"):
    rotate_residual({"Dense_0": {"kernel": jnp.ones((4, 4))}}, key=jax.random.key(0))
