"""Tests for duquant_jax.transforms / duquant_jax.rotations (DuQuant input transforms).

Numerics are pinned with stated bounds: orthogonality to 1e-5, exact folding to float32 tolerance,
zigzag balance within one channel max, greedy rotation at least 3x lower max on a 100x outlier.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax import rotations
from duquant_jax import transforms as T

KINDS = ("greedy", "random", "hadamard", "weight_svd", "weight_qr")


def _outlier_acts(key, lead, rows, k, outliers=((3, 100.0),)):
  """Activations (..., R, K) ~ N(0, 1) with a few persistent outlier channels."""
  x = jax.random.normal(key, (*lead, rows, k))
  for ch, scale in outliers:
    x = x.at[..., ch].multiply(scale)
  return x


# Shapes and step counts are shared between tests on purpose: every new (shape, block size,
# max_steps) costs a ~1-2 s XLA compile on CPU.
STEPS = 8


def _rotation(kind, lead, k, b, key=jax.random.key(0), n=48):
  kx, kw = jax.random.split(key)
  if kind == "greedy":
    return T.greedy_rotation(jnp.abs(_outlier_acts(kx, lead, 1, k)), b, key, max_steps=STEPS)
  if kind == "random":
    return T.random_block_rotation(key, lead, k, b)
  if kind == "hadamard":
    return T.hadamard_block_rotation(lead, k, b)
  w = jax.random.normal(kw, (*lead, k, n))
  return T.weight_svd_rotation(w, b) if kind == "weight_svd" else T.weight_qr_rotation(w, b)


def _assert_orthogonal(r, tol=1e-5):
  b = r.shape[-1]
  eye = np.eye(b)
  r = np.asarray(r, np.float64)
  np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(eye, r.shape), atol=tol)
  np.testing.assert_allclose(np.swapaxes(r, -1, -2) @ r, np.broadcast_to(eye, r.shape), atol=tol)


def _block_max(x, b):
  """(..., R, K) -> (..., K // b): max |x| per block over rows."""
  x = np.abs(np.asarray(x))
  return x.reshape(*x.shape[:-1], -1, b).max(axis=(-3, -1))


# ------------------------------------------------------------------------------------------------
# Rotations.


@pytest.mark.parametrize("shape", [(3, 2, 8, 8), (16, 16)])
def test_random_orthogonal_is_orthogonal_and_deterministic(shape):
  q = T.random_orthogonal(jax.random.key(1), shape)
  assert q.shape == shape and q.dtype == jnp.float32
  _assert_orthogonal(q)
  np.testing.assert_array_equal(q, T.random_orthogonal(jax.random.key(1), shape))
  assert not np.allclose(q, T.random_orthogonal(jax.random.key(2), shape))


def test_random_orthogonal_is_haar_not_biased():
  # Without the sign fix QR's Q has a biased diagonal (LAPACK gives R a negative diagonal);
  # Haar matrices have E[Q_ii] = 0. 4000 samples of 4x4: the mean's std is about 0.008.
  q = T.random_orthogonal(jax.random.key(3), (4000, 4, 4))
  diag_mean = np.asarray(jnp.diagonal(q, axis1=-2, axis2=-1)).mean(axis=0)
  assert np.all(np.abs(diag_mean) < 0.05), diag_mean


@pytest.mark.parametrize("b", [1, 2, 16, 64])
def test_block_hadamard(b):
  h = np.asarray(T.block_hadamard(b))
  _assert_orthogonal(h)
  np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(b), rtol=1e-6)


@pytest.mark.parametrize("b", [0, 3, 12, 48])
def test_block_hadamard_rejects_non_powers_of_two(b):
  with pytest.raises(ValueError, match="power of 2"):
    T.block_hadamard(b)


@pytest.mark.parametrize("kind", KINDS)
# (More shapes: every rotation built in test_transform_is_exact is checked for orthogonality too.)
@pytest.mark.parametrize("lead,k,b", [((2,), 128, 16), ((2, 3), 128, 64)])
def test_every_rotation_is_orthogonal(kind, lead, k, b):
  r = _rotation(kind, lead, k, b)
  assert r.shape == (*lead, k // b, b, b)
  _assert_orthogonal(r)


@pytest.mark.parametrize("n", [8, 40])
def test_weight_rotations_match_their_definitions(n):
  b = 16
  w = jax.random.normal(jax.random.key(4), (2, 32, n))
  blocks = np.asarray(w, np.float64).reshape(2, 2, b, n)
  u = np.asarray(T.weight_svd_rotation(w, b), np.float64)
  s = np.linalg.svd(blocks, compute_uv=False)
  # U^T W_g = S V^T: row i has norm s_i (the energy concentration the seeds got).
  row_norms = np.linalg.norm(np.swapaxes(u, -1, -2) @ blocks, axis=-1)
  np.testing.assert_allclose(row_norms[..., :min(b, n)], s, rtol=1e-4, atol=1e-4)
  q = np.asarray(T.weight_qr_rotation(w, b), np.float64)
  r = np.swapaxes(q, -1, -2) @ blocks  # Q^T W_g = R, upper triangular.
  np.testing.assert_allclose(np.tril(r, -1), 0.0, atol=1e-4)
  _assert_orthogonal(q)


def test_spreading_factors_first_row_uniform():
  f = rotations.spreading_factors(jax.random.key(5), (3, 32, 32))
  _assert_orthogonal(f)
  np.testing.assert_allclose(f[:, 0, :], 1 / np.sqrt(32), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Greedy rotation.


@pytest.mark.parametrize("lead", [(), (2, 3)])
def test_greedy_spreads_a_100x_outlier(lead):
  b, k = 64, 128
  x = jax.random.uniform(jax.random.key(6), (*lead, 1, k), minval=0.5, maxval=1.0)
  x = x.at[..., 70].set(100.0)  # block 1
  rot = T.greedy_rotation(x, b, jax.random.key(7), max_steps=STEPS)
  before, after = _block_max(x, b), _block_max(T.apply_block_rotation(x, rot), b)
  # One spreading step alone gives about 100 / sqrt(64) + noise ~ 14: require 3x.
  assert np.all(after[..., 1] <= before[..., 1] / 3), after[..., 1]
  assert np.all(after <= before * (1 + 1e-5))


@pytest.mark.parametrize("rows", [1, 6])
def test_greedy_never_increases_block_max(rows):
  # Flat Gaussian data: steps may well not help, and then the empty prefix (identity) is kept.
  b = 16
  x = jax.random.normal(jax.random.key(8), (2, rows, 128))
  rot = T.greedy_rotation(x, b, jax.random.key(9), max_steps=STEPS)
  _assert_orthogonal(rot)
  assert np.all(_block_max(T.apply_block_rotation(x, rot), b) <= _block_max(x, b) * (1 + 1e-5))


def test_greedy_zero_steps_is_identity_and_is_deterministic():
  x = _outlier_acts(jax.random.key(10), (2,), 6, 128)
  r0 = T.greedy_rotation(x, 16, jax.random.key(0), max_steps=0)
  np.testing.assert_array_equal(r0, np.broadcast_to(np.eye(16), (2, 8, 16, 16)))
  r1 = T.greedy_rotation(x, 16, jax.random.key(11), max_steps=STEPS)
  np.testing.assert_array_equal(r1, T.greedy_rotation(x, 16, jax.random.key(11), max_steps=STEPS))
  assert not np.allclose(r1, T.greedy_rotation(x, 16, jax.random.key(12), max_steps=STEPS))


# ------------------------------------------------------------------------------------------------
# Smoothing.


def test_smoothing_factors_formula_and_guards():
  act = jnp.array([4.0, 0.0, 1e-9, jnp.inf, 9.0, 1e30, 1.0])
  wmax = jnp.array([0.25, 1.0, 1.0, 1.0, jnp.nan, 1e-4, 0.0])
  lam = np.asarray(T.smoothing_factors(act, wmax, 0.5))
  assert lam[0] == pytest.approx(np.sqrt(4.0) / np.sqrt(0.25), rel=1e-6)
  np.testing.assert_array_equal(lam[[1, 2, 3, 4, 6]], 1.0)  # dead / non-finite channels
  assert lam[5] == pytest.approx(1e4)  # clamped, not inf
  assert np.all(np.isfinite(lam)) and np.all(lam > 0)
  lam_a = T.smoothing_factors(jnp.array([8.0]), jnp.array([2.0]), 0.75)
  assert float(lam_a[0]) == pytest.approx(8.0 ** 0.75 / 2.0 ** 0.25, rel=1e-6)


def test_smoothing_rejects_bad_alpha_and_shapes():
  with pytest.raises(ValueError, match="alpha"):
    T.smoothing_factors(jnp.ones(4), jnp.ones(4), 1.5)
  with pytest.raises(ValueError, match="channel axes"):
    T.smoothing_factors(jnp.ones(4), jnp.ones(8), 0.5)


# ------------------------------------------------------------------------------------------------
# Permutations.


def _block_sums(channel_max, perm, b):
  cm = np.take_along_axis(np.asarray(channel_max), np.asarray(perm), axis=-1)
  return cm.reshape(*cm.shape[:-1], -1, b).sum(-1)


@pytest.mark.parametrize("lead,k,b", [((), 256, 16), ((3,), 128, 32), ((2, 2), 64, 8)])
def test_zigzag_is_a_balancing_permutation(lead, k, b):
  key = jax.random.key(14)
  cm = jax.random.uniform(key, (*lead, k), minval=0.5, maxval=1.0)
  cm = cm.at[..., :8].set(100.0)  # a few large channels, all in block 0 (and 1 when b = 4)
  perm = T.zigzag_permutation(cm, k // b)
  assert perm.dtype == jnp.int32 and perm.shape == cm.shape
  np.testing.assert_array_equal(np.sort(perm, axis=-1), np.broadcast_to(np.arange(k), cm.shape))
  sums, plain = _block_sums(cm, perm, b), np.asarray(cm).reshape(*lead, -1, b).sum(-1)
  # Zigzag bound: block sums differ by at most the largest channel max (telescoping over sweeps).
  spread = sums.max(-1) - sums.min(-1)
  assert np.all(spread <= np.asarray(cm).max(-1) * (1 + 1e-6))
  # The 8 channels of 100 sit in block 0 unpermuted (block sum >= 800); zigzag deals them one per
  # block per sweep, so a block holds ceil(8 / G) of them: max block sum <= ceil(8 / G) * 100 + b,
  # and at least 3x below the unpermuted max here.
  per_block = -(-8 // (k // b))
  assert np.all(sums.max(-1) <= per_block * 100 + b)
  assert np.all(sums.max(-1) * 3 <= plain.max(-1))


def test_zigzag_deal_order():
  # 8 channels, 2 blocks of 4; ranks 0..7 deal to blocks 0 1 1 0 0 1 1 0.
  cm = jnp.array([7.0, 6, 5, 4, 3, 2, 1, 0])
  perm = np.asarray(T.zigzag_permutation(cm, 2))
  np.testing.assert_array_equal(perm, [0, 3, 4, 7, 1, 2, 5, 6])
  np.testing.assert_array_equal(np.asarray(cm)[perm], [7, 4, 3, 0, 6, 5, 2, 1])


@pytest.mark.parametrize("lead", [(), (2,)])
def test_head_constrained_zigzag_keeps_heads(lead):
  k, hd, b = 128, 32, 8
  cm = jax.random.uniform(jax.random.key(15), (*lead, k))
  cm = cm.at[..., 0:4].set(50.0).at[..., 40].set(80.0)
  perm = np.asarray(T.head_constrained_zigzag(cm, b, hd))
  np.testing.assert_array_equal(np.sort(perm, -1), np.broadcast_to(np.arange(k), perm.shape))
  heads = np.broadcast_to(np.arange(k) // hd, perm.shape)
  np.testing.assert_array_equal(perm // hd, heads)
  # Within head 0 the 4 outliers are dealt to its 4 blocks, one each.
  sums = _block_sums(cm, perm, b)[..., :hd // b]
  assert np.all(sums.max(-1) <= 50 + b)


def test_head_alignment_errors():
  with pytest.raises(ValueError, match="block size 48 does not divide head_dim 64 at layers/q"):
    T.check_block_alignment(48, 64, "layers/q")
  T.check_block_alignment(64, 256, "ok")
  with pytest.raises(ValueError, match="does not divide head_dim"):
    T.head_constrained_zigzag(jnp.ones(128), 48, 64)
  with pytest.raises(ValueError, match="head_dim 48 does not divide K"):
    T.head_constrained_zigzag(jnp.ones(128), 16, 48)


# ------------------------------------------------------------------------------------------------
# InputTransform exactness.


def _check_exact(t, x, w, rtol=2e-5):
  y = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  yq = np.asarray(t.apply(x, precision=jax.lax.Precision.HIGHEST) @ t.fold(w), np.float64)
  err = np.abs(yq - y).max() / np.abs(y).max()
  assert err < rtol, err


@functools.lru_cache(maxsize=None)
def _problem(lead, k=128, n=24, m=6):
  kx, kw = jax.random.split(jax.random.key(16))
  x = _outlier_acts(kx, lead, m, k, outliers=((3, 100.0), (77, 30.0)))
  w = jax.random.normal(kw, (*lead, k, n)) * 0.05
  return x, w


@pytest.mark.parametrize("rotation", T.ROTATIONS)
@pytest.mark.parametrize("permutation", T.PERMUTATIONS)
@pytest.mark.parametrize("alpha", [None, 0.5])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_transform_is_exact(rotation, permutation, alpha, lead):
  b, hd = 16, 32
  x, w = _problem(lead)
  t = T.build_duquant_transform(
      x, jnp.max(jnp.abs(x), axis=-2), jnp.max(jnp.abs(w), axis=-1), block_size=b,
      key=jax.random.key(17), alpha=alpha, rotation=rotation, permutation=permutation,
      head_dim=hd, w=w, max_steps=STEPS)
  t.validate()
  for r in (t.rot1, t.rot2):
    if r is not None:
      _assert_orthogonal(r)
  assert (t.smooth is None) == (alpha is None)
  assert (t.rot1 is None) == (rotation == "none")
  assert (t.perm is None) == (permutation == "none")
  assert (t.rot2 is None) == (rotation == "none" or permutation == "none")
  _check_exact(t, x, w)
  m = t.merged()
  m.validate()
  if alpha is not None and rotation != "none":
    assert m.smooth is None and m.merged_smooth
  _check_exact(m, x, w)


def test_greedy_transform_lowers_max_and_merged_matches():
  x, w = _problem((2,))
  absmax = jnp.max(jnp.abs(x), axis=-2)
  t = T.build_duquant_transform(None, absmax, None, block_size=16, key=jax.random.key(18),
                                alpha=None, max_steps=STEPS)
  xt = t.apply(x)
  assert float(jnp.max(jnp.abs(xt))) * 3 < float(jnp.max(jnp.abs(x)))
  np.testing.assert_allclose(t.merged().apply(x), xt, rtol=1e-5, atol=1e-5)
  ts = T.build_duquant_transform(None, absmax, jnp.max(jnp.abs(w), -1), block_size=16,
                                 key=jax.random.key(18), alpha=0.5, max_steps=STEPS)
  np.testing.assert_allclose(ts.merged().apply(x), ts.apply(x), rtol=1e-4, atol=1e-5)


def test_transform_broadcasts_leading_axes():
  # One shared transform (no leading axes) on per-layer x and w, and a per-layer transform on x (L,..).
  x, w = _problem((2,))
  xs, ws = x[0], w[0]
  shared = T.build_duquant_transform(None, jnp.max(jnp.abs(xs), -2), jnp.max(jnp.abs(ws), -1),
                                     block_size=16, key=jax.random.key(19), max_steps=STEPS)
  assert shared.apply(x).shape == x.shape
  _check_exact(shared, x, w)
  per_layer = T.build_duquant_transform(x, jnp.max(jnp.abs(x), -2), jnp.max(jnp.abs(w), -1),
                                        block_size=16, key=jax.random.key(19), max_steps=STEPS)
  assert per_layer.rot1.shape == (2, 8, 16, 16)
  # Leading axes broadcast numpy-style (right-aligned): x (3, 2, M, K) with a (2, ...) transform.
  x2 = jnp.stack([x, 2 * x, -x])
  np.testing.assert_allclose(per_layer.apply(x2)[1], 2 * per_layer.apply(x), rtol=1e-5, atol=1e-4)


def test_transform_is_deterministic_and_jittable():
  x, w = _problem((2,))
  args = (x, jnp.max(jnp.abs(x), -2), jnp.max(jnp.abs(w), -1))
  build = functools.partial(T.build_duquant_transform, block_size=16, alpha=0.5,
                            permutation="head_zigzag", head_dim=32, max_steps=STEPS)
  t1 = build(*args, key=jax.random.key(20))
  jbuild = jax.jit(build)
  t2 = jbuild(*args, key=jax.random.key(20))
  n_compiled = jbuild._cache_size()
  jbuild(*jax.tree.map(lambda a: a + 1, args), key=jax.random.key(21))
  assert jbuild._cache_size() == n_compiled  # no recompilation for new data or keys
  for a, c in zip(jax.tree.leaves(t1), jax.tree.leaves(t2)):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(t1.perm, t2.perm)
  # The packed transform is a pytree that flows through jit.
  y = jax.jit(lambda t, x: t.apply(x))(t1.merged(), x)
  np.testing.assert_allclose(y, t1.apply(x), rtol=1e-4, atol=1e-4)


def test_empty_transform_is_identity():
  x, w = _problem(())
  t = T.InputTransform()
  np.testing.assert_array_equal(t.apply(x), x)
  np.testing.assert_array_equal(t.fold(w), w)


# ------------------------------------------------------------------------------------------------
# Output rotation.


@pytest.mark.parametrize("lead", [(), (2,)])
def test_output_rotation_restores(lead):
  x, w = _problem(lead)
  rot = T.random_block_rotation(jax.random.key(21), lead, 24, 8)
  o = T.OutputRotation(rot=rot)
  y = x @ w
  y_rot = x @ o.rotate(w)
  assert not np.allclose(y_rot, y, atol=1e-3)
  np.testing.assert_allclose(o.restore(y_rot, precision=jax.lax.Precision.HIGHEST), y,
                             rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))
  np.testing.assert_allclose(T.restore_output(x @ T.rotate_output(w, rot), rot), y,
                             rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))


# ------------------------------------------------------------------------------------------------
# Errors.


def test_errors_for_non_dividing_block_sizes_and_bad_shapes():
  x = jnp.ones((2, 1, 96))
  with pytest.raises(ValueError, match="block size 64 does not divide the channel count 96"):
    T.greedy_rotation(x, 64, jax.random.key(0))
  with pytest.raises(ValueError, match="does not divide"):
    T.random_block_rotation(jax.random.key(0), (2,), 96, 64)
  with pytest.raises(ValueError, match="does not divide"):
    T.hadamard_block_rotation((), 96, 64)
  with pytest.raises(ValueError, match="power of 2"):
    T.hadamard_block_rotation((), 96, 48)
  with pytest.raises(ValueError, match="does not divide"):
    T.weight_svd_rotation(jnp.ones((96, 8)), 64)
  with pytest.raises(ValueError, match=r"\(\.\.\., K, N\)"):
    T.weight_qr_rotation(jnp.ones((96,)), 32)
  with pytest.raises(ValueError, match=r"\(\.\.\., R, K\)"):
    T.greedy_rotation(jnp.ones(96), 32, jax.random.key(0))
  with pytest.raises(ValueError, match="max_steps"):
    T.greedy_rotation(x, 32, jax.random.key(0), max_steps=-1)
  with pytest.raises(ValueError, match="5 blocks do not divide"):
    T.zigzag_permutation(jnp.ones(96), 5)
  with pytest.raises(ValueError, match="does not tile"):
    T.apply_block_rotation(jnp.ones((4, 96)), jnp.ones((2, 32, 32)))
  with pytest.raises(ValueError, match="random_orthogonal"):
    T.random_orthogonal(jax.random.key(0), (4, 3))


def test_builder_errors():
  absmax, wmax = jnp.ones((2, 64)), jnp.ones((2, 64))
  build = functools.partial(T.build_duquant_transform, None, absmax, wmax, key=jax.random.key(0))
  with pytest.raises(ValueError, match="does not divide the channel count"):
    build(block_size=48)
  with pytest.raises(ValueError, match="block size 32 does not divide head_dim 16"):
    build(block_size=32, head_dim=16)
  with pytest.raises(ValueError, match="unknown rotation"):
    build(block_size=16, rotation="svd")
  with pytest.raises(ValueError, match="unknown permutation"):
    build(block_size=16, permutation="random")
  with pytest.raises(ValueError, match="needs head_dim"):
    build(block_size=16, permutation="head_zigzag")
  with pytest.raises(ValueError, match="needs the weight"):
    build(block_size=16, rotation="weight_qr")
  with pytest.raises(ValueError, match="needs w_absmax"):
    T.build_duquant_transform(None, absmax, None, block_size=16, key=jax.random.key(0))
  with pytest.raises(ValueError, match="samples must be"):
    T.build_duquant_transform(jnp.ones((3, 1, 64)), absmax, wmax, block_size=16,
                              key=jax.random.key(0))
