"""Evaluation harnesses: passkey retrieval, perplexity and speed, Self-Extend against vanilla attention and
llama.cpp's alternatives (its position-shifting approximation, YaRN and linear RoPE scaling).

Library first: each harness yields plain results (dataclasses with ``to_json``); ``report`` turns them into
tables, JSON documents and plots; the ``selfext eval`` commands are thin glue over both.
"""
