"""Remove layers from a trained model without any fine-tuning, by every rule; choose on validation, report on test."""

from __future__ import annotations

import math

import torch
from transformers import default_data_collator

import hf_collapse
from hf_collapse.evaluation import evaluate_classification, perplexity

from .data import Splits
from .studies import ScratchStudy

__all__ = ["COLLAPSED_BELOW", "RULES", "measure_removal"]

# The rules that order layers for removal: the paper's MSW ranking, the post-hoc scores, the last layers before
# the final one, and greedy measurement on the validation rows.
RULES = ("msw", "block_influence", "angular", "last_k", "measured")
# A layer counts as collapsed when its distance relative to its input's RMS is under this (1 %): its output
# distribution differs from its input by under a hundredth of the input's scale.
COLLAPSED_BELOW = 0.01


class _Metric:
    """The study's metric on a split, with the cost of a removal in the tolerance's units."""

    def __init__(self, study: ScratchStudy):
        self.study = study
        self.name = "perplexity" if study.kind == "decoder" else "accuracy"
        self.higher_is_better = study.kind == "vision"

    def __call__(self, model, split) -> float:
        if self.study.kind == "decoder":
            return perplexity(model, split, batch_size=self.study.eval_batch_size)
        return evaluate_classification(
            model, split, batch_size=self.study.eval_batch_size, collator=default_data_collator
        )["accuracy"]

    def cost(self, full: float, removed: float) -> float:
        """Relative perplexity increase (decoder) or accuracy drop in points of 1 (vision)."""
        return full - removed if self.higher_is_better else removed / full - 1


def _orders(model, splits: Splits, metric: _Metric, num_layers: int) -> tuple[dict, dict]:
    """Each rule's removal order (first = removed first) and the per-layer scores."""
    scores, orders = {}, {}
    for method in ("msw", "block_influence", "angular"):
        values = hf_collapse.score_layers(model, splits.calibration, method=method, progress=False)
        scores[method] = list(values.values)
        orders[method] = values.ranking()
    relative = hf_collapse.score_layers(model, splits.calibration, method="msw", normalization="input_rms", progress=False)
    scores["msw_relative"] = list(relative.values)
    orders["last_k"] = list(range(num_layers - 2, -1, -1))  # the layers before the final one, last first
    greedy = hf_collapse.select_by_tolerance(
        model, relative, lambda m: metric(m, splits.validation), math.inf, max_layers=num_layers - 1,
        higher_is_better=metric.higher_is_better, strategy="measured", progress=False,
    )
    orders["measured"] = list(greedy.curve[-1][0])  # the greedy path, in removal order
    return orders, scores


def _removable(costs: list[float], tolerance: float) -> int:
    """The paper's loop: layers are removed in order while every step's cost stays within the tolerance."""
    count = 0
    for cost in costs:
        if cost > tolerance:
            break
        count += 1
    return count


def measure_removal(model: torch.nn.Module, splits: Splits, study: ScratchStudy) -> dict:
    """Full-depth metrics, per-layer scores, and for every rule and k = 1 .. L-1 the validation and test metric
    of the model without that rule's first k layers (bypassed, which equals deleting them; no fine-tuning)."""
    metric = _Metric(study)
    num_layers = study.model["num_hidden_layers"]
    full = {"validation": metric(model, splits.validation), "test": metric(model, splits.test)}
    orders, scores = _orders(model, splits, metric, num_layers)
    measured: dict[tuple, dict] = {}
    rules = {}
    for rule in RULES:
        rows = []
        for k in range(1, num_layers):
            layers = tuple(sorted(orders[rule][:k]))
            if layers not in measured:
                # bypassing a layer computes what the model with that layer deleted computes (collapse_layers checks
                # exactly this before it commits), at no copy or surgery cost
                with hf_collapse.bypass_layers(model, {"": list(layers)}):
                    measured[layers] = {"validation": metric(model, splits.validation), "test": metric(model, splits.test)}
            value = measured[layers]
            rows.append({
                "k": k, "layers": list(layers), **value,
                "validation_cost": metric.cost(full["validation"], value["validation"]),
                "test_cost": metric.cost(full["test"], value["test"]),
            })
        removable = _removable([r["validation_cost"] for r in rows], study.tolerance)
        rules[rule] = {"order": orders[rule], "by_k": rows, "removable": removable}
    return {
        "metric": metric.name,
        "higher_is_better": metric.higher_is_better,
        "full": full,
        "scores": scores,
        "collapsed_layers": [i for i, v in enumerate(scores["msw_relative"]) if v < COLLAPSED_BELOW],
        "rules": rules,
        "chosen": _choose(rules, study, metric),
    }


def _choose(rules: dict, study: ScratchStudy, metric: _Metric) -> dict:
    """On validation only: the best rule at each k, and the rule that removes the most layers within tolerance."""
    sign = -1 if metric.higher_is_better else 1

    def at(rule: str, k: int) -> dict:
        return rules[rule]["by_k"][k - 1]

    by_k = {}
    for k in range(1, study.model["num_hidden_layers"]):
        rule = min(RULES, key=lambda r: (sign * at(r, k)["validation"], RULES.index(r)))
        by_k[str(k)] = {"rule": rule, **at(rule, k)}
    most = max(rules[r]["removable"] for r in RULES)
    candidates = [r for r in RULES if rules[r]["removable"] == most]
    rule = min(candidates, key=lambda r: (sign * at(r, most)["validation"], RULES.index(r))) if most else candidates[0]
    tolerance = {"rule": rule, "removable": most, **(at(rule, most) if most else {})}
    return {"by_k": by_k, "tolerance": tolerance}
