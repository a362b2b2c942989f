"""Calibration data: batches drawn from rollouts, an .npz format for real users, and validation.

Calibration batches are an `Observation` whose leaves carry two leading axes (G, B): G batches of B
observations. The source documents' calibration used the first 32 batches of the first (short)
episodes; `calibration_batches` draws across whole episodes and across tasks (`sampling='spread'`), or,
for comparison, the first chunks of every episode (`sampling='first'`).

The .npz format (`load_npz_batches` / `save_npz_batches`) holds one array per key, each with leading
axes (G, B): `image/<camera>` (G, B, h, w, 3) float in [-1, 1] for every camera of `IMAGE_KEYS`,
`image_mask/<camera>` (G, B) bool, `state` (G, B, action_dim) float, `tokenized_prompt` (G, B,
max_token_len) int, `tokenized_prompt_mask` (G, B, max_token_len) bool.

Recordings (`load_recordings`, written by `duquant-jax serve --record DIR`): a folder of
`obs_<n>.npz` files, each one served request with the same keys and one leading axis (B, ...);
images may be uint8 (converted to [-1, 1] on loading, as openpi does). They are the model's inputs:
the state normalised and padded, the prompt tokenised.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.models.config import IMAGE_KEYS, Pi0Config
from duquant_jax.models.observation import Observation, image_to_float
from duquant_jax.models.pi0 import Policy
from duquant_jax.models.rollout import ToyEnv, rollout_batches

SAMPLINGS = ("first", "spread")
_CHECK_ROWS = 64  # batches per block when scanning for NaN/Inf (bounded host memory)


def _expected(cfg: Pi0Config) -> dict[str, tuple[tuple[int, ...], str]]:
  """npz key -> (per-observation shape, accepted numpy dtype kinds)."""
  size = cfg.vision.image_size
  out: dict[str, tuple[tuple[int, ...], str]] = {}
  for cam in IMAGE_KEYS:
    out[f"image/{cam}"] = ((size, size, 3), "f")
    out[f"image_mask/{cam}"] = ((), "b")
  out["state"] = ((cfg.action_dim,), "f")
  out["tokenized_prompt"] = ((cfg.max_token_len,), "iu")
  out["tokenized_prompt_mask"] = ((cfg.max_token_len,), "b")
  return out


def to_flat(batches: Observation) -> dict[str, Any]:
  """Observation -> {npz key: array}."""
  flat = {f"image/{k}": v for k, v in batches.images.items()}
  flat.update({f"image_mask/{k}": v for k, v in batches.image_masks.items()})
  flat.update(state=batches.state, tokenized_prompt=batches.tokenized_prompt,
              tokenized_prompt_mask=batches.tokenized_prompt_mask)
  return flat


def from_flat(flat: dict[str, Any]) -> Observation:
  """{npz key: array} -> Observation (keys must be complete; see `validate_batches`)."""
  return Observation(
      images={k: flat[f"image/{k}"] for k in IMAGE_KEYS},
      image_masks={k: flat[f"image_mask/{k}"] for k in IMAGE_KEYS},
      state=flat["state"], tokenized_prompt=flat["tokenized_prompt"],
      tokenized_prompt_mask=flat["tokenized_prompt_mask"])


def _all_finite(x) -> bool:
  """True if every value of x (G, ...) is finite; checks `_CHECK_ROWS` batches at a time."""
  for start in range(0, x.shape[0], _CHECK_ROWS):
    if not np.isfinite(np.asarray(x[start:start + _CHECK_ROWS])).all():
      return False
  return True


def validate_flat(flat: dict[str, Any], cfg: Pi0Config) -> tuple[int, int]:
  """Checks {key: (G, B, ...) array} against the model config -> (G, B).

  Raises:
    ValueError naming the key: missing or unknown key, wrong shape or dtype, empty (G or B is 0),
    NaN or Inf in a float array.
  """
  expected = _expected(cfg)
  missing = [k for k in expected if k not in flat]
  if missing:
    raise ValueError(f"calibration data is missing keys {missing}; expected keys {sorted(expected)}")
  unknown = [k for k in flat if k not in expected]
  if unknown:
    raise ValueError(f"calibration data has unknown keys {unknown}; expected keys {sorted(expected)}")
  state = flat["state"]
  if not hasattr(state, "shape") or len(state.shape) < 2:
    raise ValueError(f"calibration data 'state' must have leading axes (G, B), got shape "
                     f"{getattr(state, 'shape', None)}")
  if len(state.shape) == 2:
    raise ValueError(f"calibration data 'state' has shape {tuple(state.shape)}: a single batch (B, ...); "
                     "batches need leading axes (G, B) (use add_group_axis for one batch)")
  g, b = state.shape[:2]
  if g == 0 or b == 0:
    raise ValueError(f"calibration data is empty: 'state' has shape {tuple(state.shape)} (G={g}, B={b})")
  for key, (shape, kinds) in expected.items():
    x = flat[key]
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"calibration data {key!r} must be an array, got {type(x).__name__}")
    if tuple(x.shape) != (g, b) + shape:
      raise ValueError(f"calibration data {key!r} has shape {tuple(x.shape)}, expected "
                       f"(G, B) + {shape} = {(g, b) + shape}")
    if np.dtype(x.dtype).kind not in kinds:
      raise ValueError(f"calibration data {key!r} has dtype {x.dtype}, expected kind {kinds!r}")
    if kinds == "f" and not _all_finite(x):
      raise ValueError(f"calibration data {key!r} contains NaN or Inf")
  return int(g), int(b)


def validate_batches(batches: Observation, cfg: Pi0Config) -> tuple[int, int]:
  """Checks an Observation of stacked batches (G, B, ...) -> (G, B); see `validate_flat`."""
  if not isinstance(batches, Observation):
    raise TypeError(f"calibration batches must be an Observation with leading axes (G, B), got "
                    f"{type(batches).__name__}")
  for name, d in (("image", batches.images), ("image_mask", batches.image_masks)):
    extra = sorted(set(d) - set(IMAGE_KEYS))
    if extra:
      raise ValueError(f"calibration data has unknown cameras {name}/{extra}; expected {IMAGE_KEYS}")
  return validate_flat(to_flat(batches), cfg)


def _as_bool_mask(key: str, x: np.ndarray) -> np.ndarray:
  """Integer 0/1 masks (as some writers store them) -> bool; anything else is left for validation."""
  if x.dtype.kind in "iu" and key.startswith(("image_mask/", "tokenized_prompt_mask")):
    if x.size and not np.isin(x, (0, 1)).all():
      raise ValueError(f"calibration data {key!r} is an integer mask with values other than 0 and 1")
    return x.astype(bool)
  return x


def load_npz_batches(path: str | os.PathLike, cfg: Pi0Config) -> Observation:
  """Loads stacked observations (G, B, ...) from an .npz (format in the module docstring).

  Args:
    path: the .npz file. cfg: the model config the data must fit (image size, dims, prompt length).

  Returns:
    an Observation of numpy arrays with leading axes (G, B).

  Raises:
    ValueError naming the key for a missing/unknown key, a wrong shape or dtype, an empty file or
    batch axis, or NaN/Inf values.
  """
  with np.load(path, allow_pickle=False) as data:
    if not data.files:
      raise ValueError(f"calibration data {os.fspath(path)!r} is empty (no arrays)")
    flat = {k: _as_bool_mask(k, data[k]) for k in data.files}
  validate_flat(flat, cfg)
  return from_flat(flat)


def load_recordings(path: str | os.PathLike, cfg: Pi0Config, *, batch_size: int = 4,
                    max_batches: int | None = None) -> Observation:
  """Loads a folder of recorded observations (`duquant-jax serve --record`) as calibration batches.

  The files are read in name order, their observations concatenated and grouped into G batches of
  B = min(batch_size, N) observations (a remainder of fewer than B is left out).

  Args:
    path: the folder of `*.npz` recordings. cfg: the model config the data must fit.
    batch_size: B. max_batches: read at most this many batches (None: all).

  Returns:
    an Observation of numpy arrays with leading axes (G, B), images float32 in [-1, 1].

  Raises:
    FileNotFoundError: no such folder. ValueError naming the file and key for an empty folder, a
    missing / unknown key, a wrong shape or dtype, or NaN / Inf.
  """
  root = pathlib.Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such recordings folder")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  files = sorted(root.glob("*.npz"))
  if not files:
    raise ValueError(f"{root}: no recorded observations (*.npz) in this folder")
  parts: dict[str, list[np.ndarray]] = {}
  count = 0
  limit = None if max_batches is None else max_batches * batch_size
  for f in files:
    with np.load(f, allow_pickle=False) as data:
      flat = {k: _as_bool_mask(k, data[k]) for k in data.files}
    flat = {k: image_to_float(v) if k.startswith("image/") else v for k, v in flat.items()}
    try:
      validate_flat({k: v[None] for k, v in flat.items()}, cfg)
    except ValueError as e:
      raise ValueError(f"{f}: {e}") from None
    for k, v in flat.items():
      parts.setdefault(k, []).append(v)
    count += len(flat["state"])
    if limit is not None and count >= limit:
      break
  b = min(batch_size, count)
  g = count // b
  if max_batches is not None:
    g = min(g, max_batches)
  stacked = {k: np.concatenate(v)[:g * b].reshape((g, b) + v[0].shape[1:])
             for k, v in parts.items()}
  validate_flat(stacked, cfg)
  return from_flat(stacked)


def save_npz_batches(path: str | os.PathLike, batches: Observation) -> None:
  """Writes stacked observations (G, B, ...) in the format `load_npz_batches` reads."""
  np.savez(path, **{k: np.asarray(v) for k, v in to_flat(batches).items()})


def _pick_chunks(sampling: str, per_episode: int, num_chunks: int) -> np.ndarray:
  """Chunk indices taken from every episode: the first ones, or evenly spread over the episode."""
  if sampling == "first":
    return np.arange(per_episode)
  return np.unique(np.round(np.linspace(0, num_chunks - 1, per_episode)).astype(int))


def calibration_batches(policy: Policy, params, rng: jax.Array, *, num_batches: int,
                        batch_size: int, sampling: str = "spread", num_chunks: int = 16,
                        num_episodes: int | None = None, env: ToyEnv | None = None,
                        num_steps: int = 10) -> Observation:
  """Calibration batches from closed-loop rollouts of the FP policy in the toy environment.

  Episodes run task e % env.num_tasks. With `sampling='spread'`, every episode of `num_chunks` chunks
  contributes observations evenly spaced over its whole length; with `'first'`, its first chunks
  only (the source documents' choice, for comparison). The chosen (episode, chunk) observations are
  shuffled with `rng` so every batch mixes tasks, episodes and times.

  Args:
    policy, params: the FP policy to roll out.
    rng: key of the rollouts and the shuffle.
    num_batches: G. batch_size: B.
    sampling: 'first' or 'spread'.
    num_chunks: episode length in action chunks (for 'spread'; 'first' rolls out only what it uses).
    num_episodes: episodes to roll out (default: enough for G * B observations, at least one per
      task, at most one observation per episode chunk).
    env: the environment (default `ToyEnv(policy.cfg)`).
    num_steps: flow steps of the rollout policy.

  Returns:
    an Observation of numpy arrays with leading axes (G, B).
  """
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling {sampling!r} must be one of {SAMPLINGS}")
  if num_batches < 1 or batch_size < 1 or num_chunks < 1:
    raise ValueError(f"need num_batches, batch_size, num_chunks >= 1, got {num_batches}, "
                     f"{batch_size}, {num_chunks}")
  env = env or ToyEnv(policy.cfg)
  total = num_batches * batch_size
  if num_episodes is None:
    num_episodes = max(env.num_tasks, -(-total // num_chunks))
  per_episode = -(-total // num_episodes)
  if per_episode > num_chunks:
    raise ValueError(f"{num_episodes} episodes of {num_chunks} chunks cannot give {total} observations; "
                     "raise num_episodes or num_chunks")
  chunks = _pick_chunks(sampling, per_episode, num_chunks)
  if len(chunks) * num_episodes < total:
    raise ValueError(f"not enough distinct observations for {total}; raise num_episodes")
  length = int(chunks.max()) + 1
  k_roll, k_perm = jax.random.split(rng)
  obs = rollout_batches(policy, params, k_roll, num_episodes=num_episodes, num_chunks=length,
                        batch_size=num_episodes, env=env, num_steps=num_steps)
  # (1, C, E, ...) -> the chosen chunks of every episode, flattened to a pool (E * c, ...).
  pool = jax.tree.map(lambda x: np.asarray(x)[0][chunks].reshape((-1,) + x.shape[3:]), obs)
  order = np.asarray(jax.random.permutation(k_perm, len(chunks) * num_episodes))[:total]
  return jax.tree.map(lambda x: x[order].reshape((num_batches, batch_size) + x.shape[1:]), pool)


def add_group_axis(obs: Observation) -> Observation:
  """One batch (B, ...) -> a stream of one batch (1, B, ...)."""
  return jax.tree.map(lambda x: jnp.asarray(x)[None], obs)
