"""openpi checkpoints as users have them: training state, LoRA, bf16, inferred size, damaged files,
and the streamed conversion (demo-size trees)."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import demo_params, run_cli
from duquant_jax import checkpoint as ck
from duquant_jax import openpi_checkpoint as oc
from duquant_jax.config import LayerRule, QuantConfig, get_preset
from duquant_jax.lora import LoraSpec, merge_lora
from duquant_jax.models import get_policy
from duquant_jax.quantize import quantize_params
from duquant_jax.lab.synthetic_stats import synthetic_stats
from test_lora import _add_lora

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bf16(tree):
  return jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), tree)


def _leaves_equal(a, b):
  fa, fb = dict(oc.flat_items(a)), dict(oc.flat_items(b))
  assert sorted(fa) == sorted(fb)
  for p in fa:
    x, y = jnp.asarray(fa[p]), jnp.asarray(fb[p])
    assert (x.dtype, x.shape) == (y.dtype, y.shape), p
    if x.dtype == jnp.int4:
      x, y = x.astype(jnp.int8), y.astype(jnp.int8)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


@pytest.fixture(scope="module")
def bf16_ckpts(tmp_path_factory):
  """A released-style and a training-state checkpoint of the bf16 demo pi0 (and a pi0.5)."""
  root = tmp_path_factory.mktemp("openpi")
  params = _bf16(demo_params("pi0"))
  oc.save_openpi_params(root / "plain", params)
  oc.save_openpi_params(root / "run" / "1000", params, as_state=True)
  oc.save_openpi_params(root / "run" / "200", _bf16(demo_params("pi0", seed=1)), as_state=True)
  oc.save_openpi_params(root / "pi05", _bf16(demo_params("pi05")), as_state=True)
  return root, params


MLP_RULE = LayerRule(pattern=r"PaliGemma/llm/layers/mlp/(gating_einsum|linear)", block_size=16,
                     rotation_steps=4)


@pytest.fixture(scope="module")
def mlp_pack(bf16_ckpts):
  """DuQuant on the LLM MLP (smoothing folded into the norm, greedy rotations, clip search) with
  synthetic stats, packed in memory: what every streamed conversion below must equal."""
  _, params = bf16_ckpts
  cfg = QuantConfig(name="t", rules=(MLP_RULE,))
  stats = synthetic_stats(params, MLP_RULE.pattern, rows=16)
  return cfg, stats, quantize_params(jax.tree.map(jnp.asarray, params), cfg, stats)


def test_training_state_unwrapped_dtype_kept_size_inferred(bf16_ckpts):
  root, params = bf16_ckpts
  plain = oc.load_openpi_params(root / "plain")
  state = oc.load_openpi_params(root / "run" / "1000", get_policy("pi0", "demo"))
  _leaves_equal(plain, params)
  _leaves_equal(state, params)  # unwrapped, bf16 kept (dtype=None)
  # A training run: its highest step.
  _leaves_equal(oc.load_openpi_params(root / "run"), params)
  assert oc.load_openpi_params(root / "plain", dtype=jnp.float32)["PaliGemma"]["llm"]["layers"][
      "mlp"]["linear"].dtype == jnp.float32
  info = oc.open_openpi(root / "run" / "1000")
  assert (info.model, info.size, info.wrapped, info.lora) == ("pi0", "demo", True, {})
  assert (oc.open_openpi(root / "pi05").model, oc.open_openpi(root / "pi05").size) == ("pi05", "demo")


def test_layout_mismatch_is_named(bf16_ckpts):
  root, _ = bf16_ckpts
  with pytest.raises(ValueError, match=r"does not match the model layout"):
    oc.load_openpi_params(root / "plain", get_policy("pi05", "demo"))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), demo_params("pi0"))
  del shapes["PaliGemma"]["llm"]["layers"]["mlp"]["linear"]
  with pytest.raises(ValueError, match=r"mlp/linear is missing"):
    oc.infer_model(shapes)


def test_streamed_conversion_equals_in_memory_pack(bf16_ckpts, mlp_pack, tmp_path):
  """convert_checkpoint (lazy leaves, one weight read at a time) writes exactly what
  quantize_params gives on the loaded tree; float leaves stay bf16."""
  root, _ = bf16_ckpts
  cfg, stats, want = mlp_pack
  oc.convert_checkpoint(root / "run" / "1000", tmp_path / "q", cfg, stats, save_stats=False)
  packed, _, _, meta = ck.load_packed(tmp_path / "q")
  from duquant_jax.checkpoint import _split_packed
  _leaves_equal(_split_packed(packed)[0], _split_packed(want)[0])
  assert packed["PaliGemma"]["img"]["embedding"]["kernel"].dtype == jnp.bfloat16
  assert (meta["model"], meta["size"], meta["training_state"]) == ("pi0", "demo", True)
  with pytest.raises(FileExistsError, match="already exists"):
    oc.convert_checkpoint(root / "plain", tmp_path / "q", cfg, stats)


def test_cli_converts_lora_fine_tune(tmp_path, capsys):
  """A LoRA training checkpoint: merged with --lora-alpha / --lora-rslora, then quantized."""
  params = _bf16(_add_lora(demo_params("pi0")))
  oc.save_openpi_params(tmp_path / "ft", params, as_state=True)
  code, out, err = run_cli(["convert", tmp_path / "ft", tmp_path / "q", "--preset", "w4a8-rtn",
                         "--lora-alpha", "8", "--lora-rslora"], capsys)
  assert code == 0, err
  assert "pi0 demo" in out and "training state" in out and "LoRA merged into 10 weights" in out
  packed, _, _, meta = ck.load_packed(tmp_path / "q")
  assert len(meta["lora_merged"]) == 10 and meta["lora"] == {"alpha": 8.0, "rslora": True}
  want = quantize_params(merge_lora(params, LoraSpec(alpha=8.0, rslora=True)),
                         get_preset("w4a8-rtn"))
  from duquant_jax.checkpoint import _split_packed
  _leaves_equal(_split_packed(packed)[0], _split_packed(jax.tree.map(jnp.asarray, want))[0])
  # Never over an existing output unless asked; nothing half-written on failure.
  code, _, err = run_cli(["convert", tmp_path / "ft", tmp_path / "q", "--preset", "w4a8-rtn"], capsys)
  assert code == 2 and "already exists" in err and "--overwrite" in err
  code, _, err = run_cli(["convert", tmp_path / "ft", tmp_path / "q", "--preset", "w4a8-rtn",
                       "--overwrite"], capsys)
  assert code == 0, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ft", "q"]


def test_streamed_conversions_are_byte_identical(bf16_ckpts, mlp_pack, tmp_path):
  """Two conversions of one checkpoint (groups packed in a background thread while the next is
  read) write the same bytes, given the same creation time."""
  root, _ = bf16_ckpts
  cfg, stats, _ = mlp_pack
  meta = {"created": "2026-01-01T00:00:00+00:00"}
  for name in ("a", "b"):
    oc.convert_checkpoint(root / "plain", tmp_path / name, cfg, stats, metadata=meta,
                          save_stats=False)
  files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
                     if p.is_file()}
  fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
  assert list(fa) == list(fb) and len(fa) > 10
  assert [name for name in fa if fa[name] != fb[name]] == []


def test_failure_while_a_group_packs(bf16_ckpts, mlp_pack, tmp_path):
  """A bad weight found while the group before it packs in the background: the error names it,
  the packing thread is gone, and no output (or temporary) directory is left."""
  import threading
  _, params = bf16_ckpts
  cfg, stats, _ = mlp_pack
  bad = jax.tree.map(lambda x: x, params)
  gating = np.array(bad["PaliGemma"]["llm"]["layers"]["mlp"]["gating_einsum"])
  gating[2, 1, 0, 0] = np.nan  # the gate / up group packs after the down projection's
  bad["PaliGemma"]["llm"]["layers"]["mlp"]["gating_einsum"] = gating
  with pytest.raises(ValueError, match=r"mlp/gating_einsum: contains NaN"):
    quantize_params(bad, cfg, stats)
  oc.save_openpi_params(tmp_path / "fp", bad)
  with pytest.raises(ValueError, match=r"mlp/gating_einsum: contains NaN"):
    oc.convert_checkpoint(tmp_path / "fp", tmp_path / "q", cfg, stats)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["fp"]
  assert not [t for t in threading.enumerate() if t.name.startswith("duquant-pack")]


@pytest.mark.parametrize("damaged,preset", [("data", "w4a8-rtn"), ("data", "recommended"),
                                             ("metadata", "w4a8-rtn")])
def test_corrupt_file_is_one_line(bf16_ckpts, tmp_path, damaged, preset):
  """A truncated data (or metadata) file: one 'error:' line on stderr and nothing else (orbax's
  asyncio tracebacks silenced), exit code 2, no output directory. `w4a8-rtn` streams the leaves;
  `recommended` loads the whole tree to calibrate."""
  root, params = bf16_ckpts
  oc.save_openpi_params(tmp_path / "fp", params)
  store = tmp_path / "fp" / "params" / ("ocdbt.process_0/d" if damaged == "data" else "d")
  files = [p for p in store.iterdir() if p.stat().st_size > 500]
  assert files, f"no files in {store}"
  for p in files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "duquant_jax.cli", "convert", str(tmp_path / "fp"),
                         str(tmp_path / "q"), "--preset", preset, "--calib-batches", "1"], env=env,
                        capture_output=True, text=True, timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "corrupt" in lines[0], (
      proc.stderr[-2000:])
  assert not (tmp_path / "q").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]


def test_cli_streams_with_stats_from_another_run(bf16_ckpts, mlp_pack, tmp_path, capsys):
  """--stats: calibration stats from elsewhere (as `calibrate.save_stats` stores them); the
  conversion streams and equals the in-memory pack with those stats."""
  import json
  from duquant_jax import stats as st
  from duquant_jax.calibrate import CalibStats, save_stats
  root, _ = bf16_ckpts
  cfg, syn, want = mlp_pack
  layers = {}
  for path, s in syn.items():  # the synthetic stats in calibrate's own container
    empty = st.init_channel_stats(num_layers=s.absmax.shape[0], num_channels=s.absmax.shape[-1],
                                  num_samples=16, spec=st.HistSpec())
    layers[path] = empty.replace(absmax=s.absmax, samples=s.samples,
                                 sample_priority=jnp.zeros((16,)), count=jnp.asarray(16, jnp.int32))
  save_stats(tmp_path / "stats", CalibStats(layers=layers, num_batches=jnp.asarray(1, jnp.int32)))
  (tmp_path / "rules.json").write_text(json.dumps(cfg.to_dict()))
  code, out, err = run_cli(["convert", root / "plain", tmp_path / "q", "--rules", tmp_path / "rules.json",
                         "--stats", tmp_path / "stats"], capsys)
  assert code == 0, err
  assert "calibrate" not in out.split("time:")[-1]
  packed, _, got_stats, meta = ck.load_packed(tmp_path / "q")
  assert meta["calibration"].startswith("stats of") and got_stats is not None
  from duquant_jax.checkpoint import _split_packed
  _leaves_equal(_split_packed(packed)[0], _split_packed(want)[0])
  code, _, err = run_cli(["convert", root / "plain", tmp_path / "q2", "--preset", "recommended",
                       "--stats", root / "plain"], capsys)
  assert code == 2 and "not readable as calibration stats" in err and len(err.splitlines()) == 1
