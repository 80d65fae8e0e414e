"""One module per lowering pass; :mod:`fgc_lowering.pipeline` lists them in order."""
