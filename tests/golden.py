"""Digests of packed trees and calibration stats, for tests that pin results bit for bit.

`tests/data/quantize_golden.json` holds the digests of `quantize_params` on the demo models for a
few presets (and of the demo calibration stats they were packed with); `python tests/golden.py`
writes it again (only when a change of numerics is intended, and said so in the commit).
"""

import hashlib
import json
import pathlib

import jax
import numpy as np

GOLDEN = pathlib.Path(__file__).parent / "data" / "quantize_golden.json"
# (model, preset) pairs: norm folds (RMSNorm, pi0.5's adaptive norm, SigLIP's LayerNorm), producer
# folds, GPTQ, output rotations with per-head scales, static scales, rotate_residual, embeddings.
CASES = (("pi0", "recommended"), ("pi0", "w4a8-b64-c128-perhead"), ("pi0", "fast"),
         ("pi05", "deploy"), ("pi05", "recommended-all"))
# Static fields of packed leaves that describe the stored format (compared where present).
STATIC = ("bits", "w_shape", "w_spec", "act_bits", "act_symmetric", "act_clip", "act_min_tokens",
          "mode", "group_size", "symmetric", "hadamard", "merged_smooth")


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def digests(tree) -> dict[str, str]:
  """{'/'-joined leaf path: sha256 of dtype, shape and bytes (16 hex digits)} of every array leaf,
  plus '<path>#static' entries for the format fields of packed leaves and their transforms."""
  out = {}
  for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(x)
    h = hashlib.sha256(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    out["/".join(_key(k) for k in kp)] = h.hexdigest()[:16]

  def statics(node, path):
    if isinstance(node, dict):
      for k in sorted(node):
        statics(node[k], f"{path}/{k}" if path else k)
      return
    if hasattr(node, "__dataclass_fields__"):
      fields = {f: repr(getattr(node, f)) for f in STATIC if hasattr(node, f)}
      if fields:
        out[f"{path}#static"] = json.dumps(fields, sort_keys=True)
      for f in ("transform",):
        if getattr(node, f, None) is not None:
          statics(getattr(node, f), f"{path}/{f}")
  statics(tree, "")
  return out


def compute():
  from conftest import demo_params, demo_stats
  from duquant_jax.config import get_preset
  from duquant_jax.quantize import quantize_params
  out = {"stats": {m: digests(dict(demo_stats(m).items())) for m in ("pi0", "pi05")}}
  for model, preset in CASES:
    out[f"{model}/{preset}"] = digests(
        quantize_params(demo_params(model), get_preset(preset), demo_stats(model)))
  return out


if __name__ == "__main__":
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  GOLDEN.write_text(json.dumps(compute(), indent=0, sort_keys=True) + "\n")
  print(GOLDEN, GOLDEN.stat().st_size)
