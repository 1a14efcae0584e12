"""F1, binary (of the class `pos_label`) or averaged over classes (macro / micro / weighted), kept in the
repo for offline use."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Harmonic mean of precision and recall.",
            citation="",
            inputs_description=(
                "predictions and references: lists of class ids; average: binary, macro, micro, weighted; "
                "pos_label: the positive class id of binary F1"
            ),
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        return {"f1": float(f1_score(references, predictions, average=average, pos_label=pos_label))}
