"""Conversations rendered with the model's chat template, the loss on assistant turns only.

A conversation is a row {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}.
The mask comes from the rendering of the whole conversation, the tokens the model trains on. Where
the template marks the assistant's output with `{% generation %}`, transformers' assistant mask is
used. Otherwise each message's content is located in that rendering in order, and an assistant turn
runs from where the template's generation prompt for it ends (or from its content, where the
template renders earlier turns differently once more follow, as Qwen3's drops their reasoning) to
the first special token after its content: the end-of-turn or EOS token that closes it. So templates
whose history depends on what follows, and templates that fold the system message into the first
user turn, are served; a conversation is refused only when the template refuses it or leaves a
message out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from lora_lab.config import ConfigError

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("all_assistant", "last_turn")
# For tokenizers without a chat template (task.chat_template=<name>); any other value is Jinja.
NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
_VALID_TEMPLATES = f"{', '.join(NAMED_TEMPLATES)}, or a Jinja chat template (a string with {{{{ or {{%)"


def check_chat_options(train_on: str, chat_template: str | None) -> None:
    """Config checks, before anything is loaded: a known train_on, a named or parseable template."""
    if train_on not in TRAIN_ON:
        raise ConfigError("task.train_on", train_on, f"valid values are {', '.join(TRAIN_ON)}")
    if chat_template is None or chat_template in NAMED_TEMPLATES:
        return
    if "{{" not in chat_template and "{%" not in chat_template:
        raise ConfigError("task.chat_template", chat_template, _VALID_TEMPLATES)
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError("task.chat_template", chat_template, f"not valid Jinja ({e.message})") from None


def resolve_template(tokenizer, chat_template: str | None) -> str:
    """The template conversations are rendered with: task.chat_template, else the tokenizer's own."""
    if chat_template is not None:
        return NAMED_TEMPLATES.get(chat_template, chat_template)
    if not tokenizer.chat_template:
        raise ConfigError(
            "task.chat_template",
            None,
            f"the tokenizer of {tokenizer.name_or_path} has no chat template: set {_VALID_TEMPLATES}",
        )
    return tokenizer.chat_template


def _render(
    tokenizer, template: str, options: dict, conversations: list[list[dict]], generation_prompt: bool
):
    if not conversations:
        return []
    return tokenizer.apply_chat_template(
        conversations,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
        **options,
    )


class _Rendering:
    """One conversation's rendering, where each message's content lies in it, and the rendering of
    the messages before each assistant turn with the generation prompt."""

    def __init__(self, messages: list[dict], tokenizer, template: str, options: dict, fail):
        self.messages, self.fail = messages, fail
        self.assistant_turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        try:
            self.text = _render(tokenizer, template, options, [messages], False)[0]
            prompts = _render(
                tokenizer, template, options, [messages[:j] for j in self.assistant_turns], True
            )
        except Exception as e:  # a template's raise_exception ("System role not supported"), or any
            # other error a template raises on this row
            fail(f"the chat template refuses it ({type(e).__name__}: {str(e).splitlines()[0]})")
        self.prompts = dict(zip(self.assistant_turns, prompts, strict=True))
        self.contents: list[tuple[int, int]] = []  # (start, end) of each message's content in the text
        cursor = 0
        for j, message in enumerate(messages):
            content = message["content"].strip()
            found = self.text.find(content, cursor)
            if found < 0:
                fail(f"the chat template does not render message {j} (role {message['role']!r})")
            cursor = found + len(content)
            self.contents.append((found, cursor))

    def response(self, turn: int) -> tuple[int, int]:
        """Where assistant message `turn`'s response (without its end-of-turn) starts and ends in the
        text: from the end of its generation prompt where the text begins with that prompt, else
        from its content."""
        content_start, content_end = self.contents[turn]
        previous_end = self.contents[turn - 1][1] if turn else 0
        prompt = self.prompts[turn]
        if self.text.startswith(prompt) and previous_end <= len(prompt) <= content_start:
            return len(prompt), content_end
        return content_start, content_end

    def turn_end(self, turn: int) -> int:
        """Where the next message's content starts (or the text ends): the turn's closing token lies before."""
        return self.contents[turn + 1][0] if turn + 1 < len(self.messages) else len(self.text)


def _check_messages(messages, fail) -> None:
    if not isinstance(messages, list) or not messages:
        fail("the conversation is empty")
    for j, message in enumerate(messages):
        if message.get("role") not in ROLES:
            fail(f"message {j} has role {message.get('role')!r}; roles are {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            fail(f"message {j} has no text content")
    if messages[0]["role"] == "assistant":
        fail("the conversation starts with an assistant turn; it needs a system or user message first")
    if not any(m["role"] == "assistant" for m in messages):
        fail("the conversation has no assistant turn")


def _renderings(rows: list[dict], tokenizer, template: str, options: dict, source: tuple[str, object]):
    key, value = source
    for index, row in enumerate(rows):

        def fail(reason: str, index=index):
            raise ConfigError(key, value, f"row {index}: {reason}")

        _check_messages(row["messages"], fail)
        yield _Rendering(row["messages"], tokenizer, template, options, fail)


def _special_ids(tokenizer) -> set[int]:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def assistant_tokens(
    rows: list[dict], tokenizer, template: str, options: dict, train_on: str, source: tuple[str, object]
) -> Iterator[tuple[list[int], list[bool]]]:
    """Per conversation: its token ids, as apply_chat_template tokenises it (the template adds any
    BOS itself), and which of them the loss is on: the assistant turns (`train_on`: all of them or
    the last), each with its end-of-turn token. `options` are the template's own (task.chat_template_kwargs);
    `source` (the config key and value the rows come from) names a bad row."""
    if _GENERATION_MARKER.search(template):
        yield from _marked_assistant_tokens(rows, tokenizer, template, options, train_on, source)
        return
    special = _special_ids(tokenizer)
    for rendering in _renderings(rows, tokenizer, template, options, source):
        encoded = tokenizer(rendering.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        special_spans = [span for token, span in zip(ids, offsets, strict=True) if token in special]
        turns = rendering.assistant_turns if train_on == "all_assistant" else rendering.assistant_turns[-1:]
        spans = []
        for turn in turns:
            start, content_end = rendering.response(turn)
            turn_end = rendering.turn_end(turn)
            closing = next((e for s, e in special_spans if content_end <= s < turn_end), content_end)
            spans.append((start, closing))
        yield ids, _in_spans(offsets, spans)


def _marked_assistant_tokens(rows, tokenizer, template, options, train_on, source):
    """transformers' assistant mask of a template with {% generation %} markers; for `last_turn`, its
    last run of assistant tokens."""
    for rendering in _renderings(rows, tokenizer, template, options, source):
        encoded = tokenizer.apply_chat_template(
            rendering.messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            **options,
        )
        mask = [bool(m) for m in encoded["assistant_masks"]]
        if train_on == "last_turn":
            last_start = max((i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])), default=0)
            mask = [m and i >= last_start for i, m in enumerate(mask)]
        yield list(encoded["input_ids"]), mask


def _in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token starts inside one of the (ordered) spans; a token that straddles a span's
    start (a merge across it) belongs to the text before it."""
    inside, span = [], 0
    for s, e in offsets:
        while span < len(spans) and s >= spans[span][1]:
            span += 1
        inside.append(span < len(spans) and spans[span][0] <= s and e > s)
    return inside


def _without_added_bos(tokenizer, prompt: str) -> str:
    """The scorer tokenises a prompt with the tokenizer's own special tokens; a template that already
    starts with the BOS the tokenizer adds loses it here, so the model reads the tokens it trained on."""
    adds_bos = tokenizer.bos_token is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    return prompt.removeprefix(tokenizer.bos_token) if adds_bos else prompt


def generation_prompts(
    rows: list[dict], tokenizer, template: str, options: dict, source: tuple[str, object]
) -> tuple[list[str], list[str]]:
    """For generation metrics: each conversation up to its last assistant turn, rendered with the
    generation prompt, and that turn's response as the template renders it, decoded as a generation is."""
    prompts, references = [], []
    for rendering in _renderings(rows, tokenizer, template, options, source):
        last = rendering.assistant_turns[-1]
        start, content_end = rendering.response(last)
        prompts.append(_without_added_bos(tokenizer, rendering.prompts[last]))
        # as a generation that reproduces the turn decodes (special tokens such as <think> skipped)
        response = tokenizer(rendering.text[start:content_end], add_special_tokens=False)["input_ids"]
        references.append(tokenizer.decode(response, skip_special_tokens=True))
    return prompts, references


def user_prompts(tokenizer, template: str, options: dict, texts: list[str], system: str | None) -> list[str]:
    """Texts as user turns (after a system message, if given), rendered with the generation prompt:
    what `generate` completes on a chat run."""
    before = [{"role": "system", "content": system}] if system else []
    conversations = [[*before, {"role": "user", "content": text}] for text in texts]
    return [
        _without_added_bos(tokenizer, p) for p in _render(tokenizer, template, options, conversations, True)
    ]


def end_of_turn_ids(tokenizer, template: str, options: dict) -> list[int]:
    """The special tokens that close an assistant turn in this template (<|im_end|>, <|eot_id|>,
    <end_of_turn>, EOS), found by rendering a two-message conversation: generation stops at them."""
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    ((ids, mask),) = assistant_tokens(
        [{"messages": messages}],
        tokenizer,
        template,
        options,
        "all_assistant",
        ("task.chat_template", template),
    )
    special = _special_ids(tokenizer)
    # the last token of each learned run, where special (a <think> inside the turn is not its end)
    closing = {
        token
        for i, (token, learned) in enumerate(zip(ids, mask, strict=True))
        if learned and token in special and (i + 1 == len(mask) or not mask[i + 1])
    }
    return sorted(closing | {tokenizer.eos_token_id} - {None})
