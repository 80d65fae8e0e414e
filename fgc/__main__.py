"""``python -m fgc``: the same as the ``fgc`` console script."""

from .cli import main

main(prog_name="fgc")
