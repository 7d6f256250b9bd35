"""Small local assets (a tiny tokenizer) for tests and the CPU demo; nothing here touches the network."""
