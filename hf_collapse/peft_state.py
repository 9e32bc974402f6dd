"""What a model carries from peft and bitsandbytes, asked without importing either.

Importing peft costs seconds (it pulls in bitsandbytes and much of transformers), and most commands never meet an
adapter: a model can only hold a peft layer or a bitsandbytes weight once those packages are imported, so each check
looks the package up in `sys.modules` and answers `False` at no cost when it is absent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from torch import nn


def has_tuner_layers(model: nn.Module) -> bool:
    """Whether any submodule of `model` is a peft adapter layer (LoRA, IA3, ...)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return tuners is not None and any(isinstance(module, tuners.BaseTunerLayer) for module in model.modules())


def is_peft_model(model: object) -> bool:
    """Whether `model` is a `peft.PeftModel` wrapper."""
    peft_model = sys.modules.get("peft.peft_model")
    return peft_model is not None and isinstance(model, peft_model.PeftModel)


def has_bnb_weights(parameters: Iterable[nn.Parameter]) -> bool:
    """Whether any of `parameters` is a bitsandbytes 4-/8-bit weight."""
    if "bitsandbytes" not in sys.modules:
        return False
    from peft.utils.integrations import get_bnb_param_type

    return any(get_bnb_param_type(p) for p in parameters)
