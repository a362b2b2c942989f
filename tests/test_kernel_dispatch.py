"""Auto-dispatch decisions of the kernels package, pinned as data.

Every public entry point that picks an implementation (`w4a8_matmul`, `gated_w4a8`,
`transform_quantize`, `transform_only`) is traced over a grid of
(platform, M, N, K, G, weight-code dtype, layer index or not, implementation) with the kernels
replaced by recording stubs, so no GPU is needed. Two things decide what runs:
  - the platform at trace time (`jax.default_backend()` and the first device's compute
    capability): "cpu" (any backend without a GPU), "cuda-hopper" (9.x) or "cuda-other";
  - the platform the trace is lowered for (`jax.lax.platform_dependent`): "cuda" or another.
Both are patched here. A decision is the kernel that the traced function calls: a letter per M.

The EXPECTED tables were generated from the dispatch code as it stood before the kernels package
was split into one module per op (the hard-coded `_auto` / `_at_layer` / `_mosaic_or_xla` of
`kernels/__init__.py`), by `python tests/test_kernel_dispatch.py`, and pasted here: the
dispatch tables of `kernels/w4a8.py`, `gated.py` and `online_transform.py` must reproduce them
exactly. Since then they changed on purpose twice, both in the last column (M = 4096), both on
Hopper: the W4A8 table's for the unpacked int8 GEMM (docs/kernels.md, "Unpacked int8 GEMM for
long prefixes on Hopper"), the gated table's for the kernel on an int8 copy (docs/kernels.md,
"Gated MLP on an int8 copy for long prefixes on Hopper"). Rerun that command to regenerate the data only when a threshold changes on purpose (and
say which measurement moved it in docs/kernels.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import pytest

from duquant_jax import kernels
from duquant_jax.kernels import mosaic_gpu, pallas_gpu, xla
from duquant_jax.transforms import InputTransform

# Tokens per call: policy steps (1-64), their boundaries, prefixes (256-4096).
MS = (1, 16, 17, 51, 64, 65, 256, 257, 816, 1024, 1025, 4096)
# (N, K) of the openpi linears: gemma_2b q / k,v / gate,up / down; gemma_300m q / k,v / gate,up /
# down / o; SigLIP qkvo / fc1 / fc2; and a weight of exactly 2**21 codes.
SHAPES = ((2048, 2048), (256, 2048), (16384, 2048), (2048, 16384), (2048, 1024), (256, 1024),
          (4096, 1024), (1024, 4096), (1024, 2048), (1152, 1152), (4304, 1152), (1152, 4304),
          (512, 4096))
# Gate and up stacked (2F, K): gemma_2b, gemma_300m, SigLIP.
GATED_SHAPES = ((32768, 2048), (8192, 1024), (8608, 1152))
# (weight-code dtype, scale groups): G = 1 ("channel") or groups of 128 input channels ("g128").
CODES = (("int4", "channel"), ("int4", "g128"), ("int8", "channel"))
PLATFORMS = {"cpu": ("cpu", None), "cuda-hopper": ("gpu", "9.0"), "cuda-other": ("gpu", "8.9")}
LOWERINGS = ("cuda", "other")
# One letter per M: x XLA (with a layer index: on a slice), m / p the Mosaic / Pallas kernel on
# one layer's arrays, M / P the kernel reading the stacked arrays in place, u XLA's int8 GEMM on
# an unpacked copy of the weight (with a layer index: of the layer's slice), c the gated Mosaic
# kernel on an int8 copy of one layer's int4 codes.
LETTERS = {("mosaic", False): "m", ("mosaic", True): "M", ("pallas", False): "p",
           ("pallas", True): "P", ("unpacked", False): "u", ("copy", False): "c"}


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
  compute_capability: str


@contextlib.contextmanager
def _patched(monkeypatch, platform, lowering, calls):
  """Trace as if on `platform`, lowering for `lowering`, with the kernels recording their calls."""
  backend, cc = PLATFORMS[platform]
  with monkeypatch.context() as mp:
    mp.setattr(jax, "default_backend", lambda: backend)
    mp.setattr(jax, "devices", lambda *a, **k: [_FakeDevice(cc)] if cc else [_FakeDevice("")])
    mp.setattr(jax.lax, "platform_dependent",
               lambda *args, cuda=None, default=None, **kw: (
                   cuda if lowering == "cuda" else default)(*args))

    def matmul(name):
      def stub(xq, sx, zx, q, sw, zw, *, out_dtype=jnp.float32, layer=None, **kw):
        calls.append((name, layer is not None))
        return jnp.zeros((xq.shape[0], sw.shape[-2]), out_dtype)
      return stub

    def gated(xq, sx, zx, q, sw, zw, out_scale, out_zero, *, layer=None, **kw):
      calls.append(("mosaic", layer is not None, jnp.dtype(q.dtype)))
      return jnp.zeros((xq.shape[0], sw.shape[-2] // 2), jnp.int8)

    def cm_quantize(x, transform, bits=8, *, symmetric=True, clip_ratio=1.0, reduce=False):
      calls.append(("xla_cm_reduce" if reduce else "xla_cm", False))
      m, k = x.shape
      return (jnp.zeros((m, k), jnp.int8), jnp.zeros((m, 1)),
              None if symmetric else jnp.zeros((m, 1)))

    def cm_only(x, transform, *, reduce=False):
      calls.append(("xla_cm_reduce" if reduce else "xla_cm", False))
      return jnp.zeros(x.shape, jnp.float32)

    def reduce_form(x, transform):
      calls.append(("xla_reduce", False))
      return jnp.zeros(x.shape, jnp.float32)

    real_xla_matmul = xla.w4a8_matmul

    def xla_matmul(*args, dot="int8", **kw):
      if dot == "int8_unpacked":
        calls.append(("unpacked", False))
      return real_xla_matmul(*args, dot=dot, **kw)

    mp.setattr(xla, "w4a8_matmul", xla_matmul)
    mp.setattr(mosaic_gpu, "w4a8_matmul", matmul("mosaic"))
    mp.setattr(mosaic_gpu, "gated_w4a8", gated)
    mp.setattr(pallas_gpu, "w4a8_matmul", matmul("pallas"))
    mp.setattr(xla, "transform_quantize_channel_major", cm_quantize)
    mp.setattr(xla, "transform_channel_major", cm_only)
    mp.setattr(xla, "transform_reduce", reduce_form)
    yield


def _letter(calls) -> str:
  """The letter of one traced call: the one kernel it ran, or x."""
  kernel_calls = [c for c in calls if c[0] in ("mosaic", "pallas", "unpacked", "copy")]
  assert len(kernel_calls) <= 1, calls
  return LETTERS[kernel_calls[0]] if kernel_calls else "x"


def _weight_specs(m, n, k, group, dtype, layered):
  s, f32 = jax.ShapeDtypeStruct, jnp.float32
  g = 1 if group == "channel" else k // 128
  lead = (18,) if layered else ()
  return (s((m, k), jnp.int8), s((m, 1), f32), s((m, 1), f32), s(lead + (n, k), dtype),
          s(lead + (n, g), f32), s(lead + (n, g), f32))


def w4a8_row(monkeypatch, platform, lowering, impl, layered, dtype, group, n, k, ms=MS) -> str:
  """Decisions of `kernels.w4a8_matmul` over `ms` for one grid row."""
  out = ""
  for m in ms:
    calls = []
    specs = _weight_specs(m, n, k, group, dtype, layered)
    layer = (jax.ShapeDtypeStruct((), jnp.int32),) if layered else ()
    fn = lambda *a: kernels.w4a8_matmul(*a[:6], implementation=impl,
                                        layer=a[6] if layered else None)
    with _patched(monkeypatch, platform, lowering, calls):
      jax.eval_shape(fn, *specs, *layer)
    out += _letter(calls)
  return out


def gated_row(monkeypatch, platform, lowering, impl, layered, dtype, group, n, k) -> str:
  """Decisions of `kernels.gated_w4a8` over MS for one grid row (n = 2F)."""
  out = ""
  s, f32 = jax.ShapeDtypeStruct, jnp.float32
  for m in MS:
    calls = []
    specs = _weight_specs(m, n, k, group, dtype, layered) + (s((1,), f32), s((1,), f32))
    layer = (s((), jnp.int32),) if layered else ()
    fn = lambda *a: kernels.gated_w4a8(*a[:8], implementation=impl,
                                       layer=a[8] if layered else None)
    with _patched(monkeypatch, platform, lowering, calls):
      jax.eval_shape(fn, *specs, *layer)
    # The kernel given int8 codes for an int4 weight: a copy made in the call.
    out += _letter([("copy", False) if c[2] != dtype else c[:2] for c in calls])
  return out


def _transform_spec(k, b=16, layers=None):
  s = jax.ShapeDtypeStruct
  lead = () if layers is None else (layers,)
  return InputTransform(rot1=s(lead + (k // b, b, b), jnp.float32),
                        perm=s(lead + (k,), jnp.int32), rot2=s(lead + (k // b, b, b), jnp.float32),
                        merged_smooth=True)


def transform_form(monkeypatch, platform, lowering, entry, impl, m, k, layers) -> str:
  """The form `kernels.transform_quantize` / `transform_only` runs: a name of
  `TRANSFORM_IMPLEMENTATIONS` ("xla": the row-major einsum chain)."""
  calls = []
  lead = () if layers is None else (layers,)
  x = jax.ShapeDtypeStruct(lead + (m, k), jnp.bfloat16)
  fn = {"quantize": lambda x, tr: kernels.transform_quantize(x, tr, 8, implementation=impl),
        "only": lambda x, tr: kernels.transform_only(x, tr, implementation=impl)}[entry]
  with _patched(monkeypatch, platform, lowering, calls):
    jax.eval_shape(fn, x, _transform_spec(k, layers=layers))
  assert len(calls) <= 1, calls
  return calls[0][0] if calls else "xla"


def _rows(shapes, impls=(None, "mosaic"), codes=CODES):
  """(key, row function args) of every grid row; key = (impl, platform, layered, dtype, group,
  N, K). An explicit implementation does not depend on the platform: one key, platform "any"."""
  for impl, layered, (dtype, group), (n, k) in itertools.product(impls, (False, True), codes,
                                                                  shapes):
    if group == "g128" and k % 128:
      continue
    for platform in PLATFORMS:
      key = (impl, "any" if impl else platform, layered, dtype, group, n, k)
      yield key, (platform, impl, layered, jnp.dtype(dtype), group, n, k)


TRANSFORM_MS = (1, 51, 1024, 1025, 4096)
TRANSFORM_KS = (1024, 8192, 16384)


# Generated from the dispatch code before the split (see the module docstring). Rows not listed
# are XLA at every M. Columns: MS.
EXPECTED_W4A8 = {
    (None, 'cuda-hopper', False, 'int4', 'channel', 2048, 2048): 'xxxxmmmmmmmu',
    (None, 'cuda-other', False, 'int4', 'channel', 2048, 2048): 'xxpppxxxxxxx',
    (None, 'cuda-hopper', False, 'int4', 'channel', 16384, 2048): 'mmmmmmmmmmmu',
    (None, 'cuda-other', False, 'int4', 'channel', 16384, 2048): 'pppppxxxxxxx',
    (None, 'cuda-hopper', False, 'int4', 'channel', 2048, 16384): 'mmmmmmmmmmmu',
    (None, 'cuda-hopper', False, 'int4', 'channel', 2048, 1024): 'xxxxmmmmmmmu',
    (None, 'cuda-other', False, 'int4', 'channel', 2048, 1024): 'xxpppxxxxxxx',
    (None, 'cuda-hopper', False, 'int4', 'channel', 4096, 1024): 'xxxxmmmmmmmu',
    (None, 'cuda-other', False, 'int4', 'channel', 4096, 1024): 'xxpppxxxxxxx',
    (None, 'cuda-hopper', False, 'int4', 'channel', 1024, 4096): 'xxxxmmmmmmmu',
    (None, 'cuda-hopper', False, 'int4', 'channel', 1024, 2048): 'xxxxmmmmmmmu',
    (None, 'cuda-other', False, 'int4', 'channel', 1152, 1152): 'xxpppxxxxxxx',
    (None, 'cuda-other', False, 'int4', 'channel', 4304, 1152): 'xxpppxxxxxxx',
    (None, 'cuda-other', False, 'int4', 'g128', 2048, 2048): 'xxpppxxxxxxx',
    (None, 'cuda-other', False, 'int4', 'g128', 16384, 2048): 'pppppxxxxxxx',
    (None, 'cuda-other', False, 'int4', 'g128', 2048, 1024): 'xxpppxxxxxxx',
    (None, 'cuda-other', False, 'int4', 'g128', 4096, 1024): 'xxpppxxxxxxx',
    (None, 'cuda-other', False, 'int4', 'g128', 1152, 1152): 'xxpppxxxxxxx',
    (None, 'cuda-other', False, 'int4', 'g128', 4304, 1152): 'xxpppxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 2048, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 2048, 2048): 'MMMMMMMMMMMu',
    (None, 'cuda-other', True, 'int4', 'channel', 2048, 2048): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 256, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 256, 2048): 'PPPPPxxxxxxu',
    (None, 'cuda-other', True, 'int4', 'channel', 256, 2048): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 16384, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 16384, 2048): 'MMMMMMMMMMMu',
    (None, 'cuda-other', True, 'int4', 'channel', 16384, 2048): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 2048, 16384): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 2048, 16384): 'MMMMMMMMMMMu',
    (None, 'cuda-other', True, 'int4', 'channel', 2048, 16384): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 2048, 1024): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 2048, 1024): 'MMMMMMMMMMMu',
    (None, 'cuda-other', True, 'int4', 'channel', 2048, 1024): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 256, 1024): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 256, 1024): 'PPPPPxxxxxxu',
    (None, 'cuda-other', True, 'int4', 'channel', 256, 1024): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 4096, 1024): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 4096, 1024): 'MMMMMMMMMMMu',
    (None, 'cuda-other', True, 'int4', 'channel', 4096, 1024): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 1024, 4096): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 1024, 4096): 'MMMMMMMMMMMu',
    (None, 'cuda-other', True, 'int4', 'channel', 1024, 4096): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 1024, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 1024, 2048): 'MMMMMMMMMMMu',
    (None, 'cuda-other', True, 'int4', 'channel', 1024, 2048): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 1152, 1152): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 1152, 1152): 'PPPPPxxxxxxu',
    (None, 'cuda-other', True, 'int4', 'channel', 1152, 1152): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 4304, 1152): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 4304, 1152): 'PPPPPxxxxxxu',
    (None, 'cuda-other', True, 'int4', 'channel', 4304, 1152): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'channel', 512, 4096): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'channel', 512, 4096): 'MMMMMMMMMMMu',
    (None, 'cuda-other', True, 'int4', 'channel', 512, 4096): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 2048, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 2048, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 2048, 2048): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 256, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 256, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 256, 2048): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 16384, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 16384, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 16384, 2048): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 2048, 16384): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 2048, 16384): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 2048, 16384): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 2048, 1024): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 2048, 1024): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 2048, 1024): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 256, 1024): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 256, 1024): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 256, 1024): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 4096, 1024): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 4096, 1024): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 4096, 1024): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 1024, 4096): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 1024, 4096): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 1024, 4096): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 1024, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 1024, 2048): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 1024, 2048): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 1152, 1152): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 1152, 1152): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 1152, 1152): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 4304, 1152): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 4304, 1152): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 4304, 1152): 'PPPPPxxxxxxx',
    (None, 'cpu', True, 'int4', 'g128', 512, 4096): 'PPPPPxxxxxxx',
    (None, 'cuda-hopper', True, 'int4', 'g128', 512, 4096): 'PPPPPxxxxxxx',
    (None, 'cuda-other', True, 'int4', 'g128', 512, 4096): 'PPPPPxxxxxxx',
    # Long prefixes on Hopper: the unpacked int8 GEMM, where the table had XLA's int8 dot.
    (None, 'cuda-hopper', False, 'int4', 'channel', 256, 2048): 'xxxxxxxxxxxu',
    (None, 'cuda-hopper', False, 'int4', 'channel', 256, 1024): 'xxxxxxxxxxxu',
    (None, 'cuda-hopper', False, 'int4', 'channel', 1152, 1152): 'xxxxxxxxxxxu',
    (None, 'cuda-hopper', False, 'int4', 'channel', 4304, 1152): 'xxxxxxxxxxxu',
    (None, 'cuda-hopper', False, 'int4', 'channel', 1152, 4304): 'xxxxxxxxxxxu',
    (None, 'cuda-hopper', False, 'int4', 'channel', 512, 4096): 'xxxxxxxxxxxu',
    (None, 'cuda-hopper', True, 'int4', 'channel', 1152, 4304): 'xxxxxxxxxxxu',
    ('mosaic', 'any', False, 'int4', 'channel', 2048, 2048): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 256, 2048): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 16384, 2048): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 2048, 16384): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 2048, 1024): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 256, 1024): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 4096, 1024): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 1024, 4096): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 1024, 2048): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 1152, 1152): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 512, 4096): 'mmmmmmmmmmmm',
    ('mosaic', 'any', True, 'int4', 'channel', 2048, 2048): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 256, 2048): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 16384, 2048): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 2048, 16384): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 2048, 1024): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 256, 1024): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 4096, 1024): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 1024, 4096): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 1024, 2048): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 1152, 1152): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 512, 4096): 'MMMMMMMMMMMM',
    # int8 weight codes (W8A8) take the Mosaic kernels on request only.
    ('mosaic', 'any', False, 'int8', 'channel', 2048, 2048): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 256, 2048): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 16384, 2048): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 2048, 16384): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 2048, 1024): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 256, 1024): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 4096, 1024): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 1024, 4096): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 1024, 2048): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 1152, 1152): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 512, 4096): 'mmmmmmmmmmmm',
    ('mosaic', 'any', True, 'int8', 'channel', 2048, 2048): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 256, 2048): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 16384, 2048): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 2048, 16384): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 2048, 1024): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 256, 1024): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 4096, 1024): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 1024, 4096): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 1024, 2048): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 1152, 1152): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 512, 4096): 'MMMMMMMMMMMM',
}


EXPECTED_GATED = {
    (None, 'cuda-hopper', False, 'int4', 'channel', 32768, 2048): 'mmmmmmmmmmmc',
    (None, 'cuda-hopper', False, 'int4', 'channel', 8192, 1024): 'xxxxmmmmmmmc',
    (None, 'cuda-hopper', True, 'int4', 'channel', 32768, 2048): 'MMMMMMMMMMMc',
    (None, 'cuda-hopper', True, 'int4', 'channel', 8192, 1024): 'MMMMMMMMMMMc',
    ('mosaic', 'any', False, 'int4', 'channel', 32768, 2048): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int4', 'channel', 8192, 1024): 'mmmmmmmmmmmm',
    ('mosaic', 'any', True, 'int4', 'channel', 32768, 2048): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int4', 'channel', 8192, 1024): 'MMMMMMMMMMMM',
    # int8 weight codes (W8A8) take the Mosaic kernels on request only.
    ('mosaic', 'any', False, 'int8', 'channel', 32768, 2048): 'mmmmmmmmmmmm',
    ('mosaic', 'any', False, 'int8', 'channel', 8192, 1024): 'mmmmmmmmmmmm',
    ('mosaic', 'any', True, 'int8', 'channel', 32768, 2048): 'MMMMMMMMMMMM',
    ('mosaic', 'any', True, 'int8', 'channel', 8192, 1024): 'MMMMMMMMMMMM',
}

# (entry point, x and transform of one layer or stacked, K) -> the form lowered for CUDA at each
# of TRANSFORM_MS (every other lowering ran "xla", the row-major einsum chain).
EXPECTED_TRANSFORM = {
    ('quantize', 'one layer', 1024): 'xla_cm_reduce xla_cm_reduce xla_cm_reduce xla_cm xla_cm',
    ('quantize', 'one layer', 8192): 'xla_cm_reduce xla_cm_reduce xla_cm_reduce xla_cm xla_cm',
    ('quantize', 'one layer', 16384): 'xla_cm xla_cm xla_cm xla_cm xla_cm',
    ('quantize', 'stacked', 1024): 'xla xla xla xla xla',
    ('quantize', 'stacked', 8192): 'xla xla xla xla xla',
    ('quantize', 'stacked', 16384): 'xla xla xla xla xla',
    ('only', 'one layer', 1024): 'xla_cm_reduce xla_cm_reduce xla_cm_reduce xla_cm xla_cm',
    ('only', 'one layer', 8192): 'xla_cm_reduce xla_cm_reduce xla_cm_reduce xla_cm xla_cm',
    ('only', 'one layer', 16384): 'xla_cm xla_cm xla_cm xla_cm xla_cm',
    ('only', 'stacked', 1024): 'xla xla xla xla xla',
    ('only', 'stacked', 8192): 'xla xla xla xla xla',
    ('only', 'stacked', 16384): 'xla xla xla xla xla',
}


def _all(row_fn, rows, monkeypatch, lowering):
  """{key: decisions over MS} of every grid row."""
  out = {}
  for key, (platform, impl, layered, dtype, group, n, k) in rows:
    row = row_fn(monkeypatch, platform, lowering, impl, layered, dtype, group, n, k)
    if key in out:
      assert out[key] == row, (key, platform)  # an explicit implementation: the same everywhere
    out[key] = row
  return out


def _all_w4a8(monkeypatch, lowering, **grid):
  return _all(w4a8_row, _rows(SHAPES, **grid), monkeypatch, lowering)


def _all_gated(monkeypatch, lowering, **grid):
  return _all(gated_row, _rows(GATED_SHAPES, **grid), monkeypatch, lowering)


def _all_transform(monkeypatch, lowering):
  """{(entry, one layer or stacked, K): forms over TRANSFORM_MS}."""
  table = {}
  for entry, layers, k in itertools.product(("quantize", "only"), (None, 18), TRANSFORM_KS):
    forms = []
    for m in TRANSFORM_MS:
      got = {p: transform_form(monkeypatch, p, lowering, entry, None, m, k, layers)
             for p in PLATFORMS}
      assert len(set(got.values())) == 1, got  # decided at lowering, not at trace time
      forms.append(got["cpu"])
    table[(entry, "one layer" if layers is None else "stacked", k)] = " ".join(forms)
  return table


def _xla_everywhere(rows):
  return {key: row for key, row in rows.items() if set(row) != {"x"}}


def test_w4a8_dispatch_for_cuda_lowering(monkeypatch):
  assert _xla_everywhere(_all_w4a8(monkeypatch, "cuda")) == EXPECTED_W4A8


def test_w4a8_dispatch_elsewhere_is_xla(monkeypatch):
  assert _xla_everywhere(_all_w4a8(monkeypatch, "other", codes=CODES[:1])) == {}


def test_gated_dispatch_for_cuda_lowering(monkeypatch):
  assert _xla_everywhere(_all_gated(monkeypatch, "cuda")) == EXPECTED_GATED


def test_gated_dispatch_elsewhere_is_the_reference(monkeypatch):
  assert _xla_everywhere(_all_gated(monkeypatch, "other", codes=CODES[:1])) == {}


def test_transform_dispatch(monkeypatch):
  assert _all_transform(monkeypatch, "cuda") == EXPECTED_TRANSFORM
  other = _all_transform(monkeypatch, "other")
  assert {f for forms in other.values() for f in forms.split()} == {"xla"}


@pytest.mark.parametrize("impl", ["xla", "xla_bf16", "pallas"])
@pytest.mark.parametrize("platform", list(PLATFORMS))
@pytest.mark.parametrize("layered", [False, True])
def test_explicit_w4a8_implementations_ignore_the_platform(monkeypatch, impl, platform, layered):
  for lowering in LOWERINGS:
    row = w4a8_row(monkeypatch, platform, lowering, impl, layered, jnp.dtype("int4"), "channel",
                   2048, 2048)
    assert row == {"pallas": "P" if layered else "p"}.get(impl, "x") * len(MS)


def test_choose_takes_the_first_matching_rule_else_the_fallback():
  from duquant_jax.kernels.dispatch import CPU, HOPPER, OTHER_GPU, Problem, Rule, choose
  small = lambda p: p.m <= 16
  table = (Rule(regime="a", platforms=frozenset({HOPPER}), when=small, implementation="a"),
           Rule(regime="b", platforms=frozenset({HOPPER, OTHER_GPU}), when=lambda p: True,
                implementation="b"))
  assert choose(table, Problem(m=8, k=64), on=HOPPER) == "a"
  assert choose(table, Problem(m=32, k=64), on=HOPPER) == "b"
  assert choose(table, Problem(m=8, k=64), on=OTHER_GPU) == "b"
  assert choose(table, Problem(m=8, k=64), on=CPU) == "xla"
  assert choose((), Problem(m=8, k=64), on=CPU, fallback="ref") == "ref"
  with pytest.raises(ValueError, match="platforms"):
    Rule(regime="c", platforms=frozenset({"tpu"}), when=small, implementation="c")


def test_platform_classes(monkeypatch):
  from duquant_jax.kernels import dispatch
  for name, (backend, cc) in PLATFORMS.items():
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    monkeypatch.setattr(jax, "devices", lambda *a, c=cc: [_FakeDevice(c or "")])
    assert dispatch.platform() == name


@pytest.mark.parametrize("platform,codes,group,want", [
    ("cuda-hopper", "int4", "channel", "mu"), ("cuda-hopper", "int4", "g128", "xx"),
    ("cuda-hopper", "int8", "channel", "xx"), ("cuda-other", "int4", "channel", "xx")])
def test_unpacked_gemm_from_its_threshold(monkeypatch, platform, codes, group, want):
  """The unpacked int8 GEMM takes int4 per-channel matmuls on Hopper from exactly
  `UNPACKED_MIN_TOKENS` tokens; the rows below it keep their kernel."""
  from duquant_jax.kernels import w4a8
  ms = (w4a8.UNPACKED_MIN_TOKENS - 8, w4a8.UNPACKED_MIN_TOKENS)
  row = functools.partial(w4a8_row, monkeypatch, platform, impl=None, layered=False,
                          dtype=jnp.dtype(codes), group=group, n=2048, k=16384, ms=ms)
  assert row(lowering="cuda") == want
  assert row(lowering="other") == "xx"  # lowered elsewhere: XLA's reference dot


def test_every_regime_is_explained_in_the_docs():
  """Each rule names the regime docs/kernels.md states its thresholds and measurements under."""
  import pathlib
  from duquant_jax.kernels import gated, online_transform, w4a8, weight_only
  docs = (pathlib.Path(__file__).parents[1] / "docs" / "kernels.md").read_text()
  tables = (w4a8.AUTO, w4a8.AUTO_IN_PLACE, w4a8.MOSAIC, gated.AUTO, gated.AUTO_IN_PLACE,
            gated.MOSAIC, gated.UNPACKED_TABLE, weight_only.AUTO, online_transform.CUDA_FORMS)
  regimes = {rule.regime for table in tables for rule in table}
  assert regimes and not {r for r in regimes if r not in docs}


def _print_tables():
  """Prints the EXPECTED tables from the code as it stands (to regenerate them on purpose)."""
  mp = pytest.MonkeyPatch()
  print("EXPECTED_W4A8 = {")
  for key, row in _xla_everywhere(_all_w4a8(mp, "cuda")).items():
    print(f"    {key!r}: {row!r},")
  print("}\n\nEXPECTED_GATED = {")
  for key, row in _xla_everywhere(_all_gated(mp, "cuda")).items():
    print(f"    {key!r}: {row!r},")
  print("}\n\nEXPECTED_TRANSFORM = {")
  for key, forms in _all_transform(mp, "cuda").items():
    print(f"    {key!r}: {forms!r},")
  print("}")

if __name__ == "__main__":
  _print_tables()
