"""Evaluation: fixed-seed tasks (``tasks``), scoring an original or converted checkpoint (``evaluate``),
the byte-level tokenizer of the example models (``byte_tokenizer``)."""
