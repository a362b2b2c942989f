"""Device check of the fused gated W4A8 kernel (`mosaic_gpu.gated_w4a8`): exact, and worth it?

For each Gemma MLP shape and M: the kernel's int8 codes against `gated.reference` (the same
float32 arithmetic as XLA ops; tanh-gelu and rounding may differ by one code where the two round
a value on a .5 boundary differently), then the time per call in one jitted loop
(`bench_kernels`' LoopTimer) of
- `bf16`: bf16 `jnp.dot` to (M, 2F), gelu(gate) * up in bf16 (the float model's MLP up half);
- `unfused`: the plain Mosaic W4A8 kernel to bf16 (M, 2F), then gelu * up and the down
  projection's static int8 quantizer as XLA ops (`fast` with `--variants .../unfused`);
- `fused`: the gated kernel, (M, F) int8 codes straight out of the MMA registers;
- `unpacked`: `gated.reference` on an unpacked int8 copy of the weight (XLA's int8 GEMM, the
  float32 (M, 2F) product through memory); `unpacked_split`: gate and up as two such GEMMs to
  bf16, then gelu * up and the quantizer;
- `fused_w8`: the gated kernel on an int8 copy of the codes (W8A8, no register upcast) at the int4
  codes' tiles, the copy made once; `fused_w8_unpack`: the copy made in every call;
  `fused_w8_inflight[_unpack]`: the same with `MosaicTiles(inflight=True)` (the MMA reads the
  int8 tile from shared memory, one step's MMAs in flight); `fused_inflight`: the int4 codes with
  `inflight=True` (widened into shared memory by the kernel).

Usage (Hopper GPU): python3 scripts/probe_gated_mlp.py [--ms 51,408,816,6528] [--json out.json]
                    [--tiles auto,auto+s8]   (the fused kernel's tilings, `probe_mosaic_w4a8` specs;
                    each but auto also timed on the int8 copy made in the call, `..._w8_unpack`;
                    auto+w2: two MMA warpgroups and a TMA one)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_kernels import LoopTimer, n_copies  # noqa: E402
from probe_mosaic_gpu import _err, record  # noqa: E402
from probe_mosaic_w4a8 import operands, parse_tiles, tile_tag  # noqa: E402
from duquant_jax.kernels import gated, mosaic_gpu, xla  # noqa: E402

SHAPES = {"2b_mlp": (2048, 16384), "300m_mlp": (1024, 4096)}  # (K = width, F = hidden)


def probe(m, k, f, tile_specs=("auto",), iters=20, inflight_specs=("auto",)):
  n = 2 * f
  copies = n_copies(n * k // 2)
  x, xq, sx, zx, qs, sw, zw = operands(m, k, n, jax.random.key(m + k), copies)
  # The hidden activation's static range, from the float product (as calibration would set it).
  y = xla.w4a8_matmul(xq, sx, zx, qs[0], sw, zw, out_dtype=jnp.float32)
  h = jax.nn.gelu(y[:, :f], approximate=True) * y[:, f:]
  lo, hi = float(jnp.min(h)), float(jnp.max(h))
  scale = jnp.array([(hi - lo) / 255.0], jnp.float32)
  zero = jnp.array([round(-128 - lo / float(scale[0]))], jnp.float32)
  row = dict(m=m, k=k, f=f)
  code_diff = lambda a, b: int(jnp.max(jnp.abs(a.astype(jnp.int32) - b.astype(jnp.int32))))
  try:
    got = mosaic_gpu.gated_w4a8(xq, sx, zx, qs[0], sw, zw, scale, zero)
    ref = gated.reference(xq, sx, zx, qs[0], sw, zw, scale, zero)
    d = jnp.abs(got.astype(jnp.int32) - ref.astype(jnp.int32))
    row.update(max_code_diff=int(jnp.max(d)), frac_diff=float(jnp.mean(d > 0)),
               codes_used=int(jnp.unique(ref).size))
    got_s = mosaic_gpu.gated_w4a8(xq, sx, None, qs[0], sw, None, scale, None)
    ref_s = gated.reference(xq, sx, None, qs[0], sw, None, scale, None)
    row["max_code_diff_sym"] = code_diff(got_s, ref_s)
  except Exception as e:  # recorded, the probe goes on
    row["error"] = _err(e)
    traceback.print_exc()
    return row

  def timed(name, fn, consts, weights, y0):
    try:
      row[f"{name}_us"] = 1e6 * LoopTimer(fn, consts, weights, y0, iters).time(reps=5)
    except Exception as e:
      row[f"{name}_error"] = _err(e)
      traceback.print_exc()

  def time_fused(name, tiles, ws, widen=False):
    """The gated kernel at `tiles` on codes `ws` (widen: on an int8 copy made in every call)."""
    cast = (lambda w: w.astype(jnp.int8)) if widen else (lambda w: w)
    timed(name, lambda c, w: mosaic_gpu.gated_w4a8(c[0], c[1], c[2], cast(w), sw, zw, scale, zero,
                                                   tiles=tiles),
          (xq, sx, zx), ws, jnp.zeros((m, f), jnp.int8))

  xb = x.astype(jnp.bfloat16)

  def bf16_mlp(c, w):
    g = jnp.dot(c[0], w)
    return jax.nn.gelu(g[:, :f], approximate=True) * g[:, f:]

  timed("bf16", bf16_mlp, (xb,), [q.T.astype(jnp.bfloat16) for q in qs],
        jnp.zeros((m, f), jnp.bfloat16))

  def unfused(c, w):
    g = mosaic_gpu.w4a8_matmul(c[0], c[1], c[2], w, sw, zw, out_dtype=jnp.bfloat16)
    hh = jax.nn.gelu(g[:, :f], approximate=True) * g[:, f:]
    return xla.quantize_static(hh, scale, zero)[0]

  timed("unfused", unfused, (xq, sx, zx), qs, jnp.zeros((m, f), jnp.int8))
  timed("unpacked", lambda c, w: gated.reference(c[0], c[1], c[2], w, sw, zw, scale, zero,
                                                  dot="int8_unpacked"),
        (xq, sx, zx), qs, jnp.zeros((m, f), jnp.int8))

  def unpacked_split(c, w):
    gate, up = (xla.w4a8_matmul(c[0], c[1], c[2], w[i * f:(i + 1) * f], sw[i * f:(i + 1) * f],
                                zw[i * f:(i + 1) * f], out_dtype=jnp.bfloat16,
                                dot="int8_unpacked") for i in (0, 1))
    return xla.quantize_static(jax.nn.gelu(gate, approximate=True) * up, scale, zero)[0]

  timed("unpacked_split", unpacked_split, (xq, sx, zx), qs, jnp.zeros((m, f), jnp.int8))
  for spec in tile_specs:
    t = parse_tiles(spec, m, f, k, choose=mosaic_gpu.gated_tiles)
    name = "fused" if spec == "auto" else f"fused {tile_tag(t)}"
    if spec != "auto":  # exact at these tiles too
      try:
        got_t = mosaic_gpu.gated_w4a8(xq, sx, zx, qs[0], sw, zw, scale, zero, tiles=t)
      except Exception as e:  # recorded, the other tilings go on
        row[f"{name}_error"] = _err(e)
        continue
      row[f"max_code_diff {tile_tag(t)}"] = code_diff(got_t, ref)
    time_fused(name, t, qs)
    if spec != "auto":  # the same tiles on the int8 copy made in the call
      time_fused(f"{name}_w8_unpack", t, qs, widen=True)
  # Whether the in-register int4 upcast is what limits the kernel.
  q8 = [q.astype(jnp.int8) for q in qs]
  t4 = mosaic_gpu.gated_tiles(m, f, k)  # int4 codes' tiles: every step waits for its MMAs
  try:
    got8 = mosaic_gpu.gated_w4a8(xq, sx, zx, q8[0], sw, zw, scale, zero, tiles=t4)
    row["max_code_diff_w8"] = code_diff(got8, ref)
    time_fused("fused_w8", t4, q8)
    time_fused("fused_w8_unpack", t4, qs, widen=True)
  except Exception as e:  # recorded, the probe goes on
    row["fused_w8_error"] = _err(e)
    traceback.print_exc()
  # The MMA reading the weight tile from shared memory, one step's MMAs in flight: int8 codes as
  # loaded, int4 codes widened into shared memory by the kernel.
  for spec in inflight_specs:
    fly = dataclasses.replace(parse_tiles(spec, m, f, k, choose=mosaic_gpu.gated_tiles),
                              inflight=True)
    tag = "" if spec == "auto" else f" {tile_tag(fly)}"
    for name, ws in ((f"fused_w8_inflight{tag}", q8), (f"fused_inflight{tag}", qs)):
      try:
        got_fly = mosaic_gpu.gated_w4a8(xq, sx, zx, ws[0], sw, zw, scale, zero, tiles=fly)
        row[f"max_code_diff {name}"] = code_diff(got_fly, ref)
        # Symmetric: fewer MMAs per step in flight (no code sums, no row sums).
        got_fly_s = mosaic_gpu.gated_w4a8(xq, sx, None, ws[0], sw, None, scale, None, tiles=fly)
        ref_s = gated.reference(xq, sx, None, qs[0], sw, None, scale, None)
        row[f"max_code_diff_sym {name}"] = code_diff(got_fly_s, ref_s)
      except Exception as e:  # recorded, the other rows go on
        row[f"{name}_error"] = _err(e)
        traceback.print_exc()
        continue
      time_fused(name, fly, ws)
    time_fused(f"fused_w8_inflight_unpack{tag}", fly, qs, widen=True)
  for a, b in (("bf16", "fused"), ("unfused", "fused"), ("fused", "fused_w8"),
               ("fused", "fused_w8_unpack"), ("fused", "fused_w8_inflight"),
               ("fused", "fused_w8_inflight_unpack"), ("bf16", "fused_w8_inflight_unpack"),
               ("fused", "fused_inflight")):
    if f"{a}_us" in row and f"{b}_us" in row:
      row[f"{a}/{b}"] = round(row[f"{a}_us"] / row[f"{b}_us"], 3)
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ms", default="51,408,816,6528")
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--json", default=None)
  ap.add_argument("--tiles", default="auto", help="comma list of the fused kernel's tilings "
                  "(probe_mosaic_w4a8.parse_tiles specs; auto: mosaic_gpu.gated_tiles)")
  ap.add_argument("--inflight-tiles", default="auto",
                  help="the same for the rows with MMAs in flight (inflight is set)")
  a = ap.parse_args()
  rows = []
  for name in a.shapes.split(","):
    k, f = SHAPES[name]
    for m in (int(v) for v in a.ms.split(",")):
      record(rows, dict(shape=name, **probe(m, k, f, a.tiles.split(","),
                                            inflight_specs=a.inflight_tiles.split(","))), a.json)


if __name__ == "__main__":
  main()
