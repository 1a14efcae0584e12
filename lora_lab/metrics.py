"""Evaluation metrics through `evaluate`, from metric modules kept in the repo (they load offline).

Per-step metrics (accuracy, f1_<positive label>, f1_macro, token_accuracy) come from the Trainer's eval
loop; `perplexity` is exp(eval loss); `exact_match` decodes greedily, at the final evaluation (and on
a subsample at each evaluation when a pruner needs it: lora_lab/pruning.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import evaluate
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from lora_lab.data import IGNORE_INDEX
from lora_lab.loftq import dequantized_weight
from lora_lab.metric_names import step_metrics

MODULES_DIR = Path(__file__).parent / "metric_modules"


def load_metric(name: str) -> evaluate.EvaluationModule:
    return evaluate.load(str(MODULES_DIR / name))


def argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the predicted ids, so that eval never holds a vocab-sized logits tensor in memory."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def step_metrics_fn(kind: str, names: list[str], labels: list[str]) -> Callable | None:
    """The Trainer's compute_metrics for the metrics computed in its eval loop."""
    available = step_metrics(kind, labels)
    wanted = {name: available[name] for name in names if name in available}
    if not wanted:
        return None
    modules = {module: load_metric(module) for module, _ in wanted.values()}

    def compute(eval_pred) -> dict[str, float]:
        predictions, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
        if kind == "causal_lm":
            # Position t predicts token t+1; score only positions that carry a label.
            predictions, labels = predictions[:, :-1], labels[:, 1:]
            mask = labels != IGNORE_INDEX
            predictions, labels = predictions[mask], labels[mask]
        results = {}
        for name, (module, arguments) in wanted.items():
            value = modules[module].compute(
                predictions=predictions.ravel(), references=labels.ravel(), **arguments
            )
            results[name] = next(iter(value.values()))
        return results

    return compute


def perplexity(loss: float) -> float:
    """exp of the mean token cross-entropy (capped, so that a diverged loss gives no overflow)."""
    return math.exp(min(loss, 50.0))


def add_perplexity(metrics: dict[str, float]) -> None:
    """eval/perplexity from eval/loss."""
    loss = metrics.get("eval/loss")
    if loss is not None:
        metrics["eval/perplexity"] = perplexity(loss)


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, stop_token_ids: list[int] = ()
) -> list[str]:
    """Greedy decoding of each prompt's continuation, stopped at EOS or one of `stop_token_ids` (a chat
    template's end-of-turn tokens)."""
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(
                model.device
            )
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted({tokenizer.eos_token_id, *stop_token_ids} - {None}),
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def exact_match(predictions: list[str], references: list[str], answer_pattern: str | None) -> float:
    """Exact match of the answers; with a pattern, of its first group in each string (e.g. GSM8K's
    `#### 42`), numbers compared as numbers."""
    if answer_pattern is not None:
        predictions = [_answer(answer_pattern, p) for p in predictions]
        references = [_answer(answer_pattern, r) for r in references]
    return load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]


def _answer(pattern: str, text: str) -> str:
    """The first match: a generation that goes on past its answer (into a next question of its own,
    with answers of its own) is scored on its answer. A number in canonical form: 1,000.00 is 1000."""
    found = re.search(pattern, text)
    if found is None:
        return ""
    answer = found.group(1).strip()
    try:
        number = Decimal(answer.replace(",", ""))
    except InvalidOperation:
        return answer
    return format(number.normalize(), "f") if number else "0"  # -0 too


@dataclass
class ExactMatchScorer:
    """exact_match of greedy generations for the eval prompts against their references."""

    tokenizer: PreTrainedTokenizerBase
    prompts: list[str]
    references: list[str]
    answer_pattern: str | None
    max_new_tokens: int
    batch_size: int
    stop_token_ids: list[int] = field(default_factory=list)

    def __call__(self, model, limit: int | None = None) -> float:
        """On all prompts, or on the first `limit` of them (the same ones at every call)."""
        predictions = generate_responses(
            model,
            self.tokenizer,
            self.prompts[:limit],
            self.max_new_tokens,
            self.batch_size,
            self.stop_token_ids,
        )
        return exact_match(predictions, self.references[:limit], self.answer_pattern)


@torch.no_grad()
def lora_diagnostics(peft_model) -> list[dict]:
    """Per LoRA layer: ||s B A|| / ||W|| (how far the adapter moved the weight) and the singular
    values of B A, with the effective rank exp(entropy of the normalised spectrum) (Roy & Vetterli)."""
    rows = []
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        base = module.base_layer
        weight = dequantized_weight(base)
        lora_a = module.lora_A["default"].weight.float()
        lora_b = module.lora_B["default"].weight.float()
        # The r x r core of B A has the same singular values, at a fraction of the cost.
        _, r_b = torch.linalg.qr(lora_b)
        _, r_a = torch.linalg.qr(lora_a.T)
        singular = torch.linalg.svdvals(r_b @ r_a.T)
        scaling = float(module.scaling["default"])
        total = float(singular.sum())
        p = singular / total if total > 0 else singular
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        rows.append(
            {
                "module": name.removeprefix("base_model.model."),
                "type": name.rsplit(".", 1)[-1],
                "relative_update": scaling * float(singular.square().sum().sqrt()) / float(weight.norm()),
                "effective_rank": float(torch.tensor(entropy).exp()) if total > 0 else 0.0,
                "rank": int(lora_a.shape[0]),
            }
        )
    return rows


def summarise_diagnostics(rows: list[dict]) -> dict[str, float]:
    """Mean relative update and effective rank per module type (q_proj, v_proj, ...)."""
    summary: dict[str, float] = {}
    for kind in sorted({r["type"] for r in rows}):
        of_kind = [r for r in rows if r["type"] == kind]
        summary[f"lora/{kind}/relative_update"] = sum(r["relative_update"] for r in of_kind) / len(of_kind)
        summary[f"lora/{kind}/effective_rank"] = sum(r["effective_rank"] for r in of_kind) / len(of_kind)
    return summary
