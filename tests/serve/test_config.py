"""Serve application arguments: validation, the engine config and replica resources they imply."""

import pytest

from msa.platform.config import ConfigError
from msa.serve.config import DEFAULT_CPU_PAGES, ServeConfig


def test_defaults_serve_the_tiny_preset_on_cpu():
    config = ServeConfig.from_args({}).resolved(cluster_gpus=0)
    engine = config.engine_config()
    assert (config.model_name, engine.device, engine.dtype, engine.num_pages) == \
        ("tiny", "cpu", "float32", DEFAULT_CPU_PAGES)
    assert engine.max_num_batched_tokens == 2048
    # A CPU engine shares the replica's process (it needs the cores); asked for, it gets its own.
    assert config.replica_actor_options() == {"num_cpus": 1.0, "num_gpus": 0}
    own = ServeConfig(engine_process=True).resolved(cluster_gpus=0)
    assert own.replica_actor_options() == {"num_cpus": 1, "num_gpus": 0}
    assert own.engine_actor_options() == {"num_cpus": 1.0, "num_gpus": 0}


def test_gpu_cluster_single_shard_engine_holds_the_gpu_and_sharded_one_does_not():
    single = ServeConfig(model="m3_proxy").resolved(cluster_gpus=8)
    assert single.runs_engine_process  # a GPU engine runs in a process of its own
    assert single.engine_config().max_num_batched_tokens == 8192  # vLLM's OpenAI server on an H100
    assert single.engine_config().device == "cuda" and single.engine_config().dtype == "bfloat16"
    assert single.engine_actor_options()["num_gpus"] == 1
    assert single.replica_actor_options()["num_gpus"] == 0
    in_replica = ServeConfig(model="m3_proxy", engine_process=False, replica_num_cpus=4).resolved(8)
    assert in_replica.replica_actor_options() == {"num_cpus": 4, "num_gpus": 1}
    sharded = ServeConfig(model="m3_proxy", tp=2, sp=2).resolved(cluster_gpus=8)
    assert sharded.engine_actor_options()["num_gpus"] == 0
    assert sharded.engine_config().world_size == 4
    actor_shard = ServeConfig(model="m3_proxy", engine_process=False, engine={"ray_shards": True}).resolved(8)
    assert actor_shard.replica_actor_options()["num_gpus"] == 0


def test_engine_passthrough_and_names():
    config = ServeConfig(model="/ckpt/MiniMax-M3", served_model_name=None, device="cuda",
                         engine={"max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.8})
    assert config.model_name == "MiniMax-M3"
    engine = config.engine_config()
    assert engine.max_num_batched_tokens == 8192 and engine.gpu_memory_utilization == 0.8


def test_api_servers_share_one_engine_in_its_own_process():
    shared = ServeConfig(api_servers=4).resolved(cluster_gpus=0)
    assert shared.shares_engine and shared.runs_engine_process  # even on CPU: it is the shared actor
    assert shared.deployment_replicas == 4
    assert shared.replica_actor_options() == {"num_cpus": 1, "num_gpus": 0}
    engines = ServeConfig(num_replicas=3).resolved(cluster_gpus=0)
    assert not engines.shares_engine and engines.deployment_replicas == 3


@pytest.mark.parametrize("config, demand", [
    (ServeConfig(), {"CPU": 1, "GPU": 0}),  # the replica holds the CPU engine
    (ServeConfig(api_servers=4), {"CPU": 5, "GPU": 0}),  # 4 HTTP replicas + the shared engine actor
    (ServeConfig(num_replicas=3), {"CPU": 3, "GPU": 0}),
    (ServeConfig(sp=2), {"CPU": 3, "GPU": 0}),  # the replica + 2 shard actors
    (ServeConfig(model="m3_proxy", device="cuda"), {"CPU": 2, "GPU": 1}),  # HTTP replica + engine
    (ServeConfig(model="m3_proxy", device="cuda", tp=2, sp=2, num_replicas=2), {"CPU": 12, "GPU": 8}),
    (ServeConfig(model="m3_proxy", device="cuda", api_servers=2, tp=2), {"CPU": 5, "GPU": 2}),
], ids=["default", "api-servers", "replicas", "sp", "cuda", "cuda-sharded-replicas", "cuda-api-servers"])
def test_resource_demand_counts_replicas_engines_and_shards(config, demand):
    assert config.resource_demand() == demand


def test_a_cluster_too_small_is_named_by_the_flags():
    from msa.serve.cli import check_resources

    check_resources(ServeConfig(api_servers=2), {"CPU": 3})
    with pytest.raises(ConfigError, match=r"--api-servers 4, --num-replicas 1, --tp 1 and --sp 1 on cpu "
                                          r"reserve 5 CPUs, but this Ray cluster has 2"):
        check_resources(ServeConfig(api_servers=4, device="cpu"), {"CPU": 2})
    with pytest.raises(ConfigError, match=r"reserve 4 GPUs, but this Ray cluster has 1$"):
        check_resources(ServeConfig(model="m3_proxy", device="cuda", tp=4), {"CPU": 64, "GPU": 1})


@pytest.mark.parametrize("args, field", [
    ({"api_servers": 0}, "api_servers"),
    ({"api_servers": 2, "num_replicas": 2}, "num_replicas"),
    ({"api_servers": 2, "engine_process": False}, "engine_process"),
    ({"model": "giant"}, "model"),
    ({"tp": 0}, "tp"),
    ({"max_waiting": -1}, "max_waiting"),
    ({"device": "tpu"}, "device"),
    ({"api_key": ""}, "api_key"),
    ({"engine": {"warp_speed": 9}}, "engine"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_arguments_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field):
        ServeConfig.from_args(args)
