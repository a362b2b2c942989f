"""quantize.pack: scale tiles, output rotations, static ranges, a group's PackedLinears, tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax.config import EmbeddingRule, LayerRule, QuantConfig
from duquant_jax.embedding import PackedEmbedding
from duquant_jax.layouts import linear_layouts, to_2d
from duquant_jax.openpi_paths import EMBEDDING, GEMMA_LAYERS, site
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize.fold import fold_smoothing
from duquant_jax.quantize.pack import (output_rotation, pack_embeddings, pack_group,
                                       prepare_pack, scale_tile, static_range)
from duquant_jax.quantize.plan import group_order, plan_group, plan_layouts
from duquant_jax.quantize.transform import build_transform, weight_array
from duquant_jax.treepath import get_path

from conftest import demo_params


def _layout(name, model="pi0"):
  return linear_layouts(demo_params(model))[site(name).path()]


def test_scale_tiles_per_channel_head_and_group():
  q, down = _layout("q"), _layout("linear")
  rule = lambda **kw: LayerRule(pattern="x", **kw)
  assert scale_tile(rule(), q) == (1, q.in_features)
  assert scale_tile(rule(weight_granularity="head"), q) == (q.head_dim, q.in_features)
  assert scale_tile(rule(weight_granularity="group", group_size=64), down) == (1, 64)
  with pytest.raises(ValueError, match="per-head weight scales"):
    scale_tile(rule(weight_granularity="head"), down)
  with pytest.raises(ValueError, match="group_size 48 does not divide"):
    scale_tile(rule(weight_granularity="group", group_size=48), down)


def test_output_rotations_are_stacked_float16_blocks():
  q = _layout("q")
  r = output_rotation(LayerRule(pattern="x", output_rotation="restore", block_size=16), q,
                      jax.random.key(0))
  n = q.out_features
  assert r.shape == q.stack_shape + (n // 16, 16, 16) and r.dtype == jnp.float16
  eye = np.einsum("lbij,lbkj->lbik", np.asarray(r, np.float32), np.asarray(r, np.float32))
  np.testing.assert_allclose(eye, np.broadcast_to(np.eye(16), eye.shape), atol=2e-3)
  assert output_rotation(LayerRule(pattern="x"), q, jax.random.key(0)) is None
  with pytest.raises(ValueError, match="does not divide the output width"):
    output_rotation(LayerRule(pattern="x", output_rotation="restore", block_size=48), q,
                    jax.random.key(0))


def test_static_ranges_need_sample_rows():
  with pytest.raises(ValueError, match="act_scale='static' needs calibration stats"):
    static_range(None, None, LayerRule(pattern="x", act_scale="static"), "w")
  x = jax.random.normal(jax.random.key(0), (3, 32, 16))
  scale, zero = static_range(x, None, LayerRule(pattern="x", act_scale="static"), "w")
  assert scale.shape == zero.shape == (3, 1)


def test_a_transforms_only_group_packs_weights_that_undo_the_online_transform():
  """q and kv behind random rotations and zigzag, quantization off: each member's stored weight
  times the online transform of its input is the float linear (to float32 rounding), and both
  members share one input group."""
  params = demo_params("pi0")
  group = f"{GEMMA_LAYERS}/pre_attention_norm"
  cfg = QuantConfig(rules=(LayerRule(pattern=r".*/(q|kv)_einsum/w", weight_bits=None,
                                     act_bits=None, rotation="random", smooth_alpha=None,
                                     block_size=16),))
  members = dict(group_order(plan_layouts(params, cfg, None), cfg))[group]
  weights = {m.path: weight_array(get_path(params, m.path)) for m in members}
  plan = plan_group(cfg, None, group, members, weights)
  t, lam = build_transform(plan, weights)
  job = prepare_pack(plan, t, fold_smoothing(params, plan, t, lam, weights), cfg)
  packed = dict(pack_group(job, weights))
  assert set(packed) == {m.path for m in members}
  x = jax.random.normal(jax.random.key(1), (5, plan.layout0.in_features))
  for m in members:
    p = packed[m.path]
    assert isinstance(p, PackedLinear) and p.input_group == group and p.bits is None
    t1 = jax.tree.map(lambda a: a[1], p.transform)  # layer 1 of the stack
    y = t1.apply(x, precision=jax.lax.Precision.HIGHEST) @ p.codes[1].T
    ref = x @ to_2d(weights[m.path][1], m)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(ref).max()))


def test_embedding_tables_are_packed_where_a_rule_matches_one():
  params = demo_params("pi0")
  cfg = QuantConfig(embeddings=(EmbeddingRule(pattern=EMBEDDING, bits=4, group_size=None),))
  tables = pack_embeddings(params, cfg)
  assert set(tables) == {EMBEDDING} and isinstance(tables[EMBEDDING], PackedEmbedding)
  assert pack_embeddings(params, QuantConfig()) == {}
  with pytest.raises(ValueError, match="matches no embedding table"):
    pack_embeddings(params, QuantConfig(embeddings=(EmbeddingRule(pattern="nothing"),)))
