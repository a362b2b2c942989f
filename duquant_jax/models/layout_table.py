"""Flat listings of a param tree: '/'-joined paths with shapes and dtypes."""

from __future__ import annotations

from typing import Any, Iterator

import jax


def path_str(path: tuple[Any, ...]) -> str:
  """A jax key path -> 'PaliGemma/llm/layers/attn/q_einsum/w'."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def flat_items(tree: Any) -> Iterator[tuple[str, Any]]:
  """('/'-joined path, leaf) for every leaf, in sorted path order."""
  items = [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return iter(sorted(items, key=lambda kv: kv[0]))


def describe(tree: Any) -> list[tuple[str, tuple[int, ...], str]]:
  """[(path, shape, dtype name)] for every array leaf (works on ShapeDtypeStructs too)."""
  return [(p, tuple(x.shape), str(x.dtype)) for p, x in flat_items(tree)]
