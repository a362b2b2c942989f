"""Packed checkpoints (save_packed / load_packed), openpi float checkpoints, and the CLI commands."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import demo_params, run_cli
from duquant_jax import checkpoint as ck
from duquant_jax import openpi_checkpoint as oc
from duquant_jax.calibrate import CalibConfig, calibrate
from duquant_jax.config import LayerRule, QuantConfig, get_preset
from duquant_jax.models import get_policy
from duquant_jax.quantize import quantize_params
from duquant_jax.runtime import PackedRuntime

CREATED = "2025-01-01T00:00:00+00:00"
MLP = r"PaliGemma/llm/layers/mlp/(gating_einsum|linear)"
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rtn():
  policy = get_policy("pi0", "demo", runtime=PackedRuntime())
  cfg = get_preset("w4a8-rtn")
  return policy, cfg, quantize_params(demo_params("pi0"), cfg)


@pytest.fixture(scope="module")
def duquant():
  """A DuQuant rule (smoothing, greedy rotations, zigzag) with stats from a 2-batch calibration."""
  policy = get_policy("pi0", "demo", runtime=PackedRuntime())
  params = demo_params("pi0")
  batches = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]),
                         policy.example_observation(jax.random.key(3), batch_size=2))
  stats = calibrate(policy, params, batches, CalibConfig(select=MLP, progress=False, num_samples=16),
                    rng=jax.random.key(4))
  cfg = QuantConfig(name="test-duquant", rules=(
      LayerRule(pattern=MLP, block_size=16, rotation_steps=4, clip_search=False),))
  return policy, cfg, stats, quantize_params(params, cfg, stats)


def _bits(x) -> np.ndarray:
  x = jnp.asarray(x)
  if x.dtype == jnp.int4:
    x = x.astype(jnp.int8)
  return np.asarray(x).reshape(-1).view(np.uint8)


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x = jnp.asarray(x)
    assert (x.dtype, x.shape) == (y.dtype, y.shape), path
    np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=str(path))


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


def test_roundtrip_bit_exact_and_same_actions(rtn, tmp_path):
  policy, cfg, packed = rtn
  ck.save_packed(tmp_path / "q", packed, cfg, metadata={"source": "test", "preset": cfg.name})
  packed2, cfg2, stats2, meta = ck.load_packed(tmp_path / "q")
  assert cfg2 == cfg and stats2 is None
  assert meta["source"] == "test" and meta["library_version"] and meta["bits"]
  _assert_same_tree(packed, packed2)
  codes = packed2["PaliGemma"]["llm"]["layers"]["mlp"]["linear"].codes
  assert codes.dtype == jnp.int4
  # q and kv read one input: the group survives the round trip (it is part of the tree structure).
  attn = packed2["PaliGemma"]["llm"]["layers"]["attn"]
  assert attn["q_einsum"]["w"].input_group is not None
  assert attn["q_einsum"]["w"].input_group == attn["kv_einsum"]["w"].input_group
  obs = policy.example_observation(jax.random.key(1), batch_size=1)
  f = jax.jit(policy.sample_actions)
  a1, a2 = f(packed, obs, jax.random.key(2)), f(packed2, obs, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))


def test_act_min_tokens_survives_the_roundtrip(rtn, tmp_path):
  _, cfg, packed = rtn
  mlp = packed["PaliGemma"]["llm"]["layers"]["mlp_1"]
  mlp["linear"] = mlp["linear"].replace(act_min_tokens=256)
  ck.save_packed(tmp_path / "q", packed, cfg)
  packed2, *_ = ck.load_packed(tmp_path / "q")
  layers = packed2["PaliGemma"]["llm"]["layers"]
  assert layers["mlp_1"]["linear"].act_min_tokens == 256
  assert layers["mlp_1"]["gating_einsum"].act_min_tokens == 0
  _assert_same_tree(packed, packed2)


def test_loads_structure_entries_with_kernel_choices(rtn, tmp_path):
  """A checkpoint whose structure names kernel choices per linear (`matmul_impl`,
  `transform_impl`: run-time choices that a packed weight does not hold) loads to the same tree."""
  _, cfg, packed = rtn
  path = ck.save_packed(tmp_path / "q", packed, cfg)
  info = json.loads((path / ck.INFO_FILE).read_text())
  linears = [d for d in info["structure"].values() if d.get("kind", "linear") == "linear"]
  assert linears
  for desc in linears:
    desc.update(matmul_impl="xla", transform_impl=None)
  (path / ck.INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
  restored, _, _, _ = ck.load_packed(path)
  _assert_same_tree(packed, restored)


def test_duquant_roundtrip_with_stats(duquant, tmp_path):
  _, cfg, stats, packed = duquant
  t = packed["PaliGemma"]["llm"]["layers"]["mlp"]["linear"].transform
  assert t is not None and t.rot1 is not None and t.perm is not None
  ck.save_packed(tmp_path / "q", packed, cfg, stats)
  packed2, cfg2, stats2, _ = ck.load_packed(tmp_path / "q")
  assert cfg2 == cfg
  _assert_same_tree(packed, packed2)
  _assert_same_tree(stats, stats2)
  assert stats2.keys() == stats.keys()


def test_same_inputs_give_byte_identical_files(duquant, tmp_path):
  _, cfg, stats, packed = duquant
  meta = {"created": CREATED}
  ck.save_packed(tmp_path / "a", packed, cfg, stats, meta)
  ck.save_packed(tmp_path / "b", packed, cfg, stats, meta)
  fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
  assert list(fa) == list(fb) and len(fa) > 10
  for name in fa:
    assert fa[name] == fb[name], name


def test_refuses_existing_and_replaces_with_force(rtn, tmp_path):
  _, cfg, packed = rtn
  ck.save_packed(tmp_path / "q", packed, cfg, metadata={"preset": "first"})
  with pytest.raises(FileExistsError, match="already exists"):
    ck.save_packed(tmp_path / "q", packed, cfg)
  ck.save_packed(tmp_path / "q", packed, cfg, metadata={"preset": "second"}, force=True)
  assert ck.load_packed(tmp_path / "q")[3]["preset"] == "second"
  assert sorted(os.listdir(tmp_path)) == ["q"]  # no temporary or old directories left


def test_interrupted_save_leaves_no_checkpoint(rtn, tmp_path):
  _, cfg, packed = rtn

  def interrupt(tmp):
    assert (tmp / ck.INFO_FILE).is_file()  # everything was written, only the rename is missing
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    ck.save_packed(tmp_path / "q", packed, cfg, _before_rename=interrupt)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_file_gives_clear_error(rtn, tmp_path, verify):
  _, cfg, packed = rtn
  ck.save_packed(tmp_path / "q", packed, cfg)
  chunk = next(p for p in sorted((tmp_path / "q/params").rglob("*"))
               if p.is_file() and "mlp.linear.codes" in p.as_posix() and not p.name.startswith("."))
  chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
  with pytest.raises(ck.CheckpointError, match="corrupt|truncated"):
    ck.load_packed(tmp_path / "q", verify=verify)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such checkpoint"):
    ck.load_packed(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ck.CheckpointError, match="not an orbax checkpoint"):
    ck.load_packed(tmp_path / "empty")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / ck.INFO_FILE).write_text('{"format": "duquant-jax/pa')
  with pytest.raises(ck.CheckpointError, match="corrupt or truncated"):
    ck.load_packed(tmp_path / "bad")


def test_openpi_params_roundtrip_and_layout_check(tmp_path):
  params = demo_params("pi0")
  oc.save_openpi_params(tmp_path / "fp", params)
  assert (tmp_path / "fp" / "params" / "_METADATA").is_file()
  for where in (tmp_path / "fp", tmp_path / "fp" / "params"):
    restored = oc.load_openpi_params(where, get_policy("pi0", "demo"))
    _assert_same_tree(jax.tree.map(jnp.asarray, params), restored)
  bf16 = oc.load_openpi_params(tmp_path / "fp", dtype=jnp.bfloat16)
  assert bf16["PaliGemma"]["llm"]["layers"]["mlp"]["linear"].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"does not match the model layout: PaliGemma/\S+: expected "
                                       r"shape \(.*\), got \(.*\)|is missing|unexpected"):
    oc.load_openpi_params(tmp_path / "fp", get_policy("pi0", "dummy"))
  with pytest.raises(ck.CheckpointError, match="float \\(openpi\\) checkpoint"):
    ck.load_packed(tmp_path / "fp")


def test_cli_end_to_end(tmp_path, capsys):
  fp, q = tmp_path / "fp", tmp_path / "q"
  code, out, _ = run_cli(["export-demo-fp", fp, "--model", "pi0"], capsys)
  assert code == 0 and (fp / "params").is_dir()
  code, out, err = run_cli(["convert", fp, q, "--preset", "w4a8-rtn"], capsys)
  assert code == 0, err
  assert "layers per rule" in out and "packed" in out and "time:" in out
  code, out, _ = run_cli(["inspect", q, "--json"], capsys)
  assert code == 0
  info = json.loads(out)
  assert info["verified"] and info["preset"] == "w4a8-rtn" and set(info["bits"].values()) == {4}
  assert info["bytes_packed"] < info["bytes_fp_bf16"]
  packed, cfg, _, _ = ck.load_packed(q)
  assert cfg == get_preset("w4a8-rtn")

  # Refusals: one 'error:' line, exit code 2, no traceback.
  for args, msg in [
      (["convert", fp, q, "--preset", "w4a8-rtn"], "already exists"),
      (["convert", fp, tmp_path / "x", "--preset", "nope"], "unknown preset"),
      (["convert", fp, tmp_path / "x", "--preset", "w4a8-rtn", "--rounding", "up"], "--rounding"),
      (["convert", tmp_path / "nothing", tmp_path / "x", "--preset", "w4a8-rtn"], "no such"),
      (["convert", fp, tmp_path / "x", "--preset", "w4a8-rtn", "--size", "dummy"], "layout"),
      (["inspect", fp], "not a duquant-jax packed one"),
      (["inspect", tmp_path / "nothing"], "no such checkpoint"),
      (["export-demo-fp", fp], "already exists"),
  ]:
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.startswith("error: ") and msg in err, (args, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "x").exists()

  chunk = next(p for p in sorted((q / "params").rglob("*"))
               if p.is_file() and "codes" in p.as_posix() and not p.name.startswith("."))
  chunk.write_bytes(chunk.read_bytes()[:-3])
  code, _, err = run_cli(["inspect", q], capsys)
  assert code == 2 and "truncated" in err
  code, _, _ = run_cli(["inspect", q, "--quick"], capsys)
  assert code == 0


def test_killed_conversion_leaves_dst_absent(tmp_path):
  fp, q = tmp_path / "fp", tmp_path / "q"
  oc.save_openpi_params(fp, demo_params("pi0"))
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen([sys.executable, "-m", "duquant_jax.cli", "convert", str(fp), str(q),
                           "--preset", "w4a8-rtn"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  try:
    while time.time() < deadline and proc.poll() is None:  # kill it while it writes
      if any(p.name.startswith(".q.tmp-") for p in tmp_path.iterdir()):
        break
      time.sleep(0.005)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert any(p.name.startswith(".q.tmp-") for p in tmp_path.iterdir()), "not killed mid-write"
  assert not q.exists()
