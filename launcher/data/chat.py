"""Chat records: a list of `{"role", "content"}` messages rendered with the tokenizer's own chat
template, with the loss on the assistant turns only (every one of them in a multi-turn record).

Which tokens are the assistant's is read from the template itself, without asking it to mark them
(few templates have `{% generation %}` blocks): a turn is the text that rendering the conversation
up to and including it adds to rendering it up to the turn before, with the generation prompt, that
is the assistant's words and whatever the template closes a turn with (its end-of-turn token, which
the model must learn to emit). This needs a template that renders earlier turns the same way
whatever follows; one that does not (some drop earlier reasoning, say) is refused with the reason,
never trained with the loss on the wrong tokens.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError


def use_chat_template(tokenizer, chat_template: str, data_path: str) -> None:
    """Puts `data.chat_template` (a template, or a file holding one) on the tokenizer; refuses a tokenizer
    with no template when none is given."""
    if chat_template:
        path = Path(chat_template)
        tokenizer.chat_template = path.read_text() if path.is_file() else chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"Dataset `{data_path}` holds chat messages, but the tokenizer at `model.path` has no chat template. "
            "Set `data.chat_template` to a Jinja chat template (or a file holding one), e.g. the one of the "
            "instruct model this base belongs to."
        )


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}.")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConfigError(f'{where}: each message needs "role" and "content", got {message!r}.')


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def target_spans(tokenizer, messages: list[dict], targets: list[int], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each target turn in it."""
    text = render(tokenizer, messages)
    spans = []
    for i in targets:
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ConfigError(
                f"{where}: the chat template renders turn {i} differently once later turns follow, so the "
                "assistant's tokens cannot be told apart. Use a template that renders each turn the same "
                "whatever follows (`data.chat_template`), or prompt/completion records."
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_chat(tokenizer, messages: list[dict], targets: list[int], where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and which of them belong to the `targets` turns."""
    text, spans = target_spans(tokenizer, messages, targets, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # A token counts where it starts: one that crosses into a turn belongs to what comes before it.
    in_target = [any(start <= begin < end for start, end in spans) for begin, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], in_target


def assistant_turns(messages: list[dict]) -> list[int]:
    return [i for i, message in enumerate(messages) if message["role"] == "assistant"]
