"""Correctness of the speed switches on CPU: packing, the fused loss, compile and checkpointing
each train exactly as the plain path does."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_EVAL, cli, compose, train_run

from lora_lab.adapters import attach_adapter
from lora_lab.config import AdapterConfig
from lora_lab.data import (
    IGNORE_INDEX,
    RowPackingCollator,
    batch_collator,
    batch_to,
    build_task_data,
    longest_batch,
    real_tokens,
)
from lora_lab.errors import ConfigError
from lora_lab.models import load_model
from lora_lab.speed import MIN_CHUNK_ROWS, PLAIN_HEAD_MODEL_TYPES, fuse_causal_lm_loss, use_fused_loss
from lora_lab.tasks import load_rows
from lora_lab.validate import validate


def test_packed_and_padded_batches_give_the_same_loss_and_gradients():
    """Rows of packed examples (sdpa, eager) and one packed row (flash, flex) train exactly as the
    padded batch does; the model is run with sdpa for all three, which keeps packed examples apart
    by their position ids."""
    run = validate(compose(["task=sort"]))
    model, tokenizer = load_model(run.model, run.quant, [], "cpu")
    model.train(False)
    for p in model.parameters():
        p.requires_grad_(True)
    _, eval_rows = load_rows(run.task)
    # Lengths from 1 to 12 numbers, so that several short examples share a row.
    rows = []
    for count in range(1, 13):
        numbers = [(7 * count + 3 * i) % 10 for i in range(count)]
        rows.append(
            {
                "prompt": "sort " + " ".join(map(str, numbers)) + " :",
                "response": " " + " ".join(map(str, sorted(numbers))),
            }
        )
    layouts = {"padded": (False, "sdpa"), "rows": (True, "sdpa"), "one row": (True, "flex_attention")}
    losses, grads, batches = {}, {}, {}
    for layout, (packing, attn) in layouts.items():
        data = build_task_data(rows, eval_rows[:4], "sft", tokenizer, 64, packing, attn)
        batch = batches[layout] = data.collator([data.train[i] for i in range(len(rows))])
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses[layout] = loss.item()
        grads[layout] = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    longest = batches["padded"]["input_ids"].shape[1]
    assert batches["rows"]["input_ids"].shape[1] == longest and "attention_mask" not in batches["rows"]
    assert 1 < batches["rows"]["input_ids"].shape[0] < len(rows)
    assert int(batches["rows"]["position_ids"].eq(0).sum()) == len(rows)
    assert batches["one row"]["input_ids"].shape[0] == 1
    assert int(batches["one row"]["position_ids"].eq(0).sum()) == len(rows)
    for layout in ("rows", "one row"):
        assert losses[layout] == pytest.approx(losses["padded"], rel=1e-5)
        assert torch.allclose(grads[layout], grads["padded"], atol=1e-6)


def test_row_packing_fills_rows_first_fit_and_pads_without_new_examples():
    collate = RowPackingCollator(pad_token_id=0)
    batch = collate(
        [{"input_ids": [v] * n, "labels": [v] * n} for v, n in [(1, 5), (2, 2), (3, 3), (4, 1), (5, 4)]]
    )
    assert batch["input_ids"].tolist() == [[1] * 5, [5, 5, 5, 5, 4], [3, 3, 3, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    # Examples of one length each get a row; padding continues the positions of its row's example,
    # so no row looks packed and attention takes its plain causal path.
    batch = collate([{"input_ids": [7] * n, "labels": [7] * n} for n in (4, 3, 3)])
    assert batch["input_ids"].tolist() == [[7, 7, 7, 7], [7, 7, 7, 0], [7, 7, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 7, 7], [-100, 7, 7, -100], [-100, 7, 7, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 3


def test_a_flash_attention_batch_moves_to_a_device_with_its_int_lengths():
    collate = batch_collator("sft", None, True, "flash_attention_2")
    batch = batch_to(
        collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}]), "cpu"
    )
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4] and batch["max_length_q"] == 3


def test_real_tokens_count_eos_when_it_is_also_the_pad_token():
    """Llama 3, Mistral and Qwen base tokenizers pad with EOS, which ends every SFT example: a count
    by the pad id would drop one token per example from packed batches."""
    run = validate(compose(["task=sort"]))
    _, tokenizer = load_model(run.model, run.quant, [], "cpu")
    tokenizer.pad_token = tokenizer.eos_token
    train_rows, _ = load_rows(run.task)
    counts = {}
    for packing, attn in [(False, "sdpa"), (True, "sdpa"), (True, "flex_attention")]:
        data = build_task_data(train_rows[:16], train_rows[:2], "sft", tokenizer, 64, packing, attn)
        batch = data.collator([data.train[i] for i in range(16)])
        counts[packing, attn] = int(real_tokens(batch, tokenizer.pad_token_id))
    lengths = sum(len(ids) for ids in data.train["input_ids"])
    assert set(counts.values()) == {lengths}, counts


def test_lm_blocks_stay_rows_with_packing_on():
    """LM text is cut into full blocks: packing would remove no padding and only make every block
    attend within one long row, quadratic in the batch's total length for sdpa and eager."""
    run = validate(compose(["task=sort"]))
    _, tokenizer = load_model(run.model, run.quant, [], "cpu")
    rows = [{"text": " ".join(["sort 3 1 2 : 1 2 3"] * 40)}] * 6
    data = build_task_data(rows, rows[:2], "lm", tokenizer, 32, packing=True)
    batch = data.collator([data.train[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 32) and "position_ids" not in batch
    assert bool(batch["labels"].ne(IGNORE_INDEX).all())


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
    from lora_lab.speed import use_liger

    run = validate(compose([]))
    model, _ = load_model(run.model, run.quant, [], "cpu")
    assert use_liger("auto", model, "causal_lm", "cpu") is False  # auto never turns it on without CUDA
    with pytest.raises(ConfigError, match="train.liger=True.*CUDA"):
        use_liger(True, model, "causal_lm", "cpu")
    # Liger replaces a causal LM's forward: a classifier has none to replace, on any device.
    assert use_liger("auto", model, "seq_cls", "cuda") is False
    with pytest.raises(ConfigError, match="train.liger=True.*causal-LM tasks only"):
        use_liger(True, model, "seq_cls", "cuda")


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    common = [*SMALL_EVAL, "train.max_steps=8", "train.eval_steps=8", "adapter.dropout=0"]
    plain = train_run([*common, "train.gradient_checkpointing=false"], tmp_path / "plain")
    checkpointed = train_run([*common, "train.gradient_checkpointing=true"], tmp_path / "checkpointed")
    assert checkpointed["eval/loss"] == pytest.approx(plain["eval/loss"], rel=1e-4)


def test_automatic_checkpointing_is_off_on_cpu_and_probes_the_longest_batch():
    from lora_lab.speed import checkpointing_needed

    run = validate(compose(["task=sort"]))
    model, tokenizer = load_model(run.model, run.quant, [], "cpu")
    train_rows, eval_rows = load_rows(run.task)
    data = build_task_data(train_rows[:50], eval_rows[:4], "sft", tokenizer, 64, packing=False)
    batch = longest_batch(data, 4)
    longest = max(len(ids) for ids in data.train["input_ids"])
    assert batch["input_ids"].shape == (4, longest)
    assert checkpointing_needed(model, batch, "cpu", torch.float32) is False


def tiny_causal_lm(model_type: str):
    """A small random causal LM of each architecture the fused loss supports."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train mode, same loss twice
    if model_type == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256, **no_dropout
        )
    else:
        config = AutoConfig.for_model(model_type, **sizes, **heads)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


# torch.nn.functional.linear_cross_entropy came with torch 2.13; the GPU image has 2.11.
HAS_FUSED_LOSS = hasattr(torch.nn, "LinearCrossEntropyOptions")
needs_fused_loss = pytest.mark.skipif(not HAS_FUSED_LOSS, reason="torch < 2.13 has no linear_cross_entropy")


@needs_fused_loss
@pytest.mark.parametrize("model_type", PLAIN_HEAD_MODEL_TYPES)
def test_fused_loss_equals_the_models_own_loss_and_gradients(model_type):
    model = attach_adapter(
        tiny_causal_lm(model_type), AdapterConfig(r=4, dropout=0.0, target_modules="all-linear"), "causal_lm"
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter, so its gradients pass through the head
            torch.nn.init.normal_(param, std=0.05)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 512, (3, 200), generator=generator)  # 600 tokens: 3 chunks
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 150:] = 0  # a padded row
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :10] = IGNORE_INDEX  # prompt tokens carry no loss
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    assert input_ids.numel() > 2 * MIN_CHUNK_ROWS  # the loss runs over several chunks
    # num_items_in_batch: the Trainer's count over all accumulated micro-batches, here twice this one
    num_items = 2 * (labels[:, 1:] != IGNORE_INDEX).sum()

    def loss_and_grads(**extra):
        model.zero_grad()
        loss = model(**batch, **extra).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    plain = [loss_and_grads(), loss_and_grads(num_items_in_batch=num_items)]
    assert use_fused_loss("auto", model, "causal_lm", liger=False)
    fuse_causal_lm_loss(model)
    fused = [loss_and_grads(), loss_and_grads(num_items_in_batch=num_items)]
    for (plain_loss, plain_grads), (fused_loss, fused_grads) in zip(plain, fused, strict=True):
        assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
        assert plain_grads.keys() == fused_grads.keys()
        for name in plain_grads:
            torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert fused[1][0] == pytest.approx(fused[0][0] / 2, rel=1e-5)  # summed over the given count

    model.eval()  # evaluation keeps the plain forward: metrics need the logits
    with torch.no_grad():
        outputs = model(**batch)
    assert outputs.logits.shape == (3, 200, 512)
    assert outputs.loss.item() == pytest.approx(plain[0][0], rel=1e-5)


def test_fused_loss_is_used_only_where_it_computes_the_models_loss():
    llama = attach_adapter(tiny_causal_lm("llama"), AdapterConfig(target_modules="all-linear"), "causal_lm")
    if HAS_FUSED_LOSS:
        assert use_fused_loss(True, llama, "causal_lm", liger=False)
    else:
        assert not use_fused_loss("auto", llama, "causal_lm", liger=False)
        with pytest.raises(ConfigError, match="no chunked linear_cross_entropy"):
            use_fused_loss(True, llama, "causal_lm", liger=False)
    assert not use_fused_loss("auto", llama, "causal_lm", liger=True)  # liger fuses the loss itself
    assert not use_fused_loss(False, llama, "causal_lm", liger=False)
    adapted_head = attach_adapter(
        tiny_causal_lm("llama"), AdapterConfig(target_modules=["q_proj", "lm_head"]), "causal_lm"
    )
    assert not use_fused_loss("auto", adapted_head, "causal_lm", liger=False)
    with pytest.raises(ConfigError, match="train.fused_loss=True.*not a plain torch.nn.Linear"):
        use_fused_loss(True, adapted_head, "causal_lm", liger=False)


@needs_fused_loss
def test_training_with_the_fused_loss_matches_the_plain_loss(tmp_path):
    # grad_accum=2: the Trainer passes num_items_in_batch, which the fused loss must honour
    common = [
        *SMALL_EVAL,
        "train.max_steps=8",
        "train.eval_steps=8",
        "adapter.dropout=0",
        "train.grad_accum=2",
    ]
    plain = train_run([*common, "train.fused_loss=false"], tmp_path / "plain")
    fused = train_run([*common, "train.fused_loss=true"], tmp_path / "fused")
    assert fused["eval/loss"] == pytest.approx(plain["eval/loss"], rel=1e-4)
    assert (fused["train/fused_loss"], plain["train/fused_loss"]) == (1.0, 0.0)  # metrics.json says which
    assert fused["train/gradient_checkpointing"] == 0.0  # auto, measured: off on CPU


def test_the_training_benchmark_runs_both_recipes(tmp_path):
    """`make bench`'s command on the CPU shape: a smoke run of the harness, not a speed assertion."""
    out = tmp_path / "bench.json"
    result = cli(
        [
            "-m", "lora_lab.bench", "train", "--shape", "cpu-small", "--quant", "none",
            "--batch", "2", "--seq", "64", "--steps", "3", "--out", str(out),
        ],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["recipe"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"peer", "lora_lab"}
    assert rows["peer"]["checkpointing"] and not rows["peer"]["fused_loss"]
    assert rows["lora_lab"]["fused_loss"] == HAS_FUSED_LOSS
    assert not rows["lora_lab"]["checkpointing"]  # measured: off on CPU
    assert all(row["tokens_per_second"] > 0 for row in rows.values())
    assert "| lora_lab |" in result.stdout


def test_the_benchmark_refuses_a_switch_that_cannot_run_in_one_line(tmp_path):
    args = ["-m", "lora_lab.bench", "train", "--shape", "cpu-small", "--batch", "1", "--seq", "16"]
    result = cli([*args, "--liger", "true"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: train.liger=True is invalid" in result.stderr and "CUDA" in result.stderr
