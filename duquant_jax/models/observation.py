"""Policy observations shaped like openpi's, their validation, and a synthetic generator.

An observation holds, for batch size B:
  images        {name: (B, h, w, 3) float32 in [-1, 1]} for the three cameras in `IMAGE_KEYS`;
  image_masks   {name: (B,) bool}, False for a missing camera;
  state         (B, action_dim) float32;
  tokenized_prompt       (B, max_token_len) int32, starting with BOS (token 2);
  tokenized_prompt_mask  (B, max_token_len) bool.

`as_observation` takes what openpi's code passes around (its `Observation`, or the nested dict form
with keys 'image', 'image_mask', 'state', 'tokenized_prompt', ...) and returns ours, converting as
openpi's `Observation.from_dict` and `preprocess_observation` do: uint8 images become float32 in
[-1, 1], a camera without a mask counts as present.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.models.config import IMAGE_KEYS, Pi0Config

BOS_TOKEN = 2


@flax.struct.dataclass
class Observation:
  images: dict[str, jax.Array]
  image_masks: dict[str, jax.Array]
  state: jax.Array
  tokenized_prompt: jax.Array
  tokenized_prompt_mask: jax.Array

  @property
  def batch_size(self) -> int:
    return self.state.shape[0]

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "Observation":
    """Builds an observation from openpi's nested dict ('image', 'image_mask', 'state', ...)."""
    required = ("image", "image_mask", "state", "tokenized_prompt", "tokenized_prompt_mask")
    for key in required:
      if key not in data:
        raise ValueError(f"observation is missing key {key!r}; expected keys {required}")
    return cls(images=dict(data["image"]), image_masks=dict(data["image_mask"]), state=data["state"],
               tokenized_prompt=data["tokenized_prompt"],
               tokenized_prompt_mask=data["tokenized_prompt_mask"])

  def to_dict(self) -> dict[str, Any]:
    return {"image": dict(self.images), "image_mask": dict(self.image_masks), "state": self.state,
            "tokenized_prompt": self.tokenized_prompt,
            "tokenized_prompt_mask": self.tokenized_prompt_mask}


def image_to_float(x: Any) -> Any:
  """uint8 image values [0, 255] -> float32 [-1, 1] (openpi's x / 255 * 2 - 1); float images as is.

  Works on numpy and jax arrays, traced or not."""
  if np.dtype(x.dtype) == np.uint8:
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.asarray(x, xp.float32) / 255.0 * 2.0 - 1.0
  return x


def as_observation(obj: Any, cfg: Pi0Config | None = None) -> Observation:
  """Our `Observation` from openpi's `Observation`, its dict form, or ours.

  Accepted, with one leading batch axis B on every array:
    - an `Observation` of this package (returned with the conversions below);
    - any object with openpi's attribute names (`images`, `image_masks`, `state`,
      `tokenized_prompt`, `tokenized_prompt_mask`; `token_ar_mask` / `token_loss_mask`, used only by
      pi0-FAST, are ignored), e.g. `openpi.models.model.Observation`;
    - a mapping in openpi's dict form: {'image': {camera: (B, h, w, 3)},
      'image_mask': {camera: (B,)}, 'state', 'tokenized_prompt', 'tokenized_prompt_mask', ...}.
  Conversions (openpi's): uint8 images -> float32 in [-1, 1]; a camera with an image but no mask
  gets an all-True mask. Masks must be bool, as openpi's are. Cameras beyond `IMAGE_KEYS` are
  dropped (openpi's preprocessing reads only those). Traceable: works on tracers inside `jax.jit`.

  Args:
    obj: the observation.
    cfg: when given, the result is checked against it (`validate_observation`).

  Returns:
    an `Observation`.

  Raises:
    TypeError: obj is none of the accepted kinds.
    ValueError: tokenized_prompt without its mask (or the reverse), a missing camera or prompt, or
      (with cfg) a wrong shape or dtype, naming the key.
  """
  if isinstance(obj, Observation):
    images, masks = obj.images, obj.image_masks
    state, tokens, token_mask = obj.state, obj.tokenized_prompt, obj.tokenized_prompt_mask
  elif isinstance(obj, Mapping):
    if "image" not in obj or "state" not in obj:
      raise ValueError(f"observation dict needs keys 'image' and 'state' (openpi's dict form), got "
                       f"keys {sorted(map(str, obj))}")
    images, masks, state = obj["image"], obj.get("image_mask") or {}, obj["state"]
    tokens, token_mask = obj.get("tokenized_prompt"), obj.get("tokenized_prompt_mask")
  elif all(hasattr(obj, a) for a in ("images", "state")):
    images, masks, state = obj.images, getattr(obj, "image_masks", None) or {}, obj.state
    tokens = getattr(obj, "tokenized_prompt", None)
    token_mask = getattr(obj, "tokenized_prompt_mask", None)
  else:
    raise TypeError(f"expected an Observation (ours or openpi's) or openpi's observation dict, got "
                    f"{type(obj).__name__}")
  if not isinstance(images, Mapping) or not isinstance(masks, Mapping):
    raise TypeError("observation images and image masks must be dicts keyed by camera name")
  if (tokens is None) != (token_mask is None):
    raise ValueError("tokenized_prompt and tokenized_prompt_mask must be provided together")
  if tokens is None:
    raise ValueError("observation has no tokenized_prompt: pi0 / pi0.5 need a tokenized prompt")
  missing = [k for k in IMAGE_KEYS if k not in images]
  if missing:
    raise ValueError(f"observation['image'] is missing cameras {missing}; expected {IMAGE_KEYS}, "
                     f"got {sorted(images)}")
  batch = np.shape(state)[:-1]
  out_images = {k: image_to_float(images[k]) for k in IMAGE_KEYS}
  out_masks = {}
  for k in IMAGE_KEYS:
    if k in masks:
      out_masks[k] = masks[k]
    else:  # openpi's preprocess_observation: no mask means the camera is present
      xp = np if isinstance(state, np.ndarray) else jnp
      out_masks[k] = xp.ones(batch, bool)
  obs = Observation(images=out_images, image_masks=out_masks, state=state,
                    tokenized_prompt=tokens, tokenized_prompt_mask=token_mask)
  if cfg is not None:
    validate_observation(obs, cfg)
  return obs


def _check(name: str, x: Any, shape: tuple[int, ...], kinds: str) -> None:
  if not hasattr(x, "shape"):
    raise ValueError(f"observation[{name!r}] must be an array, got {type(x).__name__}")
  if tuple(x.shape) != shape:
    raise ValueError(f"observation[{name!r}] has shape {tuple(x.shape)}, expected {shape}")
  if np.dtype(x.dtype).kind not in kinds:
    raise ValueError(f"observation[{name!r}] has dtype {x.dtype}, expected kind {kinds!r}")


def validate_observation(obs: Observation, cfg: Pi0Config) -> None:
  """Raises ValueError naming the first key whose presence, shape or dtype is wrong."""
  if not isinstance(obs, Observation):
    raise TypeError(f"expected an Observation, got {type(obs).__name__}; use as_observation")
  b = np.shape(obs.state)[0] if np.ndim(obs.state) else -1
  size = cfg.vision.image_size
  for key in IMAGE_KEYS:
    if key not in obs.images:
      raise ValueError(f"observation['image'] is missing camera {key!r}; expected {IMAGE_KEYS}")
    if key not in obs.image_masks:
      raise ValueError(f"observation['image_mask'] is missing camera {key!r}; expected {IMAGE_KEYS}")
    _check(f"image/{key}", obs.images[key], (b, size, size, 3), "f")
    _check(f"image_mask/{key}", obs.image_masks[key], (b,), "b")
  _check("state", obs.state, (b, cfg.action_dim), "f")
  _check("tokenized_prompt", obs.tokenized_prompt, (b, cfg.max_token_len), "iu")
  _check("tokenized_prompt_mask", obs.tokenized_prompt_mask, (b, cfg.max_token_len), "b")


def make_observation(cfg: Pi0Config, rng: jax.Array, batch_size: int = 1, *,
                     state: jax.Array | None = None, task: jax.Array | None = None) -> Observation:
  """A synthetic observation: smooth random images, a state, and a prompt of random length.

  Args:
    cfg: the policy config (image size, action_dim, max_token_len, vocab).
    rng: PRNG key; the result is a deterministic function of it.
    batch_size: B.
    state: optional (B, action_dim) state to place in the observation (rollouts pass theirs).
    task: optional (B,) int task ids; the prompt tokens and image content depend on the task.
  """
  k_img, k_state, k_tok, k_len = jax.random.split(rng, 4)
  size = cfg.vision.image_size
  if task is None:
    task = jnp.zeros((batch_size,), jnp.int32)
  task = jnp.asarray(task, jnp.int32)
  images, masks = {}, {}
  coarse = max(size // 8, 1)
  for i, key in enumerate(IMAGE_KEYS):
    k = jax.random.fold_in(k_img, i)
    low = jax.random.uniform(k, (batch_size, coarse, coarse, 3), minval=-1.0, maxval=1.0)
    # Images are smooth (upsampled noise) and shift with the task, as scenes do.
    low = jnp.tanh(low + 0.3 * jnp.sin(task[:, None, None, None] + i))
    images[key] = jax.image.resize(low, (batch_size, size, size, 3), "linear")
    masks[key] = jnp.ones((batch_size,), bool)
  if state is None:
    state = 0.5 * jax.random.normal(k_state, (batch_size, cfg.action_dim))
  lengths = jax.random.randint(k_len, (batch_size,), cfg.max_token_len // 2, cfg.max_token_len + 1)
  task_tokens = (jax.random.randint(k_tok, (batch_size, cfg.max_token_len), 3, 64)
                 + 64 * (task[:, None] % max((cfg.vocab_size - 64) // 64, 1)))
  tokens = jnp.where(jnp.arange(cfg.max_token_len)[None] == 0, BOS_TOKEN, task_tokens)
  mask = jnp.arange(cfg.max_token_len)[None] < lengths[:, None]
  return Observation(images=images, image_masks=masks, state=jnp.asarray(state, jnp.float32),
                     tokenized_prompt=jnp.where(mask, tokens, 0).astype(jnp.int32),
                     tokenized_prompt_mask=mask)
