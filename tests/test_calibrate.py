"""Calibration: scan vs Python loop, stats vs numpy, percentiles, capture coverage, data validation."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax import calib_data, calibrate as cal, stats as st
from duquant_jax.models import get_policy
from duquant_jax.models.config import IMAGE_KEYS
from duquant_jax.treepath import flat_items

from conftest import demo_params

G, B, STEPS = 3, 2, 3
RNG = jax.random.key(7)
CFG = cal.CalibConfig(num_steps=STEPS, per_step=True, num_samples=32, chunk_size=2, progress=False)


@functools.cache
def _setup():
  """pi0 demo policy and params, G batches of B observations (one prompt padded, one camera off)."""
  policy = get_policy("pi0", "demo")
  params = demo_params("pi0")
  obs = [policy.example_observation(jax.random.key(10 + g), B) for g in range(G)]
  obs[1] = obs[1].replace(image_masks={**obs[1].image_masks, IMAGE_KEYS[2]: jnp.array([True, False])})
  batches = jax.tree.map(lambda *x: np.stack([np.asarray(v) for v in x]), *obs)
  stats = cal.calibrate(policy, params, batches, CFG, rng=RNG)  # chunks of 2: the last one padded
  return policy, params, batches, stats


@functools.cache
def _captures():
  """Per batch, the raw inputs of every linear with the noise `calibrate` used for that batch."""
  policy, params, batches, _ = _setup()
  out = []
  for g in range(G):
    obs = jax.tree.map(lambda x: jnp.asarray(x[g]), batches)
    out.append(cal.capture_single_batch(policy, params, obs, rng=cal._batch_keys(RNG, g)[0],
                                        num_steps=STEPS))
  return out


def _values(path):
  """All valid captured rows of `path` over the stream -> (L, N, K) numpy, steps pooled."""
  rows = []
  for caps in _captures():
    c = caps[path]
    x, m = np.asarray(c.rows), np.asarray(c.mask)
    x = x if c.phase == cal.PREFIX else np.concatenate(list(x), axis=1)
    m = m if c.phase == cal.PREFIX else np.tile(m, STEPS)
    rows.append(x[:, m])
  return np.concatenate(rows, axis=1)


def _gemma_linears(params):
  names = r"PaliGemma/llm/layers/(attn/\w+_einsum(_1)?/w|mlp(_1)?/(gating_einsum|linear))"
  return sorted(p for p, _ in flat_items(params) if re.fullmatch(names, p))


def test_scan_equals_python_loop():
  policy, params, batches, stats = _setup()
  plan = cal._make_plan(policy, params, jax.tree.map(lambda x: jnp.asarray(x[0]), batches), CFG)
  step = jax.jit(functools.partial(cal._update_batch, policy, cfg=CFG, plan=plan))
  ref = cal._init_stats(plan, CFG)
  for g in range(G):
    obs = jax.tree.map(lambda x: jnp.asarray(x[g]), batches)
    ref = step(params, ref, obs, g, True, RNG)
  ref = cal._finalize(ref, plan, G, CFG)
  assert ref.keys() == stats.keys()
  for path in stats:
    got, want = stats[path], ref[path]
    np.testing.assert_allclose(got.absmax, want.absmax, rtol=1e-6, err_msg=path)
    np.testing.assert_allclose(got.sum_sq, want.sum_sq, rtol=1e-5, err_msg=path)
    np.testing.assert_allclose(got.samples, want.samples, rtol=1e-6, atol=1e-6, err_msg=path)
    np.testing.assert_array_equal(got.sample_priority, want.sample_priority, err_msg=path)
    assert int(got.count) == int(want.count), path
    # Identical counts up to values sitting on a bin edge (float noise between two compiled programs).
    assert np.abs(np.asarray(got.hist) - np.asarray(want.hist)).sum() <= 1e-4 * got.hist.sum(), path
    if got.step_absmax is not None:
      np.testing.assert_allclose(got.step_absmax, want.step_absmax, rtol=1e-6, err_msg=path)
  assert int(stats.num_batches) == G


def test_stats_match_numpy_reference():
  _, _, _, stats = _setup()
  spec = CFG.hist
  for path in stats:
    s, x = stats[path], _values(path)
    a = np.abs(x)
    assert int(s.count) == x.shape[1], path
    np.testing.assert_allclose(s.absmax, a.max(axis=1), rtol=1e-5, err_msg=path)
    np.testing.assert_allclose(s.sum_sq, (x.astype(np.float64) ** 2).sum(axis=1), rtol=1e-4, err_msg=path)
    bins = np.asarray(spec.bin_index(a))  # (L, N, K)
    l_idx, _, k_idx = np.indices(bins.shape, sparse=True)
    flat = (l_idx * a.shape[2] + k_idx) * spec.num_bins + bins
    ref = np.bincount(flat.ravel(), minlength=s.hist.size).reshape(s.hist.shape)
    np.testing.assert_array_equal(np.asarray(s.hist).sum(-1), x.shape[1])
    assert np.abs(np.asarray(s.hist) - ref).sum() <= 1e-4 * ref.sum(), path
    tok = np.asarray(spec.bin_index(a.max(axis=2)))
    tok_ref = np.stack([np.bincount(t, minlength=spec.num_bins) for t in tok])
    assert np.abs(np.asarray(s.token_hist) - tok_ref).sum() <= 1e-3 * tok_ref.sum() + 1, path
    # Every kept reservoir row is a captured row (the same row in every layer).
    kept = st.valid_samples(s)
    assert kept.shape[1] == min(CFG.num_samples, x.shape[1]), path
    for row in kept[0][:8]:
      assert np.abs(x[0] - row).max(axis=1).min() <= 1e-4 * (1 + np.abs(row).max()), path


@pytest.mark.parametrize("q", [50.0, 90.0, 99.0, 99.9])
def test_percentiles_within_one_bin(q):
  _, _, _, stats = _setup()
  spec = CFG.hist
  for path in ("PaliGemma/llm/layers/attn/q_einsum/w", "PaliGemma/llm/layers/mlp/linear",
               "PaliGemma/llm/layers/attn/attn_vec_einsum_1/w", "PaliGemma/llm/layers/mlp_1/linear"):
    s, x = stats[path], _values(path)
    want = np.percentile(np.abs(x), q, axis=1)  # (L, K), from all captured values
    got = np.asarray(st.percentile(s, q))
    assert got.shape == want.shape
    gap = np.abs(np.asarray(spec.bin_index(got)) - np.asarray(spec.bin_index(want)))
    assert gap.max() <= 1, (path, q, gap.max())
    assert (got <= np.asarray(s.absmax) + 1e-6).all()
  np.testing.assert_array_equal(st.percentile(s, 100.0), s.absmax)


def test_capture_reaches_every_linear_layer_and_step():
  policy, params, batches, stats = _setup()
  c = policy.cfg
  assert stats.keys() == _gemma_linears(params)
  assert len(stats) == 10
  valid_prefix = int(np.asarray(batches.tokenized_prompt_mask).sum()) + sum(
      int(np.asarray(batches.image_masks[k]).sum()) * c.vision.num_patches for k in IMAGE_KEYS)
  for path, s in stats.items():
    expert = "_1/" in path
    gemma = c.expert if expert else c.llm
    k = {"q_einsum": gemma.width, "kv_einsum": gemma.width, "gating_einsum": gemma.width,
         "attn_vec_einsum": gemma.num_heads * gemma.head_dim, "linear": gemma.mlp_dim}
    name = re.sub(r"_1$", "", path.split("/")[-2] if path.endswith("/w") else path.split("/")[-1])
    assert s.absmax.shape == (gemma.depth, k[name]), path
    assert s.hist.shape == (gemma.depth, k[name], CFG.hist.num_bins)
    assert s.samples.shape == (gemma.depth, CFG.num_samples, k[name])
    assert (np.asarray(s.absmax).max(axis=1) > 0).all(), f"{path}: a layer saw no activations"
    if expert:  # all suffix tokens, every flow step
      assert int(s.count) == G * B * c.suffix_len * STEPS, path
      sa = np.asarray(s.step_absmax)
      assert sa.shape == (STEPS, gemma.depth, k[name]), path
      assert (sa.max(axis=2) > 0).all(), f"{path}: a flow step or layer saw no activations"
      np.testing.assert_allclose(sa.max(axis=0), s.absmax, rtol=1e-6)
      assert not np.allclose(sa[0], sa[-1]), f"{path}: flow steps look identical"
    else:  # prompt padding and the switched-off camera are not counted
      assert int(s.count) == valid_prefix < G * B * c.prefix_len, path
      assert s.step_absmax is None


def test_shared_inputs_are_identical():
  """q and kv read the same tensor (so their stats are computed once): check on the raw captures."""
  for caps in _captures()[:1]:
    for sfx in ("", "_1"):
      q, kv = (caps[f"PaliGemma/llm/layers/attn/{n}{sfx}/w"] for n in ("q_einsum", "kv_einsum"))
      np.testing.assert_array_equal(q.rows, kv.rows)


def test_capture_dense_vision_and_heads():
  policy, params, batches, _ = _setup()
  obs = jax.tree.map(lambda x: jnp.asarray(x[1]), batches)  # camera 3 off for sample 1
  caps = cal.capture_single_batch(policy, params, obs, rng=RNG, num_steps=1,
                                  select=r"PaliGemma/img/.*/(query|out)/kernel|action_in_proj/kernel")
  p = policy.cfg.vision.num_patches
  q = caps["PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"]
  assert q.rows.shape == (policy.cfg.vision.depth, 3 * B * p, policy.cfg.vision.width)
  assert int(q.mask.sum()) == 3 * B * p - p
  head = caps["action_in_proj/kernel"]
  assert head.rows.shape == (1, 1, B * policy.cfg.action_horizon, policy.cfg.action_dim)
  assert len(caps) == 3


def test_stats_save_load_roundtrip(tmp_path):
  _, _, _, stats = _setup()
  cal.save_stats(tmp_path / "stats", stats)
  back = cal.load_stats(tmp_path / "stats")
  assert back.keys() == stats.keys() and back.num_steps == STEPS and back.select == stats.select
  for (_, a), (_, b) in zip(stats.items(), back.items()):
    assert a.spec == b.spec and a.stacked == b.stacked
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(x, y)


def _flat():
  _, _, batches, _ = _setup()
  return {k: np.array(v) for k, v in calib_data.to_flat(batches).items()}  # copies: tests mutate them


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.pop("state"), r"missing keys \['state'\]"),
    (lambda f: f.update(extra=f["state"]), r"unknown keys \['extra'\]"),
    (lambda f: f.update(state=f["state"][..., :5]), r"'state' has shape"),
    (lambda f: f.update({"image/base_0_rgb": f["image/base_0_rgb"][:, :, :8]}), r"'image/base_0_rgb' has shape"),
    (lambda f: f.update(tokenized_prompt=f["tokenized_prompt"].astype(np.float32)), r"'tokenized_prompt' has dtype"),
    (lambda f: f["state"].__setitem__((1, 0, 3), np.nan), r"'state' contains NaN or Inf"),
    (lambda f: f["image/left_wrist_0_rgb"].__setitem__((2, 1, 0, 0, 0), np.inf), r"'image/left_wrist_0_rgb' contains NaN or Inf"),
    (lambda f: f.update({k: v[:0] for k, v in f.items()}), r"empty"),
    (lambda f: f.update({"image_mask/base_0_rgb": np.full(f["image_mask/base_0_rgb"].shape, 3)}), r"values other than 0 and 1"),
])
def test_bad_npz_refused(tmp_path, mutate, message):
  policy, _, _, _ = _setup()
  flat = _flat()
  mutate(flat)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(ValueError, match=message):
    calib_data.load_npz_batches(tmp_path / "bad.npz", policy.cfg)


def test_npz_roundtrip_and_empty_file(tmp_path):
  policy, _, batches, _ = _setup()
  calib_data.save_npz_batches(tmp_path / "ok.npz", batches)
  back = calib_data.load_npz_batches(tmp_path / "ok.npz", policy.cfg)
  for x, y in zip(jax.tree.leaves(batches), jax.tree.leaves(back), strict=True):
    np.testing.assert_array_equal(x, y)
  np.savez(tmp_path / "empty.npz")
  with pytest.raises(ValueError, match="empty"):
    calib_data.load_npz_batches(tmp_path / "empty.npz", policy.cfg)


def test_calibrate_refuses_bad_batches_and_config():
  policy, params, batches, _ = _setup()
  bad = batches.replace(state=np.where(np.arange(policy.cfg.action_dim) == 0, np.inf, batches.state))
  with pytest.raises(ValueError, match="'state' contains NaN or Inf"):
    cal.calibrate(policy, params, bad, CFG, rng=RNG)
  with pytest.raises(ValueError, match=r"a single batch \(B, ...\)"):  # no G axis
    cal.calibrate(policy, params, jax.tree.map(lambda x: x[0], batches), CFG, rng=RNG)
  with pytest.raises(ValueError, match="matches no linear"):
    cal.calibrate(policy, params, batches, cal.CalibConfig(select="nothing/.*", progress=False), rng=RNG)
  with pytest.raises(ValueError, match="num_samples"):
    cal.CalibConfig(num_samples=0)
  with pytest.raises(ValueError, match="not a valid regex"):
    cal.CalibConfig(select="(")
  with pytest.raises(ValueError, match="max_exp"):
    st.HistSpec(min_exp=3, max_exp=3)


def test_histogram_percentile_unit():
  """Percentile readout on a known distribution, independent of the model."""
  spec = st.HistSpec()
  rng = np.random.default_rng(0)
  x = np.exp(rng.normal(0, 2, (1, 20000, 3))).astype(np.float32)
  s = st.init_channel_stats(num_layers=1, num_channels=3, num_samples=4, spec=spec)
  mask = np.ones(10000, bool)
  for half in (x[:, :10000], x[:, 10000:]):
    s = jax.jit(st.accumulate)(s, half, mask, jnp.asarray(rng.random(10000), jnp.float32))
  ratio = 2 ** (1 / spec.bins_per_octave)
  for q in (1.0, 50.0, 99.0, 99.99):
    got, want = np.asarray(jax.jit(st.percentile, static_argnums=1)(s, q)), np.percentile(x, q, axis=1)
    assert (np.abs(np.log(got / want)) <= np.log(ratio)).all(), (q, got, want)
  assert int(s.count) == 20000 and np.asarray(s.hist).sum() == 60000
