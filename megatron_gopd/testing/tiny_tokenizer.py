"""A tiny, deterministic, offline character-level tokenizer with Qwen3's special tokens and chat template.

Tests and the CPU demo need a real `transformers` fast tokenizer (chat template, special tokens,
save / reload) without downloading anything, and a vocabulary small enough that a 2-layer model's
LM head is cheap. This one maps every printable ASCII character, newline and tab, and a few common
math symbols to one token each, so arithmetic and short code snippets tokenise and decode exactly;
any other character becomes ``<|unk|>``.

The special tokens mirror Qwen3 (the paper's student family), in Qwen3's order and at the end of the
vocabulary: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos), then ``<think>`` and
``</think>``, which, as in Qwen3, are added tokens but not *special* ones (``skip_special_tokens``
keeps them). The pad id is deliberately not 0 and differs from the eos id, so tests notice code that
assumes either.

Usage::

    tok = build_tiny_tokenizer("/tmp/tiny_tok")          # also writes tokenizer files there
    tok = AutoTokenizer.from_pretrained("/tmp/tiny_tok")  # reloads offline
    model_cfg.vocab_size = TINY_VOCAB_SIZE
"""

from __future__ import annotations

import logging
from typing import Optional

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Unicode symbols that show up in maths word problems and that a character-level vocabulary can
# afford; order matters (it fixes the ids), so only ever append.
_MATH_SYMBOLS = "×÷−±≤≥≠≈√π∞°²³½·→∈∑∫αβθλμσ…"

# Every base character, in id order: printable ASCII (space .. '~'), newline, tab, math symbols.
_BASE_CHARS: tuple[str, ...] = tuple(chr(code) for code in range(0x20, 0x7F)) + ("\n", "\t") + tuple(_MATH_SYMBOLS)

UNK_TOKEN = "<|unk|>"
PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
THINK_START_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"

# Special (control) tokens, then the reasoning markers; appended after the base vocabulary in this order.
_SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)
_THINK_TOKENS: tuple[str, ...] = (THINK_START_TOKEN, THINK_END_TOKEN)

TINY_VOCAB_SIZE: int = len(_BASE_CHARS) + 1 + len(_SPECIAL_TOKENS) + len(_THINK_TOKENS)
"""Number of token ids the tiny tokenizer produces (``len(tokenizer)``): build tiny models with it."""

UNK_TOKEN_ID: int = len(_BASE_CHARS)
PAD_TOKEN_ID: int = UNK_TOKEN_ID + 1
IM_START_TOKEN_ID: int = PAD_TOKEN_ID + 1
EOS_TOKEN_ID: int = IM_START_TOKEN_ID + 1
THINK_START_TOKEN_ID: int = EOS_TOKEN_ID + 1
THINK_END_TOKEN_ID: int = THINK_START_TOKEN_ID + 1

# A reduced Qwen3 chat template: same rendering for system / user / assistant turns and for the
# generation prompt (including the empty think block for enable_thinking=False), no tool calling.
# As in Qwen3, the reasoning part of earlier assistant turns is dropped from the history.
CHAT_TEMPLATE: str = (
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- raise_exception('tiny chat template: unsupported role ' + message.role) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_MODEL_MAX_LENGTH = 131072  # Qwen3's value; only silences "sequence too long" warnings.


def _build_backend() -> Tokenizer:
    """The `tokenizers` object: one token per character, unknown characters to ``<|unk|>``."""
    vocab = {char: idx for idx, char in enumerate(_BASE_CHARS)}
    vocab[UNK_TOKEN] = UNK_TOKEN_ID
    # BPE without merges is a plain character lookup over the whole (un-pre-tokenised) string, so
    # spaces and newlines are ordinary tokens and decoding is an exact concatenation (Fuse).
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN, fuse_unk=False))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in _SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in _THINK_TOKENS])
    return backend


def build_tiny_tokenizer(save_dir: Optional[str] = None) -> PreTrainedTokenizerFast:
    """Build the tiny tokenizer (identical on every call) and optionally save it.

    Args:
        save_dir: if given, the tokenizer is written there with ``save_pretrained`` so that
            ``AutoTokenizer.from_pretrained(save_dir)`` reloads it offline (e.g. next to a tiny HF
            model checkpoint).

    Returns:
        A fast tokenizer with ``len(tokenizer) == TINY_VOCAB_SIZE``, pad ``<|endoftext|>``, eos
        ``<|im_end|>``, no bos, and a Qwen3-style chat template that accepts ``enable_thinking``.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=_MODEL_MAX_LENGTH,
    )
    # Guard the id constants above against a change in how `tokenizers` assigns added-token ids.
    if len(tokenizer) != TINY_VOCAB_SIZE or tokenizer.eos_token_id != EOS_TOKEN_ID:
        raise RuntimeError(
            f"tiny tokenizer layout changed: {len(tokenizer)} tokens (expected {TINY_VOCAB_SIZE}), "
            f"eos id {tokenizer.eos_token_id} (expected {EOS_TOKEN_ID})"
        )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
        logger.info("saved tiny tokenizer (%d tokens) to %s", TINY_VOCAB_SIZE, save_dir)
    return tokenizer
