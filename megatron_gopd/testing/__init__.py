"""Small local assets for tests and the CPU demo; nothing here touches the network.

Owns:
    tiny_tokenizer  an offline character-level tokenizer with Qwen3's special tokens and chat template
    tiny_assets     tiny Qwen3 models (HF and converted), and prompt data for the tiny example configs

May import: `models`, `bridge` (to convert the tiny models), transformers and torch. Library code
never imports it.
"""
