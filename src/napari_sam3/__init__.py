"""napari-sam3: SAM3 promptable segmentation for microscopy in napari.

``Sam3Segmenter`` loads torch lazily: importing this package stays light.
"""

from .core.prompts import ObjectPrompt, PromptError

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Sam3Segmenter":
        from .core.segmenter import Sam3Segmenter

        return Sam3Segmenter
    if name == "ConceptSegmenter":
        from .core.concept import ConceptSegmenter

        return ConceptSegmenter
    raise AttributeError(name)


__all__ = ["Sam3Segmenter", "ConceptSegmenter", "ObjectPrompt", "PromptError", "__version__"]
