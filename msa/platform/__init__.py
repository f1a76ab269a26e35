"""Shared by every part of msa: model config (``config``), checkpoint I/O (``checkpoint``),
tokenizer and chat template (``tokenizer``), asyncio helpers (``aio``) and the ``msa`` command
line (``cli``).

Import the submodule you need; this package imports nothing heavy on its own.
"""
