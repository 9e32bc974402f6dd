"""Repair at the cut: a map fitted on calibration activations for each removed span, folded into existing weights.

After the layers to remove are chosen, and before anything changes, the model runs over calibration data with hooks
that record, for every contiguous span of removed layers `a..b`, three things at each real token (ReplaceMe's
decomposition, for pre-norm decoders):

- `M`: the output of the *fold site* of the last kept layer before the span, `L = a - 1`: the output projection of
  its MLP (`mlp.down_proj`), before the residual add;
- `Y = out_L - M`: the rest of that layer's output (the residual stream it passes on);
- `Z`: the hidden state after the span (the output of layer `b`, the input of the first kept layer after it).

The repair replaces `M` by `M T + c` so that `Y + M T + c` approximates `Z` once the span is gone. `T` is:

- `linear`: least squares with ridge, `T = (MᵀM + λI)⁻¹ Mᵀ(Z - Y)`, `λ = ρ × mean diagonal of MᵀM`, with `ρ`
  chosen per span from `RIDGES` by `FOLDS`-fold cross-validation over the calibration rows (rows dealt round-robin
  to the folds; the `ρ` with the least held-out error, then refitted on every row); with a single row, `ρ = RIDGE`
  (with a shift, on centred data and `c` from the means);
- `scale`: the same per channel (a diagonal `T`);
- `transport`: the closed-form linear Monge map between Gaussian fits of `M` and of `Z - Y`,
  `T = S1^-1/2 (S1^1/2 S2 S1^1/2)^1/2 S1^-1/2`, with `S1` shrunk by the same ridge (`S1 + λI`, else the directions
  `M` barely uses are amplified without bound) (eigendecompositions in float64, eigenvalues floored at
  `EPS × the largest`); it ignores which token goes with which, where least squares uses the pairing.

`T` folds exactly into the projection: `nn.Linear` computes `x Wᵀ + b`, so `(x Wᵀ + b) T + c` is the layer with
`W ← Tᵀ W` and `b ← Tᵀ b + c`. A shift `c` exists only where the projection has a bias (Llama's has none): there the
maps are fitted without one (`transport` on centred data, so the mean is not moved) and the report says so.

Post-norm encoders (BERT, RoBERTa) leave each layer through a LayerNorm whose affine is per channel: there only
`scale` folds (`M` is the whole output of layer `L`, `Y = 0`, into the LayerNorm's weight and bias); a full matrix has
no exact place and is refused. Spans are fitted independently, each on the activations of the full model. Nothing
approximate is ever folded: the fold is checked on a probe against [`repaired_reference`] (the original model with the
spans bypassed and the fitted maps applied by hooks) before the layers are removed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import bypass_layers, eval_mode, find_layer_stacks, unwrap_model
from .scoring import calibration_batches
from .surgery.verify import build_probe

__all__ = [
    "REPAIRS", "RepairPlan", "SpanFit", "check_foldable", "check_repair", "fit_repair", "fit_repairs", "fold_verified",
    "repaired_reference",
]

REPAIRS = ("none", "scale", "linear", "transport")
RIDGE = 1e-2  # ridge weight of `scale` and `transport`, relative to the mean diagonal of MᵀM
# `linear`: candidate ridge weights (same scale), one chosen per span by cross-validation on the calibration rows.
# A fixed 1e-2 left SmolLM2-135M at 2.1x full-depth perplexity with 8 of 30 layers cut; the held-out error there
# picks 1e-6 for the long span and 1e-2 for the short one with 256 rows (validation rows only, seed 0).
RIDGES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6, 1e-7, 1e-8)
FOLDS = 4
EPS = 1e-6  # eigenvalue floor of the transport map, relative to the largest eigenvalue
# Pre-norm decoders whose layer output is `h + mlp(norm(h))` with `mlp.down_proj` the MLP's last operation.
PRE_NORM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma")
# Post-norm encoders whose layer output is `output.LayerNorm(...)`: only a per-channel map folds there.
POST_NORM_FAMILIES = ("bert", "roberta")
_SITES = {"pre_norm": "mlp.down_proj", "post_norm": "output.LayerNorm"}


def check_repair(value: object) -> None:
    """The one check of a `repair` value (recipe field `collapse_repair`, `collapse_model(repair=...)`, `--repair`)."""
    if value not in REPAIRS:
        raise ValueError(f"repair must be one of {', '.join(REPAIRS)}; got {value!r}")


def _family(model: nn.Module) -> tuple[str, str]:
    inner = unwrap_model(model)
    model_type = getattr(inner.config.get_text_config(decoder=True), "model_type", None) or inner.config.model_type
    if model_type in PRE_NORM_FAMILIES:
        return model_type, "pre_norm"
    if model_type in POST_NORM_FAMILIES:
        return model_type, "post_norm"
    return model_type, ""


def check_foldable(model: nn.Module, method: str) -> None:
    """Refuse a repair that has no exact place to fold in this model's family (before anything is computed)."""
    check_repair(method)
    if method == "none":
        return
    model_type, layout = _family(model)
    name = type(unwrap_model(model)).__name__
    where = (
        f"scale, linear and transport fold into the MLP output projection of pre-norm decoders "
        f"({', '.join(PRE_NORM_FAMILIES)}); scale alone folds into the output LayerNorm of post-norm encoders "
        f"({', '.join(POST_NORM_FAMILIES)})"
    )
    if layout == "post_norm" and method != "scale":
        raise ValueError(
            f"repair={method!r} cannot be folded exactly into {name}: a post-norm encoder's layer output leaves through "
            "a LayerNorm whose affine is per channel, so only repair='scale' folds there (into the LayerNorm of the "
            "last kept layer before the cut); use repair='scale' or 'none'"
        )
    if not layout:
        raise ValueError(
            f"repair={method!r} has no exact place to fold in {name} (model_type {model_type!r}): {where}. "
            "Use repair='none' for this family"
        )


def spans(removed: Sequence[int]) -> list[tuple[int, int]]:
    """The contiguous runs `(first, last)` of a sorted list of removed layers."""
    runs: list[list[int]] = []
    for index in sorted(removed):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return [(a, b) for a, b in runs]


@dataclass
class SpanFit:
    """The fitted map of one removed span.

    Attributes:
        first, last (`int`): the span's first and last removed layer (0-based, before removal).
        site (`str`): the module the map folds into, as a path in the model before removal.
        transform (`torch.Tensor`): `T`, `(d, d)` float64 (diagonal for `scale`): `M` becomes `M T + shift`.
        shift (`torch.Tensor`, *optional*): `c`, `(d,)`, only where the site has a bias.
        tokens (`int`): calibration tokens it was fitted on.
        error_before, error_after (`float`): `‖M + Y − Z‖² / ‖Z − Y‖²` without and with the map, on those tokens.
        source_mean, source_cov, target_mean, target_cov (`torch.Tensor`): the moments of `M` and of `Z − Y`.
        rejected_error (`float`, *optional*): set when the fitted map did not lower the error on its own calibration
            tokens: the error it would have had. The span is then left unrepaired (`transform` is the identity, the
            fold changes nothing there) and `error_after` equals `error_before`.
        ridge (`float`, *optional*): `ρ`, the ridge weight relative to the mean diagonal of `MᵀM` (for `linear` the
            one cross-validation chose).
    """

    first: int
    last: int
    site: str
    transform: torch.Tensor
    shift: torch.Tensor | None
    tokens: int
    error_before: float
    error_after: float
    source_mean: torch.Tensor
    source_cov: torch.Tensor
    target_mean: torch.Tensor
    target_cov: torch.Tensor
    rejected_error: float | None = None
    ridge: float | None = None


class _Stats:
    """Sums over tokens, in float64, kept apart per fold (the calibration rows are dealt round-robin to `folds`
    folds): the Gram matrix of `[M, 1]`, its product with `R = Z − Y` and `‖R‖²`; and `RᵀR` over every token."""

    def __init__(self, folds: int = 1):
        self.grams, self.crosses = [None] * folds, [None] * folds
        self.traces, self.counts = [0.0] * folds, [0] * folds
        self.rr, self.n = None, 0
        self._totals = None  # (gram, cross) over every fold, summed once after the last `add`

    def add(self, m: torch.Tensor, r: torch.Tensor, fold: int = 0) -> None:
        m, r = m.double().cpu(), r.double().cpu()
        augmented = torch.cat([m, torch.ones(len(m), 1, dtype=m.dtype)], dim=1)
        gram, cross, rr = augmented.T @ augmented, augmented.T @ r, r.T @ r
        if self.grams[fold] is None:
            self.grams[fold], self.crosses[fold] = gram, cross
        else:
            self.grams[fold], self.crosses[fold] = self.grams[fold] + gram, self.crosses[fold] + cross
        self.rr = rr if self.rr is None else self.rr + rr
        self.traces[fold] += float(torch.trace(rr))
        self.counts[fold] += len(m)
        self.n += len(m)
        self._totals = None

    def _total(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._totals is None:
            self._totals = (sum(g for g in self.grams if g is not None), sum(c for c in self.crosses if c is not None))
        return self._totals

    @property
    def gram(self) -> torch.Tensor:
        return self._total()[0]

    @property
    def cross(self) -> torch.Tensor:
        return self._total()[1]

    def error(self, transform: torch.Tensor, shift: torch.Tensor | None) -> float:
        """`‖[M, 1] [T; c] − R‖²` from the sums."""
        return _error(self.gram, self.cross, float(torch.trace(self.rr)), transform, shift)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        gram, cross = self.gram, self.cross
        d = gram.shape[0] - 1
        mean_m, mean_r = gram[:d, d] / self.n, cross[d] / self.n
        cov_m = gram[:d, :d] / self.n - torch.outer(mean_m, mean_m)
        cov_r = self.rr / self.n - torch.outer(mean_r, mean_r)
        return mean_m, cov_m, mean_r, cov_r

    def cross_validated_ridge(self, with_shift: bool) -> float | None:
        """The weight of `RIDGES` whose least-squares maps, each fitted without one fold, have the least error summed
        over the folds they did not see (the larger weight on a tie); `None` with fewer than two non-empty folds."""
        folds = [f for f, count in enumerate(self.counts) if count]
        if len(folds) < 2:
            return None
        gram, cross = self.gram, self.cross
        held_out = {ridge: 0.0 for ridge in RIDGES}
        for f in folds:
            system = _LeastSquares(gram - self.grams[f], cross - self.crosses[f], self.n - self.counts[f], with_shift)
            for ridge in RIDGES:
                transform, shift = system.solve(ridge)
                held_out[ridge] += _error(self.grams[f], self.crosses[f], self.traces[f], transform, shift)
        return min(RIDGES, key=lambda ridge: (held_out[ridge], -ridge))


def _error(gram: torch.Tensor, cross: torch.Tensor, trace_rr: float, transform: torch.Tensor, shift: torch.Tensor | None) -> float:
    """`‖[M, 1] [T; c] − R‖²` from the sums `[M, 1]ᵀ[M, 1]`, `[M, 1]ᵀR` and `‖R‖²`."""
    column = shift if shift is not None else torch.zeros(len(transform), dtype=transform.dtype)
    full = torch.cat([transform, column[None]])
    return float(torch.trace(full.T @ gram @ full) - 2 * torch.trace(full.T @ cross) + trace_rr)


def _normal_equations(gram: torch.Tensor, cross: torch.Tensor, n: int, with_shift: bool):
    """`(MᵀM, MᵀR, mean M, mean R)` from the sums over `[M, 1]` of `n` tokens; centred when a shift is fitted (the
    shift then takes the means)."""
    d = gram.shape[0] - 1
    mean_m, mean_r = gram[:d, d] / n, cross[d] / n
    if with_shift:
        return gram[:d, :d] - n * torch.outer(mean_m, mean_m), cross[:d] - n * torch.outer(mean_m, mean_r), mean_m, mean_r
    return gram[:d, :d], cross[:d], mean_m, mean_r


class _LeastSquares:
    """The ridge least-squares problem of sums `[M, 1]ᵀ[M, 1]`, `[M, 1]ᵀR` over `n` tokens (centred when a shift is
    fitted), diagonalised once so that each ridge weight costs two matrix products."""

    def __init__(self, gram: torch.Tensor, cross: torch.Tensor, n: int, with_shift: bool):
        self.with_shift = with_shift
        g, c, self.mean_m, self.mean_r = _normal_equations(gram, cross, n, with_shift)
        self.scale = float(torch.diagonal(g).mean())
        self.values, self.vectors = torch.linalg.eigh((g + g.T) / 2)
        self.projected = self.vectors.T @ c

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`T = (G + ρ·mean diag(G)·I)⁻¹ C`, and the shift `c = mean(R) − mean(M) T` when one is fitted."""
        inverse = 1.0 / (self.values.clamp_min(0.0) + ridge * self.scale)
        transform = self.vectors @ (inverse[:, None] * self.projected)
        return transform, (self.mean_r - self.mean_m @ transform if self.with_shift else None)


def _sqrt_psd(matrix: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    values = values.clamp_min(EPS * max(float(values.max()), 1e-300))
    power = values.rsqrt() if inverse else values.sqrt()
    return (vectors * power) @ vectors.T


def _solve(stats: _Stats, method: str, with_shift: bool) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The map of one span: `(T, c or None, ρ)`."""
    if method == "linear":
        ridge = stats.cross_validated_ridge(with_shift)
        ridge = RIDGE if ridge is None else ridge
        return (*_LeastSquares(stats.gram, stats.cross, stats.n, with_shift).solve(ridge), ridge)
    d = stats.gram.shape[0] - 1
    mean_m, cov_m, mean_r, cov_r = stats.moments()
    if method == "transport":
        # between the Gaussian fits' covariances; without a shift the mean is not moved (M's mean maps to m̄ T). The
        # source covariance is shrunk by the ridge (S1 + λI), so directions M barely uses are not blown up by S1^-1/2.
        shrunk = cov_m + RIDGE * float(torch.diagonal(cov_m).mean()) * torch.eye(d, dtype=cov_m.dtype)
        root, inverse_root = _sqrt_psd(shrunk), _sqrt_psd(shrunk, inverse=True)
        transform = inverse_root @ _sqrt_psd(root @ cov_r @ root) @ inverse_root
    else:  # scale: one coefficient per channel, on centred sums when a shift is fitted
        gram, cross, _, _ = _normal_equations(stats.gram, stats.cross, stats.n, with_shift)
        ridge = RIDGE * float(torch.diagonal(gram).mean())
        transform = torch.diag(torch.diagonal(cross) / (torch.diagonal(gram) + ridge))
    shift = mean_r - mean_m @ transform if with_shift else None
    return transform, shift, RIDGE


@dataclass
class RepairPlan:
    """What [`fit_repair`] fitted: one [`SpanFit`] per removed span, and the data it saw."""

    method: str
    layout: str
    fits: list[SpanFit]
    rows: int
    tokens: int

    def sites(self, model: nn.Module) -> list[tuple[nn.Module, SpanFit]]:
        inner = unwrap_model(model)
        return [(inner.get_submodule(fit.site), fit) for fit in self.fits]

    def fold(self, model: nn.Module) -> Callable[[], None]:
        """Fold every map into its site's weights (before the layers are removed); returns what restores them."""
        saved = []
        with torch.no_grad():
            for module, fit in self.sites(model):
                saved.append((module, module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone()))
                transform = fit.transform.to(module.weight.device)
                if self.layout == "post_norm":  # a LayerNorm: y ↦ y·s + c with a diagonal T
                    scale = torch.diagonal(transform)
                    bias = module.bias.double() * scale + (fit.shift.to(scale.device) if fit.shift is not None else 0)
                    module.weight.copy_((module.weight.double() * scale).to(module.weight.dtype))
                    module.bias.copy_(bias.to(module.bias.dtype))
                    continue
                module.weight.copy_((transform.T @ module.weight.double()).to(module.weight.dtype))
                if module.bias is not None:
                    shift = fit.shift.to(transform.device) if fit.shift is not None else 0
                    module.bias.copy_((module.bias.double() @ transform + shift).to(module.bias.dtype))

        def undo() -> None:
            with torch.no_grad():
                for module, weight, bias in saved:
                    module.weight.copy_(weight)
                    if bias is not None:
                        module.bias.copy_(bias)

        return undo

    def summary(self, data: str | None = None) -> dict:
        """The record for `collapse_report.json` and the card."""
        return {
            "method": self.method,
            "layout": self.layout,
            "rows": self.rows,
            "tokens": self.tokens,
            "data": data,
            "ridge": RIDGE if self.method != "linear" else None,
            "ridge_choice": f"{FOLDS}-fold cross-validation on the calibration rows, per span" if self.method == "linear" else "fixed",
            "shift": any(fit.shift is not None for fit in self.fits),
            "spans": [
                {"removed": list(range(fit.first, fit.last + 1)), "folded_into": fit.site.removesuffix(".base_layer"),
                 "ridge": fit.ridge,
                 "error_before": fit.error_before, "error_after": fit.error_after,
                 **({"left_unrepaired": True, "rejected_error_after": fit.rejected_error} if fit.rejected_error is not None else {})}
                for fit in self.fits
            ],
            "verified": True,
        }


def _site_path(stack_path: str, index: int, layout: str) -> str:
    return f"{stack_path}.{index}.{_SITES[layout]}"


def _plan_spans(model: nn.Module, removed: Sequence[int], method: str) -> tuple[str, list[tuple[int, int, str]]]:
    """The layout and `(first, last, site path)` per span; refuses a span with no kept layer before it."""
    check_foldable(model, method)
    if not removed:
        raise ValueError(f"repair={method!r} repairs the cut left by removed layers, but nothing is removed: "
                         "remove layers, or use repair='none'")
    _, layout = _family(model)
    (stack, *_) = find_layer_stacks(model)
    planned = []
    for first, last in spans(removed):
        if first == 0:
            raise ValueError(
                f"repair={method!r} folds into the last kept layer before each removed span, and the span {first}-{last} "
                "starts at layer 0, with no kept layer before it: keep layer 0 (collapse_protect_first=1), or use "
                "repair='none'"
            )
        site = _site_path(stack.path, first - 1, layout)
        module = unwrap_model(model).get_submodule(site)
        expected = nn.Linear if layout == "pre_norm" else nn.LayerNorm
        if not isinstance(module, expected) and isinstance(getattr(module, "base_layer", None), expected):
            site, module = f"{site}.base_layer", module.base_layer  # a PEFT adapter layer: fold into its base weights
        if not isinstance(module, expected):
            raise ValueError(f"repair={method!r}: {site} is a {type(module).__name__}, not the {expected.__name__} the "
                             "fold is exact for; use repair='none'")
        planned.append((first, last, site))
    return layout, planned


def _capture(model: nn.Module, planned, layout: str, batches, folds: int = 1) -> tuple[list[_Stats], int]:
    """One pass over the calibration batches, accumulating the sums of every span (the rows dealt round-robin to
    `folds` folds); returns them and the rows."""
    inner = unwrap_model(model)
    (stack, *_) = find_layer_stacks(model)
    stats = [_Stats(folds) for _ in planned]
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles, rows = [], 0

    def keep(key):
        def hook(module, args, output):
            seen[key] = output if isinstance(output, torch.Tensor) else output[0]
        return hook

    for i, (first, last, site) in enumerate(planned):
        handles.append(inner.get_submodule(site).register_forward_hook(keep((i, "m"))))
        handles.append(stack.layers[first - 1].register_forward_hook(keep((i, "out"))))
        handles.append(stack.layers[last].register_forward_hook(keep((i, "z"))))
    device = next(inner.parameters()).device
    try:
        with eval_mode(inner), torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                seen.clear()
                inner(**batch)
                mask = batch.get(stack.mask_key)
                shape = seen[(0, "m")].shape
                batch_rows = shape[0] if len(shape) == 3 else 1
                # the fold of each token: its row's, rows dealt round-robin across batches
                fold = ((rows + torch.arange(batch_rows)) % folds).repeat_interleave(shape[-2] if len(shape) == 3 else shape[0])
                rows += len(batch["input_ids"]) if "input_ids" in batch else 1
                for i, part in enumerate(stats):
                    m, out, z = (seen[(i, k)].reshape(-1, seen[(i, k)].shape[-1]) for k in ("m", "out", "z"))
                    where = fold
                    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                        real = mask.reshape(-1).bool()
                        m, out, z, where = m[real], out[real], z[real], fold[real.cpu()]
                    r = z - (torch.zeros_like(m) if layout == "post_norm" else out - m)
                    if folds == 1:  # every token in the one fold: no masked copy
                        part.add(m, r, 0)
                        continue
                    for f in range(folds):
                        chosen = (where == f).to(m.device)
                        if bool(chosen.any()):
                            part.add(m[chosen], r[chosen], f)
    finally:
        for handle in handles:
            handle.remove()
    return stats, rows


def fit_repair(
    model: nn.Module,
    removed: Sequence[int],
    calibration: object,
    method: str,
    *,
    tokenizer: object | None = None,
    batch_size: int = 8,
    keep_worse: bool = False,
) -> RepairPlan:
    """Fit the repair of every span of `removed` (0-based, before removal) on the full model; changes nothing.

    For each contiguous span `a..b`, the last kept layer before it is `L = a - 1`; over the calibration tokens, `M` is
    the output of `L`'s MLP output projection (`mlp.down_proj`, before the residual add), `Y` the rest of `L`'s
    output and `Z` the hidden state after the span. The map replaces `M` by `M T (+ c)` so that `Y + M T` approaches
    `Z`: `"linear"` by ridge least squares (λ = ρ × the mean diagonal of `MᵀM`, `ρ` chosen per span by 4-fold
    cross-validation over the calibration rows), `"scale"` the same per channel (`ρ = 1e-2`),
    `"transport"` the closed-form Monge map between Gaussian fits of `M` (its covariance shrunk by the same ridge)
    and `Z − Y`. A shift `c` is fitted only
    where the projection has a bias. In post-norm encoders (BERT, RoBERTa) only `"scale"` folds exactly (into the
    output LayerNorm of `L`, with its shift). [`collapse_model`] with `repair=` fits, folds and verifies it.

    Args:
        model (`nn.Module`): the full model, before any removal.
        removed (`Sequence[int]`): the layers that will be removed (their contiguous runs are the spans).
        calibration: texts (with `tokenizer`), tokenized rows, or batches, as [`score_layers`] takes them; it must
            be readable again (a list, a dataset or a DataLoader).
        method (`str`): `"scale"`, `"linear"` or `"transport"`.
        tokenizer (*optional*), batch_size (`int`, defaults to 8): for texts and rows.
        keep_worse (`bool`, defaults to `False`): keep every fitted map, even one that does not lower the error on
            its calibration tokens (to study the maps themselves; [`collapse_model`] never sets it).

    A span whose fitted map does not lower that error on the calibration tokens themselves is left unrepaired (the
    identity, recorded with the rejected map's error): a map worse than none on its own data only hurts.

    Returns:
        `RepairPlan`: one `SpanFit` per span (the map, the site it folds into, the relative error after the cut without
        and with it, the moments of `M` and `Z − Y`), the rows and tokens it was fitted on; `plan.fold(model)` folds it.

    Raises:
        `ValueError`: a repair the family cannot fold exactly, nothing removed, a span starting at layer 0, no
            calibration data, or fewer calibration tokens than the fit needs (the hidden size for `linear` and
            `transport`, 2 for `scale`).
    """
    (plan,) = fit_repairs(model, [removed], calibration, method, tokenizer=tokenizer, batch_size=batch_size,
                          keep_worse=keep_worse)
    return plan


def fit_repairs(
    model: nn.Module,
    candidates: Sequence[Sequence[int]],
    calibration: object,
    method: str,
    *,
    tokenizer: object | None = None,
    batch_size: int = 8,
    keep_worse: bool = False,
) -> list[RepairPlan]:
    """[`fit_repair`] for several candidate removals at once, in one calibration pass: one `RepairPlan` per candidate
    (each a list of layers), a span shared by two candidates fitted once. To compare where to cut with the repair
    applied (every contiguous block of `k` layers, say) without a calibration pass per candidate; the same
    arguments, checks and errors as [`fit_repair`], each candidate checked before anything runs."""
    check_repair(method)
    if method == "none":
        raise ValueError("repair='none' fits nothing")
    if calibration is None:
        raise ValueError(f"repair={method!r} is fitted on calibration data: pass calibration= (rows, texts or batches)")
    if not candidates:
        raise ValueError("fit_repairs needs at least one candidate list of layers to remove")
    layouts, per_candidate = zip(*(_plan_spans(model, removed, method) for removed in candidates))
    layout = layouts[0]
    planned = list(dict.fromkeys(span for spans_ in per_candidate for span in spans_))  # each span once, in order
    batches = calibration_batches(calibration, tokenizer, batch_size)
    stats, rows = _capture(model, planned, layout, batches, FOLDS if method == "linear" else 1)
    tokens = stats[0].n
    if not tokens:
        raise ValueError(f"repair={method!r}: the calibration data gave no tokens; give rows with text in them")
    d = stats[0].gram.shape[0] - 1
    needed = 2 if method == "scale" else d
    if tokens < needed:
        raise ValueError(
            f"repair={method!r} needs at least {needed} calibration tokens"
            + (f" (one per hidden channel: it fits a {d}×{d} matrix per span)" if method != "scale" else "")
            + f", and the calibration data gave {tokens}: give more rows (calibration_samples), or use repair='scale'"
        )
    fitted = {span: _fit_span(model, span, part, method, keep_worse) for span, part in zip(planned, stats)}
    return [RepairPlan(method, layout, [fitted[span] for span in spans_], rows, tokens) for spans_ in per_candidate]


def _fit_span(model: nn.Module, span: tuple[int, int, str], part: _Stats, method: str, keep_worse: bool) -> SpanFit:
    """The map of one span from its sums; the identity (with the rejected map's error) when the map does not lower
    the error on its own calibration tokens, unless `keep_worse`."""
    first, last, site = span
    d = part.gram.shape[0] - 1
    with_shift = getattr(unwrap_model(model).get_submodule(site), "bias", None) is not None
    transform, shift, ridge = _solve(part, method, with_shift)
    if not bool(torch.isfinite(transform).all()):
        raise ValueError(f"the {method} repair of span {first}-{last} is not finite: the activations hold "
                         "non-finite values (an fp16 overflow?); fit in float32")
    identity = torch.eye(d, dtype=transform.dtype)
    target = float(torch.trace(part.rr)) or 1.0
    before, after, rejected = part.error(identity, None) / target, part.error(transform, shift) / target, None
    if after >= before and not keep_worse:  # never fold a map that is worse than none on the very data it was fitted on
        transform, rejected, after = identity, after, before
        shift = torch.zeros(d, dtype=identity.dtype) if shift is not None else None
    return SpanFit(first, last, site, transform, shift, part.n, before, after, *part.moments(), rejected, ridge)


@contextlib.contextmanager
def repaired_reference(model: nn.Module, plan: RepairPlan, removed: Sequence[int]) -> Iterator[None]:
    """Inside the block, `model` (the original, unchanged) runs with `removed` bypassed and each fitted map applied
    to its site's output by a hook: the reference a repaired, collapsed model must equal."""

    def apply(fit: SpanFit):
        def hook(module, args, output):
            transform = fit.transform.to(output.device)
            mapped = output.double() @ transform
            if fit.shift is not None:
                mapped = mapped + fit.shift.to(output.device)
            return mapped.to(output.dtype)
        return hook

    handles = [module.register_forward_hook(apply(fit)) for module, fit in plan.sites(model)]
    try:
        with bypass_layers(model, list(removed)):
            yield
    finally:
        for handle in handles:
            handle.remove()


def measure_runs(
    model: nn.Module,
    runs: Sequence[Sequence[int]],
    method: str,
    calibration: object,
    measure: Callable[[list[int], bool], float],
    log: Callable[[str], None] | None = None,
) -> tuple[list[list], list[RepairPlan | None]]:
    """Measure each candidate run of layers for removal, as the `block` choices do: with a repair, every run's map is
    fitted in one pass over `calibration` ([`fit_repairs`]) and `measure(run, True)` is called inside
    [`repaired_reference`] (the run bypassed, its map applied by hooks); with `method="none"`, `measure(run, False)`
    must bypass the run itself. Returns the `[run, value]` curve in the order of `runs` and each run's plan (None
    without a repair), so the map folded can be the very one that was measured. `measure` refuses what it cannot use."""
    plans: list[RepairPlan | None] = [None] * len(runs)
    if method != "none":
        plans = list(fit_repairs(model, runs, calibration, method))
    curve = []
    for run, plan in zip(runs, plans):
        run = list(run)
        if plan is None:
            value = measure(run, False)
        else:
            with repaired_reference(model, plan, run):
                value = measure(run, True)
        curve.append([run, value])
        if log is not None:
            log(f"bypassed {run}{' with its ' + method + ' map' if plan is not None else ''}: {value:.4f}")
    return curve, plans


def _logits(model: nn.Module, probe: Mapping) -> torch.Tensor:
    with torch.no_grad(), eval_mode(model):
        output = model(**probe)
    value = output if isinstance(output, torch.Tensor) else output[0]
    return value.detach().double().cpu()


def fold_verified(model: nn.Module, plan: RepairPlan, removed: Sequence[int]) -> Callable[[], None]:
    """Fold the plan into the weights, and check on a probe that the model with the spans bypassed equals
    [`repaired_reference`]; on a mismatch restore the weights and raise. Returns what restores them."""
    inner = unwrap_model(model)
    probe = build_probe(inner)
    if probe is None:
        raise ValueError("the repair cannot be verified: the model's forward takes neither input_ids nor pixel_values")
    with repaired_reference(inner, plan, removed):
        reference = _logits(inner, probe)
    undo = plan.fold(inner)
    with bypass_layers(inner, list(removed)):
        got = _logits(inner, probe)
    dtype = next(p.dtype for p in inner.parameters() if p.is_floating_point())
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    scale = max(float(reference.abs().max()), 1e-6)
    error = float((got - reference).abs().max())
    if not math.isfinite(error) or error > tolerance * scale:
        undo()
        raise ValueError(
            f"the {plan.method} repair could not be verified, so nothing was changed: with the fold the model differs "
            f"from the reference (bypassed span, fitted map applied) by up to {error:.3g} (largest value {scale:.3g})"
        )
    return undo
