"""F1 score (harmonic mean of precision and recall) for binary and multi-class classification.

An `evaluate` metric module shipped inside hf-collapse, so that it loads without the Hugging Face Hub:
`evaluate.load("<path to this folder>")`, or `hf_collapse.evaluation.load_metric("f1")`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
F1 of a class = 2 TP / (2 TP + FP + FN). Averages: "binary" (the class `pos_label` only; needs at most two
distinct labels; 0 when `pos_label` occurs nowhere), "macro" (unweighted mean over the labels seen in the
predictions or references), "weighted" (mean weighted by each label's count in the references) and "micro"
(pooled counts, equal to accuracy for single-label classification).
"""

_INPUTS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids, one per prediction.
    average (`str`, defaults to `"binary"`): `"binary"`, `"macro"`, `"weighted"` or `"micro"`.
    pos_label (`int`, defaults to 1): the positive class for `average="binary"`.

Returns:
    `dict`: `{"f1": float}`.

Example:
    >>> f1 = evaluate.load("hf_collapse/metrics/f1")
    >>> f1.compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1])
    {'f1': 0.8}
"""

_AVERAGES = ("binary", "macro", "weighted", "micro")


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        if average not in _AVERAGES:
            raise ValueError(f"unknown average {average!r}: choose one of {', '.join(map(repr, _AVERAGES))}")
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.size == 0:
            raise ValueError("F1 of zero predictions is undefined: pass at least one prediction")
        labels = np.union1d(predictions, references)
        if average == "binary":
            if len(labels) > 2:
                raise ValueError(
                    f"average='binary' needs at most two classes but the inputs hold {len(labels)} "
                    f"({labels.tolist()}): use average='macro', 'weighted' or 'micro'"
                )
            labels = np.array([pos_label])
        tp = np.array([np.sum((predictions == c) & (references == c)) for c in labels], dtype=float)
        fp = np.array([np.sum((predictions == c) & (references != c)) for c in labels], dtype=float)
        fn = np.array([np.sum((predictions != c) & (references == c)) for c in labels], dtype=float)
        if average == "micro":
            return {"f1": float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))}
        denominator = 2 * tp + fp + fn
        # A zero denominator only happens for "binary" when pos_label occurs nowhere.
        per_class = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        if average == "weighted":
            support = np.array([np.sum(references == c) for c in labels], dtype=float)
            return {"f1": float(np.sum(per_class * support) / support.sum())}
        return {"f1": float(per_class.mean())}
