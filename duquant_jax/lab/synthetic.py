"""Synthetic weights with the activation statistics that decide what quantization breaks.

A randomly initialised pi0 has flat, Gaussian activations and zero adaptive-norm and vision-head
layers: every quantizer looks good on it. `realistic_params` rewrites a fresh param tree so that the
statistics that matter for W4A8 look like a trained model's:

- heavy-tailed weights: Student-t (4 degrees of freedom) entries at the init's scale, as trained LLM
  weights have excess kurtosis (the reason int4 weight clipping helps);
- persistent outlier channels: a few residual-stream channels of each Gemma carry values 60-400x the
  median channel on every token (SmoothQuant, Xiao et al. 2023, report ~100x in LLMs), written by the
  embedding, the vision head, the expert's input projections and the residual branches;
- token-specific massive activations: the BOS token's embedding has one channel ~1000x the median
  (Sun et al. 2024, "Massive Activations in Large Language Models": first token and delimiters, fixed
  channels);
- per-channel norm-scale spread: RMSNorm (1 + scale) log-normal across channels;
- MLP down-projection inputs heavy-tailed with a different peak channel per layer (a per-layer hidden
  unit whose gate and up columns are amplified);
- non-zero adaptive-norm Dense layers (pi0.5; gates around 1) and vision head, which openpi
  zero-initialises (with zeros, the expert's residual branches are switched off and quantization error
  is invisible).

Deterministic: the same config and seed give the same params, bit for bit (numpy's PCG64).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from duquant_jax.treepath import path_str
from duquant_jax.models.pi0 import Policy

Params = dict[str, Any]


def _student_t_like(rng: np.random.Generator, x: np.ndarray, fan_in: int) -> np.ndarray:
  df = 4.0
  t = rng.standard_t(df, size=x.shape).astype(np.float32)
  return t * np.float32(np.sqrt((df - 2) / df) / np.sqrt(fan_in))


def outlier_channels(width: int, seed: int, count: int = 3) -> np.ndarray:
  """The residual channels that carry persistent outliers for a Gemma of this width."""
  return np.sort(np.random.default_rng([seed, width]).choice(width, size=count, replace=False))


def realistic_params(policy: Policy, seed: int = 0) -> Params:
  """Fresh params of `policy`, rewritten to have trained-model activation statistics (see module doc).

  Meant for the demo and dummy sizes (numpy sampling of every weight); at full size it works but
  takes minutes and ~26 GB of host memory.
  """
  cfg = policy.cfg
  shapes = policy.param_shapes()  # no jax init: every leaf is drawn here, in numpy
  rng = np.random.default_rng(seed)
  llm_out = outlier_channels(cfg.llm.width, seed)
  exp_out = outlier_channels(cfg.expert.width, seed + 1)
  # Outlier gains 60x-400x in the residual stream (before norms; about 20-60x of the median channel max at linear inputs), one per channel, shared by every writer of that channel.
  llm_gain = np.geomspace(400.0, 60.0, len(llm_out)).astype(np.float32)
  exp_gain = np.geomspace(300.0, 60.0, len(exp_out)).astype(np.float32)

  def fresh(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """openpi's init, in numpy: lecun-normal kernels, zero biases and RMSNorm scales, unit LayerNorms."""
    name = path.rsplit("/", 1)[-1]
    if name == "bias" or path.endswith("norm/scale") or path.endswith("norm_1/scale"):
      return np.zeros(shape, np.float32)
    if name == "scale":  # LayerNorm
      return np.ones(shape, np.float32)
    if name == "pos_embedding":
      return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    if path.endswith("embedding/kernel"):  # patch conv (p, p, 3, W)
      return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
    fan_in = shape[-2] if len(shape) >= 2 else 1
    if "/out/kernel" in path:  # (L, N, H, D)
      fan_in = shape[-3] * shape[-2]
    elif path.endswith(("query/kernel", "key/kernel", "value/kernel")):  # (L, D, N, H)
      fan_in = shape[-3]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

  def rewrite(path: str, shape: tuple[int, ...]) -> np.ndarray:
    x = fresh(path, shape)
    expert = "_1/" in path + "/" or path.endswith("_1")
    out_idx, gain, width = (exp_out, exp_gain, cfg.expert.width) if expert else (
        llm_out, llm_gain, cfg.llm.width)
    if path.endswith("input_embedding"):
      x = rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(x.shape[-1])
      x[:, llm_out] *= llm_gain
      x[2, llm_out[0]] = 1000.0 * np.median(np.abs(x))  # BOS: a massive activation
      return x
    if path.startswith("PaliGemma/llm/layers/") and (path.endswith("/w") or "mlp" in path):
      if path.endswith("attn_vec_einsum/w") or path.endswith("attn_vec_einsum_1/w"):
        fan_in = x.shape[1] * x.shape[2]
      elif path.endswith("kv_einsum/w") or path.endswith("kv_einsum_1/w"):
        fan_in = x.shape[-2]
      elif path.endswith("gating_einsum"):
        fan_in = x.shape[-2]
      else:
        fan_in = x.shape[-2]
      x = _student_t_like(rng, x, fan_in)
      if path.endswith("gating_einsum"):
        # (L, 2, D, F): one hidden unit per layer dominates the down-projection input.
        for layer in range(x.shape[0]):
          f = rng.integers(x.shape[-1])
          x[layer, :, :, f] *= 6.0
      if path.endswith("/linear") or path.endswith("attn_vec_einsum/w") or path.endswith(
          "attn_vec_einsum_1/w"):
        x[..., out_idx] *= 4.0  # residual branches reinforce the outlier channels
      return x
    if path.endswith("norm/scale") or path.endswith("norm_1/scale"):
      scale = np.exp(rng.normal(0.0, 0.35, x.shape)).astype(np.float32)
      return scale - 1.0
    if "norm_1/Dense_0" in path:  # pi0.5 adaptive norm: modulation (scale, shift, gate)
      d = width
      if path.endswith("kernel"):
        return (rng.standard_normal(x.shape) * (0.3 / np.sqrt(d))).astype(np.float32)
      bias = np.zeros_like(x)
      bias[..., 0:d] = rng.normal(0.0, 0.3, bias[..., 0:d].shape)  # scale spread
      bias[..., 2 * d:3 * d] = 1.0  # gates around 1
      return bias
    if path.startswith("PaliGemma/img/head"):
      if path.endswith("kernel"):
        x = rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(x.shape[0])
        x[:, llm_out] *= llm_gain
        return x
      return np.zeros_like(x)
    if path.startswith("PaliGemma/img/") and path.endswith("kernel") and x.ndim >= 3:
      fan_in = int(np.prod(x.shape[1:-1])) if "out/kernel" in path else x.shape[1]
      if "embedding" in path:
        return x
      return _student_t_like(rng, x, fan_in) if "MlpBlock" not in path else x
    writers = ("action_in_proj/kernel", "state_proj/kernel", "action_time_mlp_out/kernel")
    if path in writers:
      x = x.copy()
      x[:, exp_out] *= exp_gain / np.sqrt(x.shape[0])
      return x
    return x

  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  leaves = [rewrite(path_str(p), tuple(x.shape)).astype(np.float32) for p, x in flat]
  return jax.tree_util.tree_unflatten(treedef, leaves)
