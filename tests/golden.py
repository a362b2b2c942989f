"""Digests of packed trees and calibration stats: a by-hand check that a refactor packs bit for bit.

`tests/data/quantize_golden.json` holds the digests of `quantize_params` on the demo models for a
few presets (and of the demo calibration stats they were packed with), with the host they were
computed on.

    python tests/golden.py --check [FILE]    # compare today's packs with the recorded digests
    python tests/golden.py [--record FILE]   # record them (a numerics change, said in the commit)

XLA's CPU code is compiled for the host's instruction set (AVX-512, AMX) and its linear algebra may
round differently on another CPU or with other library versions, so the recorded digests hold
only on a host like the one that recorded them, and the test suite does not run this check (it
pins determinism within one machine instead). `--check` says when the host differs. On another
host, record the digests of the code before the change to a file of your own and check against
that:

    git stash && python tests/golden.py --record /tmp/base.json && git stash pop
    python tests/golden.py --check /tmp/base.json
"""

import hashlib
import json
import pathlib
import platform
import sys

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


def host() -> str:
  """What digests depend on besides the code: the CPU (machine, model name, vector and matrix
  instruction sets) and the numerical libraries' versions."""
  import jaxlib
  model, flags = platform.processor() or "", set()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      key, _, value = line.partition(":")
      if key.strip() == "model name":
        model = value.strip()
      elif key.strip() == "flags":
        flags = {f for f in value.split() if f.startswith(("avx", "amx", "fma"))}
        break
  except OSError:
    pass
  return (f"{platform.machine()} {model} [{' '.join(sorted(flags))}] "
          f"jax {jax.__version__} jaxlib {jaxlib.__version__} numpy {np.__version__}")


def check(path: pathlib.Path = GOLDEN) -> tuple[list[str], str | None]:
  """The '<case>: <leaf path>' entries whose digest differs from those recorded in `path`, and
  the recording host when it is not this one (None when it is)."""
  recorded = json.loads(path.read_text())
  want, got = recorded["cases"], compute()
  bad = [f"{case}: {key}" for case in sorted(set(want) | set(got))
         for key in sorted(set(want.get(case, {})) | set(got.get(case, {})))
         if want.get(case, {}).get(key) != got.get(case, {}).get(key)]
  return bad, (None if recorded["host"] == host() else recorded["host"])


def main(argv: list[str]) -> int:
  if argv[:1] == ["--check"] and len(argv) <= 2:
    path = pathlib.Path(argv[1]) if len(argv) == 2 else GOLDEN
    bad, other = check(path)
    print("\n".join(bad[:50]) or f"{path.name}: every digest matches")
    if bad and other is not None:
      print(f"{path.name} was recorded on another host ({other}); this is {host()}. Its CPU "
            "code may round differently: record the base commit's digests here and check "
            "against those (tests/golden.py's docstring).")
    return 1 if bad else 0
  if argv and (argv[0] != "--record" or len(argv) != 2):
    print("usage: golden.py [--check [FILE] | --record FILE]", file=sys.stderr)
    return 2
  path = pathlib.Path(argv[1]) if argv else GOLDEN
  path.write_text(json.dumps({"host": host(), "cases": compute()}, indent=0, sort_keys=True)
                  + "\n")
  print(path, path.stat().st_size)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  sys.exit(main(sys.argv[1:]))
