"""`duquant-jax serve` end to end with openpi's real client package (openpi-client).

openpi-client pins numpy < 2, so it lives in its own virtual environment: .ci/run creates
`.venv-client` and exports DUQUANT_CLIENT_PYTHON; tests/openpi_client_roundtrip.py runs under that
python against a server on localhost, serving a packed demo checkpoint saved here.
"""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest

from conftest import demo_params
from test_openpi_io import tiny_tokenizer_file
from duquant_jax import checkpoint as ck
from duquant_jax import openpi_checkpoint as oc
from duquant_jax.calib_data import load_recordings
from duquant_jax.cli import main
from duquant_jax.cli.serve import build_runner
from duquant_jax.config import get_preset
from duquant_jax.models import IMAGE_KEYS, Observation, get_policy
from duquant_jax.quantize import quantize_params
from duquant_jax.runtime import PackedRuntime
from duquant_jax.serve import ServeConfig, start_in_thread

REPO = pathlib.Path(__file__).resolve().parents[1]
CLIENT_SCRIPT = REPO / "tests" / "openpi_client_roundtrip.py"
KEY = "secret-key"
MAX_MB = 1.0
STATE_DIMS, ACTION_DIMS = 8, 7

_client_python = os.environ.get("DUQUANT_CLIENT_PYTHON")
needs_client = pytest.mark.skipif(
    not _client_python,
    reason="DUQUANT_CLIENT_PYTHON is unset: these tests need a python with openpi-client installed "
           "(python3 -m venv .venv-client && .venv-client/bin/pip install openpi-client "
           "typing_extensions; .ci/run does this)")


def _client_python_path() -> str:
  p = pathlib.Path(_client_python)
  p = p if p.is_absolute() else REPO / p
  assert p.exists(), f"DUQUANT_CLIENT_PYTHON={_client_python} does not exist"
  return str(p)


def run_client(port, requests_file, out_file, scenarios, api_key=None, timeout=180):
  cmd = [_client_python_path(), str(CLIENT_SCRIPT), "--port", str(port), "--requests",
         str(requests_file), "--out", str(out_file), "--scenarios", scenarios,
         "--max-message-mb", str(MAX_MB)]
  if api_key:
    cmd += ["--api-key", api_key]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(pathlib.Path(out_file).read_text())


def write_requests(path, requests):
  flat = {}
  for i, r in enumerate(requests):
    for k, v in r.items():
      if isinstance(v, dict):
        flat.update({f"{i}/{k}/{cam}": np.asarray(x) for cam, x in v.items()})
      else:
        flat[f"{i}/{k}"] = np.asarray(v)
  np.savez(path, **flat)


def make_requests(policy, seed):
  """Three unbatched openpi-style requests: a prompt + uint8 images; tokens + float images with a
  camera masked out; a prompt without noise (the server draws it)."""
  c = policy.cfg
  rng = np.random.default_rng(seed)
  size = c.vision.image_size

  def noise():
    return rng.standard_normal((c.action_horizon, c.action_dim)).astype(np.float32)

  def uint8_images():
    return {k: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for k in IMAGE_KEYS}

  tokens = np.zeros((c.max_token_len,), np.int32)
  tokens[:6] = [2, 17, 30, 44, 9, 61]
  return [
      {"image": uint8_images(), "state": rng.normal(size=STATE_DIMS).astype(np.float32),
       "prompt": "pick up the red block", "noise": noise()},
      {"image": {k: rng.uniform(-1, 1, (size, size, 3)).astype(np.float32) for k in IMAGE_KEYS},
       "image_mask": {IMAGE_KEYS[2]: np.False_},
       "state": rng.normal(size=STATE_DIMS).astype(np.float32), "tokenized_prompt": tokens,
       "tokenized_prompt_mask": np.arange(c.max_token_len) < 6, "noise": noise()},
      {"image": uint8_images(), "state": rng.normal(size=STATE_DIMS).astype(np.float32),
       "prompt": "open the top drawer"},
  ]


def norm_stats(seed=0):
  rng = np.random.default_rng(seed)
  return {"state": {"mean": rng.normal(size=STATE_DIMS), "std": rng.uniform(0.5, 2, STATE_DIMS)},
          "actions": {"mean": rng.normal(size=ACTION_DIMS),
                      "std": rng.uniform(0.5, 2, ACTION_DIMS)}}


def write_norm_stats(directory, stats):
  body = {"norm_stats": {k: {f: np.asarray(v).tolist() for f, v in s.items()}
                         for k, s in stats.items()}}
  (pathlib.Path(directory) / "norm_stats.json").write_text(json.dumps(body))


def model_inputs(policy, request, stats, sp=None):
  """The model-level observation of one request, computed here by openpi's formulas (z-score)."""
  c = policy.cfg
  images = {k: (v.astype(np.float32) / 255.0 * 2.0 - 1.0 if v.dtype == np.uint8 else v)[None]
            for k, v in request["image"].items()}
  masks = {k: np.array([bool(request.get("image_mask", {}).get(k, True))]) for k in IMAGE_KEYS}
  mean, std = (np.asarray(stats["state"][f], np.float32) for f in ("mean", "std"))
  state = np.zeros((1, c.action_dim), np.float32)
  state[0, :STATE_DIMS] = (request["state"] - mean) / (std + np.float32(1e-6))
  if "prompt" in request:
    ids = sp.encode(request["prompt"], add_bos=True) + sp.encode("\n")
    tokens = np.zeros((c.max_token_len,), np.int32)
    tokens[:len(ids)] = ids
    mask = np.arange(c.max_token_len) < len(ids)
  else:
    tokens, mask = request["tokenized_prompt"], request["tokenized_prompt_mask"]
  return Observation(images=images, image_masks=masks, state=state, tokenized_prompt=tokens[None],
                     tokenized_prompt_mask=mask[None])


def expected_actions(sample, packed, policy, request, stats, sp=None):
  obs = model_inputs(policy, request, stats, sp)
  actions = np.array(sample(packed, obs, request["noise"][None]))[0]
  mean, std = (np.asarray(stats["actions"][f], np.float32) for f in ("mean", "std"))
  actions[:, :ACTION_DIMS] = actions[:, :ACTION_DIMS] * (std + np.float32(1e-6)) + mean
  actions[:, ACTION_DIMS:] *= np.float32(1 + 1e-6)  # openpi pads mean 0, std 1
  return actions


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
  """A packed demo pi0 checkpoint (openpi-style norm stats beside it) and its packed tree."""
  root = tmp_path_factory.mktemp("serve")
  policy = get_policy("pi0", "demo", runtime=PackedRuntime())
  cfg = get_preset("w4a8-rtn")
  packed = quantize_params(demo_params("pi0"), cfg)
  path = ck.save_packed(root / "packed", packed, cfg, metadata={"model": "pi0", "size": "demo"})
  stats = norm_stats()
  write_norm_stats(path, stats)
  sample = jax.jit(lambda p, o, n: policy.sample_actions(p, o, jax.random.key(0), 10, noise=n))
  return root, path, policy, packed, stats, sample


@pytest.fixture(scope="module")
def session(demo_ckpt):
  """One in-process server (API key, norm stats, tokenizer), one client run of every scenario."""
  import sentencepiece as spm
  root, path, policy, packed, stats, sample = demo_ckpt
  tok = tiny_tokenizer_file(root / "tok.model")
  runner = build_runner(str(path), tokenizer=tok)
  active, seen = [0], []
  infer = runner.infer

  def watched(request, **kw):  # concurrency probe: how many model calls overlap
    active[0] += 1
    seen.append(active[0])
    try:
      time.sleep(0.02)
      return infer(request, **kw)
    finally:
      active[0] -= 1

  runner.infer = watched
  server = start_in_thread(runner, ServeConfig(port=0, api_key=KEY,
                                               max_message_bytes=int(MAX_MB * (1 << 20))))
  requests = make_requests(policy, 0)
  write_requests(root / "requests.npz", requests)
  try:
    out = run_client(server.port, root / "requests.npz", root / "out.json",
                     "roundtrip,bad,concurrent,auth,resize", api_key=KEY)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
      out["healthz"] = r.status
  finally:
    server.close()
  sp = spm.SentencePieceProcessor(model_file=tok)
  want = [expected_actions(sample, packed, policy, r, stats, sp) if "noise" in r else None
          for r in requests]
  return out, want, seen


@needs_client
def test_roundtrip_matches_in_process_policy(session):
  out, want, _ = session
  results = out["roundtrip"]["results"]
  assert all("error" not in r for r in results), results
  for got, w in zip(results, want):
    got = np.asarray(got["actions"], np.float32)
    assert got.shape == (50, 32)
    if w is not None:  # norm stats applied both ways, prompt tokenised, same numbers
      np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
  assert not np.allclose(results[0]["actions"], results[2]["actions"])
  assert set(results[0]["server_timing"]) >= {"infer_ms"}
  assert "prev_total_ms" in results[1]["server_timing"]
  assert results[0]["policy_timing"]["infer_ms"] > 0


@needs_client
def test_metadata_on_connect(session):
  meta = session[0]["roundtrip"]["metadata"]
  assert meta["server"] == "duquant-jax" and meta["model"] == "pi0" and meta["size"] == "demo"
  assert (meta["action_horizon"], meta["action_dim"], meta["max_token_len"]) == (50, 32, 16)
  assert meta["image_keys"] == list(IMAGE_KEYS) and meta["image_resolution"] == [56, 56]
  assert meta["norm_stats"] == ["actions", "state"] and meta["norm_mode"] == "z-score"
  assert meta["tokenizer"] is True and meta["preset"] == "w4a8-rtn"


@needs_client
def test_api_key_is_required(session):
  assert session[0]["healthz"] == 200  # health checks need no key
  auth = session[0]["auth"]
  for case in ("wrong_key", "no_key"):
    assert auth[case] != "connected" and "401" in auth[case], auth


@needs_client
def test_bad_requests_get_errors_and_serving_goes_on(session):
  bad = session[0]["bad"]
  for case, msg in [("garbage", "not a msgpack"), ("truncated", "not a msgpack"),
                    ("text", "text frame"), ("not_a_dict", "expected a dict"),
                    ("wrong_state", "at most 32"), ("wrong_image", "(56, 56, 3) float"),
                    ("no_prompt", "needs 'prompt'"), ("oversized", "over the server's limit")]:
    assert msg in bad[case].get("error", ""), (case, bad[case])
  np.testing.assert_allclose(bad["good_after"]["actions"], session[1][0], rtol=1e-5, atol=1e-5)


@needs_client
def test_raw_frames_are_resized_as_openpi_does(session):
  resize = session[0]["resize"]
  assert "error" not in resize["raw"] and "error" not in resize["resized"], resize
  np.testing.assert_array_equal(resize["raw"]["actions"], resize["resized"]["actions"])


@needs_client
def test_concurrent_clients_are_serialised(session):
  out, want, seen = session
  for slot, results in enumerate(out["concurrent"]):
    assert len(results) == 3, results
    for r in results:
      np.testing.assert_allclose(r["actions"], want[slot], rtol=1e-5, atol=1e-5)
  assert max(seen) == 1 and len(seen) >= 6  # never two model calls at once


def test_unknown_attention_is_one_clear_error(demo_ckpt):
  with pytest.raises(ValueError, match="attention must be one of"):
    build_runner(str(demo_ckpt[1]), attention="flash")


@needs_client
def test_cli_serve_record_then_calibrate_on_recordings(demo_ckpt, tmp_path, capsys):
  """`duquant-jax serve --record` as a process, an unchanged client, then `convert --calib-from`
  (with the attention kernel asked for: the einsum form off CUDA, so the same actions)."""
  root, path, policy, packed, stats, sample = demo_ckpt
  rec, cache = tmp_path / "rec", tmp_path / "xla_cache"
  log = open(tmp_path / "server.log", "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "duquant_jax.cli", "serve", str(path), "--port", "0", "--record",
       str(rec), "--unroll-layers", "--attention", "pallas", "--compile-cache", str(cache)],
      stdout=subprocess.PIPE, stderr=log, text=True,
      env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"))
  try:
    port, lines = None, []
    deadline = time.time() + 120
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    while port is None and time.time() < deadline and proc.poll() is None:
      for line in list(lines):
        if line.startswith("serving on ws://"):
          port = int(line.strip().rsplit(":", 1)[1].split()[0])
      time.sleep(0.1)
    assert port is not None, (lines, (tmp_path / "server.log").read_text()[-2000:])
    requests = make_requests(policy, 1)[1:2] * 2 + make_requests(policy, 2)[1:2]
    write_requests(tmp_path / "requests.npz", requests)
    out = run_client(port, tmp_path / "requests.npz", tmp_path / "out.json", "roundtrip")
  finally:
    proc.terminate()
    proc.wait(30)
    log.close()
  results = out["roundtrip"]["results"]
  assert all("error" not in r for r in results), results
  np.testing.assert_allclose(results[0]["actions"],
                             expected_actions(sample, packed, policy, requests[0], stats),
                             rtol=1e-5, atol=1e-5)

  assert any(cache.iterdir())  # the compiled policy, for the next start
  assert len(list(rec.glob("obs_*.npz"))) == 3  # the warm-up is not recorded
  batches = load_recordings(rec, policy.cfg, batch_size=2)
  assert batches.state.shape == (1, 2, 32)  # 3 observations: one batch of 2
  want = model_inputs(policy, requests[0], stats)
  for k in IMAGE_KEYS:
    np.testing.assert_array_equal(batches.images[k][0, 0], want.images[k][0])
    np.testing.assert_array_equal(batches.image_masks[k][0, 0], want.image_masks[k][0])
  np.testing.assert_allclose(batches.state[0, 0], want.state[0], atol=1e-6)
  np.testing.assert_array_equal(batches.tokenized_prompt[0, 1], want.tokenized_prompt[0])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no recorded observations"):
    load_recordings(tmp_path / "empty", policy.cfg)

  fp = tmp_path / "fp"
  oc.save_openpi_params(fp, demo_params("pi0"))
  with pytest.raises(SystemExit) as e:
    main([str(a) for a in ["convert", fp, tmp_path / "q", "--preset", "w4a8-rtn", "--calib-from",
                           rec, "--batch-size", "2"]])
  captured = capsys.readouterr()
  assert e.value.code in (0, None), captured.err
  assert ck.read_info(tmp_path / "q")["metadata"]["calibration"] == f"recordings {rec}"
  assert ck.read_info(tmp_path / "q")["has_stats"]


def test_cli_serve_refusals(demo_ckpt, tmp_path, capsys):
  """Failures before serving are one `error:` line, exit code 2 (no client needed)."""
  path = demo_ckpt[1]
  for args, msg in [([tmp_path / "nothing"], "no such"),
                    ([path, "--tokenizer", tmp_path / "nothing.model"], "no such SentencePiece"),
                    ([path, "--norm-stats", tmp_path / "nothing.json"], "no such norm stats"),
                    ([path, "--norm-mode", "minmax"], "--norm-mode"),
                    ([path, "--norm-mode", "quantile"], "q01")]:
    with pytest.raises(SystemExit) as e:
      main(["serve", *map(str, args), "--port", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and msg in err, (args, err)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,unrolled", [([], True), (["--scan-layers"], False)])
def test_cli_serve_unrolls_the_layers_unless_asked_to_scan(monkeypatch, tmp_path, flags, unrolled):
  """`serve` builds an unrolled policy by default (its latency, BENCHMARKS.md), a scanned one on
  `--scan-layers`."""
  from duquant_jax.cli import serve as serve_cli
  seen = {}

  def fake_build_runner(ckpt, **kwargs):
    seen.update(kwargs)
    raise ValueError("stop before compiling")

  monkeypatch.setattr(serve_cli, "build_runner", fake_build_runner)
  with pytest.raises(SystemExit) as e:
    main(["serve", str(tmp_path), "--port", "0", *flags])
  assert e.value.code == 2 and seen["unroll_layers"] is unrolled
