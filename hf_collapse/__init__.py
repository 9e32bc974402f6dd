"""hf-collapse: LaCoOT layer collapse for Hugging Face Transformers.

Train with a Max-Sliced Wasserstein penalty between each layer's input and output (`CollapseTrainer`),
score the layers (`score_layers`), choose them (`select_by_tolerance`), delete them for real
(`collapse_layers`) and publish the slimmer model with its card (`export_collapsed`, `push_folder`).
"""

import importlib
from importlib.util import find_spec

from .adapters import check_adapter_fits, remap_adapter
from .config import CollapseConfig, MSWArguments
from .export import export_collapsed
from .hub import push_folder
from .layers import bypass_layers, find_layer_stacks
from .models import load_model, load_processor, resolve_model
from .msw import DirectionSearch, max_sliced_wasserstein
from .healing import adjacent_parameter_names
from .post import HealResult, collapse_model, heal
from .quantization import merge_dequantized
from .repair import fit_repair, repaired_reference
from .report import CollapseReport
from .scoring import LayerScores, score_layers, select_by_tolerance, select_lowest
from .surgery import CollapseRecord, collapse_layers
from .trainer import CollapseTrainer, MSWPenaltyMixin
from .version import __version__

__all__ = [
    "CollapseConfig",
    "CollapseRecord",
    "CollapseReport",
    "CollapseTrainer",
    "MSWArguments",
    "MSWPenaltyMixin",
    "DirectionSearch",
    "HealResult",
    "LayerScores",
    "adjacent_parameter_names",
    "bypass_layers",
    "check_adapter_fits",
    "collapse_layers",
    "collapse_model",
    "export_collapsed",
    "find_layer_stacks",
    "fit_repair",
    "heal",
    "load_model",
    "load_processor",
    "max_sliced_wasserstein",
    "merge_dequantized",
    "push_folder",
    "remap_adapter",
    "repaired_reference",
    "resolve_model",
    "score_layers",
    "select_by_tolerance",
    "select_lowest",
]
# TRL and sentence-transformers are optional extras: their trainers are offered when they are installed, and
# `import hf_collapse` never needs them.
if find_spec("trl") is not None:
    from .sft import CollapseSFTConfig, CollapseSFTTrainer

    __all__ += ["CollapseSFTConfig", "CollapseSFTTrainer"]
_LAZY = {}  # sentence-transformers is slow to import: its trainer is imported at first use
if find_spec("sentence_transformers") is not None:
    _LAZY = dict.fromkeys(("CollapseSentenceTransformerConfig", "CollapseSentenceTransformerTrainer"), ".sentence_trainer")
    __all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
