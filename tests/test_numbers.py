"""The numbers a training run reports, each checked against an independent computation: the loss
and gradients under gradient accumulation, the token-weighted eval loss, tokens/s and the baseline
after a resume, each run's own peak memory, the SFT label boundary, and which schedule applies."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, train_run, write_jsonl
from tokenizers import Tokenizer, models, normalizers, processors
from transformers import PreTrainedTokenizerFast, set_seed

from lora_lab.adapters import attach_adapter
from lora_lab.data import IGNORE_INDEX, build_task_data, tokenize_sft
from lora_lab.errors import ConfigError
from lora_lab.models import load_model
from lora_lab.tasks import load_rows
from lora_lab.trainer import build_trainer, training_arguments
from lora_lab.validate import validate

GLOBAL_BATCH = 8


def one_step(tmp_path, task: str, batch_size: int, grad_accum: int):
    """One real optimiser step on the first GLOBAL_BATCH training examples (the whole train set, so
    that every split sees the same examples), with the loss and gradient norm computed by hand on
    the same model before the step."""
    overrides = [
        f"task={task}",
        f"task.max_train_samples={GLOBAL_BATCH}",
        "task.max_eval_samples=8",
        "adapter.dropout=0",
        f"train.batch_size={batch_size}",
        f"train.grad_accum={grad_accum}",
        "train.max_steps=1",
        "train.logging_steps=1",
        "train.eval_on_start=false",
        "train.fused_loss=false",
    ]
    run = validate(compose(overrides))
    set_seed(run.train.seed)
    base, tokenizer = load_model(run.model, run.quant, run.task.labels, "cpu")
    model = attach_adapter(base, run.adapter, run.model.kind)
    data = build_task_data(
        *load_rows(run.task), run.task.format, tokenizer, run.task.max_length, run.train.packing
    )

    # By hand: every example of the global batch through the model on its own, the loss summed
    # over its targets, divided by the global batch's number of targets.
    total, targets = torch.zeros(()), 0
    for example in data.train:
        ids = torch.tensor([example["input_ids"]])
        logits = model(input_ids=ids).logits.float()
        if run.model.kind == "seq_cls":
            total = total + F.cross_entropy(logits, torch.tensor([example["labels"]]), reduction="sum")
            targets += 1
        else:
            labels = torch.tensor(example["labels"][1:])
            total = total + F.cross_entropy(
                logits[0, :-1], labels, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            targets += int((labels != IGNORE_INDEX).sum())
    loss = total / targets
    loss.backward()
    grad_norm = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters() if p.requires_grad))
    model.zero_grad()

    args = training_arguments(
        run.train, tmp_path / "checkpoints", "cpu", torch.float32, [], False, resuming=False
    )
    trainer = build_trainer(model, tokenizer, data, args, None, [], run.model.kind)
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    return float(loss.detach()), grad_norm, logged["loss"], logged["grad_norm"]


@pytest.mark.parametrize("task", ["sentiment", "sort"])
@pytest.mark.parametrize("batch_size,grad_accum", [(8, 1), (4, 2), (2, 4)])
def test_any_split_of_a_global_batch_gives_its_loss_and_gradient(tmp_path, task, batch_size, grad_accum):
    # Before the fix a classifier's loss and gradient norm were multiplied by grad_accum.
    loss, grad_norm, logged_loss, logged_grad_norm = one_step(tmp_path, task, batch_size, grad_accum)
    assert logged_loss == pytest.approx(loss, rel=1e-4)
    assert logged_grad_norm == pytest.approx(grad_norm, rel=1e-3)


def test_eval_loss_is_the_mean_over_all_label_tokens(tmp_path):
    # Eval batches of 4: a batch of one-token answers, then a batch of long ones. The mean of the two
    # batch means weighs a token of the short batch ten times more than one of the long batch.
    rows = [{"prompt": f"q{i} :", "response": " x"} for i in range(4)]
    rows += [{"prompt": f"q{i} :", "response": " " + "y z " * 10} for i in range(4)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", rows)
    overrides = [
        "task=jsonl",
        f"task.train_path={tmp_path}/train.jsonl",
        f"task.eval_path={tmp_path}/eval.jsonl",
        "train.max_steps=3",
        "train.eval_steps=3",
        "train.eval_batch_size=4",
        "train.eval_on_start=false",
    ]
    metrics = train_run(overrides, tmp_path / "run")

    from peft import PeftModel

    run = validate(compose(overrides))
    base, tokenizer = load_model(run.model, run.quant, run.task.labels, "cpu")
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    data = build_task_data(*load_rows(run.task), "sft", tokenizer, run.task.max_length, True)
    sums, counts = [], []
    with torch.no_grad():
        for example in data.eval:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(example["labels"][1:])
            sums.append(float(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")))
            counts.append(int((labels != IGNORE_INDEX).sum()))
    token_mean = sum(sums) / sum(counts)
    batch_means = [sum(sums[i : i + 4]) / sum(counts[i : i + 4]) for i in (0, 4)]
    assert abs(sum(batch_means) / 2 - token_mean) > 0.05 * token_mean  # the two methods differ here
    assert metrics["eval/loss"] == pytest.approx(token_mean, rel=1e-4)
    assert metrics["eval/perplexity"] == pytest.approx(math.exp(token_mean), rel=1e-4)


def test_a_resumed_run_keeps_its_baseline_and_times_only_its_own_tokens(tmp_path):
    common = ["task.max_eval_samples=32", "train.eval_steps=100", "train.save_steps=10"]
    first = train_run([*common, "train.max_steps=10"], tmp_path)
    resumed = train_run([*common, "train.max_steps=20", "train.resume=true"], tmp_path)
    assert resumed["train/steps"] == 20
    # The untrained adapter's metrics, not the half-trained one's that an eval on resume would give.
    assert resumed["baseline/loss"] == pytest.approx(first["baseline/loss"], rel=1e-6)
    assert resumed["eval/loss"] < resumed["baseline/loss"]
    # tokens/s: this process's tokens over this process's training time.
    own_tokens = resumed["train/tokens"] - first["train/tokens"]
    assert resumed["train/tokens"] > first["train/tokens"] > 0
    assert resumed["speed/tokens_per_second"] * resumed["time/train_seconds"] == pytest.approx(
        own_tokens, rel=1e-6
    )


def test_each_run_reports_its_own_peak_memory_on_cpu(tmp_path):
    # A big run, then a small one in the same process (as the trials of an in-process sweep run):
    # the process's lifetime peak would report the big run's peak for both.
    ballast = torch.ones(2**28 // 4)  # 256 MiB resident while the first run trains
    big = train_run(
        ["train.max_steps=2", "train.eval_on_start=false", "task.max_eval_samples=16"], tmp_path / "a"
    )
    del ballast
    small = train_run(
        ["train.max_steps=2", "train.eval_on_start=false", "task.max_eval_samples=16"], tmp_path / "b"
    )
    assert big["memory/peak_gib"] - small["memory/peak_gib"] > 0.2


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer built as Llama's SentencePiece one is: a word-start marker "▁" prepended to the
    text and put for every space, a unigram model over pieces that start with it, a BOS."""
    pieces = (
        ["<unk>", "<s>", "</s>", "▁"] + [f"▁{w}" for w in ["sort", "1", "2", "3", ":"]] + list("sort123:")
    )
    backend = Tokenizer(models.Unigram([(p, 0.0 if p.startswith("▁") else -1.0) for p in pieces], 0))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sentencepiece_response_tokens_are_those_of_the_joined_text(caplog):
    tokenizer = sentencepiece_tokenizer()
    row = {"prompt": "sort 3 1 2 :", "response": " 1 2 3"}
    joined = tokenizer(row["prompt"] + row["response"])["input_ids"]
    alone = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone)[0] == "▁"  # the stray marker the old code trained on
    [example] = tokenize_sft([row], tokenizer, max_length=64)
    assert example["input_ids"] == joined + [tokenizer.eos_token_id]
    response = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(response) == ["▁1", "▁2", "▁3", "</s>"]

    with caplog.at_level(logging.WARNING):
        cut = tokenize_sft([row, {"prompt": "sort :", "response": " 1"}], tokenizer, max_length=7)
    assert len(cut) == 2
    assert "1 of 2 examples are longer than task.max_length=7" in caplog.text


def test_command_line_epochs_win_over_the_presets_max_steps(tmp_path):
    overrides = ["train.epochs=2", "task.max_train_samples=64", "task.max_eval_samples=16"]
    metrics = train_run(overrides, tmp_path)  # model=tiny's preset sets train.max_steps=1200
    assert metrics["train/steps"] == 2 * 64 // 16  # two epochs of 64 rows in batches of 16
    assert validate(compose(overrides)).train.max_steps == 1200  # a saved config reloads as written


def test_a_model_dir_without_a_preset_drops_the_tiny_demo_schedule(tmp_path, caplog):
    overrides = [f"model.name_or_path={tmp_path}", "train.lr=1e-4"]
    with caplog.at_level(logging.WARNING, logger="lora_lab"):
        run = validate(compose(overrides), overrides)
    assert run.train.lr == 1e-4  # written on the command line: kept
    assert (run.train.max_steps, run.train.batch_size, run.train.warmup_ratio) == (-1, 4, 0.03)
    assert "train.max_steps=-1" in caplog.text and "train.lr" not in caplog.text
    tiny = validate(compose([]), [])
    assert (tiny.train.max_steps, tiny.train.lr) == (1200, 3e-3)


def test_tiny_vocab_size_is_the_models(tmp_path):
    run = validate(compose(["model.tiny.vocab_size=384"]))
    model, _ = load_model(run.model, run.quant, [], "cpu")
    assert model.get_input_embeddings().weight.shape[0] == 384
    run = validate(compose(["model.tiny.vocab_size=100"]))
    with pytest.raises(ConfigError, match="model.tiny.vocab_size=100 .*at least 260"):
        load_model(run.model, run.quant, [], "cpu")


@pytest.mark.parametrize("ratio", [None, 16])
def test_loraplus_trains_b_at_its_multiple_of_the_learning_rate(tmp_path, ratio):
    from safetensors.torch import load_file

    lr = 1e-3
    overrides = [
        f"train.lr={lr}",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0",
        "train.max_steps=1",
        "train.eval_on_start=false",
        "task.max_eval_samples=8",
        f"train.loraplus_lr_ratio={'null' if ratio is None else ratio}",
    ]
    train_run(overrides, tmp_path)
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = torch.cat([w.flatten() for k, w in weights.items() if "lora_B" in k])
    # B starts at zero and Adam's first step moves every weight with a gradient by the learning rate.
    moved = b[b != 0].abs()
    assert moved.numel() > 0.9 * b.numel()
    assert moved.median() == pytest.approx(lr * (ratio or 1), rel=1e-3)


def test_loraplus_ratio_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"train.loraplus_lr_ratio=0.5 is invalid: .*>= 1"):
        validate(compose(["train.loraplus_lr_ratio=0.5"]))


def seeded_pieces(tmp_path, seed: int):
    """The adapter's initial A, the first training batch and a LoRA dropout mask of a run with
    train.seed=seed, built as train() builds them."""
    overrides = [f"train.seed={seed}", "adapter.dropout=0.5", "train.max_steps=1"]
    run = validate(compose(overrides), overrides)
    set_seed(run.train.seed)  # as train() does, before the model and adapter are built
    base, tokenizer = load_model(run.model, run.quant, run.task.labels, "cpu")
    model = attach_adapter(base, run.adapter, run.model.kind)
    data = build_task_data(
        *load_rows(run.task), run.task.format, tokenizer, run.task.max_length, run.train.packing
    )
    args = training_arguments(
        run.train, tmp_path / "checkpoints", "cpu", torch.float32, [], False, resuming=False
    )
    trainer = build_trainer(model, tokenizer, data, args, None, [], run.model.kind)
    first_batch = next(iter(trainer.get_train_dataloader()))["input_ids"]
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.train()
    mask = layer.lora_dropout["default"](torch.ones(64, 64)) != 0
    return layer.lora_A["default"].weight.detach().clone(), first_batch, mask


def test_train_seed_drives_adapter_init_data_order_and_dropout(tmp_path):
    a1, batch1, mask1 = seeded_pieces(tmp_path, 1)
    a1_again, batch1_again, mask1_again = seeded_pieces(tmp_path, 1)
    a2, batch2, mask2 = seeded_pieces(tmp_path, 2)
    assert torch.equal(a1, a1_again) and not torch.equal(a1, a2)
    assert torch.equal(batch1, batch1_again) and not torch.equal(batch1, batch2)
    assert torch.equal(mask1, mask1_again) and not torch.equal(mask1, mask2)
