"""CPU smoke tests of the benchmark scripts' own logic (their numbers come from the H100)."""

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import demo_params
from duquant_jax.config import get_preset
from duquant_jax.lab.synthetic_stats import synthetic_stats
from duquant_jax.models import get_policy
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize import quantize_params
from duquant_jax.runtime import PackedRuntime

# The scripts are imported inside each test, from the checkout's scripts/ folder: one script that
# fails to import fails only its own tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_free_linears_replace_every_packed_linear_and_the_policy_still_runs():
  import bench_policy
  from duquant_jax import runtime
  policy = get_policy("pi0", "demo", runtime=PackedRuntime())
  packed = quantize_params(demo_params("pi0"), get_preset("w4a8-rtn"))
  free = bench_policy.free_linears(packed)
  is_packed = lambda v: isinstance(v, PackedLinear)
  leaves = [v for v in jax.tree.leaves(packed, is_leaf=is_packed) if is_packed(v)]
  swapped = [v for v in jax.tree.leaves(free, is_leaf=is_packed) if is_packed(v)]
  assert leaves and len(swapped) == len(leaves)
  assert all(isinstance(v, bench_policy.FreeLinear) for v in swapped)
  x = jnp.arange(12.0).reshape(3, 4)
  obs = policy.example_observation(jax.random.key(1), batch_size=1)
  with bench_policy.bound_linears():
    y = runtime.matmul(swapped[0], jnp.zeros((3, swapped[0].in_features)).at[:, 0].set(x[:, 0]))
    a = jax.jit(policy.sample_actions, static_argnames="num_steps")(free, obs, jax.random.key(2),
                                                                    num_steps=2)
  np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(x[:, :1]), y.shape))
  assert a.shape == (1, policy.cfg.action_horizon, policy.cfg.action_dim)


def test_anatomy_formulations_agree_on_a_tiny_shape():
  """The anatomy's formulations of one product agree, so their timings compare like with like."""
  import bench_kernels
  timers = bench_kernels.anatomy_timers(jax.random.key(0), 8, 128, 64)
  assert set(timers) == set(bench_kernels.ANATOMY_PATHS)
  y = {}
  for name, t in timers.items():
    consts, weights, _ = t.args
    y[name] = np.asarray(jax.jit(t.matmul)(consts, weights[0]), np.float64)
  scale = np.abs(y["xla_int8"]).max()
  for name in ("int4_materialized", "w8a8"):  # the same integer arithmetic and epilogue
    np.testing.assert_allclose(y[name], y["xla_int8"], atol=1e-2 * scale)
  np.testing.assert_array_equal(y["int8_dot_f32"], y["int8_dot_only"])  # exact integer sums
  np.testing.assert_allclose(y["weight_only_int8"], y["weight_only_int4"], atol=1e-2 * scale)
  np.testing.assert_allclose(y["w4a16"], y["weight_only_int4"], atol=2e-2 * np.abs(y["w4a16"]).max())
  assert timers["bf16"].time(reps=1) > 0


def test_mosaic_w4a8_probe_parses_tile_specs():
  """The device probe's tile specs map to the kernel's MosaicTiles (its timings need a Hopper GPU)."""
  import pytest
  import probe_mosaic_w4a8
  from duquant_jax.kernels import mosaic_gpu
  assert probe_mosaic_w4a8.parse_tiles("auto", 51, 2048, 16384) == mosaic_gpu.choose_tiles(51, 2048, 16384)
  t = probe_mosaic_w4a8.parse_tiles("128x128s3k2", 816, 2048, 2048)
  assert (t.tile_n, t.tile_m, t.stages, t.splits) == (128, 128, 3, 2)
  assert probe_mosaic_w4a8.tile_tag(t) == "128x128s3k2"
  auto = mosaic_gpu.choose_tiles(16, 16384, 2048)
  t = probe_mosaic_w4a8.parse_tiles("auto+s8+k2", 16, 16384, 2048)
  assert (t.tile_n, t.tile_m, t.stages, t.splits) == (auto.tile_n, auto.tile_m, 8, 2)
  assert probe_mosaic_w4a8.tile_tag(t).endswith("s8k2")
  t = probe_mosaic_w4a8.parse_tiles("auto+t256+w2", 51, 4096, 1024, choose=mosaic_gpu.gated_tiles)
  assert (t.tile_k, t.compute_wgs) == (256, 2) and probe_mosaic_w4a8.tile_tag(t).endswith("w2t256")
  t = probe_mosaic_w4a8.parse_tiles("auto+f1", 6528, 32768, 2048)
  assert t.inflight and probe_mosaic_w4a8.tile_tag(t).endswith("f")
  with pytest.raises(SystemExit, match="bad tile spec"):
    probe_mosaic_w4a8.parse_tiles("auto+q3", 16, 16384, 2048)
  with pytest.raises(SystemExit):
    probe_mosaic_w4a8.parse_tiles("128by128", 816, 2048, 2048)


def test_unshared_inputs_clears_every_input_group():
  import bench_policy
  params = demo_params("pi0")
  deploy = get_preset("deploy")  # its input groups; the weight clip search changes none of them
  cfg = dataclasses.replace(deploy, rules=tuple(dataclasses.replace(r, clip_search=False)
                                                for r in deploy.rules))
  packed = quantize_params(params, cfg, synthetic_stats(params))
  is_packed = lambda v: isinstance(v, PackedLinear)
  groups = lambda t: [v.input_group for v in jax.tree.leaves(t, is_leaf=is_packed) if is_packed(v)]
  assert any(g is not None for g in groups(packed))
  assert all(g is None for g in groups(bench_policy.unshared_inputs(packed)))


def test_profile_reads_operand_and_result_types_from_compiled_hlo():
  import profile_policy
  fn = jax.jit(lambda x, w: jnp.tanh(x @ w) + 1.0)
  text = fn.lower(jnp.ones((8, 16)), jnp.ones((16, 32))).compile().as_text()
  types = profile_policy.hlo_result_types(text)
  assert any(t.endswith("-> f32[8,32]") and "f32[8,16]" in t for t in types.values())
  events = [("Stream #1", name, 2000) for name in types][:3]
  rows = profile_policy.top_ops(events, 1, 2, types)
  assert len(rows) == 2 and rows[0][1] != "?" and rows[0][3] == 0.002


def test_profile_separates_call_sites_of_one_kernel_name_by_duration():
  import profile_policy
  name = "body_mosaic_gpu_kernel"
  events = [("Stream #1", name, ns) for ns in (12_000, 13_000, 12_500, 80_000)] * 2 + [
      ("XLA Ops", name, 50_000), ("Stream #1", "fusion", 9_000)]
  rows = profile_policy.duration_buckets(events, 2, name)
  assert [(lo, hi, c) for lo, hi, c, _ in rows] == [(8, 16, 3), (64, 128, 1)]
  assert abs(rows[0][3] - 0.0375) < 1e-12 and abs(rows[1][3] - 0.08) < 1e-12


def test_gemm_only_linears_skip_the_activation_side_but_run_the_same_matmul():
  """The `--bound` gemm-only tree: no transform, int8 codes by a cast with unit scales, and the
  packed weight's own matmul; weight-only linears get x as is."""
  import bench_policy
  from duquant_jax import runtime
  from duquant_jax.kernels import xla
  params = demo_params("pi0")
  packed = quantize_params(params, get_preset("deploy"), synthetic_stats(params))
  gemm = bench_policy.gemm_only_linears(packed)
  is_packed = lambda v: isinstance(v, PackedLinear)
  swapped = [v for v in jax.tree.leaves(gemm, is_leaf=is_packed) if is_packed(v)]
  assert swapped and all(isinstance(v, bench_policy.GemmOnlyLinear) for v in swapped)
  w4a8 = next(v for v in swapped if v.act_bits is not None and v.transform is not None)
  w4a8 = w4a8 if w4a8.codes.ndim == 2 else w4a8.at_layer(0)
  x = jnp.round(jax.random.normal(jax.random.key(0), (5, w4a8.in_features)) * 20)
  wo = next(v for v in swapped if v.act_bits is None)
  policy = get_policy("pi0", "demo", runtime=PackedRuntime())
  obs = policy.example_observation(jax.random.key(1), batch_size=1)
  with bench_policy.bound_linears():
    xq, sx, zx = runtime.quantize_input(w4a8, x)
    y = runtime.matmul(w4a8, x)
    assert runtime.quantize_input(wo, x[:, :1]) is not None
    a = jax.jit(policy.sample_actions, static_argnames="num_steps")(gemm, obs, jax.random.key(2),
                                                                    num_steps=2)
  np.testing.assert_array_equal(np.asarray(xq), np.asarray(x, np.int8))
  assert np.all(np.asarray(sx) == 1.0) and (zx is None or np.all(np.asarray(zx) == 0.0))
  want = xla.w4a8_matmul(xq, sx, zx, w4a8.codes, w4a8.scale, w4a8.zero)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=1e-6,
                             atol=1e-6 * float(jnp.abs(want).max()))
  assert a.shape == (1, policy.cfg.action_horizon, policy.cfg.action_dim)


def test_deploy_candidates_resolve_presets_and_keys():
  import pytest
  import deploy_candidates
  assert deploy_candidates.resolve("deploy") == get_preset("deploy")
  wot = deploy_candidates.resolve("allwot")
  assert [r.act_bits for r in wot.rules] == [None] * len(wot.rules)
  assert wot.rules[0].block_size == 16 and wot.rules[0].transforms_input
  with pytest.raises(SystemExit, match="unknown preset / candidate"):
    deploy_candidates.resolve("nope")


def test_bench_policy_derives_a_weight_only_candidate_from_an_earlier_pack():
  """Packing the same weights with only act_bits changed gives the same arrays, so the bench
  reuses the earlier pack; the derived tree equals packing the candidate itself."""
  import bench_policy
  import deploy_candidates
  params = demo_params("pi0")
  stats = synthetic_stats(params)
  deploy, allwot = deploy_candidates.resolve("deploy"), deploy_candidates.resolve("allwot")
  packs = [(deploy, quantize_params(params, deploy, stats))]
  assert bench_policy._repack_activations(packs, get_preset("w4a8-rtn")) is None
  derived = bench_policy._repack_activations(packs, allwot)
  direct = quantize_params(params, allwot, stats)
  is_packed = lambda v: isinstance(v, PackedLinear)
  flat = lambda t: [(v.act_bits, v.input_group) if is_packed(v) else None
                    for v in jax.tree.leaves(t, is_leaf=is_packed)]
  assert flat(derived) == flat(direct)
  assert all(a is None for a, _ in filter(None, flat(derived)))
  for a, b in zip(jax.tree.leaves(derived), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bench_policy_configures_unroll_and_attention():
  import bench_policy
  import pytest
  policy = get_policy("pi0", "full")
  cfg = bench_policy._configured(policy, "on", "cudnn").cfg
  assert (cfg.unroll_layers, cfg.attention) == (True, "cudnn")
  assert cfg.llm == policy.cfg.llm and policy.cfg.attention == "pallas"
  with pytest.raises(SystemExit, match="--unroll"):
    bench_policy._configured(policy, "yes", "einsum")
  with pytest.raises(ValueError, match="attention"):
    bench_policy._configured(policy, "off", "flash")


def test_bench_policy_xla_option_sets_are_valid_compile_options():
  """Every `--xla` set names options and values this jax's XLA accepts (XLA rejects an unknown
  name or enum value at compile time, on any backend)."""
  import bench_policy
  assert bench_policy.XLA_OPTIONS["default"] == {}
  for name, options in bench_policy.XLA_OPTIONS.items():
    y = jax.jit(lambda x: x * 2, compiler_options=options or None)(jnp.ones(3))
    np.testing.assert_array_equal(y, 2 * np.ones(3), err_msg=name)
  with pytest.raises(Exception, match="enum value"):
    jax.jit(lambda x: x, compiler_options={"xla_gpu_enable_command_buffer": "FUSION,GRAPHS"})(
        jnp.ones(3))



def test_bench_policy_dispatch_overrides_apply_and_restore():
  """unfused: no fused gated MLP; kernelprefix: no unpacked int8 GEMM; wopallas: the Pallas
  weight-only kernel at flow-step sizes on a GPU (never on the CPU); tiles128: 128-token Mosaic
  tiles for the batch-8 flow steps (the gated kernel's too); gatedint4: no int8 copy for the
  prefix's gated MLP; gatedws: the warp-specialised gated kernel for long prefixes; int8mosaic:
  an int8 expert MLP (batch-8 flow steps) on the Mosaic kernels; all restored afterwards."""
  import bench_policy
  from duquant_jax import runtime
  from duquant_jax.kernels import dispatch, gated, mosaic_gpu, w4a8, weight_only
  from duquant_jax.kernels.dispatch import Problem
  unpacked, table, gated_mlp = w4a8.UNPACKED_MIN_TOKENS, weight_only.AUTO, runtime.gated_mlp
  choose = mosaic_gpu.choose_tiles
  assert choose(408, 1024, 4096).tile_m == 64
  prefix8 = Problem(m=6528, k=2048, n=32768, codes=jnp.int4)
  assert dispatch.choose(gated.AUTO_IN_PLACE, prefix8, on=dispatch.HOPPER) == "mosaic_unpacked"
  step, prefix = (Problem(m=51, k=1024, n=2048, codes=jnp.int8),
                  Problem(m=816, k=1024, n=2048, codes=jnp.int8))
  up8, down8 = (Problem(m=408, k=1024, n=8192, codes=jnp.int8),
                Problem(m=408, k=4096, n=1024, codes=jnp.int8))
  int8_choices = lambda: (dispatch.choose(gated.TABLES[None, True], up8, on=dispatch.HOPPER),  # noqa: E731
                          dispatch.choose(w4a8.IN_PLACE_TABLES[None], down8, on=dispatch.HOPPER))
  assert int8_choices() == ("xla", "xla")
  with bench_policy.dispatch_overrides(bench_policy.DISPATCH_FLAGS):
    assert runtime.gated_mlp(None, None, jnp.ones((2, 4))) is None
    assert w4a8.UNPACKED_MIN_TOKENS > 10**9
    assert dispatch.choose(weight_only.AUTO, step, on=dispatch.HOPPER) == "pallas"
    assert dispatch.choose(weight_only.AUTO, prefix, on=dispatch.HOPPER) == "xla"
    assert dispatch.choose(weight_only.AUTO, step, on=dispatch.CPU) == "xla"
    assert mosaic_gpu.choose_tiles(408, 1024, 4096).tile_m == 128
    assert mosaic_gpu.gated_tiles(408, 4096, 1024).tile_m == 128
    assert mosaic_gpu.choose_tiles(6528, 2048, 2048) == choose(6528, 2048, 2048)
    assert dispatch.choose(gated.AUTO_IN_PLACE, prefix8, on=dispatch.HOPPER) == "mosaic"
    assert mosaic_gpu.gated_tiles(6528, 16384, 2048).compute_wgs == 2
    assert int8_choices() == ("mosaic", "mosaic")
  assert mosaic_gpu.gated_tiles(6528, 16384, 2048).compute_wgs == 1
  assert int8_choices() == ("xla", "xla")
  assert mosaic_gpu.choose_tiles(408, 1024, 4096).tile_m == 64
  assert dispatch.choose(gated.AUTO_IN_PLACE, prefix8, on=dispatch.HOPPER) == "mosaic_unpacked"
  with bench_policy.dispatch_overrides(()):
    assert (w4a8.UNPACKED_MIN_TOKENS, weight_only.AUTO) == (unpacked, table)
    assert runtime.gated_mlp is gated_mlp
  assert (w4a8.UNPACKED_MIN_TOKENS, weight_only.AUTO, runtime.gated_mlp) == (unpacked, table,
                                                                             gated_mlp)


def test_bench_policy_flowunfused_declines_only_flow_step_mlps(monkeypatch):
  """flowunfused: MLPs of up to FLOW_TOKENS tokens as two linears, longer ones (the prefix) fused;
  with unfused too, every MLP as two linears."""
  import bench_policy
  from duquant_jax import runtime
  monkeypatch.setattr(runtime, "gated_mlp", lambda w_gating, w_linear, x, *rest: "fused")
  flow, prefix = jnp.ones((1, 51, 8)), jnp.ones((1, 816, 8))
  with bench_policy.dispatch_overrides(("flowunfused",)):
    assert runtime.gated_mlp(None, None, flow) is None
    assert runtime.gated_mlp(None, None, prefix, 3) == "fused"
  with bench_policy.dispatch_overrides(("flowunfused", "unfused")):
    assert runtime.gated_mlp(None, None, prefix) is None
  assert runtime.gated_mlp(None, None, flow) == "fused"


def test_bench_policy_times_its_entries_interleaved_round_by_round():
  """Each round runs `repeats` calls of every entry in turn (after one first run each), so a
  drift of the machine reaches every entry alike; the spread is the range of round medians."""
  import bench_policy
  order = []

  def entry(name, seconds):
    def call(params, obs, rng):
      order.append(name)
      time.sleep(seconds)
      return jnp.zeros(())
    return call, None

  timed = bench_policy.time_interleaved([entry("a", 0.0), entry("b", 0.02)], None, repeats=2,
                                        rounds=3)
  assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3
  (ms_a, spread_a), (ms_b, spread_b) = timed
  assert 20 <= ms_b and ms_a < ms_b and 0 <= spread_a and 0 <= spread_b < ms_b


def test_bench_policy_compiles_a_policy_ahead_of_time():
  """The compiled function runs without tracing again: a variant's dispatch overrides need only
  surround the compilation."""
  import bench_policy
  from duquant_jax.models import get_policy, make_observation
  policy = get_policy("pi0", "demo")
  params = policy.init(jax.random.key(0))
  obs = make_observation(policy.cfg, jax.random.key(1), 1)
  compiled, seconds = bench_policy.compile_policy(policy, params, obs, num_steps=1)
  assert seconds > 0 and isinstance(compiled, jax.stages.Compiled)
  actions = compiled(params, obs, jax.random.key(2))
  assert actions.shape == (1, policy.cfg.action_horizon, policy.cfg.action_dim)
  assert bool(jnp.all(jnp.isfinite(actions)))


def test_weight_only_probe_forms_equal_the_library():
  """The probe's 2-D forms compute `xla.weight_only_matmul` (int4 and int8 codes, float32 x)."""
  import probe_weight_only
  from duquant_jax.kernels import xla
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(5, 64)), jnp.float32)
  sw = jnp.asarray(r.uniform(0.01, 0.02, size=(24, 1)), jnp.float32)
  for dtype, lo, hi in ((jnp.int4, -8, 8), (jnp.int8, -128, 128)):
    q = jnp.asarray(r.integers(lo, hi, size=(24, 64)), dtype)
    zw = jnp.asarray(r.integers(-3, 4, size=(24, 1)), jnp.float32)
    want = np.asarray(xla.weight_only_matmul(x, q, sw, zw, fold_zero=False))
    for form in (probe_weight_only.plain_2d, probe_weight_only.copied_2d):
      np.testing.assert_allclose(np.asarray(form(x, q, sw, zw)), want, rtol=1e-5, atol=1e-5)


def test_lower_policy_lowers_for_cuda_on_the_cpu(monkeypatch):
  """Policies lowered for CUDA from this CPU machine: the demo's attention kernels' Triton calls,
  and with Hopper dispatch forced, the full-size `fast` pi0's Mosaic kernels too (the demo's
  widths are below the kernels' shapes)."""
  import lower_policy
  from duquant_jax.kernels import dispatch
  bf16 = lower_policy.lower_for_cuda("pi0", "demo", "bf16", 1, False)
  assert bf16["triton_kernels"] >= 1 and bf16["mosaic_kernels"] == 0
  monkeypatch.setattr(dispatch, "platform", lambda: dispatch.HOPPER)
  fast = lower_policy.lower_for_cuda("pi0", "full", "fast", 1, False)
  assert fast["mosaic_kernels"] >= 1 and fast["trace_s"] > 0 and fast["lower_s"] > 0
  # `fast-accurate`'s W8A8 expert MLP: XLA's int8 dots by default, the Mosaic kernels (as
  # `fast`'s W4A8 one) under bench_policy's `int8mosaic`.
  acc = lower_policy.lower_for_cuda("pi0", "full", "fast-accurate", 1, False)
  acc_mosaic = lower_policy.lower_for_cuda("pi0", "full", "fast-accurate", 1, False,
                                           ("int8mosaic",))
  assert acc["int8_dots"] > acc_mosaic["int8_dots"] == fast["int8_dots"]
  assert acc["mosaic_kernels"] < acc_mosaic["mosaic_kernels"] == fast["mosaic_kernels"]


def test_bench_policy_times_the_other_variants_when_one_fails_to_compile(monkeypatch, capsys):
  """A variant whose kernels fail to build is reported by name and left out; the bf16 policy and
  the other variants are still timed."""
  import bench_policy
  real = bench_policy.compile_policy

  def compile_policy(policy, params, *a, **kw):
    if bench_policy.mosaic_gpu.gated_tiles is bench_policy._gated_tiles_ws:
      raise RuntimeError("Mosaic GPU lowering failed\nmore detail")
    return real(policy, params, *a, **kw)

  monkeypatch.setattr(bench_policy, "compile_policy", compile_policy)
  monkeypatch.setattr("sys.argv", [
      "bench_policy.py", "--models", "pi0", "--batches", "1", "--size", "demo", "--preset",
      "w4a8-rtn", "--no-clip-search", "--variants", "auto/auto,auto/auto/gatedws", "--repeats",
      "1", "--rounds", "1"])
  bench_policy.main()
  out, err = capsys.readouterr()
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["transform"] for r in rows] == ["auto"]
  assert rows[0]["latency_bf16_ms"] > 0 and rows[0]["latency_packed_ms"] > 0
  assert ("pi0 batch 1 w4a8-rtn auto/auto/gatedws: not timed, compiling failed: RuntimeError: "
          "Mosaic GPU lowering failed") in err
