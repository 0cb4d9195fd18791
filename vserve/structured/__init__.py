"""Structured outputs: constraints on a request's output, enforced by grammars.

    grammar.py   StructuredOutput → llguidance grammar text, and its validation (torch-free:
                 API servers validate before anything reaches an engine)
    matcher.py   the engine side: the tokenizer llguidance needs, grammars compiled on a
                 worker thread and cached, per-request matchers, token bitmasks

Library: llguidance (see ``docs/design/structured_outputs.md`` for why).
"""
