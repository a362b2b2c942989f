"""Nested-dict param trees addressed by '/'-joined paths (`PaliGemma/llm/layers/mlp/linear`)."""

from __future__ import annotations

from typing import Any, Mapping


def get_path(tree: Mapping, path: str) -> Any:
  """tree['a']['b'] for path 'a/b'; KeyError naming the missing key otherwise."""
  for k in path.split("/"):
    tree = tree[k]
  return tree


def set_path(tree: dict, path: str, value: Any) -> None:
  """tree['a']['b'] = value for path 'a/b' (the dicts on the way must exist)."""
  keys = path.split("/")
  for k in keys[:-1]:
    tree = tree[k]
  tree[keys[-1]] = value


def has_path(tree: Mapping, path: str) -> bool:
  try:
    get_path(tree, path)
    return True
  except (KeyError, TypeError):
    return False


def copy_dicts(tree: Any) -> Any:
  """The tree with every dict copied (leaves shared), so setting paths leaves `tree` unchanged."""
  return {k: copy_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree
