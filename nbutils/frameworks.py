"""Imported by every notebook's setup cell: JAX, Keras and keras-hub, their start-up noise filtered."""

from nbutils import quiet

quiet.load_frameworks()  # their start-up log lines filtered out, real errors kept
