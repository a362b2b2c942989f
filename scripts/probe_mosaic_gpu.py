"""Probe: do the Mosaic GPU (Pallas) Hopper matmuls that ship with jax beat XLA / bf16 on our shapes?

Which Hopper backend to build on (Mosaic GPU or Triton) is a measurement. This probe calls the two Hopper kernels that jax distributes as
`jax.experimental.pallas.ops.gpu` (not part of this library; their APIs move between jax versions)
on gemma_2b's MLP shapes, in the same jitted timing loop as `bench_kernels.py`:

  bf16         jnp.dot(x (M, K) bf16, w (K, N) bf16)
  xla_int8     this library's XLA W4A8 path (int4 weights, per-token int8 activations)
  mgpu_int8    `hopper_matmul_mgpu.matmul` on int8 x (M, K) and int8 w (K, N), if it takes int8
  mgpu_w8a16   `hopper_mixed_type_matmul_mgpu.mixed_matmul_kernel`: int8 weights upcast to bf16 in
               registers, bf16 wgmma, run as y^T = w8^T (N, K) @ x^T (K, M) (the int8 operand must be
               the left one); M is padded to a multiple of 128

The library's own W4A8 kernel (`duquant_jax/kernels/mosaic_gpu.py`) is measured by
`probe_mosaic_w4a8.py` and `bench_kernels.py --kernel mosaic`.

Usage (GPU): python3 scripts/probe_mosaic_gpu.py [--ms 64,816,4096] [--json out.json]
Every failure (an unsupported dtype, a config that does not fit) is printed and recorded, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_kernels import LoopTimer, n_copies  # noqa: E402
from duquant_jax.kernels import xla  # noqa: E402

SHAPES = (("gate/up", 2048, 16384), ("down", 16384, 2048))


def _config(module, **kw):
  """module.TuningConfig with the fields this jax version has (others dropped)."""
  names = {f.name for f in dataclasses.fields(module.TuningConfig)}
  if "max_concurrent_steps" in names:
    kw.setdefault("max_concurrent_steps", 4)
  return module.TuningConfig(**{k: v for k, v in kw.items() if k in names})


def record(rows, row, json_path):
  """Appends a probe row, prints it as JSON and rewrites `json_path` (if any) with all rows so far."""
  rows.append(row)
  print(json.dumps(row), flush=True)
  if json_path:
    Path(json_path).write_text(json.dumps(dict(jax=jax.__version__, rows=rows), indent=1))


def _err(e):
  return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def probe(m, k, n, tiles):
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
  from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as hmx
  key = jax.random.key(0)
  kx, kw = jax.random.split(key)
  mp = -(-m // 128) * 128
  copies = n_copies(n * k // 2)
  iters = 20
  x = jax.random.normal(kx, (m, k), jnp.float32)
  xq, sx, _ = xla.quantize_per_token(x)
  xb = x.astype(jnp.bfloat16)
  xt = jnp.zeros((k, mp), jnp.bfloat16).at[:, :m].set(xb.T)
  ws = [jax.random.randint(jax.random.fold_in(kw, i), (n, k), -8, 8, jnp.int32) for i in range(copies)]
  sw = jnp.full((n, 1), 0.01, jnp.float32)
  out, errors = {}, {}

  def timed(name, fn, consts, weights, y0):
    try:
      out[name] = 1e6 * LoopTimer(fn, consts, weights, y0, iters).time(reps=5)
    except Exception as e:  # recorded, the probe goes on
      errors[name] = _err(e)
      traceback.print_exc(limit=2)

  timed("bf16", lambda c, w: jnp.dot(c[0], w), (xb,),
        [w.T.astype(jnp.bfloat16) for w in ws], jnp.zeros((m, n), jnp.bfloat16))
  timed("xla_int8", lambda c, w: xla.w4a8_matmul(c[0], c[1], None, w, sw, None,
                                                 out_dtype=jnp.bfloat16),
        (xq, sx), [w.astype(jnp.int4) for w in ws], jnp.zeros((m, n), jnp.bfloat16))
  xq_p = jnp.zeros((mp, k), jnp.int8).at[:m].set(xq)
  w8_nk = [w.astype(jnp.int8) for w in ws]
  tn = (((1,), (1,)), ((), ()))
  timed("xla_int8_dot_only", lambda c, w: jax.lax.dot_general(c[0], w, tn,
                                                             preferred_element_type=jnp.int32),
        (xq_p,), w8_nk, jnp.zeros((mp, n), jnp.int32))
  w8_kn = [w.T.astype(jnp.int8) for w in ws]
  for tm, tn, tk in tiles:
    cfg = _config(hm, tile_m=tm, tile_n=tn, tile_k=tk)
    timed(f"mgpu_int8 {tm}x{tn}x{tk}", lambda c, w, cfg=cfg: hm.matmul(c[0], w, None, cfg),
          (jnp.zeros((mp, k), jnp.int8).at[:m].set(xq),), w8_kn, jnp.zeros((mp, n), jnp.int8))
    tnx = min(tn, 128) if mp % (2 * min(tn, 128)) == 0 else 64  # two warpgroups split N
    cfgx = _config(hmx, tile_m=tm, tile_n=tnx, tile_k=tk)
    timed(f"mgpu_w8a16 {tm}x{tnx}x{tk}",
          lambda c, w, cfg=cfgx: hmx.mixed_matmul_kernel(w, c[0], out_dtype=jnp.bfloat16, config=cfg),
          (xt,), [w.astype(jnp.int8) for w in ws], jnp.zeros((n, mp), jnp.bfloat16))
  # correctness of one W8A16 call (the probe's numbers mean nothing if it is wrong)
  for name in [nm for nm in out if nm.startswith("mgpu_w8a16")][:1]:
    tm, tn, tk = (int(v) for v in name.split()[1].split("x"))
    y = hmx.mixed_matmul_kernel(ws[0].astype(jnp.int8), xt, out_dtype=jnp.bfloat16,
                                config=_config(hmx, tile_m=tm, tile_n=tn, tile_k=tk))
    ref = jnp.dot(ws[0].astype(jnp.float32), xt.astype(jnp.float32))
    errors["w8a16_rel_err"] = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
  return out, errors


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ms", default="64,816,4096")
  ap.add_argument("--tiles", default="128x128x64,128x256x64,64x128x128")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
  rows = []
  print(f"# device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  for name, k, n in SHAPES:
    for m in (int(v) for v in args.ms.split(",")):
      us, errors = probe(m, k, n, tiles)
      record(rows, dict(linears=name, m=m, k=k, n=n, us=us, errors=errors), args.json)
  print("\n| linears | M | K x N | path | us |\n|---|---|---|---|---|")
  for r in rows:
    for path, v in r["us"].items():
      print(f"| {r['linears']} | {r['m']} | {r['k']}x{r['n']} | {path} | {v:.1f} |")


if __name__ == "__main__":
  main()
