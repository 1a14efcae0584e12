"""Conversations as people store them: OpenAI-style content parts, tools with tool calls and tool
results, reasoning. Each masked token by token against transformers' assistant mask of a template
with `{% generation %}` markers (one written here, published ones from tests/chat_templates), and
each shape trains on the tiny model with its loss falling."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import compose, exact_match_before_and_after, train_run, write_jsonl
from test_chat import chat_tokenizer
from test_templates import CATALOGUE, MARKERS, TEMPLATES, tokenizer_for
from transformers import AutoTokenizer

from lora_lab.data import IGNORE_INDEX, build_task_data
from lora_lab.errors import ConfigError
from lora_lab.models import byte_level_tokenizer, model_dir
from lora_lab.tasks import load_rows
from lora_lab.validate import validate

# A ChatML-like template with tools, in the tiny tokenizer's own tokens (<s>role\n...</s>), its
# assistant output marked for transformers' assistant mask.
TOOLS_MARKED = (
    "{%- if tools %}{{- bos_token + 'system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n' }}{%- endif %}"
    "{{- 'Tools:' }}{%- for tool in tools %}{{- '\n' + tool | tojson }}{%- endfor %}{{- eos_token }}"
    "{%- elif messages[0].role == 'system' %}{{- bos_token + 'system\n' + messages[0].content + eos_token }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- bos_token + 'user\n' + message.content + eos_token }}"
    "{%- elif message.role == 'assistant' %}{{- bos_token + 'assistant\n' }}{% generation %}"
    "{{- message.content }}"
    "{%- for call in message.tool_calls or [] %}{{- '<call>' + call.function | tojson + '</call>' }}{%- endfor %}"
    "{{- eos_token }}{% endgeneration %}"
    "{%- elif message.role == 'tool' %}{{- bos_token + 'tool\n' + message.content + eos_token }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- bos_token + 'assistant\n' }}{%- endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "largest",
            "description": "The largest of the digits.",
            "parameters": {"type": "object", "properties": {"digits": {"type": "string"}}},
        },
    }
]


def tool_conversation(digits_a: str, digits_b: str) -> dict:
    """Two rounds of: the user asks, the assistant calls the tool, the tool answers, the assistant
    replies with the tool's answer."""
    messages = []
    for number, digits in enumerate((digits_a, digits_b)):
        call_id = f"call_{number}"
        result = max(digits.split())
        messages += [
            {"role": "user", "content": f"largest of {digits}"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "largest", "arguments": json.dumps({"digits": digits})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": result},
        ]
    return {"messages": messages, "tools": TOOLS}


def expected_mask(tokenizer, marked: str, row: dict) -> tuple[list[int], list[bool]]:
    """transformers' assistant mask of the marked template, on the messages as a user would pass them
    to apply_chat_template (tool-call arguments as objects)."""
    messages = json.loads(json.dumps(row["messages"]))
    for message in messages:
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        if isinstance(message["content"], list) and not row.get("parts"):
            message["content"] = "".join(p["text"] for p in message["content"])
    encoded = tokenizer.apply_chat_template(
        messages,
        tools=row.get("tools"),
        chat_template=marked,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(encoded["input_ids"]), [bool(m) for m in encoded["assistant_masks"]]


def masked(tokenizer, template: str, rows: list[dict], **options):
    data = build_task_data(
        rows, rows, "chat", tokenizer, 4096, packing=False, chat_template=template, **options
    )
    return data, data.train[0]["input_ids"], [label != IGNORE_INDEX for label in data.train[0]["labels"]]


def learned_text(tokenizer, ids, learned) -> str:
    return tokenizer.decode([t for t, on in zip(ids, learned, strict=True) if on])


def test_tool_calls_carry_loss_and_tool_results_do_not_token_by_token():
    tokenizer = byte_level_tokenizer()
    row = tool_conversation("3 1 2", "9 0")
    data, ids, learned = masked(tokenizer, MARKERS.sub("", TOOLS_MARKED), [row])
    assert (ids, learned) == expected_mask(tokenizer, TOOLS_MARKED, row)
    text = learned_text(tokenizer, ids, learned)
    assert text == (
        '<call>{"name": "largest", "arguments": {"digits": "3 1 2"}}</call></s>3</s>'
        '<call>{"name": "largest", "arguments": {"digits": "9 0"}}</call></s>9</s>'
    )  # the calls and the answers, never the tool's results or the tools list
    # the tools list reaches the template, and exact match scores the final answer after the tool's result
    assert '"name": "largest"' in data.eval_prompts[0]
    assert data.eval_prompts[0].endswith("<s>tool\n9</s><s>assistant\n")
    assert data.eval_references == ["9"]


def test_a_published_tools_template_masks_tool_calls_as_its_generation_markers_do():
    entry = CATALOGUE["qwen2_5"]
    assert entry["tools"]
    tokenizer = tokenizer_for(entry)
    template = (TEMPLATES / entry["file"]).read_text()
    marked = (TEMPLATES / entry["generation_file"]).read_text()
    row = tool_conversation("3 1 2", "9 0")
    _, ids, learned = masked(tokenizer, template, [row])
    assert (ids, learned) == expected_mask(tokenizer, marked, row)
    assert "<tool_call>" in learned_text(tokenizer, ids, learned)


def test_sharegpt_function_calls_and_observations_are_tool_calls_and_results(tmp_path):
    row = {
        "conversations": [
            {"from": "human", "value": "largest of 3 1 2"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "largest", "arguments": {"digits": "3 1 2"}}),
            },
            {"from": "observation", "value": "3"},
            {"from": "gpt", "value": "3"},
        ],
        "tools": json.dumps(TOOLS),
    }
    path = write_jsonl(tmp_path / "calls.jsonl", [row] * 4)
    rows, _ = load_rows(
        validate(compose(["task=files", f"task.train_path={path}", f"task.eval_path={path}"])).task
    )
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant", "tool", "assistant"]
    tokenizer = byte_level_tokenizer()
    _, ids, learned = masked(tokenizer, MARKERS.sub("", TOOLS_MARKED), rows[:1])
    as_messages = {
        "messages": [
            {"role": "user", "content": "largest of 3 1 2"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "largest", "arguments": json.dumps({"digits": "3 1 2"})},
                    }
                ],
            },
            {"role": "tool", "content": "3"},
            {"role": "assistant", "content": "3"},
        ],
        "tools": TOOLS,
    }
    assert (ids, learned) == expected_mask(tokenizer, TOOLS_MARKED, as_messages)


def test_a_template_without_tools_refuses_tool_conversations_in_one_line():
    tokenizer = byte_level_tokenizer()
    with pytest.raises(
        ConfigError, match=r"row 0: it uses tools, and the chat template renders no tools list or tool calls"
    ):
        masked(tokenizer, "chatml", [tool_conversation("3 1 2", "9 0")])


PARTS = {
    "messages": [
        {"role": "system", "content": [{"type": "text", "text": "You sort digits."}]},
        {"role": "user", "content": [{"type": "text", "text": "sort "}, {"type": "text", "text": "3 1 2"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "1 2 3"}]},
    ]
}


def test_text_parts_are_joined_for_a_template_of_strings_and_passed_to_one_that_renders_parts():
    tokenizer = chat_tokenizer()
    _, ids, learned = masked(tokenizer, "chatml", [PARTS])
    text = tokenizer.decode(ids)
    assert "<|im_start|>user\nsort 3 1 2<|im_end|>" in text and "'type'" not in text
    assert learned_text(tokenizer, ids, learned) == "1 2 3<|im_end|>"

    entry = CATALOGUE["gemma"]  # Gemma 3's template renders parts itself
    tokenizer = tokenizer_for(entry)
    marked = (TEMPLATES / entry["generation_file"]).read_text()
    _, ids, learned = masked(tokenizer, (TEMPLATES / entry["file"]).read_text(), [PARTS])
    assert (ids, learned) == expected_mask(tokenizer, marked, {**PARTS, "parts": True})


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            [{"type": "image_url", "image_url": {"url": "x.png"}}],
            "message 1 has a content part of type 'image_url'",
        ),
        ([{"type": "input_audio", "input_audio": {}}], "message 1 has a content part of type 'input_audio'"),
        (42, r"message 1 has content of type int \(42\); contents are text or a list of text parts"),
    ],
)
def test_a_content_lora_lab_cannot_train_on_is_refused_naming_the_row(content, reason):
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    bad = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": content},
            {"role": "assistant", "content": "y"},
        ]
    }
    with pytest.raises(ConfigError, match=rf"row 1: {reason}"):
        masked(byte_level_tokenizer(), "chatml", [*rows, bad])


def reasoning_row(inline: bool) -> dict:
    turn = (
        {"role": "assistant", "content": "<think>\nthree is the largest\n</think>\n\n1 2 3"}
        if inline
        else {"role": "assistant", "reasoning_content": "three is the largest", "content": "1 2 3"}
    )
    return {
        "messages": [
            {"role": "system", "content": "You sort digits."},
            {"role": "user", "content": "sort 3 1 2"},
            turn,
        ]
    }


@pytest.mark.parametrize("inline", [False, True])
def test_reasoning_carries_loss_as_the_template_renders_it_unless_train_on_reasoning_is_false(inline):
    entry = CATALOGUE["qwen3"]
    tokenizer = tokenizer_for(entry)
    template = (TEMPLATES / entry["file"]).read_text()
    marked = (TEMPLATES / entry["generation_file"]).read_text()
    row = reasoning_row(inline)
    _, ids, learned = masked(tokenizer, template, [row])
    reference = expected_mask(tokenizer, marked, reasoning_row(inline=False))
    assert (ids, learned) == reference
    assert "three is the largest" in learned_text(tokenizer, ids, learned)

    _, ids, without = masked(tokenizer, template, [row], train_on_reasoning=False)
    text = tokenizer.decode(ids)
    start = text.index("three is the largest")
    end = start + len("three is the largest")
    # the marked mask less the reasoning's own tokens (the byte-level tokenizer: one token a byte)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert without == [
        on and not (start <= s < end) for on, (s, _) in zip(reference[1], offsets, strict=True)
    ]
    assert learned_text(tokenizer, ids, without) == "<think>\n\n</think>\n\n1 2 3<|im_end|>"


def tiny_model_with(template: str, tmp_path):
    """The tiny model's directory, its tokenizer's chat template replaced."""
    run = validate(compose([]))
    target = tmp_path / "tiny-with-template"
    shutil.copytree(model_dir(run.model), target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(target)
    return target


def some_digits(rng) -> str:
    return " ".join(rng.sample("0123456789", rng.randint(3, 5)))


def tools_row(rng) -> dict:
    return tool_conversation(some_digits(rng), some_digits(rng))


def parts_row(rng) -> dict:
    digits = some_digits(rng)
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "sort "}, {"type": "text", "text": digits}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": " ".join(sorted(digits.split()))}]},
        ]
    }


def reasoning_sort_row(rng) -> dict:
    digits = some_digits(rng)
    answer = {
        "role": "assistant",
        "reasoning_content": f"the smallest is {min(digits.split())}",
        "content": " ".join(sorted(digits.split())),
    }
    return {"messages": [{"role": "user", "content": f"sort {digits}"}, answer]}


SHAPES = {"tools": tools_row, "parts": parts_row, "reasoning": reasoning_sort_row}
# renders reasoning_content before the answer, in the tiny tokenizer's tokens
REASONING_TEMPLATE = (
    "{%- for message in messages %}{{- bos_token + message.role + '\n' }}"
    "{%- if message.reasoning_content %}{{- 'think: ' + message.reasoning_content + '\n' }}{%- endif %}"
    "{{- message.content + eos_token }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- bos_token + 'assistant\n' }}{%- endif %}"
)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_trains_its_loss_falling(shape, tmp_path):
    import random

    rng = random.Random(0)
    rows = [SHAPES[shape](rng) for _ in range(96)]
    template = {"tools": MARKERS.sub("", TOOLS_MARKED), "reasoning": REASONING_TEMPLATE}.get(shape)
    model = tiny_model_with(template, tmp_path) if template else None
    overrides = [
        *([f"model.name_or_path={model}"] if model else []),
        "task=files",
        f"task.train_path={write_jsonl(tmp_path / 'train.jsonl', rows[:64])}",
        f"task.eval_path={write_jsonl(tmp_path / 'eval.jsonl', rows[64:])}",
        "task.metrics=[token_accuracy]",
        "task.max_length=512",
        "train.max_steps=20",
        "train.lr=3e-3",
        "train.eval_steps=20",
    ]
    metrics = train_run(overrides, tmp_path / "run")
    assert metrics["eval/loss"] < metrics["baseline/loss"]


@pytest.mark.slow
def test_a_tool_calling_file_trains_and_its_final_answers_exact_match_rises(tmp_path):
    """A tools column, tool calls, tool results, two rounds: the final answer copies the tool's result."""
    import random

    rng = random.Random(1)
    rows = [tools_row(rng) for _ in range(1024)]
    model = tiny_model_with(MARKERS.sub("", TOOLS_MARKED), tmp_path)
    overrides = [
        f"model.name_or_path={model}",
        "task=files",
        f"task.train_path={write_jsonl(tmp_path / 'train.jsonl', rows[:960])}",
        f"task.eval_path={write_jsonl(tmp_path / 'eval.jsonl', rows[960:])}",
        "task.metrics=[token_accuracy,exact_match]",
        "task.generate_max_new_tokens=16",
        "task.max_length=1024",
        "train.max_steps=300",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.lr_scheduler=constant_with_warmup",
        "train.eval_steps=300",
        "task.max_eval_samples=64",
    ]
    untrained, metrics = exact_match_before_and_after(overrides, tmp_path / "run")
    print(f"tool calls: exact match {untrained:.4f} -> {metrics['eval/exact_match']:.4f}")
    assert metrics["eval/exact_match"] >= untrained + 0.3
