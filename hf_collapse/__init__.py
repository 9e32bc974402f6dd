"""hf-collapse: LaCoOT layer collapse for Hugging Face Transformers.

Train with a Max-Sliced Wasserstein penalty between each layer's input and output (`CollapseTrainer`),
score the layers (`score_layers`), choose them (`select_by_tolerance`), delete them for real
(`collapse_layers`) and publish the slimmer model with its card (`export_collapsed`, `push_folder`).

The public names are imported at first use, so that `import hf_collapse` (and `hf-collapse --help`) does not load
torch, transformers and peft before a name that needs them is asked for.
"""

from importlib import import_module
from importlib.util import find_spec

from .version import __version__

# public name -> the module that defines it
_SOURCES = {
    "check_adapter_fits": ".adapters", "remap_adapter": ".adapters",
    "CollapseConfig": ".config", "MSWArguments": ".config",
    "export_collapsed": ".export",
    "push_folder": ".hub",
    "bypass_layers": ".layers", "find_layer_stacks": ".layers",
    "load_model": ".models", "load_processor": ".models", "resolve_model": ".models",
    "DirectionSearch": ".msw", "max_sliced_wasserstein": ".msw",
    "collapse_model": ".post", "heal": ".post",
    "merge_dequantized": ".quantization",
    "CollapseReport": ".report",
    "LayerScores": ".scoring", "score_layers": ".scoring", "select_by_tolerance": ".scoring", "select_lowest": ".scoring",
    "CollapseRecord": ".surgery", "collapse_layers": ".surgery",
    "CollapseTrainer": ".trainer", "MSWPenaltyMixin": ".trainer",
}
# TRL and sentence-transformers are optional extras: their trainers are offered when they are installed, and
# `import hf_collapse` never needs them.
if find_spec("trl") is not None:
    _SOURCES.update(dict.fromkeys(("CollapseSFTConfig", "CollapseSFTTrainer"), ".sft"))
if find_spec("sentence_transformers") is not None:
    _SOURCES.update(
        dict.fromkeys(("CollapseSentenceTransformerConfig", "CollapseSentenceTransformerTrainer"), ".sentence_trainer")
    )

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name in _SOURCES:
        value = getattr(import_module(_SOURCES[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
