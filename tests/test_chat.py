"""Conversations: assistant-only masks from the chat template, token by token; bad conversations;
packing keeps conversations apart; task=chat_sort learns."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose, exact_match_before_and_after, train_run
from tokenizers import processors

from lora_lab.data import IGNORE_INDEX, build_task_data
from lora_lab.errors import ConfigError
from lora_lab.models import byte_level_tokenizer, load_model
from lora_lab.validate import validate

# Written here, not taken from lora_lab: the masks are checked against templates lora_lab never saw.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You sort digits."},
    {"role": "user", "content": "sort 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
    {"role": "user", "content": "now sort 9 0"},
    # whitespace around it: ChatML keeps it, Llama-3 trims it
    {"role": "assistant", "content": " 0 9\n"},
    {"role": "user", "content": "and 7 4 4"},
    {"role": "assistant", "content": "4 4 7"},
]
TEMPLATE_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def chat_tokenizer(adds_bos: bool = False):
    """The byte-level tokenizer (no merges: a text's tokens are its pieces' tokens, end to end) with
    the templates' special tokens; optionally adding BOS to what it encodes, as Llama's does."""
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = None
    tokenizer.add_tokens(TEMPLATE_TOKENS, special_tokens=True)
    if adds_bos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
        )
    return tokenizer


def expected_example(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels from (text, learned) pieces, each piece tokenised on its own."""
    ids, labels = [], []
    for text, learned in pieces:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tokens
        labels += tokens if learned else [IGNORE_INDEX] * len(tokens)
    return ids, labels


def chatml_pieces(last_turn_only: bool) -> list[tuple[str, bool]]:
    def turn(content, learned):
        return [
            ("<|im_start|>assistant\n", False),
            (content, learned),
            ("<|im_end|>", learned),
            ("\n", False),
        ]

    return [
        ("<|im_start|>system\nYou sort digits.<|im_end|>\n", False),
        ("<|im_start|>user\nsort 3 1 2<|im_end|>\n", False),
        *turn("1 2 3", not last_turn_only),
        ("<|im_start|>user\nnow sort 9 0<|im_end|>\n", False),
        *turn(" 0 9\n", not last_turn_only),
        ("<|im_start|>user\nand 7 4 4<|im_end|>\n", False),
        *turn("4 4 7", True),
    ]


def llama3_pieces(last_turn_only: bool) -> list[tuple[str, bool]]:
    def header(role):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def turn(content, learned):
        return [(header("assistant"), False), (content, learned), ("<|eot_id|>", learned)]

    return [
        ("<s>", False),
        (header("system") + "You sort digits.<|eot_id|>", False),
        (header("user") + "sort 3 1 2<|eot_id|>", False),
        *turn("1 2 3", not last_turn_only),
        (header("user") + "now sort 9 0<|eot_id|>", False),
        *turn("0 9", not last_turn_only),
        (header("user") + "and 7 4 4<|eot_id|>", False),
        *turn("4 4 7", True),
    ]


@pytest.mark.parametrize("train_on", ["all_assistant", "last_turn"])
@pytest.mark.parametrize(
    ("template", "pieces", "adds_bos"), [(CHATML, chatml_pieces, False), (LLAMA3, llama3_pieces, True)]
)
def test_the_loss_is_on_the_assistant_turns_and_their_end_of_turn_token_by_token(
    template, pieces, adds_bos, train_on
):
    tokenizer = chat_tokenizer(adds_bos)
    tokenizer.chat_template = template
    rows = [{"messages": CONVERSATION}]
    data = build_task_data(rows, rows, "chat", tokenizer, 512, packing=True, train_on=train_on)
    ids, labels = expected_example(tokenizer, pieces(last_turn_only=train_on == "last_turn"))
    assert data.train[0]["input_ids"] == ids
    assert data.train[0]["labels"] == labels
    # what transformers itself tokenises for the conversation
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)

    # Generation metrics: the conversation before the last assistant turn with the generation
    # prompt, read by the scorer (which adds the tokenizer's own BOS) as the model trained on it.
    prompt_ids = tokenizer(data.eval_prompts[0])["input_ids"]
    assert prompt_ids == tokenizer.apply_chat_template(
        CONVERSATION[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert prompt_ids == ids[: len(prompt_ids)]
    assert data.eval_references == ["4 4 7"]


def test_a_named_template_serves_a_tokenizer_without_one_and_none_is_refused_naming_the_key():
    tokenizer = chat_tokenizer()
    rows = [{"messages": CONVERSATION}]
    with pytest.raises(
        ConfigError, match=r"task.chat_template=None is invalid: the tokenizer .* no chat template"
    ):
        build_task_data(rows, rows, "chat", tokenizer, 512, packing=False)
    data = build_task_data(rows, rows, "chat", tokenizer, 512, packing=False, chat_template="chatml")
    ids, labels = expected_example(tokenizer, chatml_pieces(last_turn_only=False))
    assert (data.train[0]["input_ids"], data.train[0]["labels"]) == (ids, labels)
    data = build_task_data(rows, rows, "chat", tokenizer, 512, packing=False, chat_template="llama3")
    assert data.train[0]["input_ids"] == expected_example(tokenizer, llama3_pieces(False))[0]


GOOD = {"messages": CONVERSATION[:3]}
NO_SYSTEM = (
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endfor %}"
)
DROPS_SYSTEM = (
    "{%- for message in messages if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@pytest.mark.parametrize(
    ("row", "template", "reason"),
    [
        (
            {"messages": [CONVERSATION[1], {"role": "bot", "content": "42"}, CONVERSATION[2]]},
            CHATML,
            "message 1 has role 'bot'; roles are system, user, assistant, tool",
        ),
        (
            {"messages": [CONVERSATION[1], {"role": "tool", "content": "42"}, CONVERSATION[2]]},
            CHATML,
            r"it uses tools, and the chat template renders no tools list or tool calls",
        ),
        ({"messages": []}, CHATML, "the conversation is empty"),
        ({"messages": CONVERSATION[:2]}, CHATML, "the conversation has no assistant turn"),
        ({"messages": CONVERSATION[2:3]}, CHATML, "the conversation starts with an assistant turn"),
        (GOOD, NO_SYSTEM, r"the chat template refuses it \(TemplateError: System role not supported\)"),
        (GOOD, DROPS_SYSTEM, r"the chat template does not render message 0 \(role 'system'\)"),
    ],
)
def test_a_bad_conversation_is_refused_naming_the_key_and_the_row(row, template, reason):
    tokenizer = chat_tokenizer()
    rows = [{"messages": CONVERSATION[1:3]}, row]  # the bad one is row 1 of the eval file
    with pytest.raises(ConfigError, match=rf"^task.eval_path='chats.jsonl' is invalid: row 1: {reason}"):
        build_task_data(
            rows[:1],
            rows,
            "chat",
            tokenizer,
            512,
            packing=True,
            chat_template=template,
            row_sources=(("task.train_path", "train.jsonl"), ("task.eval_path", "chats.jsonl")),
        )


def test_a_bad_conversation_in_a_file_fails_the_run_naming_the_file_and_row_before_anything_is_written(
    tmp_path,
):
    rows = [{"messages": CONVERSATION}, {"messages": [CONVERSATION[1], {"role": "bot", "content": "x"}]}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows * 5))
    overrides = ["task=files", f"task.train_path={path}", "train.max_steps=1"]
    with pytest.raises(
        ConfigError, match=rf"^task.train_path='{path}' is invalid: row 1: message 1 has role 'bot'"
    ):
        train_run(overrides, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "task.train_on=everything",
            r"task.train_on='everything' is invalid: valid values are all_assistant, last_turn",
        ),
        ("task.chat_template=chatlm", r"task.chat_template='chatlm' is invalid: chatml, llama3, or a Jinja"),
        (
            "task.chat_template='{% for m in messages %}'",
            r"task.chat_template=.* is invalid: not valid Jinja",
        ),
    ],
)
def test_chat_options_are_checked_before_anything_loads(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose(["task=chat_sort", override]), [override])


def test_packing_keeps_each_conversation_one_example_apart_from_the_others():
    tokenizer = byte_level_tokenizer()
    rows = [
        {"messages": CONVERSATION},
        {"messages": CONVERSATION[:3]},
        {"messages": CONVERSATION[:5]},
        {"messages": CONVERSATION[3:5]},
    ]
    data = build_task_data(rows, rows, "chat", tokenizer, 512, packing=True)
    batch = data.collator([data.train[i] for i in range(len(rows))])
    examples = [data.train[i] for i in range(len(rows))]
    segments = []
    for ids, labels, positions in zip(
        batch["input_ids"], batch["labels"], batch["position_ids"], strict=True
    ):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        for start, end in zip(starts, starts[1:], strict=False):
            segments.append((ids[start:end], labels[start:end]))
    assert len(batch["input_ids"]) < len(rows)  # some conversations share a row
    # each conversation whole, in a segment of its own (a row's padding continues its last one)
    for example in examples:
        n = len(example["input_ids"])
        assert any(
            seg_ids[:n].tolist() == example["input_ids"]
            and seg_labels[:n].tolist() == example["labels"]
            and (seg_labels[n:] == IGNORE_INDEX).all()
            for seg_ids, seg_labels in segments
        )
    assert len(segments) == len(rows)


# The README's chat run (a constant learning rate after warmup) at half its batch, to halve the test's
# cost: exact match 0 -> 0.109 on 64 conversations (0.125 at the README's batch of 16).
CHAT_SORT_RUN = [
    "task=chat_sort",
    "train.max_steps=300",
    "train.batch_size=8",
    "train.lr_scheduler=constant_with_warmup",
    "train.eval_steps=300",
    "task.max_eval_samples=64",
]


def test_chat_sort_learns_exact_match_over_the_untrained_model(tmp_path):
    untrained, metrics = exact_match_before_and_after(CHAT_SORT_RUN, tmp_path / "run")
    assert metrics["eval/exact_match"] >= untrained + 0.05
    assert metrics["eval/token_accuracy"] > metrics["baseline/token_accuracy"]


def test_generation_speaks_the_template_user_turns_rendered_and_stopped_at_its_end_of_turn():
    from lora_lab.chat import Chat, user_prompts
    from lora_lab.metrics import generate_responses

    tokenizer = chat_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chatml = Chat(tokenizer, CHATML, {})
    assert chatml.end_of_turn_ids == sorted({im_end, tokenizer.eos_token_id})
    assert Chat(tokenizer, LLAMA3, {}).end_of_turn_ids == sorted(
        {tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.eos_token_id}
    )
    assert user_prompts(chatml, ["sort 3 1 2"], "You sort digits.") == [
        "<|im_start|>system\nYou sort digits.<|im_end|>\n<|im_start|>user\nsort 3 1 2<|im_end|>\n"
        "<|im_start|>assistant\n"
    ]
    # a model that always predicts <|im_end|> first: the response ends there, not at the token limit
    run = validate(compose([]))
    model, _ = load_model(run.model, run.quant, [], "cpu")
    model.resize_token_embeddings(len(tokenizer))
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[im_end] = 10.0
    model.lm_head = head
    prompt = user_prompts(chatml, ["sort 3 1 2"], None)
    assert generate_responses(model, tokenizer, prompt, 20, 1, [im_end]) == [""]  # special: decoded away
    # and without the template's end-of-turn token it runs on to the limit
    with torch.no_grad():
        head.bias[im_end], head.bias[tokenizer.convert_tokens_to_ids("a")] = 9.0, 10.0
    assert generate_responses(model, tokenizer, prompt, 20, 1, [im_end]) == ["a" * 20]


def test_template_options_reach_the_template():
    tokenizer = chat_tokenizer()
    template = (
        "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
        "{%- if enable_thinking is defined and not enable_thinking %}{{- 'NO THINKING\n' }}{%- endif %}{%- endif %}"
    )
    rows = [{"messages": CONVERSATION[1:3]}]
    plain = build_task_data(rows, rows, "chat", tokenizer, 512, False, chat_template=template)
    off = build_task_data(
        rows,
        rows,
        "chat",
        tokenizer,
        512,
        False,
        chat_template=template,
        chat_template_kwargs={"enable_thinking": False},
    )
    assert plain.eval_prompts[0].endswith("<|im_start|>assistant\n")
    assert off.eval_prompts[0].endswith("<|im_start|>assistant\nNO THINKING\n")
