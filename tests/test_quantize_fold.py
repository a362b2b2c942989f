"""quantize.fold: where a group's smoothing goes, and reading it back (each norm kind)."""

import jax
import numpy as np
import pytest

from duquant_jax.config import LayerRule, QuantConfig
from duquant_jax.layouts import linear_layouts
from duquant_jax.openpi_paths import GEMMA_LAYERS, site
from duquant_jax.quantize.fold import (fold_into_norm, fold_into_producer, fold_smoothing,
                                       folded_smoothing, producer_smoothing)
from duquant_jax.quantize.plan import group_order, plan_group, plan_layouts
from duquant_jax.quantize.transform import build_transform, weight_array
from duquant_jax.lab.synthetic_stats import synthetic_stats
from duquant_jax.treepath import get_path, replace_paths

from conftest import demo_params


def _lam(layout, seed=0):
  return jax.random.uniform(jax.random.key(seed), layout.stack_shape + (layout.in_features,),
                            minval=0.5, maxval=2.0)


@pytest.mark.parametrize("model, name, sfx, kind", [
    ("pi0", "q", "", "rms"), ("pi05", "q", "_1", "adarms"), ("pi05", "gating", "_1", "adarms"),
    ("pi0", "query", "", "layernorm"),
])
def test_a_norm_fold_is_read_back_exactly_and_keeps_the_dtype(model, name, sfx, kind):
  params = demo_params(model)
  lay = linear_layouts(params)[site(name).path(sfx)]
  assert lay.norm_kind == kind
  lam = _lam(lay)
  updates = fold_into_norm(params, lay, lam)
  assert all(v.dtype == get_path(params, p).dtype for p, v in updates.items())
  folded = replace_paths(params, updates)
  np.testing.assert_allclose(np.asarray(folded_smoothing(params, folded, lay)), np.asarray(lam),
                             rtol=2e-5)
  # A linear without a norm reads back ones.
  out = linear_layouts(params)[site("linear").path(sfx)]
  np.testing.assert_array_equal(np.asarray(folded_smoothing(params, folded, out)), 1.0)


def test_a_producer_fold_is_read_back_exactly():
  params = demo_params("pi0")
  down = linear_layouts(params)[site("linear").path()]
  lam = _lam(down)
  folded = replace_paths(params, fold_into_producer(params, down, lam))
  rule = LayerRule(pattern="x", permutation="none")
  np.testing.assert_allclose(np.asarray(producer_smoothing(params, folded, down, rule, None)),
                             np.asarray(lam), rtol=2e-5)
  assert producer_smoothing(params, folded, down, LayerRule(pattern="x"), None) is None  # zigzag


def _group(cfg, group, model="pi0"):
  params = demo_params(model)
  stats = synthetic_stats(params)
  members = dict(group_order(plan_layouts(params, cfg, stats), cfg))[group]
  weights = {m.path: weight_array(get_path(params, m.path)) for m in members}
  plan = plan_group(cfg, stats, group, members, weights)
  return params, plan, weights, build_transform(plan, weights)


def test_smoothing_goes_into_the_norm_and_a_float_member_is_compensated():
  """Only q has a rule: the norm takes 1/lam, kv (float) takes lam on its input rows, the online
  transform loses its smoothing and the folded one keeps it; the tree is not modified."""
  norm = f"{GEMMA_LAYERS}/pre_attention_norm"
  cfg = QuantConfig(rules=(LayerRule(pattern=r".*/q_einsum/w", block_size=16, rotation_steps=2),))
  params, plan, weights, (t, lam) = _group(cfg, norm)
  kv = site("kv").path()
  before = np.asarray(get_path(params, f"{norm}/scale")).copy()
  f = fold_smoothing(params, plan, t, lam, weights)
  assert set(f.updates) == {f"{norm}/scale", kv}
  np.testing.assert_array_equal(np.asarray(get_path(params, f"{norm}/scale")), before)
  assert f.online.smooth is None and f.fold.smooth is not None and f.online.rot1 is not None
  w = np.asarray(weights[kv], np.float32)  # (L, 2, K, D, H): D scaled by lam
  np.testing.assert_allclose(np.asarray(f.updates[kv]),
                             w * np.asarray(lam)[:, None, None, :, None], rtol=1e-6)


def test_down_projection_smoothing_goes_into_the_up_columns_without_a_permutation():
  cfg = QuantConfig(rules=(LayerRule(pattern=r".*/mlp/linear", block_size=16, rotation_steps=2,
                                     permutation="none"),))
  down = site("linear").path()
  params, plan, weights, (t, lam) = _group(cfg, down)
  f = fold_smoothing(params, plan, t, lam, weights)
  assert set(f.updates) == {site("gating").path()} and f.online.smooth is None
  # With a permutation the smoothing merges into the online rotation instead (nothing written).
  cfg = QuantConfig(rules=(LayerRule(pattern=r".*/mlp/linear", block_size=16, rotation_steps=2),))
  params, plan, weights, (t, lam) = _group(cfg, down)
  f = fold_smoothing(params, plan, t, lam, weights)
  assert not f.updates and f.online is f.fold and f.online.merged_smooth
  # A producer already packed cannot take the fold.
  packed = replace_paths(params, {site("gating").path(): object()})
  with pytest.raises(ValueError, match="already packed"):
    fold_into_producer(packed, plan.layout0, lam)
