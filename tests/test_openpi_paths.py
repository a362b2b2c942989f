"""The openpi path table: its sites cover openpi's linears, and the regexes built from it."""

import re

import pytest

from duquant_jax import config, openpi_paths
from duquant_jax.layouts import linear_layouts
from duquant_jax.models import get_policy
from duquant_jax.treepath import flat_items

GEMMA = ("q", "kv", "attn_vec", "gating", "linear")


def test_every_site_path_matches_its_own_site_for_each_expert():
  for s in openpi_paths.SITES:
    for sfx in openpi_paths.EXPERTS if s.tower == "gemma" else ("",):
      site, groups = openpi_paths.match(s.path(sfx))
      assert site is s and groups["sfx"] == sfx
      assert groups["pre"] == s.block
  assert openpi_paths.match("PaliGemma/llm/layers/attn/q_einsum/kernel") is None
  assert openpi_paths.match("action_in_proj/kernel") is None


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_the_table_declares_every_scanned_linear_of_the_full_models(model):
  """Every weight under the Gemma layers and SigLIP blocks that is not a norm or bias is a site."""
  shapes = get_policy(model, "full").param_shapes()
  blocks = (openpi_paths.GEMMA_LAYERS + "/", openpi_paths.SIGLIP_BLOCK + "/")
  weights = [p for p, _ in flat_items(shapes) if p.startswith(blocks)
             and not re.search(r"(norm|LayerNorm)[^/]*/|/bias$", p)]
  assert weights and all(openpi_paths.match(p) is not None for p in weights), weights
  layouts = linear_layouts(shapes)
  assert all(layouts[p].eqn == openpi_paths.match(p)[0].eqn for p in weights)


def test_preset_regexes_are_the_strings_saved_configs_hold():
  """Configs are stored with their patterns (checkpoints, JSON): the generated regexes keep their
  exact text."""
  assert config.LLM == (r"PaliGemma/llm/layers/(attn/(q|kv|attn_vec)_einsum/w|"
                        r"mlp/(gating_einsum|linear))")
  assert config.EXPERT_MLP == r"PaliGemma/llm/layers/mlp_1/(gating_einsum|linear)"
  assert config.EXPERT_ATTN == r"PaliGemma/llm/layers/attn/(q|kv|attn_vec)_einsum_1/w"
  assert config.EXPERT_QK == r"PaliGemma/llm/layers/attn/(q|kv)_einsum_1/w"
  assert config.ATTN_PROJ == r"PaliGemma/llm/layers/attn/(q|kv)_einsum(_1)?/w"
  assert config.ATTN_OUT == r"PaliGemma/llm/layers/attn/attn_vec_einsum/w"
  assert config.SIGLIP == (r"PaliGemma/img/Transformer/encoderblock/"
                           r"(MultiHeadDotProductAttention_0/(query|key|value|out)|"
                           r"MlpBlock_0/Dense_(0|1))/kernel")
  assert config.EMBEDDING == r"PaliGemma/llm/embedder/input_embedding"


@pytest.mark.parametrize("names, experts", [
    (GEMMA, openpi_paths.EXPERTS), (GEMMA, ("_1",)), (("q", "kv"), ("",)), (("linear",), ("",)),
    (("query", "key", "value", "out", "fc1", "fc2"), ("",)), (("fc1", "key"), ("",)),
])
def test_pattern_matches_exactly_the_named_sites(names, experts):
  every = [s.path(sfx) for s in openpi_paths.SITES
           for sfx in (openpi_paths.EXPERTS if s.tower == "gemma" else ("",))]
  want = {openpi_paths.site(n).path(sfx) for n in names
          for sfx in (experts if openpi_paths.site(n).tower == "gemma" else ("",))}
  rx = openpi_paths.pattern(names, experts)
  assert {p for p in every if re.fullmatch(rx, p)} == want


def test_pattern_refuses_sites_of_both_towers_and_unknown_names():
  with pytest.raises(ValueError, match="span 2 blocks"):
    openpi_paths.pattern(("q", "query"))
  with pytest.raises(KeyError, match="no openpi site 'qq'"):
    openpi_paths.pattern(("qq",))


def test_shared_input_owner_component_and_pairs():
  q, kv = (openpi_paths.site(n).path("_1") for n in ("q", "kv"))
  assert openpi_paths.input_owner(kv, {q, kv}) == q
  assert openpi_paths.input_owner(kv, {kv}) is None  # the owner was not captured
  assert openpi_paths.input_owner(q, {q, kv}) is None
  key, query = (openpi_paths.site(n).path() for n in ("key", "query"))
  assert openpi_paths.input_owner(key, [query, key]) == query
  assert openpi_paths.input_owner(openpi_paths.site("linear").path(), {q}) is None
  assert [openpi_paths.component(p) for p in (q, openpi_paths.site("q").path(), key)] == [
      "expert", "llm", "siglip"]
  assert openpi_paths.component("state_proj/kernel") is None
  assert openpi_paths.is_vision(key) and openpi_paths.is_vision("PaliGemma/img/head/kernel")
  assert not openpi_paths.is_vision(q)
  assert [openpi_paths.pairs_per_weight(openpi_paths.site(n).path()) for n in GEMMA] == [
      1, 2, 1, 2, 1]
  assert openpi_paths.pairs_per_weight("dense/kernel") == 1


def test_residual_stream_readers_and_writers():
  layers = openpi_paths.GEMMA_LAYERS
  assert openpi_paths.stream_readers("_1") == (
      (f"{layers}/pre_attention_norm_1", ((f"{layers}/attn/q_einsum_1/w", 1),
                                          (f"{layers}/attn/kv_einsum_1/w", 2))),
      (f"{layers}/pre_ffw_norm_1", ((f"{layers}/mlp_1/gating_einsum", 1),)))
  assert openpi_paths.stream_writers("") == ((f"{layers}/attn/attn_vec_einsum/w", 2),
                                             (f"{layers}/mlp/linear", 1))
