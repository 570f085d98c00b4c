"""``python -m ghost_kernels.bench.offline``: see the package docstring and :func:`main`."""
import sys

from . import main

sys.exit(main())
