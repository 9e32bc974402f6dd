"""Verify a collapse by construction: the structure of a model rebuilt from the new config, and a probe's output.

Run after the changes are made and before they are kept: (1) a model built from the new config (on the meta device)
must have the collapsed model's tensors, module types and settings; (2) on a small probe input, the collapsed
model's outputs must equal the original's with the same layers bypassed.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Iterator

import torch
from accelerate import init_empty_weights
from torch import nn

from ..layers import LayerStack, bypass_layers, eval_mode
from . import rules
from .rules import DELETE

# Module attributes that say how a module is being run, not what it is: a fresh model may differ in them.
_RUNTIME_ATTRS = frozenset({"training", "gradient_checkpointing"})
_SCALARS = (bool, int, float, str, type(None))
_SHOWN = 3  # differences named in an error


def _settings(module: nn.Module) -> dict[str, object]:
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_") and name not in _RUNTIME_ATTRS and isinstance(value, _SCALARS)
    }


def _same_setting(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return type(a) is type(b) and a == b


def structure_differences(model: nn.Module, config) -> dict[tuple[str, ...], str]:
    """How `model` differs from a model built from `config`: module types and settings, tensor names and shapes.

    Keyed by (module or tensor path, what) so that differences already present before a collapse (settings a
    forward pass changes, modules a user swapped) can be told apart. The fresh model is built with its
    parameters on the meta device (no memory); tied weights are listed under every name, so a difference in
    tying is not mistaken for a missing weight. A module rebuilt as another type is reported once, not once per
    tensor inside it.
    """
    with init_empty_weights():
        fresh = type(model)(copy.deepcopy(config))
    differences: dict[tuple[str, ...], str] = {}
    retyped = []
    fresh_modules = dict(fresh.named_modules())
    for path, module in model.named_modules():
        other = fresh_modules.get(path)
        if other is None:
            continue  # its tensors are reported below
        where = path or type(model).__name__
        if type(other) is not type(module):
            differences[(path, "type")] = (
                f"{where} is a {type(module).__name__} but would be rebuilt as a {type(other).__name__}"
            )
            retyped.append(f"{path}.")
            continue
        ours, theirs = _settings(module), _settings(other)
        for name in sorted(set(ours) | set(theirs)):
            if not _same_setting(ours.get(name), theirs.get(name)):
                differences[(path, "setting", name)] = (
                    f"{where}.{name} is {ours.get(name)!r} but would be rebuilt as {theirs.get(name)!r}"
                )
    for kind in ("parameters", "buffers"):
        ours = {n: tuple(t.shape) for n, t in getattr(model, f"named_{kind}")(remove_duplicate=False)}
        theirs = {n: tuple(t.shape) for n, t in getattr(fresh, f"named_{kind}")(remove_duplicate=False)}
        for name in sorted(set(ours) | set(theirs)):
            if name.startswith(tuple(retyped)) or ours.get(name) == theirs.get(name):
                continue
            if name not in theirs:
                message = f"{name} (shape {ours[name]}) would not be rebuilt"
            elif name not in ours:
                message = f"{name} (shape {theirs[name]}) would be created, randomly initialised"
            else:
                message = f"{name} has shape {ours[name]} but would be rebuilt as {theirs[name]}"
            differences[(name, kind)] = message
    return differences


def _old_path(path: str, renames: dict[str, str]) -> str:
    """The path a module or tensor of the collapsed model had before (`model.layers.1.x` -> `model.layers.2.x`)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        old = renames.get(".".join(parts[:cut]))
        if old is not None:
            return ".".join([old, *parts[cut:]])
    return path


@contextlib.contextmanager
def _settings_kept(model: nn.Module) -> Iterator[None]:
    """Give every module back its scalar settings after a probe: some forwards adjust them to the input (Swin's
    window size), and a probe must leave no trace."""
    saved = [(module, _settings(module)) for module in model.modules()]
    try:
        yield
    finally:
        for module, settings in saved:
            for name, value in settings.items():
                if vars(module).get(name, DELETE) is not value:
                    setattr(module, name, value)


def _special_token_ids(*configs) -> set[int]:
    ids: set[int] = set()
    for config in configs:
        for name, value in vars(config).items():
            if name.endswith(("_token_id", "_token_index", "_token_ids")):
                ids.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
    return ids


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    real = [p.device for p in model.parameters() if p.device.type != "meta"]
    return real[0] if real else torch.device("cpu")


def build_probe(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A small deterministic input built from the config, or None when the forward takes neither tokens nor pixels.

    Tokens avoid every special id of the config (an image token would make a multimodal model expect pixels);
    encoder-decoders also get decoder tokens; vision models get one image of the configured size.
    """
    config = model.config
    accepted = set(inspect.signature(model.forward).parameters)
    text = config.get_text_config(decoder=True)
    vocab = getattr(text, "vocab_size", None)
    generator = torch.Generator().manual_seed(0)
    device = _input_device(model)
    if "input_ids" in accepted and isinstance(vocab, int) and vocab > 0:
        special = _special_token_ids(config, text)
        allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in special] or [0])
        pick = lambda n: allowed[torch.randint(len(allowed), (1, n), generator=generator)].to(device)  # noqa: E731
        probe = {"input_ids": pick(8)}
        if "decoder_input_ids" in accepted and getattr(config, "is_encoder_decoder", False):
            probe["decoder_input_ids"] = pick(4)
        return probe
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None)
    if "pixel_values" in accepted and size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        channels = getattr(vision, "num_channels", 3)
        return {"pixel_values": torch.randn(1, channels, height, width, generator=generator).to(device, dtype)}
    return None


def _output_tensors(output) -> dict[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return {"output": output}
    items = output.items() if isinstance(output, dict) else enumerate(output)
    found = {}
    for name, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            found[str(name)] = value
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            found.update({f"{name}[{i}]": v for i, v in enumerate(value) if v.is_floating_point()})
    return found


def _run_probe(model: nn.Module, probe: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad(), eval_mode(model), _settings_kept(model):
        return {k: v.detach().float().cpu() for k, v in _output_tensors(model(**probe)).items()}


def _output_differences(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor], dtype) -> list[str]:
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    differences = [f"output {name!r} is missing" for name in reference if name not in got]
    for name, expected in reference.items():
        value = got.get(name)
        if value is None:
            continue
        if value.shape != expected.shape:
            differences.append(f"output {name!r} has shape {tuple(value.shape)}, not {tuple(expected.shape)}")
            continue
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        error = float((value - expected).abs().max()) if expected.numel() else 0.0
        # written so that NaN fails: a NaN in either output (or in their difference) is a difference, not a pass
        if not error <= tolerance * max(scale, 1e-6) or not (torch.isfinite(value).all() and torch.isfinite(expected).all()):
            differences.append(f"output {name!r} differs by up to {error:.3g} (its largest value is {scale:.3g})")
    return differences


def _suspect_fields(configs) -> list[str]:
    """Config fields that look layer-related and that no rule updated: the likely cause of a difference."""
    handled = {rule.field for rule in rules.RULES} | {o for rule in rules.RULES for o in rule.owns}
    handled |= set(rules.RECORD_FIELDS) | set(rules.PARENT_COUNT_ATTRS) | {"num_decoder_layers", "encoder_layers", "decoder_layers"}
    names = set()
    for config in configs:
        for name, value in vars(config).items():
            lowered = name.lower()
            if name in handled or name.startswith("_") or isinstance(value, bool):
                continue
            if isinstance(value, (int, list, tuple)) and ("layer" in lowered or "dense" in lowered):
                names.add(name)
    return sorted(names)


def _verification_error(what: str, differences: list[str], configs) -> ValueError:
    shown = "; ".join(differences[:_SHOWN]) + (f"; and {len(differences) - _SHOWN} more" if len(differences) > _SHOWN else "")
    suspects = _suspect_fields(configs)
    hint = (
        f" Config field(s) that may describe layers and that no rule updated: {', '.join(suspects)}."
        if suspects
        else ""
    )
    return ValueError(
        f"the collapse could not be verified, so nothing was changed: {what}: {shown}.{hint} "
        "This family needs a rule in hf_collapse.surgery.rules.RULES; until then remove other layers or keep these"
    )


def reference_outputs(inner: nn.Module, selection, probe: dict, given: bool) -> dict[str, torch.Tensor] | None:
    """The original's outputs on the probe with the layers bypassed; None when the built probe does not fit the model.

    A bypass that breaks a model which runs on the probe means the layers change the hidden states' shape (Swin's
    stages, for example): they cannot be removed. A probe built from the config that the model itself does not
    accept (it needs other inputs) leaves the structure check alone; a probe given by the caller must work.
    """
    try:
        with bypass_layers(inner, selection):
            return _run_probe(inner, probe)
    except Exception as bypassed_error:
        try:
            _run_probe(inner, probe)
        except Exception as error:
            if given:
                raise ValueError(f"the model fails on the given probe_inputs: {type(error).__name__}: {error}") from error
            return None
        chosen = {name: indices for name, indices in selection.items() if indices}
        layers = ", ".join(f"{name} {indices}" if name else str(indices) for name, indices in chosen.items())
        raise ValueError(
            f"cannot remove layers {layers}: the model fails once they are bypassed "
            f"({type(bypassed_error).__name__}: {bypassed_error}), so their input and output are not interchangeable "
            "(for example blocks that change the hidden size or the sequence length); only layers whose output has "
            "the shape of their input can be removed"
        ) from bypassed_error


def verify_collapse(inner: nn.Module, stacks: list[LayerStack], probe, reference, baseline, renames) -> None:
    configs = [inner.config, *{id(s.config): s.config for s in stacks}.values()]
    differences = [
        message
        for key, message in structure_differences(inner, inner.config).items()
        if (_old_path(key[0], renames), *key[1:]) not in baseline
    ]
    if differences:
        raise _verification_error("a model built from the new config would not be this model", differences, configs)
    if reference is None:
        return
    try:
        got = _run_probe(inner, probe)
    except Exception as error:
        raise _verification_error(
            "the collapsed model fails on the probe input", [f"{type(error).__name__}: {error}"], configs
        ) from error
    dtype = next((p.dtype for p in inner.parameters() if p.is_floating_point()), torch.float32)
    differences = _output_differences(reference, got, dtype)
    if differences:
        raise _verification_error(
            "its output differs from the original's with the same layers bypassed", differences, configs
        )


def probe_differences(model: nn.Module, probe: dict, reference: dict[str, torch.Tensor]) -> list[str]:
    """How `model`'s outputs on `probe` differ from `reference` (see [`reference_outputs`]), within the tolerance of
    its dtype; empty when they agree."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return _output_differences(reference, _run_probe(model, probe), dtype)
