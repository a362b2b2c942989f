"""Checkpoint I/O: packed (W4A8) checkpoints of duquant-jax, and openpi's float checkpoints.

Packed checkpoint layout (a directory, written atomically):

    DST/
      duquant.json   format tag and version, the QuantConfig (`QuantConfig.to_dict`), metadata
                     (library version, source, preset, date, per-layer bits), the *structure* of the
                     packed tree (per `PackedLinear` path: its static fields and which optional arrays
                     exist) and a manifest (size and sha256 of every file under params/ and stats/)
      params/        orbax PyTree checkpoint (zarr, one directory per array: deterministic file names)
                     of {"params": arrays}, where each PackedLinear became a dict of its arrays
                     (`codes` stored natively as jnp.int4 / int8, scales, zero points, transform, ...)
      stats/         optional: the calibration stats (`duquant_jax.calibrate.to_tree`)

A `PackedEmbedding` (weight-only token table) is stored the same way: its arrays under params/, its
static fields in the structure with `"kind": "embedding"` (entries without a kind are PackedLinear).
Checkpoints holding one are written as format version 2, so that a version-1 reader refuses them by
name instead of failing on the unknown entry; checkpoints without one stay version 1.

Static fields of `PackedLinear` / `InputTransform` are not arrays, so they live in the JSON structure and
`load_packed` rebuilds the dataclasses; the restored tree runs under `jax.jit(policy.sample_actions)`
(a policy with `runtime.PackedRuntime`) as is, and its arrays are bit-identical to the saved ones.
Kernel choices are not part of a packed weight (`runtime.Execution`): structure entries that name
them (`matmul_impl`, `transform_impl`) load with those keys ignored.

Determinism: the same packed tree, config, stats and metadata (including `metadata["created"]`) give
byte-identical files. orbax's own timestamps (`_CHECKPOINT_METADATA`) are set to the `created` time and
its `commit_success.txt` (which names the temporary directory) is dropped.

openpi's float checkpoints (an orbax PyTree checkpoint at `<ckpt>/params` holding {"params": tree})
are read and written by `duquant_jax.openpi_checkpoint`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.version import __version__
from duquant_jax.config import QuantConfig
from duquant_jax.embedding import PackedEmbedding
from duquant_jax.treepath import get_path, path_str, set_path
from duquant_jax.packed import PackedLinear
from duquant_jax.transforms import InputTransform

__all__ = ["CheckpointError", "FORMAT", "FORMAT_VERSION", "load_packed", "read_info",
           "save_packed", "verify_files"]

FORMAT = "duquant-jax/packed"
# The newest version this library reads; 2 added PackedEmbedding entries, 3 compact storage (int8
# rotations with row scales, generated Hadamard blocks, float16 scales / int8 zero points) and
# float (transforms-only, bits None) weights, 4 2-bit embedding codes stored four to a uint8 byte.
FORMAT_VERSION = 4
INFO_FILE = "duquant.json"
_PL_STATIC = ("w_shape", "w_spec", "bits", "act_bits", "act_symmetric", "act_clip", "mode")
_PL_OPTIONAL = ("zero", "out_rot", "act_scale", "act_zero")
_TF_ARRAYS = ("smooth", "rot1", "perm", "rot2", "rot1_scale", "rot2_scale")
_EMB_STATIC = ("bits", "dtype")
_ORBAX_DROP = ("commit_success.txt",)

Params = dict[str, Any]
ShardingLike = Union[jax.sharding.Sharding, Callable[[str, tuple, Any], jax.sharding.Sharding], None]


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: not a checkpoint, wrong kind, corrupt or truncated files."""


def _orbax():
  import orbax.checkpoint as ocp  # imported lazily: slow, and noisy at import time
  return ocp


# Loggers that orbax and its asyncio / tensorstore machinery write to: every save / restore logs at
# WARNING through absl, and a damaged file makes asyncio log one ERROR traceback per failed read
# (dozens, hundreds of KB). The caller turns the exception into one line instead.
_NOISY_LOGGERS = ("absl", "asyncio", "orbax", "jax._src.distributed", "concurrent.futures")


@contextlib.contextmanager
def _quiet_orbax():
  """Silences orbax's loggers, and stderr (Python's and file descriptor 2: tensorstore's threads
  and handlers bound to the old stream write there) for the duration of the block.

  A failed read makes tensorstore's threads print tracebacks ("Event loop is closed") for a short
  while after the exception: when anything was written, or the block raised, stderr stays
  silenced until that output has stopped (at most a few seconds).
  """
  import io
  import logging
  import sys
  import tempfile
  import time
  loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
  old_levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL + 1)
  saved_fd, saved_stderr, py_sink = None, sys.stderr, io.StringIO()
  failed = False
  with tempfile.TemporaryFile() as sink:
    try:
      sys.stderr.flush()
      saved_fd = os.dup(2)
      os.dup2(sink.fileno(), 2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (e.g. captured by a test runner)
      saved_fd = None
    sys.stderr = py_sink
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      size = lambda: os.fstat(sink.fileno()).st_size + py_sink.tell()
      if failed or size():
        deadline, last, quiet_since = time.monotonic() + 3.0, -1, time.monotonic()
        while time.monotonic() < deadline:
          now = size()
          if now != last:
            last, quiet_since = now, time.monotonic()
          elif time.monotonic() - quiet_since > 0.3:
            break
          time.sleep(0.05)
      sys.stderr = saved_stderr
      if saved_fd is not None:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
      for lg, lvl in zip(loggers, old_levels):
        lg.setLevel(lvl)


# ----------------------------------------------------------------------------------------------
# Packed tree <-> (arrays, structure).


def _split_packed(tree: Any, prefix: str = "") -> tuple[Any, dict[str, dict]]:
  """Packed tree -> (nested dict of arrays only, structure {path: static description})."""
  structure: dict[str, dict] = {}

  def walk(node, path):
    if isinstance(node, PackedEmbedding):
      arrays = {"codes": node.codes, "scale": node.scale}
      desc = {"kind": "embedding", **{f: getattr(node, f) for f in _EMB_STATIC},
              "arrays": ["codes", "scale"]}
      if node.zero is not None:
        arrays["zero"] = node.zero
        desc["arrays"].append("zero")
      structure[path] = desc
      return arrays
    if isinstance(node, PackedLinear):
      arrays = {"codes": node.codes, "scale": node.scale}
      desc = {f: getattr(node, f) for f in _PL_STATIC}
      desc["w_shape"] = list(node.w_shape)
      if node.input_group is not None:  # an optional key: absent when None
        desc["input_group"] = node.input_group
      if node.act_min_tokens:  # an optional key: absent when 0
        desc["act_min_tokens"] = node.act_min_tokens
      desc["arrays"] = ["codes", "scale"]
      for f in _PL_OPTIONAL:
        if getattr(node, f) is not None:
          arrays[f] = getattr(node, f)
          desc["arrays"].append(f)
      if node.transform is not None:
        t = node.transform
        tarr = {f: getattr(t, f) for f in _TF_ARRAYS if getattr(t, f) is not None}
        arrays["transform"] = tarr
        desc["transform"] = {"arrays": sorted(tarr), "merged_smooth": bool(t.merged_smooth)}
        if any(t.hadamard):  # optional keys: absent for stored blocks
          desc["transform"]["hadamard"] = list(t.hadamard)
          desc["transform"]["width"] = t.width
      else:
        desc["transform"] = None
      structure[path] = desc
      return arrays
    if isinstance(node, Mapping):
      for k in node:
        if not isinstance(k, str) or "/" in k or "." in k:
          raise ValueError(f"{path}/{k}: param tree keys must be strings without '/' or '.'")
      return {k: walk(v, f"{path}/{k}" if path else k) for k, v in node.items()}
    if node is None:
      raise ValueError(f"{path}: None leaves cannot be saved")
    if not hasattr(node, "shape") or not hasattr(node, "dtype"):
      raise TypeError(f"{path}: cannot save a leaf of type {type(node).__name__}")
    return node

  return walk(tree, prefix), structure


def _join_packed(arrays: dict, structure: Mapping[str, dict]) -> dict:
  """Inverse of `_split_packed` (arrays is modified in place and returned)."""
  for path, desc in structure.items():
    try:
      a = get_path(arrays, path)
    except (KeyError, TypeError):
      raise CheckpointError(f"structure names {path!r} but the checkpoint has no arrays there") from None
    missing = [f for f in desc["arrays"] if f not in a]
    if missing:
      raise CheckpointError(f"{path}: arrays {missing} missing from the checkpoint")
    kind = desc.get("kind", "linear")
    if kind == "embedding":
      emb = PackedEmbedding(codes=a["codes"], scale=a["scale"], zero=a.get("zero"),
                            **{f: desc[f] for f in _EMB_STATIC})
      try:
        emb.validate()
      except ValueError as e:
        raise CheckpointError(f"{path}: restored packed embedding is inconsistent: {e}") from None
      set_path(arrays, path, emb)
      continue
    if kind != "linear":
      raise CheckpointError(f"{path}: unknown packed entry kind {kind!r}")
    transform = None
    if desc["transform"] is not None:
      ta = a.get("transform", {})
      transform = InputTransform(**{f: ta.get(f) for f in _TF_ARRAYS},
                                 merged_smooth=bool(desc["transform"]["merged_smooth"]),
                                 hadamard=tuple(desc["transform"].get("hadamard", (0, 0))),
                                 width=int(desc["transform"].get("width", 0)))
    static = {f: desc[f] for f in _PL_STATIC}
    static["w_shape"] = tuple(int(v) for v in desc["w_shape"])
    static["input_group"] = desc.get("input_group")
    static["act_min_tokens"] = int(desc.get("act_min_tokens", 0))
    packed = PackedLinear(codes=a["codes"], scale=a["scale"], zero=a.get("zero"),
                          transform=transform, out_rot=a.get("out_rot"),
                          act_scale=a.get("act_scale"), act_zero=a.get("act_zero"), **static)
    try:
      packed.validate()
    except ValueError as e:
      raise CheckpointError(f"{path}: restored packed weight is inconsistent: {e}") from None
    set_path(arrays, path, packed)
  return arrays


# ----------------------------------------------------------------------------------------------
# Files, manifest, atomic directories.


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _manifest(root: pathlib.Path, subdirs: tuple[str, ...]) -> dict[str, list]:
  """{relative path: [size, sha256]} of every file under `subdirs`, hashed in two threads
  (hashlib releases the GIL)."""
  from concurrent.futures import ThreadPoolExecutor
  files = [p for sub in subdirs for p in sorted((root / sub).rglob("*")) if p.is_file()]
  with ThreadPoolExecutor(2) as pool:
    digests = list(pool.map(_sha256, files))
  return {p.relative_to(root).as_posix(): [p.stat().st_size, d] for p, d in zip(files, digests)}


def verify_files(path: Union[str, os.PathLike], *, hashes: bool = True) -> int:
  """Checks every file listed in the checkpoint's manifest (size, and sha256 when `hashes`).

  Returns:
    the number of bytes checked.

  Raises:
    CheckpointError naming the first missing, truncated or modified file.
  """
  root = pathlib.Path(path)
  info = read_info(root)
  total = 0
  for rel, (size, digest) in info["manifest"].items():
    p = root / rel
    if not p.is_file():
      raise CheckpointError(f"{root}: file {rel} is missing (incomplete checkpoint)")
    got = p.stat().st_size
    if got != size:
      raise CheckpointError(f"{root}: file {rel} has {got} bytes, expected {size} "
                            "(truncated or corrupt)")
    if hashes and _sha256(p) != digest:
      raise CheckpointError(f"{root}: file {rel} does not match its recorded sha256 (corrupt)")
    total += size
  return total


def _normalize_orbax_dir(d: pathlib.Path, created_ns: int) -> None:
  """Makes orbax's bookkeeping files deterministic (timestamps -> created time, no tmp path)."""
  for name in _ORBAX_DROP:
    with contextlib.suppress(FileNotFoundError):
      (d / name).unlink()
  meta = d / "_CHECKPOINT_METADATA"
  if meta.exists():
    m = json.loads(meta.read_text())
    for k in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
      if k in m:
        m[k] = created_ns
    meta.write_text(json.dumps(m, sort_keys=True))


def _orbax_save(d: pathlib.Path, tree: Any, *, ocdbt: bool, copy_host_arrays: bool = True) -> None:
  """Saves `tree` with orbax. `copy_host_arrays=False`: numpy leaves are written from their own
  buffers (orbax copies them by default, against changes during an asynchronous save; this save
  is synchronous and the caller does not change them)."""
  ocp = _orbax()
  kw = {}
  if not copy_host_arrays:
    th = ocp.type_handlers
    kw["type_handler_registry"] = th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, th.get_type_handler(jax.Array)))
  with _quiet_orbax(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, **kw)) as ck:
    ck.save(d.absolute(), args=ocp.args.PyTreeSave(tree))


@contextlib.contextmanager
def atomic_dir(dst: Union[str, os.PathLike], *, force: bool = False):
  """Yields a temporary sibling directory; on success renames it to `dst`, else removes it.

  Raises:
    FileExistsError: `dst` exists and not `force`.
  """
  dst = pathlib.Path(dst).absolute()
  if dst.exists() and not force:
    raise FileExistsError(f"{dst} already exists (force=True, or --overwrite on the command "
                          "line, replaces it)")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    if dst.exists():  # force: move the old one aside, then swap
      old = dst.parent / f".{dst.name}.old-{os.getpid()}"
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ----------------------------------------------------------------------------------------------
# Packed checkpoints.


def _now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _created_ns(created: str) -> int:
  try:
    t = datetime.datetime.fromisoformat(created)
  except (TypeError, ValueError):
    return 0
  if t.tzinfo is None:
    t = t.replace(tzinfo=datetime.timezone.utc)
  return int(t.timestamp()) * 10**9


def _to_numpy(x):
  """Host arrays in the dtype JAX would use (float64 -> float32 without x64, as at run time); jax
  arrays are kept as they are (orbax stores int4 natively)."""
  if isinstance(x, jax.Array):
    return x
  x = np.asarray(x)
  return x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)


def save_packed(path: Union[str, os.PathLike], packed: Params, cfg: QuantConfig, stats: Any = None,
                metadata: Optional[Mapping[str, Any]] = None, *, force: bool = False,
                _before_rename: Optional[Callable[[pathlib.Path], None]] = None) -> pathlib.Path:
  """Writes a packed param tree (from `quantize_params`) as an orbax checkpoint directory.

  Args:
    path: the checkpoint directory to create.
    packed: the packed tree (PackedLinear leaves where weights were quantized, arrays elsewhere).
    cfg: the QuantConfig that produced it (stored as JSON).
    stats: optional CalibStats (stored under stats/).
    metadata: extra JSON-able metadata (e.g. source, preset); `created` (ISO date, default now),
      `library_version` and `bits` (per-layer weight bits) are filled in when absent.
    force: replace an existing `path`.

  Returns:
    the absolute path written.

  Raises:
    FileExistsError: `path` exists and not `force`.
    ValueError / TypeError: a tree that cannot be stored (non-array leaves, keys with '/' or '.').
  """
  from duquant_jax.quantize import summarize
  arrays, structure = _split_packed(packed)
  arrays = jax.tree.map(_to_numpy, arrays)
  meta = dict(metadata or {})
  meta.setdefault("created", _now_iso())
  meta.setdefault("library_version", __version__)
  summary = summarize(packed)
  meta.setdefault("bits", dict(sorted(summary.bits.items())))
  meta.setdefault("bytes_fp_bf16", summary.weight_bytes_fp)
  meta.setdefault("bytes_packed", summary.weight_bytes_packed)
  meta.setdefault("layers_quantized", summary.layers_quantized)
  created_ns = _created_ns(meta["created"])

  with atomic_dir(path, force=force) as tmp:
    _orbax_save(tmp / "params", {"params": arrays}, ocdbt=False, copy_host_arrays=False)
    _normalize_orbax_dir(tmp / "params", created_ns)
    subdirs = ("params",)
    if stats is not None:
      from duquant_jax.calibrate import to_tree
      _orbax_save(tmp / "stats", jax.tree.map(np.asarray, to_tree(stats)), ocdbt=False)
      _normalize_orbax_dir(tmp / "stats", created_ns)
      subdirs += ("stats",)
    # Older readers cannot rebuild newer entries: mark a checkpoint with the oldest version that
    # reads it, so they refuse it by name.
    version = _format_version(packed, structure)
    info = {"format": FORMAT, "format_version": version, "config": cfg.to_dict(),
            "metadata": meta, "structure": structure, "has_stats": stats is not None,
            "manifest": _manifest(tmp, subdirs)}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True, default=_json_default))
    if _before_rename is not None:  # test hook: simulate an interruption before the rename
      _before_rename(tmp)
  return pathlib.Path(path).absolute()


def _format_version(packed: Params, structure: Mapping[str, dict]) -> int:
  """4 with 2-bit embedding codes four to a byte, 3 with compact storage or float
  (transforms-only) weights, 2 with packed embeddings, else 1."""
  packed_leaf = lambda n: isinstance(n, (PackedEmbedding, PackedLinear))
  leaves = [leaf for leaf in jax.tree.leaves(packed, is_leaf=packed_leaf) if packed_leaf(leaf)]
  tables = [leaf for leaf in leaves if isinstance(leaf, PackedEmbedding)]
  if any(t.codes.dtype == jnp.uint8 for t in tables):
    return 4
  linears = [leaf for leaf in leaves if isinstance(leaf, PackedLinear)]
  def compact(w):
    t = w.transform
    return w.bits is None or w.scale.dtype != jnp.float32 or (w.zero is not None and (
        w.zero.dtype != jnp.float32)) or (t is not None and (
            any(t.hadamard) or t.rot1_scale is not None or t.rot2_scale is not None
            or (t.perm is not None and t.perm.dtype != jnp.int32)))
  if any(compact(w) for w in linears):
    return 3
  return 2 if any(d.get("kind") == "embedding" for d in structure.values()) else 1


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"metadata value of type {type(x).__name__} is not JSON-serialisable")


def read_info(path: Union[str, os.PathLike]) -> dict:
  """The parsed duquant.json of a packed checkpoint (no arrays read).

  Raises:
    FileNotFoundError: `path` does not exist.
    CheckpointError: not a packed checkpoint (an openpi FP one is named as such), or a corrupt JSON.
  """
  root = pathlib.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"{root}: no such checkpoint")
  if not root.is_dir():
    raise CheckpointError(f"{root}: not a checkpoint directory")
  f = root / INFO_FILE
  if not f.is_file():
    if (root / "params" / "_METADATA").exists() or (root / "_METADATA").exists():
      raise CheckpointError(f"{root}: an orbax checkpoint without {INFO_FILE}: a float (openpi) "
                            "checkpoint, not a duquant-jax packed one")
    raise CheckpointError(f"{root}: not an orbax checkpoint (no {INFO_FILE}, no params/_METADATA)")
  try:
    info = json.loads(f.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{root}/{INFO_FILE} is corrupt or truncated ({e})") from None
  if not isinstance(info, dict) or info.get("format") != FORMAT:
    raise CheckpointError(f"{root}/{INFO_FILE}: not a {FORMAT} checkpoint")
  if info.get("format_version", 0) > FORMAT_VERSION:
    raise CheckpointError(f"{root}: format version {info['format_version']} is newer than this "
                          f"library ({FORMAT_VERSION}); upgrade duquant-jax")
  for k in ("config", "metadata", "structure", "manifest"):
    if k not in info:
      raise CheckpointError(f"{root}/{INFO_FILE}: missing {k!r} (corrupt)")
  return info


def _restore_args(meta_tree: Any, sharding: ShardingLike, dtype: Any = None):
  ocp = _orbax()
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def one(kp, m):
    s = sharding
    if s is None:
      s = default
    elif not isinstance(s, jax.sharding.Sharding):
      s = s(path_str(kp), tuple(m.shape), m.dtype)
    cast = dtype if dtype is not None and jnp.issubdtype(m.dtype, jnp.floating) else None
    return ocp.ArrayRestoreArgs(sharding=s, dtype=cast, global_shape=tuple(m.shape))

  return jax.tree_util.tree_map_with_path(one, meta_tree)


def _orbax_metadata(d: pathlib.Path, ocdbt: Optional[bool] = None):
  ocp = _orbax()
  handler = ocp.PyTreeCheckpointHandler() if ocdbt is None else ocp.PyTreeCheckpointHandler(
      use_ocdbt=ocdbt)
  with _quiet_orbax(), ocp.Checkpointer(handler) as ck:
    m = ck.metadata(d.absolute())
  tree = getattr(m, "item_metadata", m)
  return getattr(tree, "tree", tree)


def _orbax_restore(d: pathlib.Path, restore_args, ocdbt: Optional[bool] = None):
  ocp = _orbax()
  handler = ocp.PyTreeCheckpointHandler() if ocdbt is None else ocp.PyTreeCheckpointHandler(
      use_ocdbt=ocdbt)
  with _quiet_orbax(), ocp.Checkpointer(handler) as ck:
    return ck.restore(d.absolute(), args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _first_line(e: BaseException) -> str:
  s = str(e).strip().splitlines()
  return f"{type(e).__name__}: {s[0] if s else ''}"[:300]


def load_packed(path: Union[str, os.PathLike], *, sharding: ShardingLike = None,
                verify: bool = True) -> tuple[Params, QuantConfig, Any, dict]:
  """Reads a checkpoint written by `save_packed`.

  Args:
    path: the checkpoint directory.
    sharding: where to put the arrays: a `jax.sharding.Sharding` for every array, a function
      (path, shape, dtype) -> Sharding, or None (the first default device).
    verify: check every file's size and sha256 against the manifest before reading (sizes are
      always checked).

  Returns:
    (packed tree, QuantConfig, CalibStats or None, metadata dict).

  Raises:
    FileNotFoundError: no such path.
    CheckpointError (a ValueError): not a packed checkpoint, corrupt or truncated files.
  """
  root = pathlib.Path(path)
  info = read_info(root)
  verify_files(root, hashes=verify)
  try:
    cfg = QuantConfig.from_dict(info["config"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{root}/{INFO_FILE}: bad config ({e})") from None
  try:
    meta_tree = _orbax_metadata(root / "params", ocdbt=False)
    restored = _orbax_restore(root / "params", _restore_args(meta_tree, sharding), ocdbt=False)
  except CheckpointError:
    raise
  except Exception as e:  # orbax / tensorstore raise many types for damaged files
    raise CheckpointError(f"{root}: corrupt or truncated checkpoint ({_first_line(e)})") from None
  if not isinstance(restored, dict) or "params" not in restored:
    raise CheckpointError(f"{root}/params: expected an item {{'params': tree}}")
  packed = _join_packed(restored["params"], info["structure"])
  stats = None
  if info.get("has_stats"):
    from duquant_jax.calibrate import from_tree
    try:
      meta_s = _orbax_metadata(root / "stats", ocdbt=False)
      stats = from_tree(_orbax_restore(root / "stats", _restore_args(meta_s, None), ocdbt=False))
    except Exception as e:
      raise CheckpointError(f"{root}/stats: corrupt or truncated ({_first_line(e)})") from None
  return packed, cfg, stats, dict(info["metadata"])
