"""Model parts whose source fgc copies into each generated package's model.py."""
