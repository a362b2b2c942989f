"""The one walker of param trees: leaves addressed by '/'-joined paths (`PaliGemma/llm/layers`).

Param trees are nested dicts (flax's `params`); a leaf's path joins its keys with '/'. Every module
that lists, reads or rewrites leaves by path goes through here:

- `flat_items` / `describe`: (path, leaf) of every leaf, sorted by path; `is_leaf` stops the walk
  at nodes the caller names (packed weights are pytrees of several arrays);
- `get_path` / `has_path` / `set_path`: one leaf (or subtree) at a path;
- `copy_dicts` / `replace_paths`: a new tree with some paths changed, the input left as it is.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional

import jax


def path_str(path: tuple[Any, ...]) -> str:
  """A jax key path -> 'PaliGemma/llm/layers/attn/q_einsum/w' (dict keys, attribute names and
  sequence indices joined by '/')."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def flat_items(tree: Any, *, is_leaf: Optional[Callable[[Any], bool]] = None
               ) -> Iterator[tuple[str, Any]]:
  """('/'-joined path, leaf) for every leaf, in sorted path order.

  Args:
    tree: any pytree (nested dicts of arrays, ShapeDtypeStructs, packed weights...).
    is_leaf: as in `jax.tree_util`: nodes for which it is true are yielded whole (e.g.
      `lambda n: isinstance(n, PackedLinear)`).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  items = [(path_str(p), x) for p, x in flat]
  return iter(sorted(items, key=lambda kv: kv[0]))


def describe(tree: Any) -> list[tuple[str, tuple[int, ...], str]]:
  """[(path, shape, dtype name)] for every array leaf (works on ShapeDtypeStructs too)."""
  return [(p, tuple(x.shape), str(x.dtype)) for p, x in flat_items(tree)]


def get_path(tree: Mapping, path: str) -> Any:
  """tree['a']['b'] for path 'a/b'.

  Raises:
    KeyError: naming the missing key.
  """
  for k in path.split("/"):
    tree = tree[k]
  return tree


def has_path(tree: Mapping, path: str) -> bool:
  """Whether `get_path(tree, path)` finds something."""
  try:
    get_path(tree, path)
    return True
  except (KeyError, TypeError):
    return False


def set_path(tree: dict, path: str, value: Any, *, create: bool = False) -> None:
  """tree['a']['b'] = value for path 'a/b', in place.

  Args:
    create: make the missing dicts on the way (otherwise they must exist).

  Raises:
    KeyError: a dict on the way is missing and `create` is False.
  """
  *parents, last = path.split("/")
  for k in parents:
    tree = tree.setdefault(k, {}) if create else tree[k]
  tree[last] = value


def copy_dicts(tree: Any) -> Any:
  """The tree with every dict copied (leaves shared), so setting paths leaves `tree` unchanged."""
  return {k: copy_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def replace_paths(tree: Any, values: Mapping[str, Any]) -> Any:
  """A copy of the tree's dicts (leaves shared) with `values` ({path: value}) set; `tree` is not
  modified.

  Raises:
    KeyError: a path whose parent dicts do not exist.
  """
  out = copy_dicts(tree)
  for path, value in values.items():
    set_path(out, path, value)
  return out
