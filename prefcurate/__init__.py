"""prefcurate: curate preference data (prompt, chosen, rejected) into clean training sets."""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__", "load_shards", "run_recipe"]


def __getattr__(name: str):  # lazy: keep `import prefcurate` and `prefcurate --help` fast
    if name == "run_recipe":
        from prefcurate.runner import run_recipe

        return run_recipe
    if name == "load_shards":
        from prefcurate.shards import read_table

        return read_table
    raise AttributeError(name)
