"""`python -m hcsc_jax.convert ...`: see the package docstring."""

import sys

from hcsc_jax.convert.cli import main

sys.exit(main())
