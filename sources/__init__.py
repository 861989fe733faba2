"""Data sources and formats: the Shapes set, caption and conversation files, chat templates, the tokenizer and batching."""
