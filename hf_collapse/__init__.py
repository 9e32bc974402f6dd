"""hf-collapse: LaCoOT layer collapse for Hugging Face Transformers."""

from .config import CollapseConfig
from .layers import LayerCapture, LayerStack, find_layer_stacks
from .msw import DirectionSearch, max_sliced_wasserstein
from .trainer import CollapseTrainer

__all__ = [
    "CollapseConfig",
    "CollapseTrainer",
    "DirectionSearch",
    "LayerCapture",
    "LayerStack",
    "find_layer_stacks",
    "max_sliced_wasserstein",
]
__version__ = "0.1.0"
