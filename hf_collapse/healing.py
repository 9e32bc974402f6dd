"""What healing trains after a collapse, for `heal_scope="adjacent"`: the kept layers next to each removed span and
the head, everything else frozen.

The layers next to a span are the last kept layer before it and the first kept layer after it (the two whose
input or output changed when the span went). The head is what turns the last hidden state into the output: the
output embeddings (`lm_head`; tied to the input embeddings in many LLMs, which then train with it), a
classifier (`classifier`, `score`, `qa_outputs`), a pooler, and the final norm of the stack's model (`norm`,
`final_layernorm`, `ln_f`, `final_layer_norm`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from .layers import find_layer_stacks, unwrap_model

__all__ = ["HEAD_NAMES", "adjacent_layers", "adjacent_parameter_names", "train_only"]

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "pooler", "norm", "final_layernorm", "ln_f", "final_layer_norm")


def adjacent_layers(removed: Sequence[int], original_depth: int) -> list[int]:
    """The indices, in the collapsed stack, of the kept layers next to a removed span.

    `removed` is in the numbering before any removal (as `config.collapsed_layers`), `original_depth` the layer
    count then. A span at the start of the stack has only a layer after it; one at the end only a layer before it.
    """
    gone = set(removed)
    kept = [i for i in range(original_depth) if i not in gone]
    position = {old: new for new, old in enumerate(kept)}
    out = set()
    for index in gone:
        for neighbour in (index - 1, index + 1):
            if neighbour in position:
                out.add(position[neighbour])
    return sorted(out)


def _collapse_record(model: nn.Module) -> tuple[list[int], int]:
    config = unwrap_model(model).config
    removed = getattr(config, "collapsed_layers", None)
    original = getattr(config, "original_num_hidden_layers", None)
    if not removed:
        raise ValueError("the adjacent healing scope needs a collapsed model (config.collapsed_layers is empty)")
    if isinstance(removed, dict) or isinstance(original, dict):
        raise ValueError("the adjacent healing scope handles one-stack models; heal an encoder-decoder with "
                         "heal_scope='full' or 'lora'")
    return sorted(int(i) for i in removed), int(original)


def adjacent_parameter_names(model: nn.Module) -> list[str]:
    """The names (as `model.named_parameters()` gives them) that `heal_scope="adjacent"` trains.

    Raises:
        `ValueError`: a model that was not collapsed, a record that does not match the stack, or no head found.
    """
    inner = unwrap_model(model)
    removed, original = _collapse_record(inner)
    (stack, *rest) = find_layer_stacks(inner)
    if rest:
        raise ValueError("the adjacent healing scope handles one-stack models; use heal_scope='full' or 'lora'")
    if original - len(removed) != len(stack):
        raise ValueError(
            f"config.collapsed_layers removes {len(removed)} of {original} layers, but the model has {len(stack)} "
            "layers: the collapse record does not describe this model"
        )
    layers = adjacent_layers(removed, original)
    prefixes = [f"{stack.path}.{i}." for i in layers]
    heads = [name for name, _ in inner.named_modules()
             if name.rsplit(".", 1)[-1] in HEAD_NAMES and not name.startswith(stack.path + ".")]
    output = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    heads += [name for name, module in inner.named_modules() if output is not None and module is output]
    if not heads:
        raise ValueError(f"found no head (one of {', '.join(HEAD_NAMES)}) in {type(inner).__name__}: use heal_scope='full'")
    prefixes += [f"{name}." for name in heads]
    # tied weights appear once in named_parameters, under the name of the module that owns them first
    tied = {id(p) for name in heads for p in inner.get_submodule(name).parameters()}
    return [name for name, p in inner.named_parameters() if any(name.startswith(x) for x in prefixes) or id(p) in tied]


@contextlib.contextmanager
def train_only(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Inside the block, only the parameters `names` of `model` require gradients; afterwards every parameter's
    flag is what it was."""
    inner = unwrap_model(model)
    keep = set(names)
    saved = [(p, p.requires_grad) for _, p in inner.named_parameters()]
    try:
        for name, p in inner.named_parameters():
            p.requires_grad_(name in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
