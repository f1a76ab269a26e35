"""Agentic RL post-training of msa models.

    msa train examples/rl_tiny.yaml                        # CPU, tiny model, a few minutes
    msa submit examples/rl_gpu.yaml --address http://HEAD:8265

One step (``train.py``): prompts from a jsonl/parquet file (``data.py``) -> G episodes each on the
msa engine, environments executing tool calls (``rollout.py``, ``chat.py``, ``envs/``) -> group
advantages and the clipped-ratio loss (``algorithms.py``, ``batch.py``) -> a DeepSpeed update in
Ray trainer actors (``trainer.py``, ``placement.py``) -> the new weights into the running engine
with a version number (``sync.py``) -> metrics, curves and a resumable checkpoint
(``metrics.py``, ``checkpoint.py``). ``config.py`` holds the YAML-backed run config; ``cli.py``
the ``train`` and ``submit`` subcommands.
"""
