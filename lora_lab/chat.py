"""Conversations rendered with the model's chat template, the loss on assistant turns only.

A conversation is a row {"messages": [...], "tools": [...] (optional)}, its messages as people store
them: a role (system, user, assistant, tool), a content (text, or OpenAI-style parts, of which text
parts), an assistant's `tool_calls` and `reasoning_content`. The mask comes from the rendering of the
whole conversation, the tokens the model trains on. Where the template marks the assistant's output
with `{% generation %}`, transformers' assistant mask is used. Otherwise the pieces of each message
(its reasoning, its text, the names of the tools it calls) are located in that rendering in order,
and an assistant turn runs from where the template's generation prompt for it ends (or from its
first piece, where the template renders earlier turns differently once more follow, as Qwen3's drops
their reasoning) to the template's end-of-turn token after its last piece. So templates whose history
depends on what follows, and templates that fold the system message into the first user turn, are
served; a conversation is refused only when the template refuses it or leaves a message out. Tool
results are never learned; reasoning is, where the template renders it, unless
task.train_on_reasoning is false.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cached_property

from lora_lab.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")
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


class Chat:
    """A chat template and the options it renders with (task.chat_template_kwargs), with what the
    template can render (content parts, tools), found once by rendering probes."""

    def __init__(self, tokenizer, template: str, options: dict, train_on_reasoning: bool = True):
        self.tokenizer, self.template, self.options = tokenizer, template, dict(options)
        self.train_on_reasoning = train_on_reasoning
        self.special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(
            tokenizer.all_special_ids
        )

    def render(self, messages: list[dict], tools: list | None, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            **self.options,
        )

    def _renders(self, messages: list[dict], probe: str, tools: list | None = None) -> bool:
        """Whether the probe's text shows in the rendering, not as a Python repr of its object."""
        try:
            text = self.render(messages, tools, False)
        except Exception:  # a template that refuses the probe does not render it
            return False
        return probe in text and "{'type'" not in text

    @cached_property
    def renders_parts(self) -> bool:
        """Whether the template renders a list of content parts as their text (Gemma 3's does)."""
        return self._renders([{"role": "user", "content": [{"type": "text", "text": _PROBE}]}], _PROBE)

    @cached_property
    def renders_tools(self) -> bool:
        """Whether the template renders a tools list and an assistant's tool calls."""
        tool = {"type": "function", "function": {"name": _PROBE, "description": "", "parameters": {}}}
        call = {"type": "function", "function": {"name": _PROBE + "_call", "arguments": {}}}
        messages = [
            {"role": "user", "content": "1"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
        ]
        return self._renders(messages[:1], _PROBE, [tool]) and self._renders(
            messages, _PROBE + "_call", [tool]
        )

    @cached_property
    def end_of_turn_ids(self) -> list[int]:
        """The special tokens that close an assistant turn (<|im_end|>, <|eot_id|>, <end_of_turn>,
        EOS), from a rendered two-message conversation: the first special token after the response.
        Generation stops at them."""
        messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _PROBE}]
        text = self.render(messages, None, False)
        after = text.rindex(_PROBE) + len(_PROBE)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        closing = next(
            (
                t
                for t, (s, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
                if s >= after and t in self.special
            ),
            None,
        )
        return sorted({closing, self.tokenizer.eos_token_id} - {None})

    def conversations(self, rows: list[dict], source: tuple[str, object]) -> Iterator[_Rendering]:
        key, value = source
        for index, row in enumerate(rows):

            def fail(reason: str, index=index):
                raise ConfigError(key, value, f"row {index}: {reason}")

            messages, tools = self.prepare(row, fail)
            yield _Rendering(self, messages, tools, fail)

    def prepare(self, row: dict, fail) -> tuple[list[dict], list | None]:
        """A row's messages and tools as the template takes them, or `fail` with why not."""
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            fail("the conversation is empty")
        prepared = [self._message(j, m, fail) for j, m in enumerate(messages)]
        if prepared[0]["role"] == "assistant":
            fail("the conversation starts with an assistant turn; it needs a system or user message first")
        if not any(m["role"] == "assistant" for m in prepared):
            fail("the conversation has no assistant turn")
        tools = row.get("tools")
        if isinstance(tools, str):
            tools = _json(tools, "its tools", fail)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            fail(f"its tools are a list of JSON schemas (objects), got {tools!r:.60}")
        uses_tools = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in prepared)
        if uses_tools and not self.renders_tools:
            fail(
                "it uses tools, and the chat template renders no tools list or tool calls "
                "(set task.chat_template to one that does, e.g. Qwen2.5's or Llama 3.1's)"
            )
        return prepared, _without_none(tools) if tools else None

    def _message(self, j: int, message: object, fail) -> dict:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            fail(f"message {j} has role {role!r}; roles are {', '.join(ROLES)}")
        role, content = message["role"], message.get("content")
        if content is None:  # an assistant turn whose tool calls carry the answer
            content = ""
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    fail(f"message {j} has a content part of type {kind!r}; lora_lab trains on text parts")
                texts.append(part["text"])
            content = [{"type": "text", "text": t} for t in texts] if self.renders_parts else "".join(texts)
        elif role == "tool" and isinstance(content, dict):  # a tool result stored as an object
            content = json.dumps(content, ensure_ascii=False)
        elif not isinstance(content, str):
            fail(
                f"message {j} has content of type {type(content).__name__} ({content!r:.40}); "
                "contents are text or a list of text parts"
            )
        prepared = {"role": role, "content": content}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if message.get(key) is not None:
                prepared[key] = message[key]
        if message.get("tool_calls"):
            prepared["tool_calls"] = [_tool_call(j, call, fail) for call in message["tool_calls"]]
        return prepared


_PROBE = "lora_lab_probe"


def _json(text: str, what: str, fail):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{what} are not valid JSON ({e.msg} at character {e.pos})")


def _without_none(value):
    """Values without the None-valued keys that `datasets` adds where rows of one file hold objects
    of different keys (one schema for every row): a tool's arguments as the row wrote them."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _tool_call(j: int, call: object, fail) -> dict:
    """An OpenAI-style tool call {"type": "function", "function": {"name", "arguments"}} (or the bare
    function), its arguments an object (templates render them as JSON; a JSON string is parsed)."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        fail(f"message {j} has a tool call without a function name: {call!r:.60}")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        arguments = _json(arguments, f"message {j}'s tool call arguments", fail)
    if not isinstance(arguments, dict):
        fail(f"message {j} has a tool call whose arguments are not an object: {arguments!r:.60}")
    return {"type": "function", "function": {"name": function["name"], "arguments": _without_none(arguments)}}


def _pieces(message: dict) -> list[tuple[str, str]]:
    """(kind, text) of what a message shows, in the order templates render it: an assistant's
    reasoning (reasoning_content, or <think>...</think> in its content), its text, the tools it calls
    (each one's name and argument values)."""
    content = message["content"]
    texts = [p["text"] for p in content] if isinstance(content, list) else [content]
    reasoning = message.get("reasoning_content") or ""
    if message["role"] == "assistant" and not reasoning and texts and "</think>" in texts[-1]:
        thought, texts[-1] = texts[-1].split("</think>", 1)
        reasoning = thought.split("<think>")[-1]
    pieces = [("reasoning", reasoning.strip())] if reasoning.strip() else []
    pieces += [("text", t.strip()) for t in texts if t.strip()]
    for call in message.get("tool_calls", []):  # its name, then its arguments' values, as rendered
        pieces.append(("tool_call", call["function"]["name"]))
        arguments = call["function"]["arguments"]
        pieces += [("tool_call", _shown(v)) for v in arguments.values() if _shown(v)]
    return pieces


def _shown(value) -> str:
    """How a tool call's argument value shows in a rendering: a string as itself, a number or a
    boolean as JSON writes it; an object or a list is not looked for."""
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value) if isinstance(value, (int, float, bool)) else ""


class _Rendering:
    """One conversation's rendering, where each message's pieces lie in it, and the rendering of
    the messages before each assistant turn with the generation prompt."""

    def __init__(self, chat: Chat, messages: list[dict], tools: list | None, fail):
        self.chat, self.messages, self.tools, self.fail = chat, messages, tools, fail
        self.assistant_turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        try:
            self.text = chat.render(messages, tools, False)
            self.prompts = {j: chat.render(messages[:j], tools, True) for j in self.assistant_turns}
        except Exception as e:  # a template's raise_exception ("System role not supported"), or any
            # other error a template raises on this row
            fail(f"the chat template refuses it ({type(e).__name__}: {str(e).splitlines()[0]})")
        # per message: (start, end) of what it shows, and where its reasoning lies (if rendered)
        self.spans: list[tuple[int, int]] = []
        self.reasoning: dict[int, tuple[int, int]] = {}
        cursor = 0
        for j, message in enumerate(messages):
            start = None
            for kind, piece in _pieces(message):
                found = self.text.find(piece, cursor)
                if found < 0 and kind == "reasoning":
                    continue  # templates drop the reasoning of earlier turns
                if found < 0:
                    fail(f"the chat template does not render message {j} (role {message['role']!r})")
                if kind == "reasoning":
                    self.reasoning[j] = (found, found + len(piece))
                start = found if start is None else start
                cursor = found + len(piece)
            self.spans.append((cursor if start is None else start, cursor))

    def response(self, turn: int) -> tuple[int, int, int]:
        """Where assistant message `turn`'s response starts, where its last piece ends, and where its
        end-of-turn token ends (the turn's end in the text): it starts where its generation prompt
        ends, where the text begins with that prompt, else at its first piece."""
        first, last = self.spans[turn]
        previous_end = self.spans[turn - 1][1] if turn else 0
        prompt = self.prompts[turn]
        start = (
            len(prompt) if self.text.startswith(prompt) and previous_end <= len(prompt) <= first else first
        )
        turn_end = self.spans[turn + 1][0] if turn + 1 < len(self.messages) else len(self.text)
        return start, last, turn_end

    def tokens(self, train_on: str) -> tuple[list[int], list[bool]]:
        """The token ids and which carry the loss: the assistant turns (`train_on`), each through its
        end-of-turn token, without their reasoning where task.train_on_reasoning is false."""
        chat = self.chat
        encoded = chat.tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        turns = self.assistant_turns if train_on == "all_assistant" else self.assistant_turns[-1:]
        spans, skipped = [], []
        for turn in turns:
            start, last, turn_end = self.response(turn)
            spans.append((start, self._closing(ids, offsets, last, turn_end)[1]))
            if not chat.train_on_reasoning and turn in self.reasoning:
                skipped.append(self.reasoning[turn])
        learned = _in_spans(offsets, spans)
        return ids, [on and not off for on, off in zip(learned, _in_spans(offsets, skipped), strict=True)]

    def _closing(self, ids, offsets, after: int, before: int) -> tuple[int, int]:
        """The (start, end) of the end-of-turn token after `after` (the first special token there,
        where the template closes turns with another), or an empty span at `after`."""
        candidates = [(t, span) for t, span in zip(ids, offsets, strict=True) if after <= span[0] < before]
        for wanted in (set(self.chat.end_of_turn_ids), self.chat.special):
            found = next((span for t, span in candidates if t in wanted), None)
            if found is not None:
                return found
        return after, after

    def reference(self) -> str:
        """The last assistant turn's response, decoded as a generation of it is (special tokens
        such as <think> skipped): what exact match compares a generation with."""
        start, last, turn_end = self.response(self.assistant_turns[-1])
        encoded = self.chat.tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
        closing = self._closing(encoded["input_ids"], encoded["offset_mapping"], last, turn_end)[0]
        tokens = self.chat.tokenizer(self.text[start:closing], add_special_tokens=False)["input_ids"]
        return self.chat.tokenizer.decode(tokens, skip_special_tokens=True)


_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def assistant_tokens(
    rows: list[dict], chat: Chat, train_on: str, source: tuple[str, object]
) -> Iterator[tuple[list[int], list[bool]]]:
    """Per conversation: its token ids, as apply_chat_template tokenises it (the template adds any
    BOS itself), and which of them the loss is on: the assistant turns (`train_on`: all of them or
    the last), each with its end-of-turn token. `source` (the config key and value the rows come
    from) names a bad row."""
    marked = _GENERATION_MARKER.search(chat.template) and chat.train_on_reasoning
    for rendering in chat.conversations(rows, source):
        yield _marked_tokens(rendering, train_on) if marked else rendering.tokens(train_on)


def _marked_tokens(rendering: _Rendering, train_on: str) -> tuple[list[int], list[bool]]:
    """transformers' assistant mask of a template with {% generation %} markers; for `last_turn`, its
    last run of assistant tokens."""
    chat = rendering.chat
    encoded = chat.tokenizer.apply_chat_template(
        rendering.messages,
        tools=rendering.tools,
        chat_template=chat.template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **chat.options,
    )
    mask = [bool(m) for m in encoded["assistant_masks"]]
    if train_on == "last_turn":
        last_start = max((i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])), default=0)
        mask = [m and i >= last_start for i, m in enumerate(mask)]
    return list(encoded["input_ids"]), mask


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
    rows: list[dict], chat: Chat, source: tuple[str, object]
) -> tuple[list[str], list[str]]:
    """For generation metrics: each conversation up to its last assistant turn, rendered with the
    generation prompt (and its tools), and that turn's response as the template renders it (a tool
    call as its rendered text), decoded as a generation is."""
    prompts, references = [], []
    for rendering in chat.conversations(rows, source):
        prompts.append(_without_added_bos(chat.tokenizer, rendering.prompts[rendering.assistant_turns[-1]]))
        references.append(rendering.reference())
    return prompts, references


def user_prompts(chat: Chat, texts: list[str], system: str | None) -> list[str]:
    """Texts as user turns (after a system message, if given), rendered with the generation prompt:
    what `generate` completes on a chat run."""
    before = [{"role": "system", "content": system}] if system else []
    return [
        _without_added_bos(chat.tokenizer, chat.render([*before, {"role": "user", "content": t}], None, True))
        for t in texts
    ]
