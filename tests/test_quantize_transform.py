"""quantize.transform: one group's DuQuant transform as stored, and the weights' input ranges."""

import jax.numpy as jnp
import numpy as np

from duquant_jax.config import LLM, LayerRule, QuantConfig
from duquant_jax.layouts import linear_layouts
from duquant_jax.openpi_paths import GEMMA_LAYERS
from duquant_jax.quantize.plan import group_order, plan_group, plan_layouts
from duquant_jax.quantize.transform import build_transform, w_absmax_in, weight_array
from duquant_jax.lab.synthetic_stats import synthetic_stats
from duquant_jax.transforms import smoothing_factors
from duquant_jax.treepath import get_path

from conftest import demo_params

ATTN = f"{GEMMA_LAYERS}/pre_attention_norm"


def _built(cfg, stats=None):
  params = demo_params("pi0")
  members = dict(group_order(plan_layouts(params, cfg, stats), cfg))[ATTN]
  weights = {m.path: weight_array(get_path(params, m.path)) for m in members}
  plan = plan_group(cfg, stats, ATTN, members, weights)
  return plan, weights, build_transform(plan, weights)


def test_rules_without_an_input_transform_build_none():
  cfg = QuantConfig(rules=(LayerRule(pattern=LLM, rotation="none", permutation="none",
                                     smooth_alpha=None),))
  assert _built(cfg)[2] == (None, None)


def test_the_stored_transform_and_its_smoothing():
  """Smoothing from the group's input absmax and its members' weights (the max over q and kv);
  rotations stored as float16, or int8 codes with row scales under `compact`."""
  stats = synthetic_stats(demo_params("pi0"))
  cfg = QuantConfig(rules=(LayerRule(pattern=LLM, block_size=16, rotation_steps=2),))
  plan, weights, (t, lam) = _built(cfg, stats)
  w_absmax = jnp.maximum(*[w_absmax_in(weights[m.path], m) for m in plan.active])
  np.testing.assert_allclose(np.asarray(lam), np.asarray(
      smoothing_factors(plan.absmax, w_absmax, 0.5)), rtol=1e-6)
  assert t.rot1.dtype == t.rot2.dtype == jnp.float16 and t.perm is not None
  assert t.smooth is not None  # where it goes is the fold's decision
  compact = QuantConfig(rules=(LayerRule(pattern=LLM, block_size=16, rotation_steps=2,
                                         compact=True),))
  t8 = _built(compact, stats)[2][0]
  assert t8.rot1.dtype == jnp.int8 and t8.rot1_scale is not None


def test_w_absmax_in_reads_the_input_channels_of_any_layout():
  params = demo_params("pi0")
  lay = linear_layouts(params)[f"{GEMMA_LAYERS}/attn/kv_einsum/w"]  # (L, 2, K, D, H): K_in = D
  w = np.asarray(get_path(params, lay.path), np.float32)
  np.testing.assert_array_equal(np.asarray(w_absmax_in(w, lay)), np.abs(w).max(axis=(1, 2, 4)))
