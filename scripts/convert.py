"""Converts an openpi float checkpoint to a packed duquant-jax checkpoint (a thin CLI wrapper).

  PYTHONPATH=. python scripts/convert.py export-demo-fp checkpoints/demo_fp
  PYTHONPATH=. python scripts/convert.py convert checkpoints/demo_fp checkpoints/demo_w4a8 --preset recommended
  PYTHONPATH=. python scripts/convert.py inspect checkpoints/demo_w4a8

With no sub-command, `convert` is assumed: `python scripts/convert.py SRC DST --preset NAME`.
"""

import sys

from duquant_jax.cli import main

if __name__ == "__main__":
  argv = sys.argv[1:]
  if argv and argv[0] not in ("convert", "export-demo-fp", "inspect", "--help", "-h"):
    argv = ["convert", *argv]
  main(argv)
