"""Model config: both config.json layouts, validation errors that name the field, preset round trips."""

from __future__ import annotations

import dataclasses
import json
import re
import socket

import pytest

from msa.platform.config import (
    PRESETS,
    ConfigError,
    config_from_dict,
    load_config,
    m3,
    model_config_of,
    preset,
    tiny,
)  # fmt: skip


def _published_text_config() -> dict:
    """The published M3 text config, written the way the release spells it."""
    return {
        "model_type": "minimax_m3", "vocab_size": 200064, "hidden_size": 6144, "num_hidden_layers": 60,
        "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "partial_rotary_factor": 0.5,
        "rope_theta": 5000000, "max_position_embeddings": 1048576, "rms_norm_eps": 1e-6,
        "intermediate_size": 12288, "moe_intermediate_size": 3072, "shared_intermediate_size": 3072,
        "num_local_experts": 128, "num_experts_per_tok": 4, "routed_scaling_factor": 2.0,
        "moe_layer_freq": [0, 0, 0] + [1] * 57, "sparse_attention_freq": [0, 0, 0] + [1] * 57,
        "num_mtp_modules": 7, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
        "use_qk_norm": True, "qk_norm_type": "per_head", "hidden_act": "swigluoai", "scoring_func": "sigmoid",
        "attention_output_gate": False,
        "sparse_attention_config": {
            "sparse_block_size": 128, "sparse_topk_blocks": 16, "sparse_num_index_heads": 4,
            "sparse_index_dim": 128, "sparse_score_type": "max", "sparse_init_block": 0,
            "sparse_local_block": 1, "sparse_disable_index_value": True},
    }


def _write(tmp_path, raw: dict):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_flat_config_json(tmp_path):
    config = load_config(_write(tmp_path, _published_text_config()))
    assert config == m3()
    assert config.rotary_dim == 64 and config.sparse.topk_blocks == 16


def test_vl_config_json(tmp_path):
    raw = {"model_type": "minimax_m3_vl", "image_token_index": 200025, "vision_config": {"hidden_size": 1280},
           "text_config": _published_text_config()}
    config = load_config(_write(tmp_path, raw))
    assert config == m3()
    assert config.hidden_size == 6144  # from text_config, not the vision tower


def test_yaml_config(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("hidden_size: 128\nnum_hidden_layers: 2\nmoe_layer_freq: [0, 1]\n"
                    "sparse_attention_freq: [0, 1]\n")
    config = load_config(path)
    assert config.hidden_size == 128 and config.is_moe_layer(1) and not config.is_sparse_layer(0)


def _with(**changes) -> dict:
    raw = tiny().to_dict()
    for key, value in changes.items():
        if key in raw["sparse_attention_config"]:
            raw["sparse_attention_config"][key] = value
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("changes, field", [
    ({"num_attention_heads": 5}, "num_attention_heads"),  # not a multiple of 2 KV heads
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"sparse_num_index_heads": 4}, "sparse_num_index_heads"),  # must equal the 2 KV heads
    ({"sparse_block_size": 0}, "sparse_block_size"),
    ({"sparse_score_type": "mean"}, "sparse_score_type"),
    ({"sparse_attention_freq": [0, 1, 1]}, "sparse_attention_freq"),  # 4 layers
    ({"moe_layer_freq": [0, 1, 2, 1]}, "moe_layer_freq"),
    ({"moe_layer_freq": 1}, "moe_layer_freq"),
    ({"rotary_dim": 17}, "rotary_dim"),
    ({"head_dim": "16"}, "head_dim"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_act": "silu"}, "hidden_act"),
    ({"eos_token_id": [257, 264]}, "eos_token_id"),
    ({"bos_token_id": -1}, "bos_token_id"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_field_is_named(changes, field):
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        config_from_dict(_with(**changes))


def test_text_config_must_be_a_mapping():
    with pytest.raises(ConfigError, match="'text_config'"):
        config_from_dict({"text_config": [1, 2]})


def test_aliases_and_unknown_keys():
    raw = _with(num_experts=4, some_future_field=1)
    del raw["num_local_experts"]
    assert config_from_dict(raw) == tiny()


def test_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trip(name, tmp_path):
    config = preset(name)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    config.save(tmp_path / "config.json")
    assert load_config(tmp_path) == config
    assert config_from_dict({"model_type": "minimax_m3_vl", "text_config": config.to_dict()}) == config


def test_a_model_is_a_config_a_checkpoint_directory_or_a_preset(tmp_path):
    small = dataclasses.replace(tiny(), rope_theta=1234.0)
    small.save(tmp_path / "config.json")
    assert model_config_of(small) is small
    assert model_config_of(tmp_path) == small
    with pytest.raises(ConfigError, match=r"config\.json' is a file; give the checkpoint directory"):
        model_config_of(tmp_path / "config.json")  # not a model whose weights are random
    assert model_config_of("tiny") == tiny()
    missing = str(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=rf"model '{re.escape(missing)}' is neither a checkpoint directory "
                       rf"nor a preset \(one of \['m3', 'm3_proxy', 'tiny'\]\); no such path on this host \("
                       rf"{re.escape(socket.gethostname())}\)"):
        model_config_of(missing)


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


@pytest.mark.parametrize("changes, field, allowed", [
    ({"shared_intermediate_size": "32"}, "shared_intermediate_size", "a non-negative integer"),
    ({"shared_intermediate_size": 31.5}, "shared_intermediate_size", "a non-negative integer"),
    ({"shared_intermediate_size": -1}, "shared_intermediate_size", "a non-negative integer"),
    ({"num_mtp_modules": "1"}, "num_mtp_modules", "a non-negative integer"),
    ({"num_mtp_modules": 1.5}, "num_mtp_modules", "a non-negative integer"),
    ({"num_mtp_modules": None}, "num_mtp_modules", "a non-negative integer"),
    ({"num_mtp_modules": True}, "num_mtp_modules", "a non-negative integer"),
    ({"sparse_disable_index_value": "false"}, "sparse_disable_index_value", "the boolean true"),
    ({"sparse_disable_index_value": 1}, "sparse_disable_index_value", "the boolean true"),
    ({"sparse_index_dim": 4}, "sparse_index_dim", ">= rotary_dim (8)"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_wrongly_typed_field_is_a_config_error_naming_it(changes, field, allowed):
    with pytest.raises(ConfigError, match=rf"config field '{field}' must be {re.escape(allowed)}"):
        config_from_dict(_with(**changes))


def test_zero_shared_experts_and_mtp_modules_are_allowed():
    config = config_from_dict(_with(shared_intermediate_size=0, num_mtp_modules=0))
    assert (config.shared_intermediate_size, config.num_mtp_modules) == (0, 0)


def test_index_dim_equal_to_rotary_dim_is_allowed():
    assert config_from_dict(_with(sparse_index_dim=8)).sparse.index_dim == 8


def _without(*keys: str, **changes) -> dict:
    raw = _with(**changes)
    for key in keys:
        del raw[key]
    return raw


def test_absent_head_dim_is_128_and_rotary_dim_follows_it():
    published = _published_text_config()
    del published["head_dim"]
    config = config_from_dict(published)
    assert (config.head_dim, config.rotary_dim) == (128, 64)  # not 6144 // 64 = 96
    assert config == m3()


@pytest.mark.parametrize("factor, rotary_dim", [(None, 8), (0.5, 8), (0.25, 4), (1.0, 16)])
def test_absent_rotary_dim_is_partial_rotary_factor_of_head_dim(factor, rotary_dim):
    changes = {} if factor is None else {"partial_rotary_factor": factor}
    config = config_from_dict(_without("rotary_dim", **changes))
    assert (config.head_dim, config.rotary_dim) == (16, rotary_dim)


def test_absent_head_dim_and_rotary_dim_derive_together():
    raw = _without("head_dim", "rotary_dim", "partial_rotary_factor", sparse_index_dim=64)
    config = config_from_dict(raw)
    assert (config.head_dim, config.rotary_dim) == (128, 64)
    raw["partial_rotary_factor"] = 0.25
    assert config_from_dict(raw).rotary_dim == 32


@pytest.mark.parametrize("factor", ["0.5", 0, 1.5, None, True])
def test_bad_partial_rotary_factor_is_named(factor):
    with pytest.raises(ConfigError, match="config field 'partial_rotary_factor' must be a number in"):
        config_from_dict(_without("rotary_dim", partial_rotary_factor=factor))
