"""quantize.plan: layouts, group order, and the checks of one group before anything is built."""

import pytest

from duquant_jax.config import LLM, LayerRule, QuantConfig
from duquant_jax.models import get_policy
from duquant_jax.openpi_paths import GEMMA_LAYERS
from duquant_jax.quantize.plan import group_order, plan_group, plan_layouts, receivers
from duquant_jax.quantize.transform import weight_array
from duquant_jax.lab.synthetic_stats import synthetic_stats
from duquant_jax.treepath import get_path

from conftest import demo_params

ATTN = f"{GEMMA_LAYERS}/pre_attention_norm"  # the group of q / kv (their norm)


def _group(params, cfg, group, stats=None, **kw):
  layouts = plan_layouts(params, cfg, stats)
  members = dict(group_order(layouts, cfg))[group]
  weights = {m.path: weight_array(get_path(params, m.path)) for m in members}
  return plan_group(cfg, stats, group, members, weights, **kw)


def test_groups_receiving_another_groups_fold_are_packed_last():
  """pi0.5: the adaptive norms' Dense kernels and the gating_einsum producers receive folds."""
  shapes = get_policy("pi05", "demo").param_shapes()
  cfg = QuantConfig(rules=(LayerRule(pattern=r"PaliGemma/llm/.*"),))
  layouts = plan_layouts(shapes, cfg, None)
  late = receivers(layouts)
  assert f"{GEMMA_LAYERS}/pre_ffw_norm_1/Dense_0/kernel" in late
  assert f"{GEMMA_LAYERS}/mlp/gating_einsum" in late
  order = group_order(layouts, cfg)
  flags = [any(m.path in late for m in members) for _, members in order]
  assert flags == sorted(flags) and any(flags)  # every receiving group after every other
  groups = dict(order)
  assert [m.path.rsplit("/", 2)[-2] for m in groups[ATTN]] == ["kv_einsum", "q_einsum"]


def test_a_group_gathers_its_stats_and_loses_smoothing_on_rotated_streams():
  params = demo_params("pi0")
  stats = synthetic_stats(params)
  cfg = QuantConfig(rules=(LayerRule(pattern=LLM, block_size=16),))
  plan = _group(params, cfg, ATTN, stats)
  k = plan.layout0.in_features
  assert plan.absmax.shape == (3, k) and plan.samples.shape == (3, 64, k)
  assert plan.lead.smooth_alpha == 0.5 and plan.head_dim is None
  assert len(plan.active) == 2 and len(plan.quantizing) == 2
  plan = _group(params, cfg, ATTN, stats, unsmoothed={ATTN})
  assert plan.lead.smooth_alpha is None
  assert all(r.smooth_alpha is None for r in plan.rules.values())


def test_members_of_one_input_must_agree_on_its_transform_and_quantizer():
  params = demo_params("pi0")
  stats = synthetic_stats(params)
  q, kv = r".*/q_einsum/w", r".*/kv_einsum/w"
  cfg = QuantConfig(rules=(LayerRule(pattern=q, block_size=16),
                           LayerRule(pattern=kv, block_size=32)))
  with pytest.raises(ValueError, match="differ in the input transform"):
    _group(params, cfg, ATTN, stats)
  cfg = QuantConfig(rules=(LayerRule(pattern=q, act_scale="static"), LayerRule(pattern=kv)))
  with pytest.raises(ValueError, match="quantize it differently"):
    _group(params, cfg, ATTN, stats)


def test_a_group_needing_stats_without_them_is_refused():
  cfg = QuantConfig(rules=(LayerRule(pattern=LLM, smooth_alpha=None),))  # greedy rotations
  with pytest.raises(ValueError, match="no calibration stats.*greedy rotation"):
    _group(demo_params("pi0"), cfg, ATTN)
  cfg = QuantConfig(rules=(LayerRule(pattern=LLM, rounding="gptq", rotation="none",
                                     permutation="none", smooth_alpha=None),))
  with pytest.raises(ValueError, match="needs the input Hessian"):
    _group(demo_params("pi0"), cfg, ATTN)
