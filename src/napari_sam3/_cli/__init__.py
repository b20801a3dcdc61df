"""The commands behind :mod:`napari_sam3.cli` (which holds the parser and dispatch).

* ``errors``: one-line errors and warnings, exit statuses.
* ``inputs``: reading and checking IMAGE (2D image or stack), limits, tiling, region.
* ``prompt_files``: reading and checking PROMPTS.json and EXEMPLARS.json.
* ``output``: checking OUT, staging and atomic renames, label images, score tables.
* ``cache``: locating and checking the embedding cache; ``cache info`` / ``cache clear``.
* ``models``: loading the segmenters with the command line's options.
* ``segment``: ``segment``: choosing the mode, checks shared by every mode.
* ``segment_prompts``: ``segment --prompts`` (with or without ``--propagate``).
* ``segment_instances``: ``segment --text/--exemplars`` and ``segment --everything``.
* ``precompute``: ``precompute``.
* ``view``: ``view``.

Like the parser, these import only the standard library at module level: NumPy,
Zarr, torch/transformers and napari are imported where they are needed.
"""
