"""The OpenAI-compatible HTTP endpoint over Ray Serve.

``schemas`` (request bodies, validated here and nowhere else), ``errors`` (OpenAI error bodies),
``server`` (what the routes share around one engine), ``chat`` / ``completions`` (the two
generation routes), ``tools`` (tool_choice prompting and ``<tool_call>`` parsing), ``logprobs``,
``metrics`` (Prometheus), ``api`` (the FastAPI app, no Serve needed), ``config`` + ``app`` (the Serve
deployment and ``build_app``), ``cli`` (``msa serve``).
"""
