"""Benchmark DuQuant's online input transform + per-token int8 quantization on a GPU.

Paths per (M tokens, K channels, block b), each timed inside ONE jitted `lax.fori_loop` (see
`bench_kernels.LoopTimer`: each call depends on the previous output, transforms cycle over copies):
  xla           `InputTransform.apply` + `quantize_per_token` as XLA compiles them (the einsum chain);
  xla_reduce    the same with the block rotations as multiply-reduce (`xla.transform_reduce`);
  xla_cm        the einsum chain on channel-major x^T (`xla.transform_quantize_channel_major`);
  xla_cm_reduce the multiply-reduce form on channel-major x^T;
  fused         `kernels.pallas_transform.transform_quantize` (one Pallas kernel), best of a few tiles;
  quant         `quantize_per_token` alone, no transform (what the quantizer costs by itself on XLA).
`--check` first compares every path's codes with the einsum chain run at HIGHEST precision.
`--ks` takes K or K:b (block size b, default 16 as the LLM and expert MLP of `deploy`; SigLIP: 8).

Usage (GPU machine):  python scripts/bench_transform.py --check [--ms 1,16,51,64,256,816] [--json out]
CPU smoke test:       python scripts/bench_transform.py --interpret --ms 3 --ks 256
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_kernels import LoopTimer  # noqa: E402
from duquant_jax import kernels  # noqa: E402
from duquant_jax.kernels import pallas_transform as pt  # noqa: E402
from duquant_jax.transforms import InputTransform  # noqa: E402

KS = (1024, 2048, 4096, 16384)  # gemma_300m / gemma_2b widths and MLP inner sizes
MS = (1, 16, 51, 64, 256, 816)
TILES = (pt.TransformTiles(chunk=512, num_warps=8),)  # the best of a 4-tile sweep on the H100


def make_transform(key, k, b=16):
  """A recommended-preset-like transform: fp16 R1 (smoothing merged), zigzag-like perm, fp16 R2."""
  k1, k2, k3 = jax.random.split(key, 3)
  r1 = jnp.linalg.qr(jax.random.normal(k1, (k // b, b, b)))[0]
  r1 = (r1 * jax.random.uniform(k3, (k // b, b, 1), minval=0.5, maxval=2.0)).astype(jnp.float16)
  r2 = jnp.linalg.qr(jax.random.normal(k2, (k // b, b, b)))[0].astype(jnp.float16)
  perm = jax.random.permutation(k3, k).astype(jnp.int32)
  return InputTransform(rot1=r1, perm=perm, rot2=r2, merged_smooth=True)


def make_x(key, m, k):
  x = jax.random.normal(key, (m, k), jnp.float32)
  return (x * jnp.where(jnp.arange(k) % 97 == 0, 30.0, 1.0)).astype(jnp.bfloat16)


XLA_FORMS = ("xla", "xla_reduce", "xla_cm", "xla_cm_reduce")


def parse_ks(spec):
  """"1024,1152:8" -> [(1024, 16), (1152, 8)]."""
  out = []
  for item in spec.split(","):
    k, _, b = item.partition(":")
    out.append((int(k), int(b) if b else 16))
  return out


def check(key, ms, ks, interpret, fused=True):
  rows = []
  for k, b in ks:
    tr = make_transform(key, k, b)
    for m in ms:
      x = make_x(jax.random.fold_in(key, m), m, k)
      for sym in (False, True):
        ref = jax.jit(lambda x, tr: kernels.xla.quantize_per_token(
            tr.apply(x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST), 8,
            symmetric=sym))(x, tr)
        paths = {form: jax.jit(functools.partial(kernels.transform_quantize, bits=8, symmetric=sym,
                                                 implementation=form)) for form in XLA_FORMS}
        if fused and pt.supports(k, b):
          paths["fused"] = lambda x, tr: pt.transform_quantize(
              x, tr.rot1, tr.perm, tr.rot2, symmetric=sym, interpret=interpret)
        for name, fn in paths.items():
          got = fn(x, tr)
          d = np.abs(np.asarray(got[0], np.int32) - np.asarray(ref[0], np.int32))
          row = dict(path=name, k=k, b=b, m=m, symmetric=sym, max_code_diff=int(d.max()),
                     frac_codes_differ=float((d > 0).mean()),
                     sx_rel=float(np.max(np.abs(np.asarray(got[1]) / np.asarray(ref[1]) - 1))))
          if not sym:
            row["zx_max_diff"] = float(np.max(np.abs(np.asarray(got[2]) - np.asarray(ref[2]))))
          rows.append(row)
          print("check", json.dumps(row), flush=True)
  return rows


def time_case(key, m, k, b, copies, iters, interpret, fused=True):
  x = make_x(key, m, k)
  trs = [make_transform(jax.random.fold_in(key, i), k, b) for i in range(copies)]
  y0 = jnp.zeros((m, k), jnp.int8)
  paths = {form: (lambda c, tr, form=form: kernels.transform_quantize(
      c[0], tr, 8, implementation=form)[0]) for form in XLA_FORMS}
  paths["quant"] = lambda c, tr: kernels.quantize_per_token(c[0].astype(jnp.float32), 8,
                                                            symmetric=False)[0]
  for tiles in TILES if fused else ():
    if pt.supports(k, b, tiles) and tiles.chunk <= k:
      paths[f"fused c{tiles.chunk} w{tiles.num_warps}"] = (
          lambda c, tr, tiles=tiles: pt.transform_quantize(
              c[0], tr.rot1, tr.perm, tr.rot2, tiles=tiles, interpret=interpret)[0])
  out = {}
  for name, fn in paths.items():
    try:
      out[name] = 1e6 * LoopTimer(fn, (x,), trs, y0, iters).time(reps=5)
    except Exception as e:  # a tile that does not compile is reported, not fatal
      print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
  fused = {n: v for n, v in out.items() if n.startswith("fused")}
  best = min(fused, key=fused.get) if fused else None
  row = dict(m=m, k=k, b=b, us=out, best_fused=best,
             speedup_vs_xla=(out["xla"] / fused[best]) if best else None)
  print("time", json.dumps(row), flush=True)
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ms", default=",".join(map(str, MS)))
  ap.add_argument("--ks", default=",".join(map(str, KS)))
  ap.add_argument("--check", action="store_true")
  ap.add_argument("--interpret", action="store_true")
  ap.add_argument("--copies", type=int, default=8)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--json", default=None)
  ap.add_argument("--no-fused", action="store_true", help="skip the fused Pallas kernel's tiles")
  args = ap.parse_args()
  ms = [int(v) for v in args.ms.split(",")]
  ks = parse_ks(args.ks)
  key = jax.random.key(0)
  result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__)
  if args.check:
    result["check"] = check(key, ms, ks, args.interpret, not args.no_fused)
  rows = [time_case(key, m, k, b, args.copies, args.iters, args.interpret, not args.no_fused)
          for k, b in ks for m in ms]
  result["time"] = rows
  print(f"\ndevice={result['device']} jax={result['jax']}")
  print("| K | b | M | XLA chain us | XLA multiply-reduce us | channel-major chain us "
        "| channel-major multiply-reduce us | fused us (best tiles) | quantize only us "
        "| fused speedup |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    best, us = r["best_fused"], r["us"]
    fused_col = (f"{us[best]:.1f} ({best[6:]}) | {us['quant']:.1f} | {r['speedup_vs_xla']:.2f}x"
                 if best else f"- | {us['quant']:.1f} | -")
    forms = " | ".join(f"{us[f]:.1f}" if f in us else "-" for f in XLA_FORMS)
    print(f"| {r['k']} | {r['b']} | {r['m']} | {forms} | {fused_col} |")
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
