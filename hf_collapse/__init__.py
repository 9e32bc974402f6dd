"""hf-collapse: LaCoOT layer collapse for Hugging Face Transformers.

Train with a Max-Sliced Wasserstein penalty between each layer's input and output (`CollapseTrainer`),
score the layers (`score_layers`), choose them (`select_by_tolerance`), delete them for real
(`collapse_layers`) and publish the slimmer model with its card (`export_collapsed`, `push_folder`).
"""

from .card import CollapseReport
from .config import CollapseConfig
from .export import export_collapsed, push_folder
from .layers import bypass_layers, find_layer_stacks
from .models import load_model, load_processor, resolve_model
from .msw import DirectionSearch, max_sliced_wasserstein
from .scoring import LayerScores, score_layers, select_by_tolerance, select_lowest
from .surgery import CollapseRecord, collapse_layers
from .trainer import CollapseTrainer

__all__ = [
    "CollapseConfig",
    "CollapseRecord",
    "CollapseReport",
    "CollapseTrainer",
    "DirectionSearch",
    "LayerScores",
    "bypass_layers",
    "collapse_layers",
    "export_collapsed",
    "find_layer_stacks",
    "load_model",
    "load_processor",
    "max_sliced_wasserstein",
    "push_folder",
    "resolve_model",
    "score_layers",
    "select_by_tolerance",
    "select_lowest",
]
__version__ = "0.1.0"
