"""Reading stacked (L, ...) packed layer weights in place at a layer index
(`runtime.stack_in_place`, `Execution.stacked_in_place`, `runtime.einsum(..., layer=)`): the same
actions as openpi's sliced params, the Pallas kernel reading a layer of the stack, and the CUDA
lowering that hands the kernel the whole stack. (Whether it is faster is measured on the H100:
BENCHMARKS.md, "Policy latency (H100)".)
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax import kernels, runtime
from duquant_jax.config import get_preset
from duquant_jax.models import Policy, get_policy, make_observation
from duquant_jax.models.runtime import STACKED
from duquant_jax.packed import PackedLinear
from duquant_jax.runtime import Execution, LayerIndex, PackedRuntime, stack_in_place
from duquant_jax.quantize import quantize_params
from duquant_jax.lab.synthetic_stats import synthetic_stats

from conftest import fast_packed


@pytest.fixture(scope="module")
def demo():
  policy = get_policy("pi0", "demo")
  params = policy.init(jax.random.key(0))
  packed = quantize_params(params, get_preset("deploy"), synthetic_stats(params))
  return policy, params, packed


def _in_place(policy, flag, matmul=None):
  return Policy(policy.cfg, PackedRuntime(Execution(matmul=matmul, stacked_in_place=flag)))


def _packed_leaves(tree):
  return [v for v in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, PackedLinear))
          if isinstance(v, PackedLinear)]


def test_stack_in_place_moves_the_llm_layer_weights_only(demo):
  _, params, packed = demo
  assert stack_in_place(params) == {"params": params}  # nothing packed: nothing moves
  variables = stack_in_place(packed)
  moved = _packed_leaves(variables[STACKED])
  depth = get_policy("pi0", "demo").cfg.llm.depth
  assert moved and all(w.codes.shape[0] == depth for w in moved)
  slots = [v for v in jax.tree.leaves(variables["params"], is_leaf=lambda v: isinstance(v, LayerIndex))
           if isinstance(v, LayerIndex)]
  assert len(slots) == len(moved)
  assert all(np.array_equal(s.index, np.arange(depth)) for s in slots)
  # SigLIP's packed weights (flax Dense, read by the interceptor) stay where they were.
  img = _packed_leaves(variables["params"]["PaliGemma"]["img"])
  assert img and len(img) == len(_packed_leaves(packed["PaliGemma"]["img"]))


def test_in_place_actions_equal_sliced_actions(demo):
  policy, _, packed = demo
  obs = make_observation(policy.cfg, jax.random.key(1), 2)
  run = lambda flag: np.asarray(jax.jit(_in_place(policy, flag).sample_actions)(
      packed, obs, jax.random.key(2)))
  np.testing.assert_array_equal(run(True), run(False))


def test_einsum_at_a_layer_with_the_kernel_reading_in_place(demo):
  _, _, packed = demo
  w = packed["PaliGemma"]["llm"]["layers"]["mlp_1"]["gating_einsum"]
  assert w.codes.ndim == 3 and w.act_bits == 8
  x = jax.random.normal(jax.random.key(3), (1, 51, w.w_shape[1]), jnp.float32)
  layer = jnp.int32(1)
  y = runtime.einsum(w, "BTD,2DF->2BTF", x, Execution(matmul="pallas_interpret"), layer=layer)
  # 51 float32 tokens run weight-only (`act_min_tokens`): a float32 x float32 dot on both sides.
  # The sliced reference runs it at HIGHEST, exact float32 on every backend (the GPU's default
  # is TF32). The kernel runs its own at the default precision, TF32 on the GPU by design: there
  # it is checked to TF32's rounding (10 mantissa bits, 2^-11 relative per operand; measured
  # 2.2e-4 of max |ref| on the H200), on the CPU to float32 rounding as before.
  with jax.default_matmul_precision("highest"):
    ref = runtime.einsum(w.at_layer(1), "BTD,2DF->2BTF", x, Execution(matmul="xla"))
  tol = 2e-3 if jax.default_backend() == "gpu" else 1e-5
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=tol,
                             atol=tol * float(jnp.abs(ref).max()))


def test_layer_index_needs_a_stacked_weight(demo):
  _, _, packed = demo
  w = packed["PaliGemma"]["llm"]["layers"]["mlp_1"]["gating_einsum"].at_layer(0)
  x = jnp.ones((1, 4, w.w_shape[1]))
  with pytest.raises(ValueError, match="stack axes"):
    runtime.einsum(w, "BTD,2DF->2BTF", x, layer=jnp.int32(0))
  xq, sx, zx = kernels.quantize_per_token(x[0], symmetric=False)
  with pytest.raises(ValueError, match="stacked"):
    kernels.w4a8_matmul(xq, sx, zx, w.codes, w.scale, w.zero, layer=jnp.int32(0))


def test_in_place_policy_hands_the_kernel_the_whole_stack_on_cuda(demo):
  policy, _, packed = demo
  obs = make_observation(policy.cfg, jax.random.key(1), 1)
  triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")

  def cuda_text(flag):
    # The kernels forced: auto-dispatch takes the W4A8 one only at full-size shapes, and the
    # weight-only one never.
    p = _in_place(policy, flag, matmul="pallas")
    return jax.export.export(jax.jit(p.sample_actions), platforms=["cuda"],
                             disabled_checks=[triton])(packed, obs, jax.random.key(2)).mlir_module()

  depth = policy.cfg.llm.depth
  calls = lambda flag: re.findall(r"custom_call @__gpu\$xla\.gpu\.triton\(.*", cuda_text(flag))
  # The flow steps' matmuls (51 tokens; at batch 1 `deploy` runs them all weight-only): the
  # kernel gets (L, N, K') codes and an index in place, and one layer's slice otherwise. (SigLIP's
  # weight-only linears, read through the flax interceptor, always get a slice.)
  in_place, sliced = calls(True), calls(False)
  stacked_codes = re.compile(rf"tensor<{depth}x\d+x\d+xi8>")
  flow = lambda cs: [c for c in cs if "tensor<51x" in c]
  assert flow(in_place) and all(stacked_codes.search(c) for c in flow(in_place))
  assert len(flow(sliced)) == len(flow(in_place))
  assert sliced and not any(stacked_codes.search(c) for c in sliced)


@pytest.fixture(scope="module")
def fast_demo():
  return get_policy("pi0", "demo"), fast_packed("pi0")


def test_in_place_fused_mlp_actions_equal_sliced_actions(fast_demo, monkeypatch):
  policy, packed = fast_demo
  obs = make_observation(policy.cfg, jax.random.key(1), 2)
  layers_seen = []
  real = runtime.gated_mlp

  def spy(w_gating, w_linear, x, execution=runtime.AUTO, layer=None):
    y = real(w_gating, w_linear, x, execution, layer)
    layers_seen.append((layer is not None, y is not None))
    return y

  monkeypatch.setattr(runtime, "gated_mlp", spy)
  run = lambda flag: np.asarray(jax.jit(_in_place(policy, flag).sample_actions)(
      packed, obs, jax.random.key(2)))
  sliced = run(False)
  assert layers_seen and all(not stacked and fused for stacked, fused in layers_seen)
  layers_seen.clear()
  in_place = run(True)
  # In place, every Gemma MLP still takes the fused form, now at a layer index of the stack.
  assert layers_seen and all(stacked and fused for stacked, fused in layers_seen)
  np.testing.assert_array_equal(in_place, sliced)


def test_in_place_fast_policy_hands_the_mosaic_kernels_the_whole_stack_on_cuda(fast_demo):
  policy, packed = fast_demo
  obs = make_observation(policy.cfg, jax.random.key(1), 1)
  triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")

  texts = {}

  def mosaic_calls(flag):
    texts[flag] = jax.export.export(jax.jit(_in_place(policy, flag, "mosaic").sample_actions),
                                    platforms=["cuda"], disabled_checks=[triton])(
                                        packed, obs, jax.random.key(2)).mlir_module()
    return re.findall(r"custom_call @mosaic_gpu\w*\(.*", texts[flag])

  depth = policy.cfg.llm.depth
  stacked_codes = re.compile(rf"tensor<{depth}x\d+x\d+xi4>")
  in_place, sliced = mosaic_calls(True), mosaic_calls(False)
  # Every W4A8 Gemma linear (gate/up fused with gelu, down, attention output) gets the whole
  # (L, N, K) stack and reads its layer in place; sliced, each gets one layer's copy.
  assert in_place and len(in_place) == len(sliced)
  assert all(stacked_codes.search(c) for c in in_place)
  assert not any(stacked_codes.search(c) for c in sliced)
  # `fast`'s static scales (token tiles <= 64 here): each kernel gets the stack's per-layer
  # scales, (L,) vectors it reads as scalars, and no per-token (4, Mp) vectors; the token codes'
  # row sums are summed in the kernel, and int8 codes are never padded or reduced by XLA (the
  # quantizer's fusion pads the rows; the gated kernel's rows go to the down kernel as they are).
  assert all(re.search(rf"tensor<{depth}xf32>", c) for c in in_place)
  assert not any(re.search(r"tensor<4x\d+xf32>", c) for c in in_place)
  # (Token codes: tens of rows; the (1, T) integer positions are summed too, legitimately.)
  ops_on_codes = re.findall(r"stablehlo\.(?:reduce|pad)\b.*: \(tensor<[1-9]\d+x\d+xi(?:8|32)>",
                            texts[True])
  assert not ops_on_codes, ops_on_codes
