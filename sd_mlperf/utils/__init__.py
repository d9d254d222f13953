"""Small utilities shared by every part of the package (logging, files, timing)."""
