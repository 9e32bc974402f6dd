"""Accuracy: the fraction of predictions equal to their reference label.

An `evaluate` metric module shipped inside hf-collapse, so that it loads without the Hugging Face Hub:
`evaluate.load("<path to this folder>")`, or `hf_collapse.evaluation.load_metric("accuracy")`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions that equal their reference label, between 0 and 1."

_INPUTS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids, one per prediction.

Returns:
    `dict`: `{"accuracy": float}`.

Example:
    >>> accuracy = evaluate.load("hf_collapse/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1])
    {'accuracy': 0.75}
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("accuracy of zero predictions is undefined: pass at least one prediction")
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
