"""openpi float checkpoints as users have them: read, understood, and converted a leaf at a time.

openpi (`src/openpi/training/checkpoints.py`, `models/model.py: restore_params`) stores a policy's
params as an orbax PyTree checkpoint at `<ckpt>/params` holding `{"params": tree}`:
- released checkpoints hold the pure param dict;
- training checkpoints (`<run>/<step>/params`, beside `train_state/` and `assets/`) hold an
  `nnx.State`, whose every leaf path ends in `/value`: unwrapped here as openpi's `restore_params`
  does (only when every leaf ends so);
- LoRA fine-tunes add `lora_a` / `lora_b` leaves beside the Gemma weights (`duquant_jax.lora`):
  merged into the base weights here, then quantized like any checkpoint.
The model (pi0 / pi0.5) and size (full / dummy / demo) are inferred by matching the leaf shapes
against the declared layouts of each (`infer_model`); float leaves keep their stored dtype unless
a dtype is asked for.

`convert_checkpoint` streams: the tree is opened as `LazyLeaf`s (shapes and dtypes from orbax's
metadata; the array is read on first use with an orbax partial restore), so `quantize_params`
reads one group of linears' weights while the group before packs (in its packing thread) and the
float32 working set is one stacked layer; only the packed weights and the float leaves being
written are ever held together.

Damaged checkpoints give one `CheckpointError` line; orbax's own logging (one asyncio traceback per
failed read) is silenced (`checkpoint._quiet_orbax`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.checkpoint import (INFO_FILE, CheckpointError, ShardingLike, _first_line,
                                    _orbax, _orbax_metadata, _orbax_restore, _orbax_save,
                                    _quiet_orbax, _restore_args, atomic_dir)
from duquant_jax.lora import LoraSpec, LoraWeight, find_lora, merge_lora, merge_one
from duquant_jax import openpi_paths
from duquant_jax.treepath import flat_items, get_path, path_str, replace_paths, set_path

__all__ = ["LazyLeaf", "OpenpiCheckpoint", "check_layout", "convert_checkpoint", "infer_model",
           "load_openpi_params", "open_openpi", "read_lazy_leaves", "resolve_openpi_params_dir",
           "save_openpi_params", "unwrap_values"]

Params = dict[str, Any]
_VALUE = "value"


# ----------------------------------------------------------------------------------------------
# Where the params are.


def resolve_openpi_params_dir(path: Union[str, os.PathLike]) -> pathlib.Path:
  """The orbax directory of an openpi checkpoint.

  Accepts `<ckpt>/params`, `<ckpt>` (a released checkpoint or one training step `<run>/<step>`),
  or a training run `<run>` holding numbered steps (the highest step is taken).

  Raises:
    FileNotFoundError: no such path. CheckpointError: none of these holds an orbax checkpoint.
  """
  root = pathlib.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"{root}: no such checkpoint")
  if (root / "params" / "_METADATA").is_file():
    return root / "params"
  if (root / "_METADATA").is_file():
    return root
  if (root / INFO_FILE).is_file():
    raise CheckpointError(f"{root}: a duquant-jax packed checkpoint, not an openpi float one")
  steps = [p for p in root.iterdir() if p.name.isdigit() and (p / "params" / "_METADATA").is_file()
           ] if root.is_dir() else []
  if steps:
    return max(steps, key=lambda p: int(p.name)) / "params"
  raise CheckpointError(f"{root}: not an orbax checkpoint (no params/_METADATA or _METADATA)")


def save_openpi_params(path: Union[str, os.PathLike], params: Params, *, force: bool = False,
                       as_state: bool = False) -> pathlib.Path:
  """Writes `params` the way openpi does: an orbax PyTree checkpoint at `<path>/params` holding
  {"params": params}, leaves in their own dtype. Atomic (temporary sibling, renamed at the end).

  Args:
    as_state: wrap every leaf as `{"value": leaf}`, as openpi's training checkpoints store an
      `nnx.State`.

  Raises:
    FileExistsError: `path` exists and not `force`.
  """
  tree = jax.tree.map(np.asarray, params)
  if as_state:
    tree = jax.tree.map(lambda x: {_VALUE: x}, tree)
  with atomic_dir(path, force=force) as tmp:
    _orbax_save(tmp / "params", {"params": tree}, ocdbt=True)
  return pathlib.Path(path).absolute()


def unwrap_values(tree: Any) -> tuple[Any, bool]:
  """(tree without the trailing `value` keys, whether it had them): openpi's training checkpoints
  store an `nnx.State`, whose every leaf is `{..., "value": array}`. Unwrapped only if every leaf
  path ends in `value`, as openpi's `restore_params` does."""
  def all_wrapped(node) -> bool:
    if not isinstance(node, Mapping) or not node:
      return False
    if set(node) == {_VALUE} and not isinstance(node[_VALUE], Mapping):
      return True
    return all(isinstance(v, Mapping) and all_wrapped(v) for v in node.values())

  def strip(node):
    if set(node) == {_VALUE} and not isinstance(node[_VALUE], Mapping):
      return node[_VALUE]
    return {k: strip(v) for k, v in node.items()}

  if isinstance(tree, Mapping) and all_wrapped(tree):
    return strip(tree), True
  return tree, False


# ----------------------------------------------------------------------------------------------
# Which model.


def infer_model(shapes: Any) -> tuple[str, str]:
  """(model, size) of an openpi param tree (arrays or shape structs), LoRA leaves excluded.

  The candidate is read off the tree (pi0.5 has `time_mlp_in`, pi0 `state_proj`; the size from the
  LLM's query projection), then every path and shape is checked against that model's declared
  layout, so a tree that matches no known model is refused by its first mismatching path.

  Raises:
    ValueError: not a pi0 / pi0.5 tree, or one whose layout matches no size.
  """
  from duquant_jax.models import get_policy
  from duquant_jax.models.config import SIZES
  flat = dict((p, tuple(x.shape)) for p, x in flat_items(shapes))
  if "time_mlp_in/kernel" in flat:
    model = "pi05"
  elif "state_proj/kernel" in flat:
    model = "pi0"
  else:
    raise ValueError("not a pi0 / pi0.5 param tree: neither state_proj (pi0) nor time_mlp_in "
                     "(pi0.5) is there")
  q_path = openpi_paths.site("q").path()
  q = flat.get(q_path)
  if q is None:
    raise ValueError(f"not a pi0 / pi0.5 param tree: {q_path} is missing")
  errors = []
  for size in SIZES:
    expected = get_policy(model, size).param_shapes()
    e_q = tuple(get_path(expected, q_path).shape)
    if e_q != q:
      continue
    try:
      check_layout(shapes, expected, where=f"{model} {size}")
    except ValueError as e:
      errors.append(str(e))
      continue
    return model, size
  if errors:
    raise ValueError(errors[0])
  raise ValueError(f"no known {model} size has a query projection of shape {q} ({q_path})")


def check_layout(got: Any, expected: Any, *, where: str = "checkpoint") -> None:
  """Raises ValueError naming the first path (sorted) whose presence or shape differs."""
  g = {p: tuple(x.shape) for p, x in flat_items(got)}
  e = {p: tuple(x.shape) for p, x in flat_items(expected)}
  for p in sorted(set(g) | set(e)):
    if p not in g:
      raise ValueError(f"{where}: does not match the model layout: {p} is missing "
                       f"(expected shape {e[p]})")
    if p not in e:
      raise ValueError(f"{where}: does not match the model layout: unexpected {p} {g[p]}")
    if g[p] != e[p]:
      raise ValueError(f"{where}: does not match the model layout: {p}: expected shape {e[p]}, "
                       f"got {g[p]}")


# ----------------------------------------------------------------------------------------------
# Reading, a leaf at a time.


class _Reader:
  """Partial orbax restores of one params directory: `read(paths)` returns {path: np.ndarray}."""

  def __init__(self, d: pathlib.Path, meta: Any, wrapped: bool, dtype: Any):
    self.d, self.wrapped, self.dtype = d, wrapped, dtype
    self._whole = None
    self.meta = {p: m for p, m in flat_items(meta)}  # stored paths (with /value if wrapped)

  def stored(self, path: str) -> str:
    return f"params/{path}/{_VALUE}" if self.wrapped else f"params/{path}"

  def read(self, paths: list[str]) -> dict[str, np.ndarray]:
    ocp = _orbax()
    item, args = {}, {}
    for p in paths:
      m = self.meta[self.stored(p)]
      cast = self.dtype if self.dtype is not None and jnp.issubdtype(m.dtype, jnp.floating) else None
      set_path(item, self.stored(p), m, create=True)
      set_path(args, self.stored(p), ocp.RestoreArgs(restore_type=np.ndarray, dtype=cast),
               create=True)
    try:
      restore_args = ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
    except TypeError:  # an orbax without partial restores: read the whole tree once, keep it
      if self._whole is None:
        self._whole = self._restore_whole()
      return {p: get_path(self._whole, self.stored(p)) for p in paths}
    try:
      with _quiet_orbax(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ck:
        got = ck.restore(self.d.absolute(), args=restore_args)
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
      raise CheckpointError(f"{self.d}: corrupt or truncated checkpoint ({_first_line(e)})") from None
    return {p: get_path(got, self.stored(p)) for p in paths}

  def _restore_whole(self) -> Any:
    ocp = _orbax()
    meta = _orbax_metadata_quiet(self.d)
    args = jax.tree.map(lambda m: ocp.RestoreArgs(
        restore_type=np.ndarray,
        dtype=self.dtype if self.dtype is not None and jnp.issubdtype(m.dtype, jnp.floating)
        else None), meta)
    try:
      return _orbax_restore(self.d, args)
    except Exception as e:
      raise CheckpointError(f"{self.d}: corrupt or truncated checkpoint ({_first_line(e)})") from None


class LazyLeaf:
  """A checkpoint leaf read on first use (`np.asarray(leaf)`), never kept: each use reads it again,
  so a stacked weight is in memory only while a caller holds its array.

  With `lora` set it is a base weight whose LoRA branch is merged as it is read.
  """

  def __init__(self, reader: _Reader, path: str, shape: tuple[int, ...], dtype: Any,
               lora: Optional[tuple[LoraWeight, LoraSpec]] = None):
    self.reader, self.path, self.shape, self.dtype, self.lora = reader, path, shape, dtype, lora

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size * np.dtype(self.dtype).itemsize

  def read(self) -> np.ndarray:
    if self.lora is None:
      return self.reader.read([self.path])[self.path]
    lw, spec = self.lora
    got = self.reader.read([self.path, lw.a, lw.b])
    return merge_one(got[self.path], got[lw.a], got[lw.b], lw, spec)

  def __array__(self, dtype=None, copy=None):
    x = self.read()
    return x if dtype is None else x.astype(dtype)

  def __jax_array__(self):
    return jnp.asarray(self.read())

  def astype(self, dtype):
    return self.read().astype(dtype)

  def __repr__(self) -> str:
    return f"LazyLeaf({self.path!r}, shape={self.shape}, dtype={np.dtype(self.dtype).name})"


def read_lazy_leaves(tree: Any) -> Any:
  """`tree` (nested dicts) with every `LazyLeaf` replaced by its array: the plain leaves of one
  checkpoint in one orbax partial restore (which reads them concurrently, instead of one restore
  per leaf), LoRA-merged ones one at a time. Other leaves are kept as they are."""
  lazy = {p: x for p, x in flat_items(tree) if isinstance(x, LazyLeaf)}
  got: dict[str, np.ndarray] = {}
  by_reader: dict[int, list[str]] = {}
  for path, leaf in lazy.items():
    if leaf.lora is None:
      by_reader.setdefault(id(leaf.reader), []).append(path)
    else:
      got[path] = leaf.read()
  for paths in by_reader.values():
    reader = lazy[paths[0]].reader
    read = reader.read([lazy[p].path for p in paths])
    got.update((p, read[lazy[p].path]) for p in paths)
  return replace_paths(tree, got)


@dataclasses.dataclass(frozen=True)
class OpenpiCheckpoint:
  """What an openpi checkpoint holds, from its metadata alone (no array read)."""

  params_dir: pathlib.Path
  shapes: Params  # the param tree (LoRA leaves excluded) as jax.ShapeDtypeStructs
  wrapped: bool  # a training checkpoint (nnx.State: leaves under `value`)
  lora: dict[str, LoraWeight]  # base weight path -> its LoRA branch
  model: Optional[str]  # 'pi0' / 'pi05', or None where not inferred
  size: Optional[str]

  def lazy_tree(self, *, dtype: Any = None, lora: LoraSpec = LoraSpec()) -> Params:
    """The param tree as `LazyLeaf`s (LoRA branches merged on read), to stream into
    `quantize_params`."""
    meta = _orbax_metadata_quiet(self.params_dir)
    reader = _Reader(self.params_dir, meta, self.wrapped, dtype)

    def leaf(kp, s):
      p = path_str(kp)
      dt = np.dtype(dtype if dtype is not None and jnp.issubdtype(s.dtype, jnp.floating) else s.dtype)
      return LazyLeaf(reader, p, tuple(s.shape), dt,
                      (self.lora[p], lora) if p in self.lora else None)

    return jax.tree_util.tree_map_with_path(leaf, self.shapes)


def _orbax_metadata_quiet(d: pathlib.Path) -> Any:
  """orbax's metadata tree of `d`; CheckpointError (one line, stderr kept quiet) if unreadable."""
  with _quiet_orbax():
    try:
      meta = _orbax_metadata(d)
    except Exception as e:
      raise CheckpointError(f"{d}: corrupt or unreadable orbax metadata ({_first_line(e)})") from None
    if meta is None:  # orbax returns None for a damaged metadata store
      raise CheckpointError(f"{d}: corrupt or unreadable orbax metadata (no tree could be read)")
    if not isinstance(meta, Mapping) or "params" not in meta:
      keys = list(meta)[:5] if isinstance(meta, Mapping) else type(meta).__name__
      raise CheckpointError(f"{d}: expected an item {{'params': tree}}, got keys {keys}")
  return meta


def open_openpi(path: Union[str, os.PathLike], *, infer: bool = True) -> OpenpiCheckpoint:
  """Reads an openpi checkpoint's metadata: layout, training-state wrapping, LoRA, model and size.

  Args:
    path: as `resolve_openpi_params_dir`.
    infer: infer (model, size) from the shapes (`infer_model`); raises if none matches.

  Raises:
    FileNotFoundError, CheckpointError; ValueError from `find_lora` / `infer_model`.
  """
  d = resolve_openpi_params_dir(path)
  meta = _orbax_metadata_quiet(d)
  tree, wrapped = unwrap_values(meta["params"])
  shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
  lora = find_lora(shapes)
  plain = shapes
  if lora:
    drop = {p for lw in lora.values() for p in (lw.a, lw.b)}
    plain = {}
    for p, s in flat_items(shapes):
      if p not in drop:
        set_path(plain, p, s, create=True)
  model = size = None
  if infer:
    model, size = infer_model(plain)
  return OpenpiCheckpoint(params_dir=d, shapes=plain, wrapped=wrapped, lora=lora, model=model,
                          size=size)


def load_openpi_params(path: Union[str, os.PathLike], policy: Any = None, *, dtype: Any = None,
                       sharding: ShardingLike = None, lora: LoraSpec = LoraSpec()) -> Params:
  """Reads openpi params: released, training-state (`/value` leaves) or LoRA fine-tuned.

  Args:
    path: as `resolve_openpi_params_dir`.
    policy: a `duquant_jax.models.Policy`; when given, every path and shape (after unwrapping and
      merging LoRA) is checked against `policy.param_shapes()`.
    dtype: floating dtype to restore as; None keeps each leaf's stored dtype (openpi's
      `restore_params` default; its policies restore bfloat16).
    sharding: as in `checkpoint.load_packed`.
    lora: how the LoRA branches were scaled (merged into the base weights in float32, stored back
      in the base weight's dtype); ignored without LoRA leaves.

  Returns:
    the param tree (the dict holding 'PaliGemma', ...), without LoRA leaves.

  Raises:
    FileNotFoundError, CheckpointError (corrupt or truncated files: one line); ValueError naming
    the first path whose shape differs from the model layout, or inconsistent LoRA leaves.
  """
  d = resolve_openpi_params_dir(path)
  meta = _orbax_metadata_quiet(d)
  tree, _ = unwrap_values(meta["params"])
  found = find_lora(tree)
  if policy is not None:
    drop = {p for lw in found.values() for p in (lw.a, lw.b)}
    plain = {}
    for p, s in flat_items(tree):
      if p not in drop:
        set_path(plain, p, s, create=True)
    check_layout(plain, policy.param_shapes(), where=str(d))
  with _quiet_orbax():
    try:
      restored = _orbax_restore(d, _restore_args(meta, sharding, dtype))
    except Exception as e:
      raise CheckpointError(f"{d}: corrupt or truncated checkpoint ({_first_line(e)})") from None
  params, _ = unwrap_values(restored["params"])
  if found:
    params = merge_lora(params, lora)
    if sharding is None:
      params = jax.tree.map(jnp.asarray, params)
    else:
      params = jax.tree_util.tree_map_with_path(
          lambda kp, x: jax.device_put(x, sharding if isinstance(sharding, jax.sharding.Sharding)
                                       else sharding(path_str(kp), x.shape, x.dtype)), params)
  return params


# ----------------------------------------------------------------------------------------------
# Conversion, streamed.


def convert_checkpoint(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], cfg: Any,
                       stats: Any = None, *, lora: LoraSpec = LoraSpec(),
                       metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = False,
                       save_stats: bool = True, progress: bool = False,
                       timings: Optional[dict] = None) -> pathlib.Path:
  """openpi checkpoint in, packed checkpoint out, streamed a layer group at a time.

  The source tree is opened lazily (`OpenpiCheckpoint.lazy_tree`): `quantize_params` reads each
  group's weights (LoRA merged on read) while the group before packs, and float leaves are read
  when written, so peak memory is the packed tree plus two groups' stacked weights and one
  layer's float32 working set (full-size pi0: about 9 GB, BENCHMARKS.md "Conversion (CPU)").

  Args:
    src: the openpi checkpoint (as `resolve_openpi_params_dir`).
    dst: the packed checkpoint directory to create (atomically: nothing is left at `dst` on
      failure or interruption).
    cfg: the QuantConfig. stats: calibration stats for its smoothing / greedy rotations (or None).
    lora: scaling of LoRA branches. metadata: extra metadata (model, size and source are added).
    overwrite: replace an existing `dst`. save_stats: store `stats` in the checkpoint.
    progress: a progress bar over layer groups.
    timings: a dict to receive the seconds of each phase ("open", "quantize", "save").

  Returns:
    the absolute path written.

  Raises:
    FileExistsError: `dst` exists and not `overwrite`. FileNotFoundError, CheckpointError,
    ValueError: as `open_openpi` and `quantize_params`.
    NotImplementedError: a config with `attention_balance`, which needs forward passes of the
      whole model (load it with `load_openpi_params`, then `quantize_params`,
      `balance_attention` and `save_packed`; the CLI's convert does).
  """
  from duquant_jax.checkpoint import save_packed
  from duquant_jax.quantize import quantize_params
  if getattr(cfg, "attention_balance", None) is not None:
    raise NotImplementedError(
        "convert_checkpoint streams the weights and runs no forward pass, which attention "
        "balancing needs: load the model (load_openpi_params), then quantize_params, "
        "balance_attention and save_packed (as `duquant-jax convert` does)")
  if pathlib.Path(dst).exists() and not overwrite:
    raise FileExistsError(f"{dst} already exists (pass overwrite / --overwrite to replace it)")
  timings = {} if timings is None else timings
  t = time.perf_counter()
  ck = open_openpi(src)
  params = ck.lazy_tree(lora=lora)
  timings["open"] = time.perf_counter() - t
  t = time.perf_counter()
  packed = jax.block_until_ready(quantize_params(params, cfg, stats, progress=progress))
  timings["quantize"] = time.perf_counter() - t
  t = time.perf_counter()
  packed = read_lazy_leaves(packed)
  meta = {"source": str(pathlib.Path(src).absolute()), "preset": cfg.name, "model": ck.model,
          "size": ck.size, "lora_merged": sorted(ck.lora), "training_state": ck.wrapped}
  meta.update(metadata or {})
  out = save_packed(dst, packed, cfg, stats if save_stats else None, meta, force=overwrite)
  timings["save"] = time.perf_counter() - t
  return out
