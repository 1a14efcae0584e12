"""A quick look at a trained adapter: complete prompts (causal LM) or classify texts (seq_cls).

python -m lora_lab.generate outputs/2026-11-23/10-00-00 "sort 3 1 2 :"
python -m lora_lab.generate <classification run> "the film was superb" "the food was awful"
python -m lora_lab.generate <chat run> "sort 3 1 2" --system "You sort digits."

On a chat run each text is a user turn, rendered with the run's chat template, and the response
ends at the template's end-of-turn token; it prints the text and the response, tab-separated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lora_lab.chat import Chat, resolve_template, user_prompts
from lora_lab.errors import exit_on_config_error
from lora_lab.metrics import generate_responses
from lora_lab.runs import load_run


@torch.no_grad()
def classify(model, tokenizer, texts: list[str], labels: list[str]) -> list[tuple[str, float]]:
    batch = tokenizer(texts, padding=True, return_tensors="pt").to(next(model.parameters()).device)
    probabilities = model(**batch).logits.float().softmax(dim=-1)
    best = probabilities.argmax(dim=-1)
    return [(labels[i], float(probabilities[row, i])) for row, i in enumerate(best.tolist())]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lora_lab.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("texts", nargs="+", help="prompts to complete, or texts to classify")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--system", help="a system message before each user turn (chat runs)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    with exit_on_config_error():
        model, tokenizer, run = load_run(args.run_dir, args.device)
    if run.model.kind == "seq_cls":
        for text, (label, probability) in zip(
            args.texts, classify(model, tokenizer, args.texts, run.task.labels), strict=True
        ):
            print(f"{label}\t{probability:.3f}\t{text}")
    elif run.task.format == "chat":
        chat = Chat(
            tokenizer, resolve_template(tokenizer, run.task.chat_template), run.task.chat_template_kwargs
        )
        prompts = user_prompts(chat, args.texts, args.system)
        responses = generate_responses(
            model, tokenizer, prompts, args.max_new_tokens, 8, chat.end_of_turn_ids
        )
        for text, response in zip(args.texts, responses, strict=True):
            print(f"{text}\t{response}")
    else:
        for prompt, completion in zip(
            args.texts, generate_responses(model, tokenizer, args.texts, args.max_new_tokens, 8), strict=True
        ):
            print(f"{prompt}{completion}")


if __name__ == "__main__":
    main()
