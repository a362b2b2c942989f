"""openpi interoperability without a server: as_observation / OpenpiModel, the msgpack-numpy codec,
norm stats, the prompt tokenizer and the request adapter."""

import dataclasses
import io
import json
from typing import Any, Optional

import jax
import msgpack
import numpy as np
import pytest

from conftest import demo_params
from duquant_jax.models import IMAGE_KEYS, as_observation, get_policy
from duquant_jax.openpi_io import (NormStats, OpenpiModel, PaligemmaTokenizer, RequestAdapter,
                                   RequestError, find_norm_stats, load_norm_stats, normalize, packb,
                                   resize_with_pad, unnormalize, unpackb)


@dataclasses.dataclass
class OpenpiLikeObservation:
  """The attribute names of openpi's `Observation` (a different class, as openpi's would be)."""
  images: dict
  image_masks: dict
  state: Any
  tokenized_prompt: Optional[Any] = None
  tokenized_prompt_mask: Optional[Any] = None
  token_ar_mask: Optional[Any] = None
  token_loss_mask: Optional[Any] = None


def tiny_tokenizer_file(path) -> str:
  """A small SentencePiece model trained on robot prompts (PaliGemma ids: pad 0, eos 1, bos 2)."""
  import sentencepiece as spm
  text = ["pick up the red block and place it in the bowl", "open the top drawer",
          "put the cup on the plate", "Task: stack the blocks, State: 1 2 3 128 255;",
          "Action: move left", "close the microwave door"] * 20
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text), model_writer=model, vocab_size=100, model_type="bpe",
      minloglevel=2, bos_id=2, eos_id=1, unk_id=3, pad_id=0, hard_vocab_limit=False,
      user_defined_symbols=["\n"], normalization_rule_name="identity",
      remove_extra_whitespaces=False)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return str(path)


def _uint8_obs(policy, seed, batch):
  """An observation in openpi's dict form with uint8 images and one camera mask left out."""
  c = policy.cfg
  rng = np.random.default_rng(seed)
  size = c.vision.image_size
  images = {k: rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8) for k in IMAGE_KEYS}
  tokens = rng.integers(3, c.vocab_size, (batch, c.max_token_len), dtype=np.int32)
  tokens[:, 0] = 2
  return {"image": images, "image_mask": {IMAGE_KEYS[0]: np.ones((batch,), bool)},
          "state": rng.normal(size=(batch, c.action_dim)).astype(np.float32),
          "tokenized_prompt": tokens,
          "tokenized_prompt_mask": np.arange(c.max_token_len) < np.array([[5], [9]])[:batch]}


def test_as_observation_converts_like_openpi():
  policy = get_policy("pi0", "demo")
  d = _uint8_obs(policy, 0, 2)
  obs = as_observation(d, policy.cfg)
  for k in IMAGE_KEYS:
    want = d["image"][k].astype(np.float32) / 255.0 * 2.0 - 1.0
    np.testing.assert_allclose(obs.images[k], want, atol=1e-6)
    assert obs.images[k].dtype == np.float32
    np.testing.assert_array_equal(obs.image_masks[k], [True, True])  # missing mask: present
  obj = OpenpiLikeObservation(images=d["image"], image_masks={}, state=d["state"],
                              tokenized_prompt=d["tokenized_prompt"],
                              tokenized_prompt_mask=d["tokenized_prompt_mask"],
                              token_ar_mask=np.zeros_like(d["tokenized_prompt"]))
  from_obj = as_observation(obj, policy.cfg)
  assert jax.tree.all(jax.tree.map(np.array_equal, from_obj, obs))
  assert as_observation(obs) is not None  # ours passes through

  with pytest.raises(ValueError, match="provided together"):
    as_observation({**d, "tokenized_prompt_mask": None})
  with pytest.raises(ValueError, match="missing cameras"):
    as_observation({**d, "image": {IMAGE_KEYS[0]: d["image"][IMAGE_KEYS[0]]}})
  with pytest.raises(TypeError, match="expected an Observation"):
    as_observation([1, 2])
  with pytest.raises(ValueError, match="state"):
    as_observation({**d, "state": d["state"][:, :5]}, policy.cfg)


def test_sample_actions_takes_openpi_forms_and_signature():
  """Policy.sample_actions (jitted) takes openpi's dict / Observation; OpenpiModel has openpi's
  argument order; all give the actions of our own Observation with float images."""
  policy = get_policy("pi0", "demo")
  params = demo_params("pi0")
  d = _uint8_obs(policy, 1, 2)
  obj = OpenpiLikeObservation(images=d["image"], image_masks=d["image_mask"], state=d["state"],
                              tokenized_prompt=d["tokenized_prompt"],
                              tokenized_prompt_mask=d["tokenized_prompt_mask"])
  model = OpenpiModel(policy, params)
  assert (model.action_horizon, model.action_dim, model.max_token_len) == (50, 32, 16)
  rng = jax.random.key(5)
  noise = jax.random.normal(rng, (2, policy.cfg.action_horizon, policy.cfg.action_dim))
  want = np.asarray(model.sample_actions(rng, as_observation(d), num_steps=4, noise=noise))
  got = model.sample_actions(rng, obj, num_steps=4, noise=noise)
  np.testing.assert_array_equal(np.asarray(got), want)
  # Inside jit, uint8 images converted there, noise drawn from rng as sample_actions draws it. The
  # conversion rounds differently inside the program than outside it: float32 noise only.
  jitted = jax.jit(policy.sample_actions, static_argnums=3)(params, d, rng, 4)
  np.testing.assert_allclose(np.asarray(jitted), want, atol=1e-4)
  assert np.abs(want).max() > 0.1


def _openpi_client_style_packb(obj):
  """The wire format as openpi-client writes it (its documented map keys), independently coded."""
  def default(o):
    if isinstance(o, np.ndarray):
      return {b"__ndarray__": True, b"data": o.tobytes(), b"dtype": o.dtype.str, b"shape": o.shape}
    if isinstance(o, np.generic):
      return {b"__npgeneric__": True, b"data": o.item(), b"dtype": o.dtype.str}
    return o
  return msgpack.packb(obj, default=default)


@pytest.mark.parametrize("dtype", ["uint8", "int32", "int64", "float32", "float64", "bool",
                                   "float16"])
def test_codec_roundtrip(dtype):
  x = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
  tree = {"a": x, "nested": {"s": np.float32(2.5), "list": [1, "two", x[0, ::2]]}, "t": "text",
          "empty": np.zeros((0, 3), dtype)}
  for wire in (packb(tree), _openpi_client_style_packb(tree)):
    back = unpackb(wire)
    np.testing.assert_array_equal(back["a"], x)
    assert back["a"].dtype == x.dtype and back["empty"].shape == (0, 3)
    assert back["nested"]["s"] == np.float32(2.5) and isinstance(back["nested"]["s"], np.float32)
    np.testing.assert_array_equal(back["nested"]["list"][2], x[0, ::2])
    assert back["t"] == "text"


def test_codec_refuses_bad_input():
  with pytest.raises(TypeError):
    packb({"x": np.array([object()])})
  for data, msg in [
      (b"\xc1garbage", "not a msgpack"),
      (packb({"x": np.zeros(4)})[:-3], "not a msgpack"),
      (msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O",
                      b"shape": [1]}), "not accepted"),
      (msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4",
                      b"shape": [2]}), "needs 8 bytes"),
      (msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "<f4",
                      b"shape": [-1]}), "non-negative"),
      (msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "nonsense",
                      b"shape": [0]}), "dtype"),
  ]:
    with pytest.raises(RequestError, match=msg):
      unpackb(data)


def _stats_json(tmp_path, **keys):
  body = {"norm_stats": {k: {f: np.asarray(v).tolist() for f, v in s.items()}
                         for k, s in keys.items()}}
  d = tmp_path / "assets" / "org" / "robot"
  d.mkdir(parents=True)
  (d / "norm_stats.json").write_text(json.dumps(body))
  return d / "norm_stats.json"


def test_norm_stats_file_and_formulas(tmp_path):
  rng = np.random.default_rng(0)
  mean, std = rng.normal(size=5), rng.uniform(0.5, 2, size=5)
  q01, q99 = mean - 2 * std, mean + 2 * std
  path = _stats_json(tmp_path, state=dict(mean=mean, std=std, q01=q01, q99=q99),
                     actions=dict(mean=mean[:3], std=std[:3]))
  assert find_norm_stats(tmp_path) == path
  stats = load_norm_stats(tmp_path / "assets" / "org" / "robot")
  assert sorted(stats) == ["actions", "state"] and stats["actions"].q01 is None
  x = rng.normal(size=(2, 4)).astype(np.float32)
  s = stats["state"]
  np.testing.assert_allclose(normalize(x, s, quantile=False), (x - mean[:4]) / (std[:4] + 1e-6),
                             rtol=1e-5)
  np.testing.assert_allclose(normalize(x, s, quantile=True),
                             (x - q01[:4]) / (q99[:4] - q01[:4] + 1e-6) * 2 - 1, rtol=1e-5)
  for quantile in (False, True):
    np.testing.assert_allclose(unnormalize(normalize(x, s, quantile=quantile), s, quantile=quantile),
                               x, atol=1e-5)
  wide = rng.normal(size=(2, 6)).astype(np.float32)  # wider than the stats: mean 0, std 1
  np.testing.assert_allclose(unnormalize(wide, stats["actions"], quantile=False)[:, 3:],
                             wide[:, 3:] * (1 + 1e-6), rtol=1e-7)
  with pytest.raises(ValueError, match="q01"):
    normalize(x[:, :3], stats["actions"], quantile=True)
  padded = np.concatenate([x, np.zeros((2, 3), np.float32)], axis=1)  # wider: the tail passes
  np.testing.assert_array_equal(normalize(padded, s, quantile=True)[:, :4],
                                normalize(x, s, quantile=True))
  np.testing.assert_array_equal(normalize(padded, s, quantile=True)[:, 5:], 0)
  (path.parent / "norm_stats.json").write_text('{"norm_stats": {"state": {"mean": [1, 2], '
                                              '"std": [1]}}}')
  with pytest.raises(ValueError, match="state/std"):
    load_norm_stats(path)
  with pytest.raises(FileNotFoundError):
    load_norm_stats(tmp_path / "nothing")


@pytest.mark.parametrize("shape", [(30, 40), (80, 20), (56, 56), (5, 200)])
def test_resize_with_pad_geometry(shape):
  """Aspect ratio kept, centred on black; a constant image stays constant inside its box."""
  h, w = shape
  out = resize_with_pad(np.full((h, w, 3), 200, np.uint8), 56)
  assert out.shape == (56, 56, 3) and out.dtype == np.uint8
  rows, cols = np.nonzero(out[..., 0])
  nh, nw = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
  assert max(nh, nw) == 56 and abs(nh / nw - h / w) <= 2 / min(nh, nw) + 1e-9
  assert abs(rows.min() - (56 - rows.max() - 1)) <= 1 and abs(cols.min() - (56 - cols.max() - 1)) <= 1
  assert (out[rows.min():rows.max() + 1, cols.min():cols.max() + 1] == 200).all()


def test_tokenizer_formats(tmp_path):
  import sentencepiece as spm
  path = tiny_tokenizer_file(tmp_path / "tok.model")
  sp = spm.SentencePieceProcessor(model_file=path)
  tok = PaligemmaTokenizer(path, max_len=24)
  tokens, mask = tok.tokenize(" open_the top\ndrawer ")
  want = sp.encode("open the top drawer", add_bos=True) + sp.encode("\n")
  assert tokens.dtype == np.int32 and tokens[0] == 2
  np.testing.assert_array_equal(tokens[:len(want)], want)
  assert mask.sum() == len(want) and not tokens[len(want):].any()
  state = np.array([-1.0, 0.0, 0.999, 2.0])
  tokens, mask = tok.tokenize("open the top drawer", state)
  want = sp.encode("Task: open the top drawer, State: 0 128 255 255;\nAction: ", add_bos=True)
  np.testing.assert_array_equal(tokens[:mask.sum()], want[:24])
  with pytest.raises(ValueError, match="SentencePiece"):
    PaligemmaTokenizer(__file__, 8)


def test_request_adapter_paths_and_errors(tmp_path):
  policy = get_policy("pi05", "demo")
  c = policy.cfg
  path = tiny_tokenizer_file(tmp_path / "tok.model")
  stats = {"state": NormStats(mean=np.ones(6, np.float32), std=np.full(6, 2, np.float32),
                              q01=np.zeros(6, np.float32), q99=np.full(6, 4, np.float32)),
           "actions": NormStats(mean=np.zeros(7, np.float32), std=np.ones(7, np.float32),
                                q01=np.full(7, -2, np.float32), q99=np.full(7, 2, np.float32))}
  adapter = RequestAdapter(cfg=c, norm_stats=stats, quantile=True,
                           tokenizer=PaligemmaTokenizer(path, c.max_token_len), action_dims=7)
  size = c.vision.image_size
  request = {"image": {k: np.full((size, size, 3), 255, np.uint8) for k in IMAGE_KEYS},
             "image_mask": {IMAGE_KEYS[2]: np.False_}, "state": np.full((6,), 2.0, np.float32),
             "prompt": "open the top drawer"}
  obs, ctx = adapter.to_model(request)
  assert obs.state.shape == (1, c.action_dim) and obs.images[IMAGE_KEYS[0]].max() == 1.0
  np.testing.assert_allclose(obs.state[0, :6], 0.0, atol=1e-5)  # (2 - 0) / 4 * 2 - 1
  assert not obs.state[0, 6:].any()
  np.testing.assert_array_equal([m[0] for m in obs.image_masks.values()], [True, True, False])
  want, _ = adapter.tokenizer.tokenize("open the top drawer", obs.state[0, :6])  # pi0.5 form
  np.testing.assert_array_equal(obs.tokenized_prompt[0], want)
  reply = adapter.from_model(np.zeros((1, c.action_horizon, c.action_dim), np.float32), ctx)
  assert reply["actions"].shape == (c.action_horizon, 7)
  np.testing.assert_allclose(reply["actions"], 0.0, atol=1e-5)  # (0 + 1) / 2 * 4 - 2

  bad = [({**request, "state": np.zeros(40)}, "at most 32"),
         ({**request, "state": "x"}, "expected an array"),
         ({**request, "image": {}}, "missing camera"),
         ({**request, "image": {k: np.zeros((3, 3, 3), np.float32) for k in IMAGE_KEYS}}, "expected"),
         ({**request, "image": {k: np.zeros((9, 9, 4), np.uint8) for k in IMAGE_KEYS}}, "expected"),
         ({k: v for k, v in request.items() if k != "prompt"}, "needs 'prompt'"),
         ({**request, "prompt": 5}, "expected a string"),
         ({**request, "tokenized_prompt": np.zeros(3, np.int32)}, "together"),
         ({**request, "noise": np.zeros(3)}, "noise"),
         ([1, 2], "expected a dict")]
  for req, msg in bad:
    with pytest.raises(RequestError, match=msg):
      adapter.to_model(req)
  batched = {**request, "image": {k: np.stack([v, v]) for k, v in request["image"].items()},
             "image_mask": {}, "state": np.zeros((2, 6), np.float32), "prompt": ["a", "b"]}
  obs, ctx = adapter.to_model(batched)
  assert obs.state.shape == (2, c.action_dim) and obs.tokenized_prompt.shape == (2, c.max_token_len)
  reply = adapter.from_model(np.zeros((2, c.action_horizon, c.action_dim), np.float32), ctx)
  assert reply["actions"].shape == (2, c.action_horizon, 7)
  plain = dataclasses.replace(adapter, discrete_state=False)  # openpi's pi05_libero: pi0's form
  want, _ = adapter.tokenizer.tokenize("open the top drawer")
  np.testing.assert_array_equal(plain.to_model(request)[0].tokenized_prompt[0], want)
  no_tok = dataclasses.replace(adapter, tokenizer=None)
  with pytest.raises(RequestError, match="no tokenizer"):
    no_tok.to_model(request)
