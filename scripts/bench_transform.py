"""Benchmark DuQuant's online input transform + per-token int8 quantization on a GPU.

Three paths per (M tokens, K channels), each timed inside ONE jitted `lax.fori_loop` (see
`bench_kernels.LoopTimer`: each call depends on the previous output, transforms cycle over copies):
  xla       `InputTransform.apply` + `quantize_per_token` as XLA compiles them (the unfused chain);
  xla_reduce  the same with the block rotations as multiply-reduce (`xla.transform_reduce`);
  fused     `kernels.pallas_transform.transform_quantize` (one Pallas kernel), best of a few tiles;
  quant     `quantize_per_token` alone, no transform (what the quantizer costs by itself on XLA).
`--check` first compares the fused codes with the XLA chain run at HIGHEST precision.

Usage (GPU machine):  python scripts/bench_transform.py --check [--ms 1,16,51,64,256,816] [--json out]
CPU smoke test:       python scripts/bench_transform.py --interpret --ms 3 --ks 256
"""

from __future__ import annotations

import argparse
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


def check(key, ms, ks, interpret):
  rows = []
  for k in ks:
    tr = make_transform(key, k)
    for m in ms:
      x = make_x(jax.random.fold_in(key, m), m, k)
      for sym in (False, True):
        ref = jax.jit(lambda x, tr: kernels.xla.quantize_per_token(
            tr.apply(x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST), 8,
            symmetric=sym))(x, tr)
        got = pt.transform_quantize(x, tr.rot1, tr.perm, tr.rot2, symmetric=sym,
                                    interpret=interpret)
        d = np.abs(np.asarray(got[0], np.int32) - np.asarray(ref[0], np.int32))
        row = dict(k=k, m=m, symmetric=sym, max_code_diff=int(d.max()),
                   frac_codes_differ=float((d > 0).mean()),
                   sx_rel=float(np.max(np.abs(np.asarray(got[1]) / np.asarray(ref[1]) - 1))))
        if not sym:
          row["zx_max_diff"] = float(np.max(np.abs(np.asarray(got[2]) - np.asarray(ref[2]))))
        rows.append(row)
        print("check", json.dumps(row), flush=True)
  return rows


def time_case(key, m, k, copies, iters, interpret, fused=True):
  x = make_x(key, m, k)
  trs = [make_transform(jax.random.fold_in(key, i), k) for i in range(copies)]
  y0 = jnp.zeros((m, k), jnp.int8)
  paths = {
      "xla": lambda c, tr: kernels.transform_quantize(c[0], tr, 8, implementation="xla")[0],
      "xla_reduce": lambda c, tr: kernels.transform_quantize(c[0], tr, 8,
                                                             implementation="xla_reduce")[0],
      "quant": lambda c, tr: kernels.quantize_per_token(c[0].astype(jnp.float32), 8,
                                                        symmetric=False)[0],
  }
  for tiles in TILES if fused else ():
    if pt.supports(k, 16, tiles) and tiles.chunk <= k:
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
  row = dict(m=m, k=k, us=out, best_fused=best,
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
  ks = [int(v) for v in args.ks.split(",")]
  key = jax.random.key(0)
  result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__)
  if args.check:
    result["check"] = check(key, ms, ks, args.interpret)
  rows = [time_case(key, m, k, args.copies, args.iters, args.interpret, not args.no_fused) for k in ks for m in ms]
  result["time"] = rows
  print(f"\ndevice={result['device']} jax={result['jax']}")
  print("| K | M | XLA chain us | XLA multiply-reduce us  | fused us (best tiles) "
        "| quantize only us | fused speedup |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    b, us = r["best_fused"], r["us"]
    fused_col = f"{us[b]:.1f} ({b[6:]}) | {us['quant']:.1f} | {r['speedup_vs_xla']:.2f}x" if b else (
        f"- | {us['quant']:.1f} | -")
    print(f"| {r['k']} | {r['m']} | {us['xla']:.1f} | {us['xla_reduce']:.1f} | {fused_col} |")
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
