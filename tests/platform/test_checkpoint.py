"""Checkpoint save/load: bit-exact round trips in both layouts, sharded or not, and the errors a
checkpoint that does not fit the model must raise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from msa.platform.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    cast_model,
    load_checkpoint,
    load_model,
    place_tensor,
    save_checkpoint,
)
from msa.platform.config import load_config, tiny


class _Linear(nn.Module):
    def __init__(self, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, cols, dtype=dtype))


class _Moe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = _Linear(4, 8)
        self.e_score_correction_bias = nn.Parameter(torch.randn(4), requires_grad=False)
        self.experts = nn.ModuleList(nn.ModuleDict({"w1": _Linear(6, 8), "w2": _Linear(8, 6)})
                                     for _ in range(4))


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = _Linear(1, 8)
        self.block_sparse_moe = _Moe()


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(_Layer() for _ in range(2))


class ToyLM(nn.Module):
    """A small module tree in the checkpoint's naming, to test loading apart from the real model."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Backbone()
        self.lm_head = _Linear(16, 8)


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    same = (sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    return sa.keys() == sb.keys() and all(same)


def _shard_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("layout", ["flat", "vl"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_model_round_trip_is_bit_exact(tmp_path, layout, sharded, dtype):
    model, config = load_model("tiny", dtype=dtype, seed=3, progress=False)
    save_checkpoint(model, tmp_path, config, layout=layout, max_shard_bytes=50_000 if sharded else 2**30)
    files = _shard_files(tmp_path)
    assert (len(files) > 2) if sharded else (files == [SINGLE_FILE])
    assert (tmp_path / INDEX_FILE).exists() == sharded
    loaded, loaded_config = load_model(tmp_path, dtype=dtype, progress=False)
    assert loaded_config == config
    assert _states_equal(model, loaded)
    router = loaded.model.layers[1].block_sparse_moe
    assert router.gate.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert loaded.model.embed_tokens.weight.dtype == dtype


def test_weight_files_get_the_mode_of_the_files_beside_them(tmp_path):
    """Readable by others as config.json is (the umask decides), not owner-only."""
    model, config = load_model("tiny", dtype=torch.float32, progress=False)
    save_checkpoint(model, tmp_path, config, max_shard_bytes=100_000)
    mode = (tmp_path / "config.json").stat().st_mode & 0o777
    assert {(tmp_path / f).stat().st_mode & 0o777 for f in _shard_files(tmp_path)} == {mode}
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_index_lists_every_tensor_with_total_size(tmp_path):
    model, config = load_model("tiny", dtype=torch.float32, progress=False)
    save_checkpoint(model, tmp_path, config, max_shard_bytes=100_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())


def test_vl_checkpoint_skips_vision_tensors(tmp_path):
    torch.manual_seed(0)
    model = ToyLM()
    save_checkpoint(model, tmp_path, tiny(), layout="vl")
    tensors = load_file(tmp_path / SINGLE_FILE)
    assert all(name.startswith("language_model.") for name in tensors)
    tensors["vision_tower.blocks.0.attn.qkv.weight"] = torch.randn(3, 5)
    tensors["multi_modal_projector.linear_1.weight"] = torch.randn(2, 2)
    save_file(tensors, tmp_path / SINGLE_FILE)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "minimax_m3_vl"
    fresh = ToyLM()
    load_checkpoint(fresh, tmp_path, dtype=torch.float32, progress=False)
    assert _states_equal(model, fresh)


def test_sharded_vl_checkpoint_with_vision_shard(tmp_path):
    torch.manual_seed(0)
    model = ToyLM()
    save_checkpoint(model, tmp_path, tiny(), layout="vl", max_shard_bytes=200)
    save_file({"vision_tower.patch_embed.proj.weight": torch.randn(4, 3)}, tmp_path / "vision.safetensors")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["vision_tower.patch_embed.proj.weight"] = "vision.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    fresh = ToyLM()
    load_checkpoint(fresh, tmp_path, dtype=torch.float32, progress=False)
    assert _states_equal(model, fresh)


def test_bf16_load_keeps_router_fp32_and_casts_the_rest(tmp_path):
    torch.manual_seed(0)
    model = ToyLM()
    save_checkpoint(model, tmp_path, tiny())
    fresh = ToyLM()
    load_checkpoint(fresh, tmp_path, dtype=torch.bfloat16, progress=False)
    moe = fresh.model.layers[0].block_sparse_moe
    assert moe.gate.weight.dtype == moe.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(moe.gate.weight, model.model.layers[0].block_sparse_moe.gate.weight)
    assert fresh.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight.bfloat16())
    assert not moe.e_score_correction_bias.requires_grad


def test_mismatches_are_reported_together(tmp_path):
    torch.manual_seed(0)
    tensors = dict(ToyLM().state_dict())
    del tensors["model.layers.1.input_layernorm.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    tensors["lm_head.weight"] = torch.zeros(16, 9)
    save_file(tensors, tmp_path / SINGLE_FILE)
    fresh = ToyLM()
    before = fresh.lm_head.weight.clone()
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(fresh, tmp_path, dtype=torch.float32, progress=False)
    message = str(caught.value)
    assert "1 missing, 1 unexpected, 1 misshaped" in message
    assert "model.layers.1.input_layernorm.weight: expected [1, 8], found none" in message
    assert "model.layers.0.extra.weight: expected none, found [3]" in message
    assert "lm_head.weight: expected [16, 8], found [16, 9]" in message
    assert caught.value.misshaped == [("lm_head.weight", (16, 8), (16, 9))]
    assert torch.equal(fresh.lm_head.weight, before), "nothing is loaded from a checkpoint that does not fit"


def test_fp8_block_scales_are_rejected(tmp_path):
    tensors = dict(ToyLM().state_dict())
    tensors["lm_head.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, tmp_path / SINGLE_FILE)
    with pytest.raises(CheckpointError, match=r"FP8 block-scaled checkpoints are not supported yet.*lm_head"):
        load_checkpoint(ToyLM(), tmp_path, progress=False)


def test_missing_weights_and_unknown_model_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(ToyLM(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        load_model(tmp_path / "nowhere")
    tiny().save(tmp_path / "config.json")
    with pytest.raises(ValueError, match="is a file; give the checkpoint directory"):
        load_model(tmp_path / "config.json")  # not random weights of its config


def test_preset_weights_depend_only_on_seed():
    a, _ = load_model("tiny", dtype=torch.float32, seed=1, progress=False)
    b, _ = load_model("tiny", dtype=torch.float32, seed=1, progress=False)
    c, _ = load_model("tiny", dtype=torch.float32, seed=2, progress=False)
    assert _states_equal(a, b)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert not a.training


def test_cast_model_keeps_router_fp32():
    model = cast_model(ToyLM(), dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[1].block_sparse_moe.gate.weight.dtype == torch.float32


def test_saved_config_loads_back(tmp_path):
    model, config = load_model("tiny", dtype=torch.float32, progress=False)
    for layout in ("flat", "vl"):
        save_checkpoint(model, tmp_path / layout, config, layout=layout)
        assert load_config(tmp_path / layout) == config


def test_model_loaded_from_directory_computes_the_same_logits(tmp_path):
    from msa.model import cache_free_batch

    model, config = load_model("tiny", dtype=torch.float32, seed=5, progress=False)
    save_checkpoint(model, tmp_path, config)
    loaded, _ = load_model(tmp_path, dtype=torch.float32, progress=False)
    ids = torch.arange(11) * 7 % config.vocab_size
    with torch.no_grad():
        expected = model(ids, cache_free_batch([11], config.sparse.block_size))
        got = loaded(ids, cache_free_batch([11], config.sparse.block_size))
    assert torch.equal(expected, got)


def test_a_tensor_under_both_names_is_unexpected(tmp_path):
    tensors = dict(ToyLM().state_dict())
    tensors["language_model.lm_head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, tmp_path / SINGLE_FILE)
    with pytest.raises(CheckpointError, match="1 unexpected") as caught:
        load_checkpoint(ToyLM(), tmp_path, progress=False)
    [(name, _, _)] = caught.value.unexpected
    assert name in ("lm_head.weight", "language_model.lm_head.weight") and name in str(caught.value)


@pytest.mark.parametrize("bad", [torch.int32, torch.int64, torch.bool, torch.uint8], ids=str)
@pytest.mark.parametrize("layout", ["flat", "vl"])
def test_a_non_float_tensor_for_a_float_weight_is_named(tmp_path, bad, layout):
    model, config = load_model("tiny", dtype=torch.float32, seed=0, progress=False)
    save_checkpoint(model, tmp_path, config, layout=layout)
    tensors = load_file(tmp_path / SINGLE_FILE)
    name = ("language_model." if layout == "vl" else "") + "lm_head.weight"
    tensors[name] = (tensors[name] * 100).to(bad)
    save_file(tensors, tmp_path / SINGLE_FILE)
    found = {torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL", torch.uint8: "U8"}[bad]
    with pytest.raises(CheckpointError) as caught:
        load_model(tmp_path, dtype=torch.bfloat16, progress=False)
    assert f"{name}: expected a floating dtype, loaded as torch.bfloat16, found {found}" in str(caught.value)
    assert caught.value.mistyped == [(name, torch.bfloat16, found)]


def test_a_non_float_router_tensor_names_its_fp32_target(tmp_path):
    tensors = dict(ToyLM().state_dict())
    tensors["model.layers.1.block_sparse_moe.gate.weight"] = torch.ones(4, 8, dtype=torch.int64)
    save_file(tensors, tmp_path / SINGLE_FILE)
    with pytest.raises(CheckpointError, match=r"gate.weight: expected a floating dtype, loaded as "
                                              r"torch.float32, found I64"):
        load_checkpoint(ToyLM(), tmp_path, dtype=torch.bfloat16, progress=False)


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_any_float_precision_converts_to_the_model_dtype(tmp_path, stored):
    torch.manual_seed(0)
    model = ToyLM()
    save_file({k: v.to(stored) for k, v in model.state_dict().items()}, tmp_path / SINGLE_FILE)
    fresh = ToyLM()
    load_checkpoint(fresh, tmp_path, dtype=torch.bfloat16, progress=False)
    assert fresh.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight.to(stored).bfloat16())
    gate = fresh.model.layers[0].block_sparse_moe.gate.weight
    assert gate.dtype == torch.float32
    assert torch.equal(gate, model.model.layers[0].block_sparse_moe.gate.weight.to(stored).float())


class _WithIndexBuffer(ToyLM):
    """A model with an integer buffer, as some architectures keep (position or expert ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("expert_ids", torch.zeros(4, dtype=torch.int64))


def test_integer_buffers_load_from_integer_tensors_and_refuse_floats(tmp_path):
    torch.manual_seed(0)
    model = _WithIndexBuffer()
    model.expert_ids.copy_(torch.tensor([3, 1, 0, 2]))
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["expert_ids"] = tensors["expert_ids"].to(torch.int32)  # another integer width converts
    save_file(tensors, tmp_path / SINGLE_FILE)
    fresh = _WithIndexBuffer()
    load_checkpoint(fresh, tmp_path, dtype=torch.bfloat16, progress=False)
    assert fresh.expert_ids.dtype == torch.int64 and fresh.expert_ids.tolist() == [3, 1, 0, 2]
    assert fresh.lm_head.weight.dtype == torch.bfloat16

    tensors["expert_ids"] = torch.tensor([3.0, 1.0, 0.0, 2.0])
    save_file(tensors, tmp_path / SINGLE_FILE)
    with pytest.raises(CheckpointError, match=r"expert_ids: expected torch.int64, found F32"):
        load_checkpoint(_WithIndexBuffer(), tmp_path, progress=False)


def test_place_tensor_refuses_an_integer_value_for_a_float_parameter():
    model, cpu = ToyLM(), torch.device("cpu")
    expected = r"'lm_head.weight': expected a floating tensor, got torch.int32"
    with pytest.raises(CheckpointError, match=expected):
        place_tensor(model, "lm_head.weight", torch.ones(16, 8, dtype=torch.int32), torch.bfloat16, cpu)
    assert model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("text, message", [
    (json.dumps({"metadata": {"total_size": 1}}), "has no 'weight_map'"),
    (json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}), "has no 'weight_map'"),
    (json.dumps([1, 2]), "has no 'weight_map'"),
    ("{not json", "is not valid JSON"),
], ids=["no-weight-map", "weight-map-list", "not-an-object", "bad-json"])
def test_a_broken_index_names_the_index_file(tmp_path, text, message):
    model, config = load_model("tiny", dtype=torch.float32, progress=False)
    save_checkpoint(model, tmp_path, config, max_shard_bytes=50_000)
    (tmp_path / INDEX_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE} {message}"):
        load_model(tmp_path, dtype=torch.float32, progress=False)


def test_vl_mismatches_are_reported_by_their_names_in_the_file(tmp_path):
    model, config = load_model("tiny", dtype=torch.float32, progress=False)
    save_checkpoint(model, tmp_path, config, layout="vl", max_shard_bytes=50_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shard = tmp_path / index["weight_map"]["language_model.model.norm.weight"]
    tensors = load_file(shard)
    tensors["language_model.model.norm.weight"] = torch.zeros(3)
    tensors["language_model.model.layers.2.self_attn.bogus.weight"] = torch.zeros(2)
    save_file(tensors, shard)
    index["weight_map"]["language_model.model.layers.2.self_attn.bogus.weight"] = shard.name
    dropped = "language_model.model.layers.2.self_attn.index_k_proj.weight"
    del index["weight_map"][dropped]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="1 missing, 1 unexpected, 1 misshaped") as caught:
        load_model(tmp_path, dtype=torch.float32, progress=False)
    error = caught.value
    assert error.missing == [(dropped, (16, 64), None)]
    assert error.unexpected == [("language_model.model.layers.2.self_attn.bogus.weight", None, (2,))]
    assert error.misshaped == [("language_model.model.norm.weight", (64,), (3,))]
    assert f"missing {dropped}: expected [16, 64], found none" in str(error)
    assert "misshaped language_model.model.norm.weight: expected [64], found [3]" in str(error)


def test_a_stray_vl_name_in_a_flat_checkpoint_is_reported_as_written(tmp_path):
    tensors = dict(ToyLM().state_dict())
    tensors["language_model.model.foo"] = torch.zeros(2)
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / SINGLE_FILE)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(ToyLM(), tmp_path, progress=False)
    assert caught.value.unexpected == [("language_model.model.foo", None, (2,))]
    assert caught.value.missing == [("lm_head.weight", (16, 8), None)]  # the flat layout's name
