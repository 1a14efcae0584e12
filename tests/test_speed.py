"""Correctness of the speed switches on CPU: packed (padding-free) batches give the padded loss."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_EVAL, compose, train_run

from lora_lab.config import validate
from lora_lab.data import build_task_data
from lora_lab.models import load_model
from lora_lab.tasks import load_rows


def test_packed_and_padded_batches_give_the_same_loss_and_gradients():
    run = validate(compose(["task=sort"]))
    model, tokenizer = load_model(run.model, run.quant, [], "cpu")
    model.train(False)
    for p in model.parameters():
        p.requires_grad_(True)
    train_rows, eval_rows = load_rows(run.task)
    rows = train_rows[:12]
    losses, grads = {}, {}
    for packing in (False, True):
        data = build_task_data(rows, eval_rows[:4], "sft", tokenizer, 64, packing)
        batch = data.collator([data.train[i] for i in range(len(rows))])
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses[packing] = loss.item()
        grads[packing] = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        if packing:
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
            assert int(batch["position_ids"].eq(0).sum()) == len(rows)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert torch.allclose(grads[True], grads[False], atol=1e-6)


def test_training_with_and_without_packing_matches(tmp_path):
    common = [*SMALL_EVAL, "train.max_steps=15", "train.eval_steps=15", "adapter.dropout=0"]
    packed = train_run([*common, "train.packing=true"], tmp_path / "packed")
    padded = train_run([*common, "train.packing=false"], tmp_path / "padded")
    assert packed["train/tokens"] == padded["train/tokens"]  # padding is not counted in either
    assert packed["eval/loss"] == pytest.approx(padded["eval/loss"], rel=1e-3)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    common = [
        *SMALL_EVAL,
        "train.max_steps=6",
        "train.eval_steps=6",
        "adapter.dropout=0",
        "train.packing=false",
    ]
    eager = train_run(common, tmp_path / "eager")
    compiled = train_run([*common, "train.compile=true"], tmp_path / "compiled")
    assert compiled["eval/loss"] == pytest.approx(eager["eval/loss"], rel=1e-3)


def test_liger_is_refused_clearly_where_it_cannot_run():
    from lora_lab.config import ConfigError
    from lora_lab.trainer import use_liger

    assert use_liger("auto", "cpu") is False  # auto never turns it on without CUDA
    with pytest.raises(ConfigError, match="train.liger='true'.*CUDA"):
        use_liger("true", "cpu")


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    common = [*SMALL_EVAL, "train.max_steps=8", "train.eval_steps=8", "adapter.dropout=0"]
    plain = train_run([*common, "train.gradient_checkpointing=false"], tmp_path / "plain")
    checkpointed = train_run([*common, "train.gradient_checkpointing=true"], tmp_path / "checkpointed")
    assert checkpointed["eval/loss"] == pytest.approx(plain["eval/loss"], rel=1e-4)


def test_automatic_checkpointing_is_off_on_cpu():
    from lora_lab.trainer import checkpointing_needed

    assert (
        checkpointing_needed(model=None, data=None, batch_size=4, device="cpu", compute_dtype=torch.float32)
        is False
    )
