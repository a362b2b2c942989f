"""Tests of the command line (duquant_jax.cli): its commands, their options, their errors.

The checkpoint commands are tested end to end with the checkpoints (test_checkpoint.py,
test_openpi_checkpoint.py), `serve` with the server (test_serve.py), `bench` with the script it runs
(test_pallas_transform.py).
"""

import json
import re
import subprocess
import sys

import pytest

from duquant_jax.cli import main
from duquant_jax.cli.app import COMMANDS
from duquant_jax.models import Policy, get_config
from duquant_jax.treepath import describe


def test_commands_in_help_order(capsys):
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  names = ["layout", "export-demo-fp", "convert", "inspect", "eval", "diagnose", "serve", "demo",
           "presets", "bench"]
  assert [name for name, _, _ in COMMANDS] == names
  listed = re.findall(r"^\W+ ([a-z][a-z0-9-]*)  ", out, flags=re.M)  # a table's first column
  assert listed == names


def test_python_m_runs_the_same_cli():
  proc = subprocess.run([sys.executable, "-m", "duquant_jax.cli", "layout", "--model", "pi9"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: unknown model 'pi9'") and len(proc.stderr.splitlines()) == 1


def test_cli_layout_json(capsys):
  with pytest.raises(SystemExit) as e:
    main(["layout", "--model", "pi05", "--size", "full", "--json"])
  assert e.value.code == 0
  rows = json.loads(capsys.readouterr().out)
  # The table of the model that test_models.py matches against openpi's own layout.
  want = describe(Policy(get_config("pi05", "full")).param_shapes())
  assert rows == [{"path": p, "shape": list(s), "dtype": d} for p, s, d in want]
  assert {"path": "time_mlp_in/kernel", "shape": [1024, 1024], "dtype": "float32"} in rows


def test_cli_unknown_model_is_one_clear_line(capsys):
  with pytest.raises(SystemExit) as e:
    main(["layout", "--model", "pi9"])
  assert e.value.code == 2
  assert "unknown model 'pi9'" in capsys.readouterr().err


def test_eval_command_end_to_end(tmp_path, capsys):
  js, png, md = tmp_path / "e.json", tmp_path / "d.png", tmp_path / "e.md"
  with pytest.raises(SystemExit) as e:
    main(["eval", "--model", "pi0", "--presets", "fp,w4a8-rtn", "--calib-batches", "2",
          "--episodes", "2", "--chunks", "2", "--json", str(js), "--plot", str(png),
          "--markdown", str(md), "--quiet"])
  assert e.value.code == 0
  rep = json.loads(js.read_text())
  fp, rtn = rep["results"]
  assert fp["action_err_mean"] == 0 and fp["drift_curve"] == [0.0, 0.0, 0.0]
  assert fp["exceeds_at"] is None
  assert 0.05 < rtn["action_err_mean"] < 0.6 and rtn["drift_curve"][-1] > 0
  assert len(rtn["step_err_mean"]) == 10 and len(rtn["layer_err_worst"]) == 5
  assert 0.0 < rtn["layer_err_mean"] < 0.5 and rtn["bytes_packed"] < rtn["bytes_fp"] / 3
  assert png.stat().st_size > 1000 and "| w4a8-rtn |" in md.read_text()
  assert "drift@1" in capsys.readouterr().out


def test_eval_command_bad_variant(capsys):
  with pytest.raises(SystemExit) as e:
    main(["eval", "--presets", "recommended+rot=spin"])
  assert e.value.code == 2
  assert "error:" in capsys.readouterr().err


def test_missing_matplotlib_is_one_line_before_any_work(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
  with pytest.raises(SystemExit) as e:
    main(["diagnose", "--out", str(tmp_path / "d")])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.splitlines() == ["error: plots need matplotlib: pip install 'duquant-jax[lab]'"]
  assert not (tmp_path / "d").exists()
