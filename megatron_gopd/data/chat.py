"""Chat templates: a record's prompt as chat messages, rendered and tokenised by a model's tokenizer.

Each model renders prompts with its own chat template (a Qwen3 student with ``enable_thinking=False``
adds an empty think block to the generation prompt; an Instruct-2507 teacher does not). The student's
prompts are rendered when the data is loaded; a teacher renders ``PromptRecord.messages`` with its own
tokenizer through `render_prompt_ids`, and the student's response token ids are appended to each
model's own prompt ids (response text is never re-tokenised).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

from transformers import PreTrainedTokenizerBase

from megatron_gopd.data.records import PROMPT_FIELD

logger = logging.getLogger(__name__)

# Template variables that the data pipeline sets itself (or that transformers owns); a user may not
# pass them through ``chat_template_kwargs``.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "return_dict",
        "tools",
        "documents",
        "enable_thinking",  # has its own DataConfig field
    }
)


def prompt_to_messages(prompt: Any) -> list[dict[str, str]]:
    """A record's ``prompt`` as chat messages: a string becomes one user message.

    Keys with a None value are dropped (columnar formats fill keys that only some messages have).

    Raises:
        ValueError: the prompt is missing, empty, or not a string / list of ``{"role", "content"}``.
    """
    if prompt is None:
        raise ValueError(f"record has no {PROMPT_FIELD!r}")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(
            f"{PROMPT_FIELD!r} must be a string or a non-empty list of chat messages, got {type(prompt).__name__}"
        )
    messages = []
    for msg in prompt:
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
            raise ValueError(f"chat message must have string 'role' and 'content', got {msg!r}")
        messages.append({key: value for key, value in msg.items() if value is not None})
    return messages


def template_variables(tokenizer: PreTrainedTokenizerBase) -> Optional[frozenset[str]]:
    """Names the tokenizer's chat template reads, or None when the template cannot be analysed."""
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = tokenizer.get_chat_template()
    # transformers' `{% generation %}` tag is an extension plain Jinja does not know; it does not
    # read variables, so strip it before parsing.
    template = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)
    env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return frozenset(meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateError as err:
        logger.warning("cannot analyse the chat template (%s); template kwargs are not checked", err)
        return None


def check_template_kwargs(tokenizer: PreTrainedTokenizerBase, template_kwargs: dict[str, Any]) -> None:
    """Refuse template variables the chat template never reads (a typo would otherwise do nothing).

    Raises:
        ValueError: the tokenizer has no chat template, or a kwarg is not read by it.
    """
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: prompts are rendered with one")
    known = template_variables(tokenizer)
    if known is None:
        return
    unknown = sorted(set(template_kwargs) - known)
    if unknown:
        raise ValueError(
            f"chat template of {tokenizer.name_or_path!r} does not use {unknown}; it reads {sorted(known)}"
        )


def render_prompt_text(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, template_kwargs: Optional[dict[str, Any]] = None
) -> str:
    """The prompt rendered with the tokenizer's chat template, ending with the generation prompt."""
    return tokenizer.apply_chat_template(
        prompt_to_messages(prompt), tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )


def render_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, template_kwargs: Optional[dict[str, Any]] = None
) -> list[int]:
    """Token ids of `render_prompt_text` (no extra BOS/EOS: the template writes all control tokens).

    Teachers with their own template call this on ``PromptRecord.messages`` with their own tokenizer.
    """
    return encode_texts(tokenizer, [render_prompt_text(tokenizer, prompt, template_kwargs)])[0]


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of already rendered texts, in one batched call (no BOS/EOS added)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def end_of_response_ids(tokenizer: PreTrainedTokenizerBase, model_dir: Optional[str] = None) -> list[int]:
    """The token ids that end a response: the tokenizer's eos and pad ids, plus every id of the
    ``eos_token_id`` in `model_dir`'s ``generation_config.json`` (an int or a list: Llama 3 lists
    several, e.g. ``<|eot_id|>`` beside ``<|end_of_text|>``; Qwen3 lists ``<|im_end|>`` and
    ``<|endoftext|>``). A malformed generation config is an error naming the file and field.
    """
    import json
    from pathlib import Path

    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    path = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if path is not None and path.is_file():
        try:
            listed = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"{path}: not a JSON object ({err})") from err
        listed = [] if listed is None else listed if isinstance(listed, list) else [listed]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in listed):
            raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {listed!r}")
        ids.update(listed)
    return sorted(i for i in ids if i is not None)
