"""Published chat templates (tests/chat_templates/, each with its source in templates.json): every
conversation of 1-3 turns, with and without a system message, is masked, and the mask equals, token
by token, transformers' assistant mask of a copy of the template with `{% generation %}` markers
added by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import exact_match_before_and_after, write_jsonl
from test_families import SIZES
from transformers import AutoConfig, AutoModelForCausalLM

from lora_lab.chat import Chat
from lora_lab.data import build_task_data
from lora_lab.models import byte_level_tokenizer
from lora_lab.tasks.builtin import chat_sort_rows

TEMPLATES = Path(__file__).parent / "chat_templates"
CATALOGUE = {t["name"]: t for t in json.loads((TEMPLATES / "templates.json").read_text())}
MARKERS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")
TURNS = [("sort 3 1 2", "1 2 3"), ("now 9 0", "0 9"), ("and 7 4 4", "4 4 7")]


def conversation(turns: int, system: bool) -> list[dict]:
    messages = [{"role": "system", "content": "You sort digits."}] if system else []
    for user, assistant in TURNS[:turns]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def tokenizer_for(entry: dict):
    """The byte-level tokenizer with the template's special tokens, BOS and EOS as its model's."""
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = None
    specials = [*entry["special_tokens"], entry["end_of_turn"]]
    for role in ("bos_token", "eos_token"):
        if entry.get(role):
            specials.append(entry[role])
    tokenizer.add_tokens(sorted(set(specials)), special_tokens=True)
    if entry.get("bos_token"):
        tokenizer.bos_token = entry["bos_token"]
    if entry.get("eos_token"):
        tokenizer.eos_token = entry["eos_token"]
    return tokenizer


CASES = [
    (name, turns, system)
    for name, entry in CATALOGUE.items()
    for turns in (1, 2, 3)
    for system in ((False, True) if entry["system"] != "refused" else (False,))
]


@pytest.mark.parametrize(("name", "turns", "system"), CASES)
def test_a_published_template_masks_each_assistant_turn_as_its_generation_markers_do(name, turns, system):
    entry = CATALOGUE[name]
    tokenizer = tokenizer_for(entry)
    # SmolLM3's template ships markers of its own (around the header too): without them here, so
    # that lora_lab locates the turns itself (test_markers_a_template_ships_are_used)
    template = MARKERS.sub("", (TEMPLATES / entry["file"]).read_text())
    marked = (TEMPLATES / entry["generation_file"]).read_text()
    messages = conversation(turns, system)
    rows = [{"messages": messages}]
    data = build_task_data(rows, rows, "chat", tokenizer, 4096, packing=False, chat_template=template)
    expected = tokenizer.apply_chat_template(
        messages, chat_template=marked, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, labels = data.train[0]["input_ids"], data.train[0]["labels"]
    assert ids == list(expected["input_ids"])
    learned = [label != -100 for label in labels]
    assert learned == [bool(m) for m in expected["assistant_masks"]], tokenizer.decode(
        [t for t, on in zip(ids, learned, strict=True) if on]
    )
    # every assistant turn carries loss
    assert sum(1 for i, on in enumerate(learned) if on and (i == 0 or not learned[i - 1])) == turns
    # the eval prompt is the template's own generation prompt, the reference the last response
    assert data.eval_references[0].strip().endswith(TURNS[turns - 1][1])


def test_the_templates_of_ten_families_are_kept_with_their_sources():
    families = {"llama3", "qwen2_5", "qwen3", "gemma", "mistral", "phi3", "smollm3", "granite", "olmo2"}
    assert families | {"deepseek_r1_distill"} <= set(CATALOGUE)
    assert all(entry["source"] for entry in CATALOGUE.values())


def test_markers_a_template_ships_are_used_as_transformers_reads_them():
    entry = CATALOGUE["smollm3"]
    tokenizer = tokenizer_for(entry)
    template = (TEMPLATES / entry["file"]).read_text()
    assert MARKERS.search(template)
    messages = conversation(2, system=True)
    rows = [{"messages": messages}]
    for train_on in ("all_assistant", "last_turn"):
        data = build_task_data(
            rows, rows, "chat", tokenizer, 4096, False, train_on=train_on, chat_template=template
        )
        expected = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        mask = [bool(m) for m in expected["assistant_masks"]]
        if train_on == "last_turn":  # the second of the two runs of assistant tokens
            second = max(i for i, m in enumerate(mask) if m and not mask[i - 1])
            mask = [m and i >= second for i, m in enumerate(mask)]
        assert [label != -100 for label in data.train[0]["labels"]] == mask
        assert data.train[0]["input_ids"] == list(expected["input_ids"])


@pytest.mark.slow
# Gemma's template on a Llama: a tiny random Gemma 3 (embeddings scaled by sqrt(hidden)) reaches
# token accuracy 0.71 and no exact match in 300 steps here; the template's test needs a learner
@pytest.mark.parametrize(("model_type", "template_name"), [("qwen3", "qwen3"), ("llama", "gemma")])
def test_a_model_learns_multi_turn_conversations_with_a_system_message_in_its_own_template(
    model_type, template_name, tmp_path
):
    """Qwen3's template renders earlier turns differently once more follow; Gemma 3's folds the system
    message into the first user turn. Both train on task=chat_sort's conversations (a system message,
    2-3 turns) and generate their answers, stopping at their end-of-turn tokens."""
    entry = CATALOGUE[template_name]
    tokenizer = tokenizer_for(entry)
    tokenizer.chat_template = (TEMPLATES / entry["file"]).read_text()
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    config = AutoConfig.for_model(
        model_type,
        **SIZES,
        **ids,
        eos_token_id=tokenizer.eos_token_id,
        head_dim=16,
        initializer_range=0.2,  # as the tiny Llama's: random output weights that small cap the logits
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    overrides = [
        f"model.name_or_path={tmp_path / 'model'}",
        "task=files",
        f"task.train_path={write_jsonl(tmp_path / 'train.jsonl', chat_sort_rows('train'))}",
        f"task.eval_path={write_jsonl(tmp_path / 'eval.jsonl', chat_sort_rows('eval'))}",
        "task.metrics=[token_accuracy,exact_match]",
        "task.generate_max_new_tokens=12",
        "task.max_length=512",
        "train.max_steps=600",
        "train.batch_size=8",
        "train.lr=3e-3",
        "train.lr_scheduler=constant_with_warmup",
        "train.eval_steps=600",
        "task.max_eval_samples=64",
    ]
    end_of_turn = tokenizer.convert_tokens_to_ids(entry["end_of_turn"])
    assert (
        end_of_turn in Chat(tokenizer, tokenizer.chat_template, {}).end_of_turn_ids
    )  # generation stops there
    untrained, metrics = exact_match_before_and_after(overrides, tmp_path / "run")
    print(
        f"{model_type} with {template_name}'s template: exact match {untrained:.4f} -> {metrics['eval/exact_match']:.4f}"
    )
    assert metrics["eval/exact_match"] >= untrained + 0.05
    assert metrics["eval/token_accuracy"] > metrics["baseline/token_accuracy"]
