"""The Qt-free core: model loading, prompts, tiling, the embedding cache, propagation,
concepts, segment-everything and post-processing. NumPy in, NumPy out.

Nothing here imports Qt or napari, and torch / transformers load only when a model is
loaded, so the CLI, the Python API and the widget share exactly this code.
"""
