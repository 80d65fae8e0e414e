"""``python -m fgc``: the same as the ``fgc`` console script."""

from .cli import run

run()
