"""openpi interoperability: its wire format, its observation dicts, its norm stats, its model API.

What an openpi deployment exchanges, written for this package from openpi's documented formats
(openpi at commit 15a9616, openpi-client 0.1.x); no openpi code is used or needed:

- msgpack-numpy (`packb` / `unpackb`): msgpack where a numpy array travels as a map
  {b"__ndarray__": True, b"data": raw bytes (C order), b"dtype": dtype.str, b"shape": [...]} and a
  numpy scalar as {b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}. Decoding checks
  every array (dtype kind, shape, byte count) and never builds object arrays.
- Observation requests (`RequestAdapter`): openpi's model-level dict of ONE observation, e.g.
  {"image": {camera: (h, w, 3) uint8 or float}, "image_mask": {camera: bool} (optional),
  "state": (s,) float, "prompt": str} or with "tokenized_prompt" / "tokenized_prompt_mask" instead
  of "prompt". A leading batch axis on every array is accepted too. The adapter does what openpi's
  input transforms do for such a dict: normalise the state with the norm stats, tokenise the prompt
  (pi0.5: with the discretised state in the text), resize uint8 images of another size with padding,
  pad the state to the model's action_dim, convert uint8 images to [-1, 1]; on the way out it
  unnormalises the actions.
- Norm stats (`load_norm_stats`): openpi's `norm_stats.json`, {"norm_stats": {"state": {"mean",
  "std", "q01", "q99"}, "actions": {...}}}; z-score or quantile (q01 / q99 -> [-1, 1]) modes.
- `OpenpiModel`: openpi's model call, `sample_actions(rng, observation, num_steps=10, noise=None)`,
  on our policy and a (packed or float) param tree.

Axes: B batch, A action horizon, s state dims given by the client, d action_dim of the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np

from duquant_jax.models.config import IMAGE_KEYS, Pi0Config
from duquant_jax.models.observation import Observation, as_observation, image_to_float

__all__ = ["NORM_STATS_FILE", "NormStats", "OpenpiModel", "PaligemmaTokenizer", "RequestAdapter",
           "RequestError", "find_norm_stats", "load_norm_stats", "normalize", "packb",
           "resize_with_pad", "unnormalize", "unpackb"]

NORM_STATS_FILE = "norm_stats.json"
_EPS = 1e-6  # openpi's: (x - mean) / (std + 1e-6), (x - q01) / (q99 - q01 + 1e-6)
_DECODE_KINDS = "biufUS"  # numbers, bools, fixed-width strings; never object / void / complex


class RequestError(ValueError):
  """A request that cannot be served (malformed, wrong shape or dtype, missing key): the client's
  fault, answered with this message."""


# ----------------------------------------------------------------------------------------------
# msgpack-numpy.


def _encode(obj: Any) -> Any:
  if isinstance(obj, jax.Array):
    obj = np.asarray(obj)
  if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in "OVc":
    raise TypeError(f"cannot send an array of dtype {obj.dtype}")
  if isinstance(obj, np.ndarray):
    return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
  if isinstance(obj, np.generic):
    return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
  raise TypeError(f"cannot send a {type(obj).__name__}")


def _dtype(spec: Any) -> np.dtype:
  if isinstance(spec, bytes):
    spec = spec.decode("ascii", "replace")
  if not isinstance(spec, str):
    raise RequestError(f"array dtype must be a string, got {type(spec).__name__}")
  try:
    dt = np.dtype(spec)
  except TypeError:
    raise RequestError(f"unknown array dtype {spec!r}") from None
  if dt.kind not in _DECODE_KINDS or dt.fields is not None or dt.subdtype is not None:
    raise RequestError(f"array dtype {spec!r} is not accepted (numbers, bools and strings only)")
  return dt


def _decode(obj: dict) -> Any:
  if b"__ndarray__" in obj:
    dt = _dtype(obj.get(b"dtype"))
    shape, data = obj.get(b"shape"), obj.get(b"data")
    if (not isinstance(shape, (list, tuple))
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
      raise RequestError(f"array shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(data, bytes):
      raise RequestError("array data must be bytes")
    if len(data) != math.prod(shape) * dt.itemsize:
      raise RequestError(f"array of shape {tuple(shape)} and dtype {dt.str} needs "
                         f"{math.prod(shape) * dt.itemsize} bytes, got {len(data)}")
    return np.ndarray(shape=tuple(shape), dtype=dt, buffer=data)  # a read-only view of data
  if b"__npgeneric__" in obj:
    dt = _dtype(obj.get(b"dtype"))
    try:
      return dt.type(obj.get(b"data"))
    except (TypeError, ValueError, OverflowError) as e:
      raise RequestError(f"bad numpy scalar of dtype {dt.str}: {e}") from None
  return obj


def packb(obj: Any) -> bytes:
  """Encodes dicts, lists, numbers, strings and numpy / jax arrays as msgpack-numpy bytes.

  Raises:
    TypeError: an object or array dtype (object, void, complex) that cannot be sent.
  """
  import msgpack
  return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
  """Decodes msgpack-numpy bytes; arrays come back as read-only numpy arrays.

  Raises:
    RequestError: bytes that are not msgpack, or an array entry that is inconsistent (dtype not
      accepted, shape not a list of ints, byte count not matching), with what was wrong.
  """
  import msgpack
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise RequestError(f"expected msgpack bytes, got {type(data).__name__}")
  try:
    return msgpack.unpackb(data, object_hook=_decode, raw=False)
  except RequestError:
    raise
  except Exception as e:  # msgpack raises many types (ExtraData, FormatError, StackError, ...)
    raise RequestError(f"not a msgpack-numpy message ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# Norm stats.


@dataclasses.dataclass(frozen=True, eq=False)
class NormStats:
  """openpi's per-key normalisation statistics (1-D arrays over the key's last axis)."""
  mean: np.ndarray  # (n,)
  std: np.ndarray  # (n,)
  q01: Optional[np.ndarray] = None  # (n,) 1st percentile; needed for quantile mode
  q99: Optional[np.ndarray] = None  # (n,) 99th percentile

  def validate(self, name: str = "norm stats") -> None:
    """Raises ValueError naming `name` for non-1-D, mismatched or non-finite entries."""
    n = self.mean.shape
    for field in ("mean", "std", "q01", "q99"):
      x = getattr(self, field)
      if x is None:
        continue
      if x.ndim != 1 or x.shape != n:
        raise ValueError(f"{name}/{field}: expected shape {n} like mean, got {x.shape}")
      if not np.isfinite(x).all():
        raise ValueError(f"{name}/{field}: contains NaN or Inf")


def find_norm_stats(ckpt: Union[str, os.PathLike]) -> Optional[pathlib.Path]:
  """The norm_stats.json of a checkpoint directory: `CKPT/norm_stats.json`, else the one file under
  `CKPT/assets/` (where openpi keeps it, `assets/<asset_id>/norm_stats.json`); None if none.

  Raises:
    ValueError: several under assets/ (pass one explicitly).
  """
  root = pathlib.Path(ckpt)
  if (root / NORM_STATS_FILE).is_file():
    return root / NORM_STATS_FILE
  found = sorted((root / "assets").rglob(NORM_STATS_FILE)) if (root / "assets").is_dir() else []
  if len(found) > 1:
    raise ValueError(f"{root}: several norm stats files {[str(p) for p in found]}; pick one")
  return found[0] if found else None


def load_norm_stats(path: Union[str, os.PathLike]) -> dict[str, NormStats]:
  """Reads openpi's norm_stats.json (the file, or a directory holding it).

  Returns:
    {key: NormStats}, keys as in the file (openpi's: 'state', 'actions').

  Raises:
    FileNotFoundError; ValueError naming the key for malformed JSON, missing mean / std, mismatched
    lengths or non-finite values.
  """
  p = pathlib.Path(path)
  if p.is_dir():
    p = p / NORM_STATS_FILE
  if not p.is_file():
    raise FileNotFoundError(f"{p}: no such norm stats file")
  try:
    d = json.loads(p.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{p}: not valid JSON ({e})") from None
  if not isinstance(d, dict) or not isinstance(d.get("norm_stats"), dict):
    raise ValueError(f"{p}: expected {{'norm_stats': {{key: {{'mean', 'std', ...}}}}}}")
  out = {}
  for key, entry in d["norm_stats"].items():
    if not isinstance(entry, dict) or "mean" not in entry or "std" not in entry:
      raise ValueError(f"{p}: norm_stats/{key} needs 'mean' and 'std'")
    try:
      arrays = {f: None if entry.get(f) is None else np.asarray(entry[f], np.float32)
                for f in ("mean", "std", "q01", "q99")}
    except (TypeError, ValueError) as e:
      raise ValueError(f"{p}: norm_stats/{key}: not lists of numbers ({e})") from None
    stats = NormStats(**arrays)
    stats.validate(f"{p}: norm_stats/{key}")
    out[key] = stats
  return out


def _check_quantiles(stats: NormStats, key: str) -> None:
  if stats.q01 is None or stats.q99 is None:
    raise ValueError(f"norm stats {key!r} have no q01 / q99: quantile mode needs them")


def normalize(x: np.ndarray, stats: NormStats, *, quantile: bool, key: str = "") -> np.ndarray:
  """openpi's Normalize on the last axis (stats cut to x's width):
  z-score (x - mean) / (std + 1e-6), or quantile (x - q01) / (q99 - q01 + 1e-6) * 2 - 1.
  Dims past the stats' width (zero padding a client already added) pass through unchanged, as
  openpi pads after normalising.

  Raises:
    ValueError: quantile mode without q01 / q99.
  """
  n = min(x.shape[-1], stats.mean.shape[0])
  head, tail = x[..., :n], x[..., n:]
  if quantile:
    _check_quantiles(stats, key)
    q01, q99 = stats.q01[:n], stats.q99[:n]
    head = (head - q01) / (q99 - q01 + _EPS) * 2.0 - 1.0
  else:
    head = (head - stats.mean[:n]) / (stats.std[:n] + _EPS)
  return np.concatenate([head, tail], axis=-1).astype(x.dtype, copy=False)


def unnormalize(x: np.ndarray, stats: NormStats, *, quantile: bool, key: str = "") -> np.ndarray:
  """openpi's Unnormalize on the last axis: x * (std + 1e-6) + mean, or (x + 1) / 2 *
  (q99 - q01 + 1e-6) + q01. Dims past the stats' width: z-score treats them as mean 0, std 1
  (openpi's padding), quantile mode passes them through."""
  n = min(x.shape[-1], stats.mean.shape[0])
  head, tail = x[..., :n], x[..., n:]
  if quantile:
    _check_quantiles(stats, key)
    head = (head + 1.0) / 2.0 * (stats.q99[:n] - stats.q01[:n] + _EPS) + stats.q01[:n]
  else:
    head = head * (stats.std[:n] + _EPS) + stats.mean[:n]
    tail = tail * np.float32(1.0 + _EPS)
  return np.concatenate([head, tail], axis=-1).astype(x.dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# Prompt tokenizer.


class PaligemmaTokenizer:
  """openpi's PaliGemma prompt tokenisation on a SentencePiece model file that the user supplies.

  pi0: BOS + tokens of the cleaned prompt + tokens of "\\n". pi0.5 (discrete state input): BOS +
  tokens of "Task: {prompt}, State: {s_1 s_2 ...};\\nAction: " where s_i is the normalised state
  discretised into 256 bins over [-1, 1]. Cleaning: strip, '_' and newlines -> spaces. Padded with 0
  (mask False) or cut to `max_len`.
  """

  def __init__(self, model_file: Union[str, os.PathLike], max_len: int):
    import sentencepiece
    p = pathlib.Path(model_file)
    if not p.is_file():
      raise FileNotFoundError(f"{p}: no such SentencePiece model file")
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_proto=p.read_bytes())
    except Exception as e:  # sentencepiece raises RuntimeError / OSError on a bad file
      raise ValueError(f"{p}: not a SentencePiece model ({e})") from None
    self.max_len = max_len
    self.vocab_size = int(self._sp.get_piece_size())

  def tokenize(self, prompt: str,
               state: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens (max_len,) int32, mask (max_len,) bool; with `state` (s,): the discrete-state form."""
    text = prompt.strip().replace("_", " ").replace("\n", " ")
    if state is not None:
      bins = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
      text = f"Task: {text}, State: {' '.join(map(str, bins))};\nAction: "
      ids = self._sp.encode(text, add_bos=True)
    else:
      ids = self._sp.encode(text, add_bos=True) + self._sp.encode("\n")
    ids = ids[:self.max_len]
    tokens = np.zeros((self.max_len,), np.int32)
    tokens[:len(ids)] = ids
    return tokens, np.arange(self.max_len) < len(ids)


# ----------------------------------------------------------------------------------------------
# Requests <-> model observations.


def resize_with_pad(image: np.ndarray, size: int) -> np.ndarray:
  """(h, w, 3) uint8 -> (size, size, 3) uint8: scaled to fit with its aspect ratio kept (PIL
  bilinear, sizes rounded down), centred on black; what openpi's ResizeImages transform does
  (tf.image.resize_with_pad's geometry)."""
  from PIL import Image
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  scale = max(h / size, w / size)
  nh, nw = max(int(h / scale), 1), max(int(w / scale), 1)
  resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
      (nw, nh), resample=Image.BILINEAR))
  out = np.zeros((size, size, 3), np.uint8)
  top, left = (size - nh) // 2, (size - nw) // 2
  out[top:top + nh, left:left + nw] = resized
  return out


def _array(x: Any, key: str) -> np.ndarray:
  if isinstance(x, (np.ndarray, np.generic, bool, int, float)) and not isinstance(x, str):
    return np.asarray(x)
  if isinstance(x, list):
    try:
      return np.asarray(x)
    except ValueError:
      pass
  raise RequestError(f"{key}: expected an array, got {type(x).__name__}")


def _prompt_text(x: Any) -> str:
  if isinstance(x, bytes):
    x = x.decode("utf-8", "replace")
  if isinstance(x, np.ndarray) and x.dtype.kind in "US" and x.size == 1:
    x = x.reshape(()).item()
    x = x.decode("utf-8", "replace") if isinstance(x, bytes) else x
  if isinstance(x, np.str_):
    x = str(x)
  if not isinstance(x, str):
    raise RequestError(f"prompt: expected a string, got {type(x).__name__}")
  return x


@dataclasses.dataclass(frozen=True, eq=False)
class RequestAdapter:
  """openpi's input / output transforms for model-level observation dicts (module docstring).

  Fields:
    cfg: the policy's config (image size, action_dim, action_horizon, max_token_len, vocab, pi05).
    norm_stats: {key: NormStats} ('state' normalises the state, 'actions' unnormalises the actions);
      empty: no normalisation.
    quantile: quantile normalisation (openpi's choice for pi0.5) instead of z-score.
    tokenizer: tokenises a request's 'prompt'; None: requests must carry tokenized_prompt.
    action_dims: reply with the first `action_dims` action dims only (what openpi's robot output
      transforms do); None: all of action_dim.
    discrete_state: put the discretised state into the prompt (openpi's `discrete_state_input`);
      None: openpi's default, True for pi0.5 (its pi05_libero config turns it off).
  """
  cfg: Pi0Config
  norm_stats: Mapping[str, NormStats] = dataclasses.field(default_factory=dict)
  quantile: bool = False
  tokenizer: Optional[PaligemmaTokenizer] = None
  action_dims: Optional[int] = None
  discrete_state: Optional[bool] = None

  def __post_init__(self):
    if self.quantile:
      for k, s in self.norm_stats.items():
        _check_quantiles(s, k)
    if self.action_dims is not None and not 0 < self.action_dims <= self.cfg.action_dim:
      raise ValueError(f"action_dims {self.action_dims} must be in 1..{self.cfg.action_dim}")

  def to_model(self, request: Any) -> tuple[Observation, dict[str, Any]]:
    """One request -> (model Observation of numpy arrays with a batch axis, `from_model`'s context).

    Raises:
      RequestError naming the key for anything the model cannot take.
    """
    try:
      return self._to_model(request)
    except RequestError:
      raise
    except (ValueError, TypeError) as e:
      raise RequestError(str(e)) from None

  def _to_model(self, request: Any):
    c = self.cfg
    if not isinstance(request, Mapping):
      raise RequestError(f"expected a dict observation, got {type(request).__name__}")
    for key in ("image", "state"):
      if key not in request:
        raise RequestError(f"observation is missing {key!r}; got keys {sorted(map(str, request))}")
    state = _array(request["state"], "state")
    if state.dtype.kind not in "iuf" or state.ndim not in (1, 2) or state.shape[-1] == 0:
      raise RequestError(f"state: expected (s,) or (B, s) numbers, got {state.shape} {state.dtype}")
    batched = state.ndim == 2
    if not batched:
      state = state[None]
    b, s = state.shape
    if s > c.action_dim:
      raise RequestError(f"state: {s} dims, but the model takes at most {c.action_dim}")
    state = state.astype(np.float32)
    if not np.isfinite(state).all():
      raise RequestError("state: contains NaN or Inf")

    images, masks = request["image"], request.get("image_mask") or {}
    if not isinstance(images, Mapping) or not isinstance(masks, Mapping):
      raise RequestError("image and image_mask must be dicts keyed by camera name")
    size = c.vision.image_size
    out_images, out_masks, raw_images = {}, {}, {}
    for cam in IMAGE_KEYS:
      if cam not in images:
        raise RequestError(f"image: missing camera {cam!r}; expected {list(IMAGE_KEYS)}")
      img = _array(images[cam], f"image/{cam}")
      if not batched:
        img = img[None]
      if (img.dtype == np.uint8 and img.ndim == 4 and len(img) == b and img.shape[-1] == 3
          and img.shape[1:3] != (size, size) and min(img.shape[1:3]) > 0):
        img = np.stack([resize_with_pad(x, size) for x in img])  # openpi's ResizeImages
      if img.shape != (b, size, size, 3) or not (img.dtype == np.uint8 or img.dtype.kind == "f"):
        want = f"({size}, {size}, 3)" if not batched else f"({b}, {size}, {size}, 3)"
        raise RequestError(f"image/{cam}: expected {want} float or (h, w, 3) uint8, got "
                           f"{img.shape[1:] if not batched else img.shape} {img.dtype}")
      if img.dtype != np.uint8:
        img = img.astype(np.float32)
        if not np.isfinite(img).all():
          raise RequestError(f"image/{cam}: contains NaN or Inf")
      raw_images[cam] = img
      out_images[cam] = image_to_float(raw_images[cam])
      if cam in masks:
        m = _array(masks[cam], f"image_mask/{cam}")
        m = m.reshape(()) if (not batched and m.size == 1) else m
        if not batched:
          m = m[None]
        if m.shape != (b,) or m.dtype.kind not in "biu":
          raise RequestError(f"image_mask/{cam}: expected a bool per observation, got "
                             f"{m.shape} {m.dtype}")
        out_masks[cam] = m != 0
      else:
        out_masks[cam] = np.ones((b,), bool)

    if "state" in self.norm_stats:
      state = normalize(state, self.norm_stats["state"], quantile=self.quantile, key="state")
      state = state.astype(np.float32)
    tokens, token_mask = self._prompt(request, state, batched, b)
    padded = np.zeros((b, c.action_dim), np.float32)
    padded[:, :s] = state

    noise = None
    if "noise" in request:  # duquant-jax extension, as openpi's Policy.infer(obs, noise=...)
      noise = _array(request["noise"], "noise").astype(np.float32)
      want = (c.action_horizon, c.action_dim)
      want = (b,) + want if batched else want
      if noise.shape != want:
        raise RequestError(f"noise: expected {want}, got {noise.shape}")
      noise = noise if batched else noise[None]
    obs = Observation(images=out_images, image_masks=out_masks, state=padded,
                      tokenized_prompt=tokens, tokenized_prompt_mask=token_mask)
    record = Observation(images=raw_images, image_masks=out_masks, state=padded,
                         tokenized_prompt=tokens, tokenized_prompt_mask=token_mask)
    return obs, {"batched": batched, "state": request["state"], "noise": noise, "record": record}

  def _prompt(self, request: Mapping, state: np.ndarray, batched: bool, b: int):
    c = self.cfg
    if "tokenized_prompt" in request or "tokenized_prompt_mask" in request:
      if "tokenized_prompt" not in request or "tokenized_prompt_mask" not in request:
        raise RequestError("tokenized_prompt and tokenized_prompt_mask must be given together")
      tokens = _array(request["tokenized_prompt"], "tokenized_prompt")
      mask = _array(request["tokenized_prompt_mask"], "tokenized_prompt_mask")
      want = (b, c.max_token_len) if batched else (c.max_token_len,)
      if tokens.shape != want or tokens.dtype.kind not in "iu":
        raise RequestError(f"tokenized_prompt: expected {want} ints, got {tokens.shape} "
                           f"{tokens.dtype}")
      if mask.shape != want or mask.dtype.kind not in "biu":
        raise RequestError(f"tokenized_prompt_mask: expected {want} bools, got {mask.shape} "
                           f"{mask.dtype}")
      if tokens.size and (tokens.min() < 0 or tokens.max() >= c.vocab_size):
        raise RequestError(f"tokenized_prompt: token ids must be in [0, {c.vocab_size})")
      tokens, mask = tokens.astype(np.int32), mask != 0
      return (tokens, mask) if batched else (tokens[None], mask[None])
    if "prompt" not in request:
      raise RequestError("observation needs 'prompt' (or 'tokenized_prompt' and "
                         "'tokenized_prompt_mask')")
    if self.tokenizer is None:
      raise RequestError("this server has no tokenizer (start it with --tokenizer "
                         "paligemma_tokenizer.model) and the request has no 'tokenized_prompt'")
    prompts = request["prompt"]
    if batched:
      if isinstance(prompts, str) or len(prompts) != b:
        raise RequestError(f"prompt: a batched request needs {b} prompts")
      texts = [_prompt_text(p) for p in prompts]
    else:
      texts = [_prompt_text(prompts)]
    discrete = c.pi05 if self.discrete_state is None else self.discrete_state
    out = [self.tokenizer.tokenize(t, state[i] if discrete else None) for i, t in enumerate(texts)]
    tokens = np.stack([t for t, _ in out])
    if tokens.max() >= c.vocab_size:
      raise RequestError(f"prompt: the tokenizer gave token id {int(tokens.max())}, outside the "
                         f"model's vocabulary of {c.vocab_size}")
    return tokens, np.stack([m for _, m in out])

  def from_model(self, actions: np.ndarray, context: Mapping[str, Any]) -> dict[str, Any]:
    """Model actions (B, A, d) -> the reply dict {"actions": (A, d') or (B, A, d'), "state"}."""
    actions = np.asarray(actions, np.float32)
    if "actions" in self.norm_stats:
      actions = unnormalize(actions, self.norm_stats["actions"], quantile=self.quantile,
                            key="actions")
    if self.action_dims is not None:
      actions = actions[..., :self.action_dims]
    if not context["batched"]:
      actions = actions[0]
    return {"actions": np.ascontiguousarray(actions, np.float32),
            "state": np.asarray(context["state"], np.float32)}


# ----------------------------------------------------------------------------------------------
# openpi's model API.


class OpenpiModel:
  """Our policy with openpi's `BaseModel.sample_actions(rng, observation, **kwargs)` signature.

  Example:
    model = OpenpiModel(policy, packed)
    actions = model.sample_actions(jax.random.key(0), openpi_observation, num_steps=10)

  The observation may be openpi's `Observation`, its dict form or ours (uint8 or float images; see
  `as_observation`). One jitted program per num_steps and input shapes.
  """

  def __init__(self, policy: Any, params: Any):
    self.policy = policy
    self.params = params
    cfg = policy.cfg
    self.action_dim, self.action_horizon, self.max_token_len = (cfg.action_dim, cfg.action_horizon,
                                                                cfg.max_token_len)
    self._sample = jax.jit(
        lambda params, obs, rng, noise, num_steps: policy.sample_actions(
            params, obs, rng, num_steps, noise=noise), static_argnums=(4,))

  def sample_actions(self, rng: jax.Array, observation: Any, *, num_steps: int = 10,
                     noise: Optional[jax.Array] = None) -> jax.Array:
    """-> actions (B, action_horizon, action_dim) by `num_steps` Euler flow steps.

    Raises:
      TypeError / ValueError: an observation `as_observation` refuses, or shapes that do not fit.
    """
    obs = as_observation(observation, self.policy.cfg)
    return self._sample(self.params, obs, rng, noise, int(num_steps))
