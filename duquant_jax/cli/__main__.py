"""`python -m duquant_jax.cli ARGS`: the same as `duquant-jax ARGS`."""

import sys

from duquant_jax.cli.app import main

main(sys.argv[1:])
