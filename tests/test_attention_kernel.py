"""`models.attention_kernel`: the Pallas attention kernel equals openpi's einsum attention
(interpret mode on CPU; the kernel itself on a GPU), merges its key slices exactly, lowers for
CUDA, runs in the policy, and names bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax.models import attention_kernel as A
from duquant_jax.models import get_policy

from conftest import demo_params

ON_GPU = jax.default_backend() == "gpu"
TRITON = "__gpu$xla.gpu.triton"


def _case(b, t, s, n, kh, h, *, dtype=jnp.float32, seed=0, masked_row=True):
  """Random q, k, v and a random mask (70% allowed); query row 0 may attend to nothing."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = (0.3 * jax.random.normal(ks[0], (b, t, n, h))).astype(dtype)
  k, v = (jax.random.normal(kk, (b, s, kh, h)).astype(dtype) for kk in ks[1:3])
  mask = jax.random.uniform(ks[3], (b, t, s)) < 0.7
  if masked_row:
    mask = mask.at[:, 0].set(False)
  return q, k, v, mask


@pytest.mark.parametrize("shape,cache_len,tiles", [
    # (B, T, S, N, K, H): a flow step in miniature (MQA, T and S no multiple of the blocks), its
    # first S - T keys a KV cache.
    ((1, 51, 100, 4, 1, 64), 49, None),
    ((2, 51, 100, 4, 1, 64), 49, A.AttentionTiles(block_t=16, block_s=32, kv_splits=3)),
    ((1, 51, 100, 4, 1, 64), 49, A.AttentionTiles(block_t=64, block_s=64, kv_splits=1)),
    # the same keys without a cache; grouped (K = 2), slices that do not divide S
    ((2, 51, 100, 4, 1, 64), 0, A.AttentionTiles(block_t=16, block_s=32, kv_splits=3)),
    ((1, 20, 70, 4, 2, 32), 0, A.AttentionTiles(block_t=16, block_s=16, kv_splits=3)),
    # the prefix's form: T = S
    ((1, 40, 40, 2, 1, 32), 0, A.AttentionTiles(block_t=16, block_s=16, kv_splits=1)),
])
def test_kernel_equals_the_reference(shape, cache_len, tiles):
  """float32, against the einsum form at HIGHEST precision: within 1e-5 of the output's largest
  magnitude (measured on the CPU: at most 2.3e-6). The row with every key masked averages every
  value, as the einsum form's softmax does."""
  q, k, v, mask = _case(*shape)
  ref = np.asarray(A.reference(q, k, v, mask))
  cache = (k[:, :cache_len], v[:, :cache_len]) if cache_len else None
  with jax.default_matmul_precision("highest"):  # interpreted on a GPU, float32 dots are TF32
    got = np.asarray(A.attention(q, k[:, cache_len:], v[:, cache_len:], mask, cache=cache,
                                 implementation="pallas_interpret", tiles=tiles))
  np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
  g = shape[3] // shape[4]
  mean_v = np.asarray(jnp.repeat(jnp.mean(v, axis=1), g, axis=1))  # (B, N, H)
  np.testing.assert_allclose(got[:, 0], mean_v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("partial_dtype", ["float32", "bfloat16"])
def test_kernel_in_bf16_is_as_close_as_the_einsum_form(partial_dtype):
  """In bf16 the kernel rounds at other places than the einsum form (unnormalized probabilities
  to bf16, one rounding of the output, and with bf16 partials one rounding of each slice's
  output): its error from float32 stays within twice the einsum form's own (measured on the
  CPU: 0.0076 with float32 partials, 0.0137 with bf16 ones, against 0.0122)."""
  q, k, v, mask = _case(2, 51, 100, 4, 1, 64, dtype=jnp.bfloat16, seed=3)
  ref = np.asarray(A.reference(q, k, v, mask))
  einsum = np.asarray(A.einsum_attention(q, k, v, mask), np.float32)
  tiles = A.AttentionTiles(block_t=32, block_s=32, kv_splits=2, partial_dtype=partial_dtype)
  got = A.attention(q, k[:, 40:], v[:, 40:], mask, cache=(k[:, :40], v[:, :40]),
                    implementation="pallas_interpret", tiles=tiles)
  assert got.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float32) - ref).max()
  assert err <= 2 * np.abs(einsum - ref).max()


@pytest.mark.skipif(ON_GPU, reason="auto runs the kernel where the program is lowered for CUDA")
def test_auto_is_the_einsum_form_off_cuda():
  q, k, v, mask = _case(1, 9, 30, 2, 1, 16)
  want = np.asarray(A.einsum_attention(q, k, v, mask))
  np.testing.assert_array_equal(np.asarray(A.attention(q, k, v, mask)), want)
  cached = A.attention(q, k[:, 20:], v[:, 20:], mask, cache=(k[:, :20], v[:, :20]))
  np.testing.assert_array_equal(np.asarray(cached), want)


def test_choose_tiles_fills_the_gpu_at_small_batches():
  flow1, flow8 = A.choose_tiles(1, 51, 867, 8), A.choose_tiles(8, 51, 867, 8)
  assert (flow1.block_t, flow1.block_s, flow1.kv_splits) == (64, 64, 14)  # 8 x 14 programs
  assert (flow8.block_s, flow8.kv_splits, flow8.num_stages) == (32, 2, 3)
  prefix = A.choose_tiles(1, 816, 816, 8)
  assert (prefix.block_t, prefix.kv_splits) == (64, 1)  # 13 x 8 programs
  assert A.choose_tiles(1, 5, 10, 1).block_t == 16


def _cuda_module(fn, *args) -> str:
  """`fn` exported for CUDA at the shapes of `args` (pytrees of arrays or shape structs)."""
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
  exported = jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*specs)
  return exported.mlir_module()


def test_lowers_for_cuda_at_the_flow_step_shape():
  """gemma_300m on a pi0 flow step (bf16), its 816 prefix keys a cache: one Triton kernel, the
  slices' merge, and no concatenation."""
  b, t, s = 1, 51, 816
  q = jnp.zeros((b, t, 8, 256), jnp.bfloat16)
  kv, cache = jnp.zeros((b, t, 1, 256), jnp.bfloat16), jnp.zeros((b, s, 1, 256), jnp.bfloat16)
  text = _cuda_module(lambda q, k, v, m, ck, cv: A.attention(q, k, v, m, cache=(ck, cv)),
                      q, kv, kv, jnp.ones((b, t, s + t), bool), cache, cache)
  assert text.count(TRITON) == 1
  assert "concatenate" not in text


def test_policy_runs_the_kernel_for_cuda():
  """attention="pallas": the prefix's and the flow steps' Gemma attention are the kernel (one
  call in each scanned layer body), SigLIP keeps its einsum form."""
  policy = get_policy("pi0", "demo", attention="pallas")
  params = jax.eval_shape(policy.init, jax.random.key(0))
  obs = policy.example_observation(jax.random.key(1), batch_size=1)
  text = _cuda_module(lambda p, o: policy.sample_actions(p, o, jax.random.key(5), num_steps=2),
                      params, obs)
  assert text.count(TRITON) == 2


@pytest.mark.parametrize("bad,match", [
    (dict(k=jnp.zeros((1, 30, 3, 16))), "K dividing N"),
    (dict(mask=jnp.ones((1, 9, 31), bool)), r"mask \(1, 9, 31\) does not match"),
    (dict(q=jnp.zeros((9, 2, 16))), r"q \(B, T, N, H\)"),
    (dict(cache=(jnp.zeros((1, 5, 1, 8)),) * 2), r"cache k / v \(1, 5, 1, 8\)"),
])
def test_bad_shapes_are_named(bad, match):
  q, k, v, mask = _case(1, 9, 30, 2, 1, 16)
  args = dict(q=q, k=k, v=bad.get("k", v), mask=mask) | bad
  with pytest.raises(ValueError, match=match):
    A.attention(**args)


def test_bad_tiles_and_implementation_are_named():
  with pytest.raises(ValueError, match="block_t=48 must be a power of two"):
    A.AttentionTiles(block_t=48)
  with pytest.raises(ValueError, match="kv_splits=0"):
    A.AttentionTiles(kv_splits=0)
  with pytest.raises(ValueError, match="partial_dtype='float16'"):
    A.AttentionTiles(partial_dtype="float16")
  q, k, v, mask = _case(1, 9, 30, 2, 1, 16)
  with pytest.raises(ValueError, match="implementation must be one of"):
    A.attention(q, k, v, mask, implementation="flash")


@pytest.mark.skipif(not ON_GPU, reason="the compiled kernel needs a GPU")
@pytest.mark.parametrize("batch", [1, 8])
def test_kernel_on_the_gpu_at_the_flow_step_shape(batch):
  """The compiled kernel (bf16, pi0's flow-step shape, default tiles) within twice the bf16
  einsum form's error from float32, as in interpret mode."""
  q, k, v, mask = _case(batch, 51, 867, 8, 1, 256, dtype=jnp.bfloat16, seed=batch)
  ref = np.asarray(jax.jit(A.reference)(q, k, v, mask))
  einsum = np.asarray(jax.jit(A.einsum_attention)(q, k, v, mask), np.float32)
  got = np.asarray(jax.jit(lambda *a: A.attention(*a, implementation="pallas"))(q, k, v, mask),
                   np.float32)
  assert np.abs(got - ref).max() <= 2 * np.abs(einsum - ref).max()


def test_policy_with_the_kernel_equals_the_einsum_policy(monkeypatch):
  """The whole demo policy (prefix into the cache, flow steps reading it) with the kernel run in
  Pallas' interpreter: the actions of the einsum form, float32 rounding apart (measured on the
  CPU, batch 2: max abs diff 6.1e-6 of actions up to 4.9; pi0.5's attention is the same code)."""
  from duquant_jax.models import gemma
  policy, params = get_policy("pi0", "demo"), demo_params("pi0")
  obs = policy.example_observation(jax.random.key(1), batch_size=2)
  kernel = get_policy("pi0", "demo", attention="pallas")
  interpreted = functools.partial(A.attention, implementation="pallas_interpret")
  monkeypatch.setattr(gemma.attention_kernel, "attention", interpreted)

  def actions(p):
    with jax.default_matmul_precision("highest"):
      run = jax.jit(p.sample_actions, static_argnames="num_steps")
      return np.asarray(run(params, obs, jax.random.key(5), num_steps=2))
  want, got = actions(policy), actions(kernel)
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)
