"""Synthesis: the streaming Ray Data pipeline (:mod:`engine.synthesis.pipeline`) and the synthetic
sample store it writes (Zarr v3 on any fsspec URL, :mod:`engine.synthesis.store`)."""


class SynthesisIncomplete(RuntimeError):
    """A synthesis run ended with shards still missing (a pipeline that kept stalling); the complete
    ones are kept and the same command makes the rest. Here, light to import, for the CLI."""
