"""Exact match of predicted and reference strings (after stripping whitespace), kept in the repo."""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference, ignoring surrounding whitespace.",
            citation="",
            inputs_description="predictions and references: lists of strings",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
        return {"exact_match": hits / max(len(references), 1)}
