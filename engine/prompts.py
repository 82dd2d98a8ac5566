"""Prompts to token ids: plain text, or chat messages through the model's chat template."""

from __future__ import annotations

from typing import Any

from .errors import PreconditionError, RequestError


def encode_prompt(
    tok: Any,
    text: str | None = None,
    messages: list[dict] | None = None,
    chat: bool = False,
    continue_final_message: bool = False,
) -> list[int]:
    """tok: a transformers tokenizer. chat: wrap `text` as one user message. continue_final_message:
    continue the last (assistant) message instead of opening a new turn."""
    if messages is not None or chat:
        msgs = messages if messages is not None else [{"role": "user", "content": text or ""}]
        if not getattr(tok, "chat_template", None):
            raise PreconditionError("this model has no chat template; send a plain prompt", "messages")
        if continue_final_message and msgs[-1].get("role") != "assistant":
            raise RequestError(
                "continue_final_message continues an assistant turn: make the last message's role "
                "assistant, or set continue_final_message false",
                "continue_final_message",
            )
        rendered = tok.apply_chat_template(
            msgs,
            add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
            tokenize=False,
        )
        return list(tok(rendered, add_special_tokens=False)["input_ids"])
    return list(tok(text or "")["input_ids"])
