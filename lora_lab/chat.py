"""Conversations rendered with the model's chat template, the loss on assistant turns only.

A conversation is a row {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}.
Each assistant turn's tokens are found by rendering the conversation's prefixes with the template
itself: the turn starts where the rendering of the messages before it with `add_generation_prompt`
ends, and ends with the first special token after its content (the end-of-turn or EOS token the
template closes it with), or where the rendering up to it ends if no special token closes it. This
needs no `{% generation %}` markers, so every template gives an exact mask, and a template that
renders a conversation's start differently once more turns follow is refused rather than guessed at.
"""

from __future__ import annotations

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


class _Rendering:
    """One conversation's renderings: of each prefix up to and including message j, and of the
    messages before each assistant turn with the generation prompt."""

    def __init__(self, messages: list[dict], tokenizer, template: str, fail):
        self.messages, self.fail = messages, fail
        self.assistant_turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        try:
            self.upto = self._render(
                tokenizer, template, [messages[: j + 1] for j in range(len(messages))], False
            )
            self.prompts = dict(
                zip(
                    self.assistant_turns,
                    self._render(tokenizer, template, [messages[:j] for j in self.assistant_turns], True),
                    strict=True,
                )
            )
        except Exception as e:  # a template's raise_exception ("System role not supported"), or any
            # other error a template raises on this row
            fail(f"the chat template refuses it ({type(e).__name__}: {str(e).splitlines()[0]})")
        self.text = self.upto[-1]
        for j, message in enumerate(messages):
            before = self.upto[j - 1] if j else ""
            if not self.upto[j].startswith(before) or not self.text.startswith(self.upto[j]):
                fail(
                    f"the chat template renders messages 0..{j} differently when more messages follow, "
                    "so the assistant's tokens cannot be told (set task.chat_template to another template)"
                )
            if message["content"].strip() not in self.upto[j][len(before) :]:
                fail(f"the chat template does not render message {j} (role {message['role']!r})")

    @staticmethod
    def _render(
        tokenizer, template: str, conversations: list[list[dict]], generation_prompt: bool
    ) -> list[str]:
        if not conversations:
            return []
        return tokenizer.apply_chat_template(
            conversations, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def response(self, turn: int) -> tuple[int, int]:
        """Where assistant message `turn`'s response (without its end-of-turn) starts and ends in the text."""
        start = len(self.prompts[turn])
        if not self.upto[turn].startswith(self.prompts[turn]):
            self.fail(
                f"the chat template's generation prompt before message {turn} is not how it renders "
                "that message, so the assistant's tokens cannot be told"
            )
        content = self.messages[turn]["content"].strip()
        found = self.upto[turn].find(content, start)
        if found < 0:
            self.fail(f"the chat template does not render assistant message {turn} after its prompt")
        return start, found + len(content)


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


def _renderings(rows: list[dict], tokenizer, template: str, source: tuple[str, object]):
    key, value = source
    for index, row in enumerate(rows):

        def fail(reason: str, index=index):
            raise ConfigError(key, value, f"row {index}: {reason}")

        _check_messages(row["messages"], fail)
        yield _Rendering(row["messages"], tokenizer, template, fail)


def _special_ids(tokenizer) -> set[int]:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def assistant_tokens(
    rows: list[dict], tokenizer, template: str, train_on: str, source: tuple[str, object]
) -> Iterator[tuple[list[int], list[bool]]]:
    """Per conversation: its token ids, as apply_chat_template tokenises it (the template adds any
    BOS itself), and which of them the loss is on: the assistant turns (`train_on`: all of them or
    the last), each with its end-of-turn token. `source` (the config key and value the rows come
    from) names a bad row."""
    special = _special_ids(tokenizer)
    for rendering in _renderings(rows, tokenizer, template, source):
        encoded = tokenizer(rendering.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        special_spans = [span for token, span in zip(ids, offsets, strict=True) if token in special]
        turns = rendering.assistant_turns if train_on == "all_assistant" else rendering.assistant_turns[-1:]
        spans = []
        for turn in turns:
            start, content_end = rendering.response(turn)
            turn_end = len(rendering.upto[turn])
            closing = next((e for s, e in special_spans if content_end <= s < turn_end), turn_end)
            spans.append((start, closing))
        yield ids, _in_spans(offsets, spans)


def _in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token starts inside one of the (ordered) spans; a token that straddles a span's
    start (a merge across it) belongs to the text before it."""
    inside, span = [], 0
    for s, e in offsets:
        while span < len(spans) and s >= spans[span][1]:
            span += 1
        inside.append(span < len(spans) and spans[span][0] <= s and e > s)
    return inside


def generation_prompts(
    rows: list[dict], tokenizer, template: str, source: tuple[str, object]
) -> tuple[list[str], list[str]]:
    """For generation metrics: each conversation up to its last assistant turn, rendered with the
    generation prompt, and that turn's response as the template renders it.

    The scorer tokenises a prompt with the tokenizer's own special tokens; a template that already
    starts with the BOS the tokenizer adds loses it here, so the model reads the tokens it trained on."""
    adds_bos = tokenizer.bos_token is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    prompts, references = [], []
    for rendering in _renderings(rows, tokenizer, template, source):
        last = rendering.assistant_turns[-1]
        start, content_end = rendering.response(last)
        prompt = rendering.prompts[last]
        if adds_bos:
            prompt = prompt.removeprefix(tokenizer.bos_token)
        prompts.append(prompt)
        references.append(rendering.upto[last][start:content_end])
    return prompts, references
