"""hf-collapse: LaCoOT layer collapse for Hugging Face Transformers.

Train with a Max-Sliced Wasserstein penalty between each layer's input and output (`CollapseTrainer`),
score the layers (`score_layers`), choose them (`select_by_tolerance`), delete them for real
(`collapse_layers`) and publish the slimmer model with its card (`export_collapsed`, `push_folder`).
"""

import importlib
from importlib.util import find_spec
from typing import TYPE_CHECKING

from .version import __version__

# Every public name is imported at first use (PEP 562): `import hf_collapse` and the CLI stay light, so a
# streamed collapse or `hf-collapse --help` does not pay for peft, the Trainer or the datasets stack.
_LAZY = {
    "check_adapter_fits": ".adapters",
    "remap_adapter": ".adapters",
    "CollapseConfig": ".config",
    "MSWArguments": ".config",
    "export_collapsed": ".export",
    "push_folder": ".hub",
    "bypass_layers": ".layers",
    "find_layer_stacks": ".layers",
    "load_model": ".models",
    "load_processor": ".models",
    "resolve_model": ".models",
    "DirectionSearch": ".msw",
    "max_sliced_wasserstein": ".msw",
    "adjacent_parameter_names": ".healing",
    "HealResult": ".post",
    "collapse_model": ".post",
    "heal": ".post",
    "merge_dequantized": ".quantization",
    "fit_repair": ".repair",
    "fit_repairs": ".repair",
    "repaired_reference": ".repair",
    "CollapseReport": ".report",
    "LayerScores": ".scoring",
    "score_layers": ".scoring",
    "select_by_tolerance": ".scoring",
    "select_lowest": ".scoring",
    "CollapseRecord": ".surgery",
    "collapse_layers": ".surgery",
    "CollapseTrainer": ".trainer",
    "MSWPenaltyMixin": ".trainer",
}

if TYPE_CHECKING:  # the same names for type checkers and the API docs, which read imports without running them
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
    from .repair import fit_repair, fit_repairs, repaired_reference
    from .report import CollapseReport
    from .scoring import LayerScores, score_layers, select_by_tolerance, select_lowest
    from .surgery import CollapseRecord, collapse_layers
    from .trainer import CollapseTrainer, MSWPenaltyMixin

__all__ = sorted(_LAZY)  # every lazily imported name is public
# TRL and sentence-transformers are optional extras: their trainers are offered when they are installed, and
# `import hf_collapse` never needs them.
if find_spec("trl") is not None:
    _LAZY.update(dict.fromkeys(("CollapseSFTConfig", "CollapseSFTTrainer"), ".sft"))
    __all__ += ["CollapseSFTConfig", "CollapseSFTTrainer"]
if find_spec("sentence_transformers") is not None:
    _OPTIONAL = ("CollapseSentenceTransformerConfig", "CollapseSentenceTransformerTrainer")
    _LAZY.update(dict.fromkeys(_OPTIONAL, ".sentence_trainer"))
    __all__ += list(_OPTIONAL)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
