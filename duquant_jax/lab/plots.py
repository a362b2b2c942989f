"""matplotlib for the harness's figures, which is the optional `lab` extra of the package."""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "plots need matplotlib: pip install 'duquant-jax[lab]'"


def pyplot() -> Any:
  """`matplotlib.pyplot` on the Agg backend (PNG files, no display).

  Returns:
    The `matplotlib.pyplot` module.

  Raises:
    ImportError: matplotlib is not installed (the message names the `lab` extra).
  """
  # Imported here, not at the top: matplotlib is optional and only the plots need it.
  try:
    import matplotlib
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt
