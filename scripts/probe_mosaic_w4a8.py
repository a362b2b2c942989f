"""Device check of the Mosaic GPU W4A8 kernel (`duquant_jax.kernels.mosaic_gpu`): exact, and fast?

For each linear shape and M: the kernel's error against the XLA integer reference (float32 output,
symmetric and asymmetric quantizers), then the time per matmul in one jitted loop (`bench_kernels`'
LoopTimer) of bf16 `jnp.dot`, the XLA W4A8 path, the kernel with its XLA side ops (`mosaic`: the
row pad, per-token vectors, the split-K sum), the same with M padded to whole token tiles
(`mosaic_padM`), and the bare Pallas call (`mosaic_core`) for a few tilings.

Usage (Hopper GPU): python3 scripts/probe_mosaic_w4a8.py [--ms 51,816] [--json out.json]
Failures (a tiling that does not lower) are recorded and the probe goes on.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_kernels import LoopTimer, n_copies  # noqa: E402
from probe_mosaic_gpu import _err, record  # noqa: E402
from duquant_jax.kernels import mosaic_gpu, xla  # noqa: E402

SHAPES = {"2b_gate": (2048, 16384), "2b_down": (16384, 2048), "2b_q": (2048, 2048),
          "300m_gate": (1024, 4096), "300m_down": (4096, 1024)}


def operands(m, k, n, key, copies):
  kx, kw, ks, kz = jax.random.split(key, 4)
  x = jax.random.normal(kx, (m, k), jnp.float32) * (1 + 4 * jax.random.uniform(ks, (1, k)))
  xq, sx, zx = xla.quantize_per_token(x, symmetric=False)
  qs = [jax.random.randint(jax.random.fold_in(kw, i), (n, k), -8, 8).astype(jnp.int4)
        for i in range(copies)]
  sw = 0.01 + 0.01 * jax.random.uniform(ks, (n, 1))
  zw = jnp.round(4 * jax.random.uniform(kz, (n, 1)) - 2)
  return x, xq, sx, zx, qs, sw, zw


def check(m, k, n, tiles):
  """Max |kernel - XLA| / max |XLA| (float32 out), symmetric and asymmetric.

  Tilings whose float32 output tile does not fit shared memory are checked with bf16 output
  against the reference rounded to bf16 (`bf16_sym`, `bf16_asym`: 0.0 when every element agrees).
  """
  x, xq, sx, zx, qs, sw, zw = operands(m, k, n, jax.random.key(m + k), 1)
  out = {}
  for name, (zx_, zw_) in {"sym": (None, None), "asym": (zx, zw)}.items():
    ref = xla.w4a8_matmul(xq, sx, zx_, qs[0], sw, zw_)
    try:
      y = mosaic_gpu.w4a8_matmul(xq, sx, zx_, qs[0], sw, zw_, out_dtype=jnp.float32, tiles=tiles)
    except ValueError as e:
      if "shared memory" not in str(e):
        raise
      y = mosaic_gpu.w4a8_matmul(xq, sx, zx_, qs[0], sw, zw_, out_dtype=jnp.bfloat16, tiles=tiles)
      ref, name = ref.astype(jnp.bfloat16).astype(jnp.float32), f"bf16_{name}"
      y = y.astype(jnp.float32)
    out[name] = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
  return out


def unpacked_matmul(xq, sx, q, sw, zw):
  """W4A8 as int4 codes unpacked to an int8 copy in device memory, then XLA's bare int8 dot
  (symmetric activations, weight zero points through the token rows' sums): the design where
  the GEMM library, not an upcast in the kernel, does the integer multiply."""
  q8 = jax.lax.optimization_barrier(q.astype(jnp.int8))
  acc = jax.lax.dot_general(xq, q8, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  rx = jnp.sum(xq.astype(jnp.int32), axis=1, keepdims=True)
  y = (acc - rx * zw.T.astype(jnp.int32)).astype(jnp.float32) * sx * sw.T
  return y.astype(jnp.bfloat16)


def probe(m, k, n, tile_list, iters=20, unpacked=False):
  copies = n_copies(n * k // 2)
  x, xq, sx, zx, qs, sw, zw = operands(m, k, n, jax.random.key(1), copies)
  out, errors = {}, {}

  def timed(name, fn, consts, weights, y0):
    try:
      out[name] = 1e6 * LoopTimer(fn, consts, weights, y0, iters).time(reps=5)
    except Exception as e:  # recorded, the probe goes on
      errors[name] = _err(e)
      traceback.print_exc()

  xb = x.astype(jnp.bfloat16)
  timed("bf16", lambda c, w: jnp.dot(c[0], w), (xb,),
        [q.T.astype(jnp.bfloat16) for q in qs], jnp.zeros((m, n), jnp.bfloat16))
  timed("xla_int8", lambda c, w: xla.w4a8_matmul(c[0], c[1], c[2], w, sw, zw, out_dtype=jnp.bfloat16),
        (xq, sx, zx), qs, jnp.zeros((m, n), jnp.bfloat16))
  if unpacked:
    timed("int8_bare", lambda c, w: jax.lax.dot_general(
        c[0], w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32),
        (xq,), [q.astype(jnp.int8) for q in qs], jnp.zeros((m, n), jnp.int32))
    timed("unpacked", lambda c, w: unpacked_matmul(c[0], c[1], w, sw, zw), (xq, sx), qs,
          jnp.zeros((m, n), jnp.bfloat16))
    timed("xla_unpacked", lambda c, w: xla.w4a8_matmul(c[0], c[1], c[2], w, sw, zw,
                                                       out_dtype=jnp.bfloat16,
                                                       dot="int8_unpacked"),
          (xq, sx, zx), qs, jnp.zeros((m, n), jnp.bfloat16))
    timed("xla_unpacked_sym", lambda c, w: xla.w4a8_matmul(c[0], c[1], None, w, sw, zw,
                                                           out_dtype=jnp.bfloat16,
                                                           dot="int8_unpacked"),
          (xq, sx), qs, jnp.zeros((m, n), jnp.bfloat16))
  for t in tile_list:
    tag = tile_tag(t)
    try:
      errors[f"exact {tag}"] = check(m, k, n, t)
    except Exception as e:
      errors[f"exact {tag}"] = _err(e)
      traceback.print_exc()
      continue
    timed(f"mosaic {tag}", lambda c, w, t=t: mosaic_gpu.w4a8_matmul(
        c[0], c[1], c[2], w, sw, zw, out_dtype=jnp.bfloat16, tiles=t),
        (xq, sx, zx), qs, jnp.zeros((m, n), jnp.bfloat16))
    if t.inflight:  # int8 codes, read by the MMA as loaded (no widening in the kernel)
      timed(f"mosaic_w8 {tag}", lambda c, w, t=t: mosaic_gpu.w4a8_matmul(
          c[0], c[1], c[2], w, sw, zw, out_dtype=jnp.bfloat16, tiles=t),
          (xq, sx, zx), [q.astype(jnp.int8) for q in qs], jnp.zeros((m, n), jnp.bfloat16))
    mp = -(-m // t.tile_m) * t.tile_m
    xq_p = jnp.pad(xq, ((0, mp - m), (0, 0)))
    if mp != m:  # the same call with M padded to whole token tiles, the pad and slice included
      pad_m = lambda v: jnp.pad(v, ((0, mp - m), (0, 0)))
      timed(f"mosaic_padM {tag}", lambda c, w, t=t: mosaic_gpu.w4a8_matmul(
          pad_m(c[0]), pad_m(c[1]), pad_m(c[2]), w, sw, zw, out_dtype=jnp.bfloat16, tiles=t)[:m],
          (xq, sx, zx), qs, jnp.zeros((m, n), jnp.bfloat16))
    vec_n, cols = jnp.ones((n,), jnp.float32), jnp.ones((4, mp), jnp.float32)
    out_dtype = jnp.dtype(jnp.float32 if t.splits > 1 else jnp.bfloat16)
    layer0 = jnp.zeros((1,), jnp.int32)
    timed(f"mosaic_core {tag}", lambda c, w, t=t: mosaic_gpu._kernel(
        c[0], w[None], c[1][None], c[1][None], c[2], (), layer0, tiles=t,
        out_dtype=jnp.dtype(jnp.bfloat16), asym_w=True, asym_x=True)[0],
        (xq_p, vec_n, cols), qs, jnp.zeros((mp, n), out_dtype))
  return out, errors


def tile_tag(t):
  return (f"{t.tile_n}x{t.tile_m}s{t.stages}" + (f"k{t.splits}" if t.splits > 1 else "")
          + (f"w{t.compute_wgs}" if t.compute_wgs > 1 else "")
          + (f"t{t.tile_k}" if t.tile_k != 128 else "") + ("f" if t.inflight else ""))


_SPEC_FIELDS = {"n": "tile_n", "m": "tile_m", "s": "stages", "k": "splits", "w": "compute_wgs",
                "t": "tile_k", "f": "inflight"}


def parse_tiles(spec, m, n, k, choose=mosaic_gpu.choose_tiles):
  """'auto', 'auto+s8+k2' (`choose(m, n, k)` with fields replaced: n tile_n, m tile_m, s stages,
  k splits, w compute warpgroups, t tile_k, f1 inflight: MMAs in flight, the codes widened
  in shared memory; also timed on int8 copies) or 'NxM[sS][kK][wW]'."""
  import dataclasses
  import re
  if spec.startswith("auto"):
    t = choose(m, n, k)
    for mod in filter(None, spec[4:].split("+")):
      g = re.fullmatch(r"([nmskwtf])(\d+)", mod)
      if not g:
        raise SystemExit(f"bad tile spec {spec!r}")
      field = _SPEC_FIELDS[g[1]]
      t = dataclasses.replace(t, **{field: bool(int(g[2])) if field == "inflight" else int(g[2])})
    return t
  g = re.fullmatch(r"(\d+)x(\d+)(?:s(\d+))?(?:k(\d+))?(?:w(\d+))?", spec)
  if not g:
    raise SystemExit(f"bad tile spec {spec!r}")
  return mosaic_gpu.MosaicTiles(tile_n=int(g[1]), tile_m=int(g[2]), stages=int(g[3] or 4),
                               splits=int(g[4] or 1), compute_wgs=int(g[5] or 1))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ms", default="51,816")
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--tiles", default="auto",
                  help="comma list of NxM[sS][kK][wW] (tile_n per warpgroup x tile_m, stages, "
                       "K splits, compute warpgroups) or auto[+s8+k2...] (choose_tiles, fields "
                       "replaced)")
  ap.add_argument("--json", default=None)
  ap.add_argument("--unpacked", action="store_true",
                  help="also time XLA's bare int8 dot on int8 weights (int8_bare) and the same "
                       "after unpacking the int4 codes to an int8 copy per call (unpacked)")
  args = ap.parse_args()
  print(f"# device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  rows = []
  for name in args.shapes.split(","):
    k, n = SHAPES[name]
    for m in (int(v) for v in args.ms.split(",")):
      tiles = []
      for spec in args.tiles.split(","):
        t = parse_tiles(spec, m, n, k)
        if t not in tiles and (spec.startswith("auto") or m > 64 or t.tile_m <= 64):
          tiles.append(t)
      us, errors = probe(m, k, n, tiles, unpacked=args.unpacked)
      record(rows, dict(shape=name, m=m, k=k, n=n, us=us, errors=errors), args.json)
  print("\n| shape | M | path | us | vs bf16 |\n|---|---|---|---|---|")
  for r in rows:
    for path, v in r["us"].items():
      print(f"| {r['shape']} | {r['m']} | {path} | {v:.1f} | {r['us'].get('bf16', float('nan')) / v:.2f}x |")


if __name__ == "__main__":
  main()
