"""Synthesis: the synthetic sample store (Zarr v3 on any fsspec URL) and, later, the streaming pipeline."""
