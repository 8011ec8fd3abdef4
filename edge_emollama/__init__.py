"""edge-emollama: Emotion-LLaMA as real-time edge software.

The package imports without torch; the PyTorch reference (``edge_emollama.reference``) and the export
stage (``edge_emollama.export``) need the ``export`` extra.
"""
__version__ = "0.1.0"

from .errors import EdgeEmollamaError  # noqa: E402
from .spec import LABELS, PRESETS, ModelSpec, get_preset  # noqa: E402

__all__ = ["__version__", "EdgeEmollamaError", "LABELS", "PRESETS", "ModelSpec", "get_preset"]
