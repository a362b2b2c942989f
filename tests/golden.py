"""Digests of packed trees and calibration stats: a by-hand check that a refactor packs bit for bit.

`tests/data/quantize_golden.json` holds the digests of `quantize_params` on the demo models for a
few presets (and of the demo calibration stats they were packed with).

    python tests/golden.py --check   # compare today's packs with the recorded digests
    python tests/golden.py           # record them again (a change of numerics, said in the commit)

The digests are of this project's 2-core CPU machine (jax 0.10.2): XLA's CPU code is compiled for
the host's instruction set and may round differently on another CPU, so the test suite does not
run this check (the suite pins determinism within one machine instead); run it by hand before and
after a change that must not move any bit.
"""

import hashlib
import json
import pathlib

import jax
import numpy as np

from duquant_jax.treepath import path_str

GOLDEN = pathlib.Path(__file__).parent / "data" / "quantize_golden.json"
# (model, preset) pairs: norm folds (RMSNorm, pi0.5's adaptive norm, SigLIP's LayerNorm), producer
# folds, GPTQ, output rotations with per-head scales, static scales, rotate_residual, embeddings.
CASES = (("pi0", "recommended"), ("pi0", "w4a8-b64-c128-perhead"), ("pi0", "fast"),
         ("pi05", "deploy"), ("pi05", "recommended-all"))
# Static fields of packed leaves that describe the stored format (compared where present).
STATIC = ("bits", "w_shape", "w_spec", "act_bits", "act_symmetric", "act_clip", "act_min_tokens",
          "mode", "group_size", "symmetric", "hadamard", "merged_smooth")


def digests(tree) -> dict[str, str]:
  """{'/'-joined leaf path: sha256 of dtype, shape and bytes (16 hex digits)} of every array leaf,
  plus '<path>#static' entries for the format fields of packed leaves and their transforms."""
  out = {}
  for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(x)
    h = hashlib.sha256(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    out[path_str(kp)] = h.hexdigest()[:16]

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


def check() -> list[str]:
  """The '<case>: <leaf path>' entries whose digest differs from the recorded one."""
  want, got = json.loads(GOLDEN.read_text()), compute()
  return [f"{case}: {key}" for case in sorted(set(want) | set(got))
          for key in sorted(set(want.get(case, {})) | set(got.get(case, {})))
          if want.get(case, {}).get(key) != got.get(case, {}).get(key)]


if __name__ == "__main__":
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  if sys.argv[1:] == ["--check"]:
    bad = check()
    print("\n".join(bad[:50]) or f"{GOLDEN.name}: every digest matches")
    sys.exit(1 if bad else 0)
  GOLDEN.write_text(json.dumps(compute(), indent=0, sort_keys=True) + "\n")
  print(GOLDEN, GOLDEN.stat().st_size)
