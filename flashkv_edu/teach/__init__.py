"""Everything a notebook uses besides the core modules: one teaching file per notebook.

``nbNN_<topic>.py`` holds notebook NN's figures, widgets, exercise checks and the solutions
(functions named exactly as the learner's stubs). The core modules never import this package.

    python -m flashkv_edu.teach solutions DIR   # solved, executed copies of the notebooks
    python -m flashkv_edu.teach list            # the exercises, as in the README's table
"""

from __future__ import annotations

import importlib

NOTEBOOKS = {
    "01_naive_attention": "nb01_naive_attention",
    "02_kv_cache": "nb02_kv_cache",
    "03_window_size_bug": "nb03_window_size_bug",
    "04_online_softmax": "nb04_online_softmax",
    "05_tiled_triton_kernels": "nb05_tiled_triton_kernels",
    "06_paged_block_tables": "nb06_paged_block_tables",
    "07_split_kv_decode": "nb07_split_kv_decode",
    "08_putting_it_together": "nb08_putting_it_together",
    "09_precision_and_quantized_caches": "nb09_precision_and_quantized_caches",
    "10_transformers_model": "nb10_transformers_model",
    "11_when_the_cache_does_not_fit": "nb11_when_the_cache_does_not_fit",
    "12_beyond_one_process": "nb12_beyond_one_process",
    "13_long_context": "nb13_long_context",
    "14_several_query_rows": "nb14_several_query_rows",
}


def module_for(notebook: str):
    """The teaching module of a notebook (``"05_tiled_triton_kernels"`` or its file name)."""
    stem = notebook.rsplit("/", 1)[-1].removesuffix(".ipynb")
    return importlib.import_module(f"{__name__}.{NOTEBOOKS[stem]}")


def all_exercises() -> list:
    """Every :class:`~flashkv_edu.teach.exercise.Exercise`, in notebook order."""
    return [e for stem in NOTEBOOKS for e in module_for(stem).EXERCISES]
