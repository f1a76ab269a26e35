"""The distributed inference engine: one replica of ``tp x sp`` model shards driven as one engine.

- ``engine.MSAEngine`` / ``config.EngineConfig``: the ``protocol.Engine`` that serving and RL use.
- ``scheduler.Scheduler``: continuous batching, chunked prefill under a token budget, preemption.
- ``block_manager.BlockManager``: KV pages per sequence shard (global block j on shard j % sp).
- ``executor``: ``LocalExecutor`` (one shard in-process) and ``RayExecutor`` (shard actors).
- ``shard.ModelShard``: a shard's model slice, KV cache and steps; ``placement``: its bundle.
- ``parallel``: tensor/expert parallel slicing and all-reduces, the context-parallel collectives.
- ``sampler``, ``output``: sampling on rank 0; detokenization and stop handling per choice.
- ``weights``: checksummed weight buckets for updates without restarts.
"""
