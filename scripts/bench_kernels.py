"""Benchmark W4A8 matmul paths on a GPU: bf16 `jnp.dot`, XLA int8 TN, and the Pallas kernel.

Every number is the median over repeats of ONE jitted `lax.fori_loop` that runs the matmul many times
(a loop-carried `optimization_barrier` makes each iteration depend on the last, so XLA can neither
hoist nor drop it); within an iteration the matmul cycles over several weight copies so that large
weights come from device memory, not L2. Time per matmul = loop time / (iterations x copies).

Usage (GPU machine):
  python scripts/bench_kernels.py --check --json out.json          # correctness vs XLA, then tables
  python scripts/bench_kernels.py --sweep                          # tile sweep on a few shapes
  python scripts/bench_kernels.py --models gemma_2b --ms 16,64 --skip-probe
  python scripts/bench_kernels.py --kernel mosaic --skip-probe     # the Hopper Mosaic GPU kernel
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from duquant_jax.kernels import mosaic_gpu, pallas_gpu, xla  # noqa: E402

# (name, K, N) of the 7 linears per layer; D width, F mlp, 8 heads x 256, 1 kv head.
MODELS = {
    "gemma_2b": dict(width=2048, mlp=16384, heads=8, kv_heads=1, head_dim=256),
    "gemma_300m": dict(width=1024, mlp=4096, heads=8, kv_heads=1, head_dim=256),
    "tiny": dict(width=128, mlp=256, heads=2, kv_heads=1, head_dim=64),  # CPU smoke test
}
INTERPRET = False  # --interpret: run the kernel in Pallas interpret mode (CPU smoke test)
KERNEL = "triton"  # --kernel: which kernel the "kernel" column times (triton | mosaic)


def kernel_module():
  return mosaic_gpu if KERNEL == "mosaic" else pallas_gpu


def kernel(*args, **kw):
  if KERNEL == "mosaic":
    return mosaic_gpu.w4a8_matmul(*args, **kw)
  return pallas_gpu.w4a8_matmul(*args, interpret=INTERPRET, **kw)
MS = (1, 16, 50, 64, 256, 816, 968, 4096)
L2_BYTES = 50 * 2**20  # H100 L2


def linear_shapes(width, mlp, heads, kv_heads, head_dim):
  """[(name, K, N)] of one Gemma layer's 7 linears."""
  hd = heads * head_dim
  kv = kv_heads * head_dim
  return [("q", width, hd), ("k", width, kv), ("v", width, kv), ("o", hd, width),
          ("gate", width, mlp), ("up", width, mlp), ("down", mlp, width)]


# ------------------------------------------------------------------------------------------ timing
def _depend(c, y):
  """c with c[0][0, 0] bumped by isnan(y[0, 0]) (always 0): a real dependency on y that no compiler
  can fold away, updated in place in the loop carry (one 1-element kernel per matmul)."""
  a = c[0]
  bump = jnp.isnan(y[0, 0].astype(jnp.float32)).astype(a.dtype)
  return (a.at[0, 0].add(bump),) + tuple(c[1:])


class LoopTimer:
  """One jitted timing loop: `matmul(c, w)` over every w in `weights`, `iters` times.

  Args:
    matmul: (c, w) -> y, the operation timed; c[0] is the activation array (it is carried and made
      to depend on the previous y, so XLA can neither hoist, CSE nor drop a matmul).
    consts: tuple of activation-side inputs; weights: list of weight pytrees (copies cycled).
    y0: an array shaped like y (the loop carry).
  """

  def __init__(self, matmul, consts, weights, y0, iters):
    def run(consts_in, weights_in, y_in):
      def body(_, carry):
        c, y = carry
        for w in weights_in:
          c = _depend(c, y)
          y = matmul(c, w)
        return c, y
      return jax.lax.fori_loop(0, iters, body, (consts_in, y_in))
    self.args = (consts, weights, y0)
    self.matmul = matmul
    self.fn = jax.jit(run)
    self.per_loop = iters * len(weights)
    self.compiled = None

  def compile(self):
    self.compiled = self.fn.lower(*self.args).compile()
    return self

  def time(self, reps=5):
    """Median seconds per matmul."""
    if self.compiled is None:
      self.compile()
    jax.block_until_ready(self.compiled(*self.args))  # warm up
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(self.compiled(*self.args))
      times.append(time.perf_counter() - t0)
    return statistics.median(times) / self.per_loop


def compile_all(timers, threads=12):
  """Compile timers in parallel threads (XLA compilation releases the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(threads) as ex:
    return list(ex.map(_try_compile, timers))


def _try_compile(t):
  try:
    return t.compile()
  except Exception as e:  # reported by the caller
    return e


def timed_loop(matmul, consts, weights, y0, iters, reps=5):
  return LoopTimer(matmul, consts, weights, y0, iters).time(reps)


def loop_overhead(m, k, n, copies=8, iters=50):
  """Seconds per iteration of the timing loop with the matmul replaced by a 1-element update."""
  c = (jnp.zeros((m, k), jnp.int8),)
  return timed_loop(lambda c, w: w.at[0, 0].add(c[0][0, 0].astype(w.dtype)), c,
                    [jnp.zeros((m, n), jnp.bfloat16) for _ in range(copies)],
                    jnp.zeros((m, n), jnp.bfloat16), iters)


def n_copies(weight_bytes):
  """Weight copies to cycle so their total exceeds 2x L2 (at most 16)."""
  return int(min(16, max(1, math.ceil(2 * L2_BYTES / weight_bytes))))


def n_iters(est_seconds_per_iter):
  return int(min(200, max(3, 4e-3 / max(est_seconds_per_iter, 1e-7))))


# ------------------------------------------------------------------------------------------ inputs
def make_case(key, m, k, n, copies, symmetric=True):
  """Random activations and `copies` weight sets for the three paths."""
  kx, kw, ks = jax.random.split(key, 3)
  x = jax.random.normal(kx, (m, k), jnp.float32)
  xq, sx, zx = xla.quantize_per_token(x, symmetric=symmetric)
  xb = x.astype(jnp.bfloat16)
  wkeys = jax.random.split(kw, copies)
  w_bf16, w_q = [], []
  for i in range(copies):
    w_bf16.append(jax.random.normal(wkeys[i], (k, n), jnp.bfloat16))
    q = jax.random.randint(wkeys[i], (n, k), -8, 8, jnp.int32).astype(jnp.int4)
    sw = jax.random.uniform(ks, (n, 1), jnp.float32, 0.001, 0.01)
    w_q.append((q, sw))
  return dict(xb=xb, xq=xq, sx=sx, zx=zx, w_bf16=w_bf16, w_q=w_q)


def _tc(bm, bn, bk, w=4, st=4, sk=1, unpack="interleave"):
  return pallas_gpu.TritonTiles(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st,
                               split_k=sk, unpack=unpack)


# Candidate tiles per M regime for --autotune (the winners of an H100 sweep, BENCHMARKS.md).
AUTOTUNE = {
    "small": [_tc(16, 32, 512), _tc(16, 64, 256, unpack="split_x"),
              _tc(16, 32, 256, sk=2, unpack="split_x")],
    "mid": [_tc(64, 64, 256), _tc(64, 16, 512), _tc(64, 32, 256, unpack="split_x")],
    "m256": [_tc(64, 64, 256), _tc(128, 128, 128, w=8)],
    "large": [_tc(128, 64, 128), _tc(128, 256, 128, w=8, st=3)],
}


def regime(m):
  return "small" if m <= 16 else "mid" if m <= 64 else "m256" if m <= 256 else "large"


PATHS = ("bf16", "xla_int8", "xla_bf16", "kernel")


def case_timers(key, m, k, n, tiles=None, paths=PATHS, candidates=()):
  """{path: LoopTimer} for one (M, K, N); "kernel@i" for each tile candidate i."""
  copies = n_copies(n * k // 2)
  case = make_case(key, m, k, n, copies)
  est = copies * max(2 * n * k / 2.4e12, 2 * m * n * k / 600e12, 5e-6)
  iters = n_iters(est)
  y0 = jnp.zeros((m, n), jnp.bfloat16)
  out = {}
  if "bf16" in paths:
    out["bf16"] = LoopTimer(lambda c, w: jnp.dot(c[0], w), (case["xb"],), case["w_bf16"], y0, iters)
  act = (case["xq"], case["sx"])
  if "xla_int8" in paths:
    out["xla_int8"] = LoopTimer(
        lambda c, w: xla.w4a8_matmul(c[0], c[1], None, w[0], w[1], None, out_dtype=jnp.bfloat16),
        act, case["w_q"], y0, iters)
  if "xla_bf16" in paths:  # the same integer dot on bf16 tensor cores (exact, see xla.w4a8_matmul)
    out["xla_bf16"] = LoopTimer(
        lambda c, w: xla.w4a8_matmul(c[0], c[1], None, w[0], w[1], None, out_dtype=jnp.bfloat16,
                                     dot="bf16"),
        act, case["w_q"], y0, iters)

  def kernel_timer(t):
    return LoopTimer(
        lambda c, w: kernel(c[0], c[1], None, w[0], w[1], None, out_dtype=jnp.bfloat16, tiles=t),
        act, case["w_q"], y0, iters)

  if "kernel" in paths:
    out["kernel"] = kernel_timer(tiles or kernel_module().choose_tiles(m, n, k))
  for i, t in enumerate(candidates):
    if kernel_module().supports(m, n, k, 1, t):
      out[f"kernel@{i}"] = kernel_timer(t)
  return out


def run_timers(timers):
  """{name: seconds or nan}: compile in parallel, then time one by one."""
  names = list(timers)
  res = compile_all([timers[nm] for nm in names])
  out = {}
  for nm, r in zip(names, res):
    if isinstance(r, Exception):
      print(f"  {nm}: compile failed: {type(r).__name__}: {str(r)[:300]}", flush=True)
      out[nm] = float("nan")
    else:
      out[nm] = r.time()
  return out


def bench_case(key, m, k, n, tiles=None, paths=PATHS):
  """{path: seconds per matmul} for one (M, K, N)."""
  return run_timers(case_timers(key, m, k, n, tiles, paths))


def copy_bandwidth(nbytes=2 * 2**30):
  """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
  x = jnp.arange(nbytes // 4, dtype=jnp.uint32)
  iters = 10

  @jax.jit
  def run(x):
    return jax.lax.fori_loop(0, iters, lambda i, v: v + jnp.uint32(1), x)

  run(x).block_until_ready()
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    run(x).block_until_ready()
    ts.append(time.perf_counter() - t0)
  return 2 * nbytes * iters / statistics.median(ts)


# ------------------------------------------------------------------------------------------ anatomy
ANATOMY_PATHS = ("bf16", "xla_int8", "int4_materialized", "w8a8", "int8_dot_only", "int8_dot_f32",
                 "w4a16", "weight_only_int4", "weight_only_int8")


def anatomy_timers(key, m, k, n):
  """Where the XLA W4A8 path's time goes at one (M, K, N), one timer per formulation:

    bf16               jnp.dot, weight (K, N)
    xla_int8           the library's path: int4 -> int8 cast fused by XLA into its GEMM, epilogue
    int4_materialized  the same with the cast forced into its own kernel (optimization barrier)
    w8a8               int8 weights stored (no cast), same epilogue
    int8_dot_only      the bare int8 x int8 -> int32 TN dot of stored int8 weights (no epilogue)
    int8_dot_f32       the same dot asking XLA for float32 output
    w4a16              int4 -> bf16 dequantization (codes x scales), then a bf16 TN dot
    weight_only_int4   `xla.weight_only_matmul`: int4 codes cast to bf16 in the dot, scales after
    weight_only_int8   the same with int8 codes (W8A16)
  """
  copies = n_copies(n * k // 2)
  case = make_case(key, m, k, n, copies)
  est = copies * max(2 * n * k / 2.4e12, 2 * m * n * k / 600e12, 5e-6)
  iters = n_iters(est)
  y0 = jnp.zeros((m, n), jnp.bfloat16)
  act = (case["xq"], case["sx"])
  w8 = [(q.astype(jnp.int8), sw) for q, sw in case["w_q"]]
  tn = (((1,), (1,)), ((), ()))

  def epi(c, q, sw):
    return xla.w4a8_matmul(c[0], c[1], None, q, sw, None, out_dtype=jnp.bfloat16)

  return {
      "bf16": LoopTimer(lambda c, w: jnp.dot(c[0], w), (case["xb"],), case["w_bf16"], y0, iters),
      "xla_int8": LoopTimer(lambda c, w: epi(c, w[0], w[1]), act, case["w_q"], y0, iters),
      "int4_materialized": LoopTimer(
          lambda c, w: epi(c, jax.lax.optimization_barrier(w[0].astype(jnp.int8)), w[1]),
          act, case["w_q"], y0, iters),
      "w8a8": LoopTimer(lambda c, w: epi(c, w[0], w[1]), act, w8, y0, iters),
      "int8_dot_only": LoopTimer(
          lambda c, w: jax.lax.dot_general(c[0], w[0], tn, preferred_element_type=jnp.int32),
          act, w8, jnp.zeros((m, n), jnp.int32), iters),
      "int8_dot_f32": LoopTimer(
          lambda c, w: jax.lax.dot_general(c[0], w[0], tn, preferred_element_type=jnp.float32),
          act, w8, jnp.zeros((m, n), jnp.float32), iters),
      "w4a16": LoopTimer(
          lambda c, w: jax.lax.dot_general(
              c[0], (w[0].astype(jnp.bfloat16) * w[1].astype(jnp.bfloat16)), tn),
          (case["xb"],), case["w_q"], y0, iters),
      "weight_only_int4": LoopTimer(
          lambda c, w: xla.weight_only_matmul(c[0], w[0], w[1], None).astype(jnp.bfloat16),
          (case["xb"],), case["w_q"], y0, iters),
      "weight_only_int8": LoopTimer(
          lambda c, w: xla.weight_only_matmul(c[0], w[0], w[1], None).astype(jnp.bfloat16),
          (case["xb"],), w8, y0, iters),
  }


def anatomy(key, models, ms, deadline):
  """Rows {model, m, k, n, <path>: seconds} of `anatomy_timers` over each model's distinct shapes."""
  rows = []
  for model in models:
    uniq = {}
    for name, k, n in linear_shapes(**MODELS[model]):
      uniq.setdefault((k, n), []).append(name)
    for m in ms:
      if time.time() > deadline:
        print("anatomy: deadline reached", flush=True)
        return rows
      for (k, n), names in uniq.items():
        res = run_timers(anatomy_timers(key, m, k, n))
        row = dict(model=model, linears="/".join(names), m=m, k=k, n=n, **res)
        rows.append(row)
        print("| " + " | ".join([model, row["linears"], str(m), f"{k}x{n}"]
                                + [f"{res[p] * 1e6:.1f}" for p in ANATOMY_PATHS]) + " |", flush=True)
  return rows


# ------------------------------------------------------------------------------------------ check
def check(key):
  """Kernel vs XLA integer path on GPU, several shapes / quantizer kinds; returns rows."""
  rows = []
  shapes = [(1, 2048, 256, 1), (50, 1024, 4096, 1), (51, 2048, 2048, 1), (64, 16384, 2048, 1),
            (816, 2048, 2048, 1), (968, 1024, 256, 1), (4096, 2048, 2048, 1), (50, 2048, 2048, 16),
            (100, 1024, 1024, 8)]
  tiles_extra = [None, pallas_gpu.TritonTiles(block_m=16, block_n=32, block_k=256, split_k=4)]
  for (m, k, n, g) in shapes:
    for sym in (True, False):
      for tiles in tiles_extra:
        if tiles is not None and not pallas_gpu.supports(m, n, k, g, tiles):
          continue
        key, k1, k2, k3, k4 = jax.random.split(key, 5)
        x = jax.random.normal(k1, (m, k)) * (1 + 5 * jax.random.uniform(k4, (1, k)))
        xq, sx, zx = xla.quantize_per_token(x, symmetric=sym)
        q = jax.random.randint(k2, (n, k), -8, 8).astype(jnp.int4)
        sw = jax.random.uniform(k3, (n, g), minval=0.001, maxval=0.01)
        zw = None if sym else jax.random.randint(k4, (n, g), -4, 4).astype(jnp.float32)
        ref = jax.jit(xla.w4a8_matmul)(xq, sx, zx, q, sw, zw)
        y = kernel(xq, sx, zx, q, sw, zw, tiles=tiles)
        f64 = xla.w4a8_matmul_reference_f64(xq, sx, zx, q, sw, zw)
        err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
        err64 = float(np.max(np.abs(np.asarray(y, np.float64) - f64)) / np.max(np.abs(f64)))
        ok = bool(np.all(np.isfinite(np.asarray(y)))) and err < 1e-5
        rows.append(dict(m=m, k=k, n=n, g=g, symmetric=sym, split_k=(tiles.split_k if tiles else 1),
                         rel_err_vs_xla=err, rel_err_vs_f64=err64, ok=ok))
        print(f"check M={m} K={k} N={n} G={g} sym={sym} split={rows[-1]['split_k']}: "
              f"vs XLA {err:.2e}, vs f64 {err64:.2e} {'OK' if ok else 'FAIL'}", flush=True)
  return rows


def pack_cost():
  """Is the int4 -> int8-pair view free? Returns the HLO ops of the jitted kernel call."""
  m, k, n = 64, 2048, 16384
  xq = jnp.ones((m, k), jnp.int8)
  sx = jnp.ones((m, 1), jnp.float32)
  q = jnp.ones((n, k), jnp.int4)
  sw = jnp.ones((n, 1), jnp.float32)
  f = jax.jit(lambda *a: pallas_gpu.w4a8_matmul(*a, out_dtype=jnp.bfloat16))
  txt = f.lower(xq, sx, None, q, sw, None).compile().as_text()
  ops = [ln.strip()[:160] for ln in txt.splitlines()
         if ("fusion" in ln or "custom-call" in ln or "copy" in ln or "bitcast" in ln) and "=" in ln]
  return ops


# ------------------------------------------------------------------------------------------ probe
def probe(key, layers=18, m=64, k=2048, n=16384, use_kernel=True):
  """18 stacked gemma_2b up-projections at M=64: unrolled vs scanned, per path. Seconds per stack."""
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (m, k))
  xb = x.astype(jnp.bfloat16)
  xq, sx, _ = xla.quantize_per_token(x)
  wb = jax.random.normal(kw, (layers, k, n), jnp.bfloat16)
  q = jax.random.randint(kw, (layers, n, k), -8, 8).astype(jnp.int4)
  sw = jax.random.uniform(kw, (layers, n, 1), minval=0.001, maxval=0.01)
  wb_list = [wb[i] for i in range(layers)]
  q_list = [(q[i], sw[i]) for i in range(layers)]

  def bf16(c, w):
    return jnp.dot(c[0], w)

  def int8(c, w):
    return xla.w4a8_matmul(c[0], c[1], None, w[0], w[1], None, out_dtype=jnp.bfloat16)

  def kern(c, w):
    return kernel(c[0], c[1], None, w[0], w[1], None, out_dtype=jnp.bfloat16)

  # Each layer's matmul depends on the previous layer's output (as in a real layer stack).
  def unrolled(fn):
    def run(c, ws):
      y = jnp.zeros((m, n), jnp.bfloat16)
      for w in ws:
        c = _depend(c, y)
        y = fn(c, w)
      return y
    return run

  def scanned(fn):
    def run(c, ws):
      def step(carry, w):
        c, y = carry
        c = _depend(c, y)
        return (c, fn(c, w)), None
      return jax.lax.scan(step, (c, jnp.zeros((m, n), jnp.bfloat16)), ws)[0][1]
    return run

  def scanned_index(c, ws):
    qs, sws = ws
    def step(carry, i):
      c, y = carry
      c = _depend(c, y)
      y = kernel(c[0], c[1], None, qs, sws, None, out_dtype=jnp.bfloat16, layer=i)
      return (c, y), None
    return jax.lax.scan(step, (c, jnp.zeros((m, n), jnp.bfloat16)), jnp.arange(layers))[0][1]

  cases = {
      "bf16 unrolled (18 arrays)": (unrolled(bf16), (xb,), wb_list),
      "bf16 scan (stacked)": (scanned(bf16), (xb,), wb),
      "XLA int8 unrolled": (unrolled(int8), (xq, sx), q_list),
      "XLA int8 scan": (scanned(int8), (xq, sx), (q, sw)),
  }
  if use_kernel:
    cases["kernel unrolled"] = (unrolled(kern), (xq, sx), q_list)
    cases["kernel scan (slice)"] = (scanned(kern), (xq, sx), (q, sw))
    cases["kernel scan (layer index)"] = (scanned_index, (xq, sx), (q, sw))
  out = {}
  y0 = jnp.zeros((m, n), jnp.bfloat16)
  for name, (fn, c, ws) in cases.items():
    try:
      out[name] = timed_loop(fn, c, [ws], y0, iters=20)
    except Exception as e:  # report and go on: one failing variant must not lose the rest
      print(f"probe {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      out[name] = float("nan")
    print(f"probe {name}: {out[name] * 1e3:.3f} ms", flush=True)
  return out


# ------------------------------------------------------------------------------------------ sweep
SWEEP_TILES = {
    "small": [pallas_gpu.TritonTiles(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st,
                                    split_k=sk)
              for (bm, bn, bk, w, st, sk) in [
                  (16, 16, 512, 4, 4, 1), (16, 32, 512, 4, 4, 1), (16, 64, 256, 4, 4, 1),
                  (16, 32, 1024, 4, 3, 1), (16, 32, 256, 4, 4, 2), (16, 64, 512, 4, 3, 4),
                  (16, 128, 256, 4, 3, 4), (16, 32, 512, 2, 4, 1)]],
    "mid": [pallas_gpu.TritonTiles(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st,
                                  split_k=sk)
            for (bm, bn, bk, w, st, sk) in [
                (64, 32, 256, 4, 4, 1), (64, 64, 256, 4, 4, 1), (64, 16, 512, 4, 4, 1),
                (32, 32, 512, 4, 4, 1), (64, 64, 256, 4, 3, 2), (64, 128, 128, 4, 4, 1),
                (16, 64, 256, 4, 4, 1), (64, 128, 256, 8, 3, 2)]],
    "large": [pallas_gpu.TritonTiles(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
              for (bm, bn, bk, w, st) in [
                  (128, 128, 128, 8, 4), (128, 128, 256, 8, 3), (128, 256, 128, 8, 3),
                  (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (256, 128, 128, 8, 3),
                  (128, 128, 64, 4, 4), (64, 256, 128, 8, 4)]],
}


def sweep(key, deadline):
  rows = []
  for (m, k, n) in [(16, 2048, 16384), (16, 16384, 2048), (64, 2048, 16384), (64, 16384, 2048),
                    (50, 1024, 4096), (64, 2048, 2048), (256, 2048, 16384), (968, 2048, 16384),
                    (968, 16384, 2048), (4096, 2048, 16384)]:
    regime = "small" if m <= 16 else "mid" if m <= 256 else "large"
    timers = case_timers(key, m, k, n, paths=("bf16", "xla_int8"))
    cands = [t for t in SWEEP_TILES[regime] if pallas_gpu.supports(m, n, k, 1, t)]
    for i, t in enumerate(cands):
      timers[i] = case_timers(key, m, k, n, tiles=t, paths=("kernel",))["kernel"]
    res = run_timers(timers)
    base = {p: res[p] for p in ("bf16", "xla_int8")}
    for i, t in enumerate(cands):
      s = res[i]
      rows.append(dict(m=m, k=k, n=n, tiles=dataclasses.asdict(t), kernel_s=s, **base))
      print(f"sweep M={m} K={k} N={n} bm={t.block_m} bn={t.block_n} bk={t.block_k} "
            f"w={t.num_warps} st={t.num_stages} sk={t.split_k}: {s * 1e6:.1f} us "
            f"(bf16 {base['bf16'] * 1e6:.1f}, xla int8 {base['xla_int8'] * 1e6:.1f})", flush=True)
    if time.time() > deadline:
      print("sweep: deadline reached", flush=True)
      break
  return rows


# ------------------------------------------------------------------------------------------ main
def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--models", default="gemma_2b,gemma_300m")
  ap.add_argument("--ms", default=",".join(map(str, MS)))
  ap.add_argument("--check", action="store_true", help="kernel vs XLA correctness on this device")
  ap.add_argument("--sweep", action="store_true", help="tile sweep instead of the tables")
  ap.add_argument("--skip-table", action="store_true")
  ap.add_argument("--skip-probe", action="store_true")
  ap.add_argument("--max-minutes", type=float, default=8.0)
  ap.add_argument("--json", default=None, help="write all results to this path")
  ap.add_argument("--autotune", action="store_true",
                  help="kernel column = best of choose_tiles and the AUTOTUNE candidates")
  ap.add_argument("--interpret", action="store_true", help="kernel in interpret mode (CPU smoke)")
  ap.add_argument("--kernel", choices=("triton", "mosaic"), default="triton",
                  help="the kernel column: the Triton kernel (pallas_gpu) or the Hopper Mosaic GPU "
                       "kernel (mosaic_gpu; no --autotune, --sweep, --check or layer-index probe)")
  ap.add_argument("--anatomy", action="store_true",
                  help="instead of the tables: where the XLA path's time goes (see anatomy_timers)")
  ap.add_argument("--probe-shape", default="18,64,2048,16384", help="layers,M,K,N of the probe")
  args = ap.parse_args()
  global INTERPRET, KERNEL
  INTERPRET, KERNEL = args.interpret, args.kernel
  if KERNEL == "mosaic" and (args.autotune or args.sweep or args.check or not args.skip_probe):
    ap.error("--kernel mosaic takes neither --autotune, --sweep, --check nor the probe "
             "(pass --skip-probe)")

  deadline = time.time() + 60 * args.max_minutes
  key = jax.random.PRNGKey(0)
  dev = jax.devices()[0]
  result = dict(device=str(getattr(dev, "device_kind", dev)), jax=jax.__version__,
                argv=sys.argv)
  print(f"# device {result['device']}, jax {jax.__version__}", flush=True)

  def dump():
    if args.json:
      Path(args.json).write_text(json.dumps(result, indent=1))

  if args.check:
    result["pack_hlo"] = pack_cost()
    print("kernel call HLO ops:\n  " + "\n  ".join(result["pack_hlo"]), flush=True)
    result["check"] = check(key)
    dump()
  bw = copy_bandwidth(2**24 if args.interpret else 2 * 2**30)
  result["copy_bw"] = bw
  print(f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s", flush=True)
  ovh = {m: loop_overhead(m, 2048, 2048) for m in (1, 64, 968)}
  result["loop_overhead_s"] = ovh
  print("timing-loop overhead per matmul (1-element dependency update): "
        + ", ".join(f"M={m}: {v * 1e6:.2f} us" for m, v in ovh.items()), flush=True)
  if args.anatomy:
    print("| model | linears | M | K x N | " + " | ".join(f"{p} us" for p in ANATOMY_PATHS) + " |",
          flush=True)
    result["anatomy"] = anatomy(key, args.models.split(","), [int(v) for v in args.ms.split(",")],
                                deadline)
    dump()
    return
  if args.sweep:
    result["sweep"] = sweep(key, deadline)
    dump()
    return
  if not args.skip_probe:
    layers, pm, pk, pn = (int(v) for v in args.probe_shape.split(","))
    result["probe"] = probe(key, layers, pm, pk, pn)
    dump()
  if args.skip_table:
    return
  rows = []
  ms = [int(v) for v in args.ms.split(",")]
  for model in args.models.split(","):
    shapes = linear_shapes(**MODELS[model])
    uniq = {}
    for name, k, n in shapes:
      uniq.setdefault((k, n), []).append(name)
    for m in ms:
      if time.time() > deadline:
        print("table: deadline reached", flush=True)
        break
      timers = {}
      cands = AUTOTUNE[regime(m)] if args.autotune else ()
      for (k, n) in uniq:
        for path, t in case_timers(key, m, k, n, candidates=cands).items():
          timers[(k, n, path)] = t
      res = run_timers(timers)
      del timers
      for (k, n), names in uniq.items():
        t = {p: res[(k, n, p)] for p in PATHS}
        t["kernel_default"] = t["kernel"]
        best = None
        for i, c in enumerate(cands):
          v = res.get((k, n, f"kernel@{i}"), float("nan"))
          if v == v and v < t["kernel"]:
            t["kernel"], best = v, dataclasses.asdict(c)
        t["kernel_tiles"] = best or dataclasses.asdict(kernel_module().choose_tiles(m, n, k))
        # The bytes moved once at the measured copy rate (read + write counted).
        floor = (n * k / 2 + m * k + 2 * m * n) / bw
        row = dict(model=model, linears="/".join(names), m=m, k=k, n=n, floor_s=floor, **t)
        rows.append(row)
        print_row(row)
      result["table"] = rows
      dump()
  print_table(rows)


def print_row(r):
  print(f"| {r['model']} | {r['linears']} | {r['m']} | {r['k']}x{r['n']} | {r['bf16'] * 1e6:.1f} | "
        f"{r['xla_int8'] * 1e6:.1f} | {r.get('xla_bf16', float('nan')) * 1e6:.1f} | "
        f"{r['kernel'] * 1e6:.1f} | {r['floor_s'] * 1e6:.1f} | "
        f"{r['bf16'] / r['kernel']:.2f} | {r['xla_int8'] / r['kernel']:.2f} | "
        f"{r['kernel'] / r['floor_s']:.2f} |", flush=True)


def print_table(rows):
  print("\n| model | linears | M | K x N | bf16 us | XLA int8 us | XLA bf16-MMA us | kernel us | "
        "floor us | bf16/kernel | int8/kernel | kernel/floor |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print_row(r)


if __name__ == "__main__":
  main()
