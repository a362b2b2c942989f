"""The tree walker: flat listings by path, reads and writes at a path, pure replacements."""

import dataclasses

import jax.numpy as jnp
import pytest

from duquant_jax.packed import PackedLinear
from duquant_jax.treepath import (copy_dicts, describe, flat_items, get_path, has_path,
                                  replace_paths, set_path)


def _tree():
  return {"b": {"y": jnp.zeros((2, 3)), "x": jnp.ones(4, jnp.int8)}, "a": jnp.zeros(())}


def test_flat_items_are_sorted_by_path_and_describe_lists_shapes():
  assert [p for p, _ in flat_items(_tree())] == ["a", "b/x", "b/y"]
  assert describe(_tree()) == [("a", (), "float32"), ("b/x", (4,), "int8"),
                               ("b/y", (2, 3), "float32")]


def test_flat_items_stops_at_nodes_the_caller_names():
  """A packed weight is a pytree of several arrays: listed whole where the caller asks, else by
  its fields."""
  fields = {f.name for f in dataclasses.fields(PackedLinear)}
  tree = {"w": _packed_stub(), "s": jnp.ones(2)}
  whole = dict(flat_items(tree, is_leaf=lambda n: isinstance(n, PackedLinear)))
  assert set(whole) == {"s", "w"} and isinstance(whole["w"], PackedLinear)
  inside = [p for p, _ in flat_items(tree)]
  assert "w/codes" in inside and all(p == "s" or p.split("/")[1] in fields for p in inside)


def _packed_stub():
  from duquant_jax.config import LayerRule, QuantConfig
  from duquant_jax.quantize import quantize_params
  rule = LayerRule(pattern="kernel", rotation="none", permutation="none", smooth_alpha=None,
                   clip_search=False)
  w = jnp.arange(32 * 16, dtype=jnp.float32).reshape(32, 16) / 100
  packed = quantize_params({"kernel": w}, QuantConfig(rules=(rule,)))["kernel"]
  assert isinstance(packed, PackedLinear)
  return packed


def test_get_has_set_and_create():
  t = _tree()
  assert get_path(t, "b/x").shape == (4,)
  assert has_path(t, "b/y") and not has_path(t, "b/z") and not has_path(t, "a/z")
  with pytest.raises(KeyError, match="z"):
    get_path(t, "b/z/w")
  set_path(t, "b/x", 1)
  assert t["b"]["x"] == 1
  with pytest.raises(KeyError):
    set_path(t, "c/d", 2)
  set_path(t, "c/d", 2, create=True)
  assert t["c"] == {"d": 2}


def test_replace_paths_and_copy_dicts_leave_the_input_unchanged():
  t = _tree()
  new = replace_paths(t, {"b/x": 7, "a": 8})
  assert new["b"]["x"] == 7 and new["a"] == 8
  assert t["b"]["x"].shape == (4,) and t["a"].shape == ()
  assert new["b"]["y"] is t["b"]["y"]  # leaves are shared
  c = copy_dicts(t)
  c["b"]["y"] = None
  assert t["b"]["y"] is not None
