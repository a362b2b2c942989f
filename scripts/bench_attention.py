"""Time the policy's Gemma attention: openpi's einsum form against the Pallas kernel
(`duquant_jax.models.attention_kernel`), at the shapes pi0 and pi0.5 run, side by side in one
process.

Each number is the median over repeats of ONE jitted `lax.fori_loop` that runs the attention many
times, each call depending on the last (`bench_kernels.LoopTimer`), so it includes about 2.6 us of
loop and dependency update per call on an H100 (`bench_kernels.loop_overhead`). Every tiling is
checked against the float32 reference: "err" is the largest absolute difference from it,
beside the bf16 einsum form's own.

Usage (GPU machine, from scripts/):
  PYTHONPATH=.. python3 bench_attention.py                 # default tiles, every shape
  PYTHONPATH=.. python3 bench_attention.py --sweep         # and a few other tilings per shape
  PYTHONPATH=.. python3 bench_attention.py --shapes flow1 --profile   # each form's GPU kernels
  PYTHONPATH=.. python3 bench_attention.py --shapes flow1 --iters 2   # CPU smoke test (interpret)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_kernels import LoopTimer, compile_all  # noqa: E402
from duquant_jax.models import attention_kernel as A  # noqa: E402

# name: (B, T, S): gemma_300m's flow steps (pi0: 51 suffix tokens after 816 prefix tokens; pi0.5:
# 50 after 968) and gemma_2b's prefix. Both have N 8 query heads, K 1 kv head, H 256.
SHAPES = {
    "flow1": (1, 51, 867), "flow2": (2, 51, 867), "flow4": (4, 51, 867), "flow8": (8, 51, 867),
    "pi05flow1": (1, 50, 1018), "pi05flow8": (8, 50, 1018),
    "prefix1": (1, 816, 816), "prefix8": (8, 816, 816),
}
HEADS, KV_HEADS, HEAD_DIM = 8, 1, 256


def sweep_tiles(b, t, s):
  """The default tiles and a few others for shape (B, T, S)."""
  base = A.choose_tiles(b, t, s, HEADS)
  out = [base]
  if base.kv_splits > 1:
    out.append(dataclasses.replace(base, partial_dtype="bfloat16"))
  for bt, bs, warps, stages in ((64, 128, 8, 1), (32, 64, 4, 2), (64, 32, 4, 3), (16, 64, 4, 2),
                                (128, 64, 8, 2), (16, 128, 4, 2)):
    splits = max(1, min(-(-s // bs), 128 // (b * HEADS * -(-t // bt))))
    # One slice writes the output itself, with no partial outputs and no merge after the kernel.
    for sk in sorted({1, splits, max(1, splits // 2)}):
      tiles = A.AttentionTiles(block_t=bt, block_s=bs, kv_splits=sk, num_warps=warps,
                               num_stages=stages)
      if tiles not in out:
        out.append(tiles)
  return out


def make_case(b, t, s, seed=0):
  """bf16 q, k, v and pi0's kind of mask: every query sees the first 90% of the keys (valid prefix
  tokens) and a block-causal tail."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = (0.06 * jax.random.normal(ks[0], (b, t, HEADS, HEAD_DIM))).astype(jnp.bfloat16)
  k, v = (jax.random.normal(kk, (b, s, KV_HEADS, HEAD_DIM)).astype(jnp.bfloat16) for kk in ks[1:])
  keys = jnp.arange(s)
  mask = (keys[None, :] < int(0.9 * (s - t))) | (keys[None, :] - (s - t) <= jnp.arange(t)[:, None])
  return q, k, v, jnp.broadcast_to(mask, (b, t, s))


def kernels_per_call(timer, iters):
  """[(kernel name, launches per call, us per call)] of one traced run of a timing loop, the
  loop's own dependency update included; printed as they are read."""
  from profile_policy import profile, tally
  _, events = profile(timer.compiled, timer.args, 1)
  per = tally((kname, ns / 1e3) for line, kname, ns in events if line.startswith("Stream"))
  rows = [(k, c / iters, us / iters) for k, (c, us) in per.items()]
  print(f"    GPU kernels per call: {sum(r[2] for r in rows):.2f} us in {sum(r[1] for r in rows):.1f}"
        " launches", flush=True)
  for k, c, us in rows[:10]:
    print(f"      {us:7.2f} us  x{c:4.1f}  {k[:100]}", flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
  ap.add_argument("--sweep", action="store_true", help="also time other tilings")
  ap.add_argument("--iters", type=int, default=200, help="calls per timing loop")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--profile", action="store_true",
                  help="also trace each form's timing loop and list its GPU kernels per call")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  impl = "pallas" if on_gpu else "pallas_interpret"
  rows = []
  for name in args.shapes.split(","):
    if name not in SHAPES:
      raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    b, t, s = SHAPES[name]
    q, k, v, mask = make_case(b, t, s)
    ref = np.asarray(jax.jit(A.reference)(q, k, v, mask))

    def err(fn):
      return float(np.abs(np.asarray(jax.jit(fn)(q, mask, *kv), np.float32) - ref).max())

    # A flow step's keys are the prefix's cache, then its own: the kernel reads both where they
    # lie, the einsum form concatenates them, as openpi does.
    c = s - t if s > t else 0
    kv = (k[:, c:], v[:, c:], k[:, :c], v[:, :c]) if c else (k, v)

    def form(impl, tiles=None):
      def run(q, mask, k, v, *cache):
        return A.attention(q, k, v, mask, cache=cache or None, implementation=impl, tiles=tiles)
      return run

    forms = [("einsum", form("xla"))]
    for tiles in (sweep_tiles(b, t, s) if args.sweep else [A.choose_tiles(b, t, s, HEADS)]):
      forms.append((str(tiles), form(impl, tiles)))
    timers = [LoopTimer(lambda c, w, fn=fn: fn(c[0], c[1], *w), (q, mask), [kv],
                        jnp.zeros_like(q), args.iters) for _, fn in forms]
    compiled = compile_all(timers)
    base = None
    for (label, fn), timer in zip(forms, compiled):
      if isinstance(timer, Exception):
        print(f"{name} {label}: failed to compile: {str(timer).splitlines()[0][:200]}", flush=True)
        continue
      us = timer.time(args.reps) * 1e6
      base = us if base is None else base
      row = dict(shape=name, b=b, t=t, s=s, form=label, us=us, speedup=base / us, err=err(fn))
      rows.append(row)
      print(f"{name:9s} B{b} T{t} S{s}  {us:8.2f} us  {base / us:5.2f}x  err {row['err']:.4f}  "
            f"{label}", flush=True)
      if args.profile:
        row["kernels"] = kernels_per_call(timer, args.iters)
  print(f"device={jax.devices()[0].device_kind} jax={jax.__version__}")
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
