"""A shard's weights: each tensor-parallel rank reads only its slices of a checkpoint (and they
equal slices of the full tensors), random weights drawn on the device agree across ranks."""

from __future__ import annotations

import pytest
import torch

import msa.platform.checkpoint as checkpoint
from msa.cluster.loading import load_shard_model
from msa.cluster.parallel import ParallelGroups, tensor_part
from msa.model.layers import SparseMoE
from msa.platform.checkpoint import keeps_fp32, load_model, save_checkpoint
from msa.platform.config import tiny

CPU = torch.device("cpu")


def groups(tp_rank: int, tp: int) -> ParallelGroups:
    return ParallelGroups(tp_rank=tp_rank, tp=tp, sp_rank=0, sp=1)


def assert_rank_holds_its_slices(model, full: dict[str, torch.Tensor], tp_rank: int, tp: int) -> None:
    """Every parameter of the rank's model is the rank's part of exactly one full tensor."""
    params = dict(model.named_parameters())
    covered = set()
    for name, tensor in full.items():
        part = tensor_part(name, tp_rank, tp, model.config)
        if part is not None:
            assert torch.equal(params[part.name], part.take(tensor)), name
            covered.add(part.name)
    assert covered == set(params)


class ReadLog:
    """Wraps safetensors' safe_open to record which tensors' data are read, whole or in part."""

    def __init__(self, real) -> None:
        self.real, self.whole, self.sliced = real, [], []

    def __call__(self, *args, **kwargs):
        log, handle = self, self.real(*args, **kwargs)

        class Handle:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, name):
                log.whole.append(name)
                return self.f.get_tensor(name)

            def get_slice(self, name):  # reading the header is free; indexing reads data
                view = self.f.get_slice(name)

                class Slice:
                    def __getitem__(self, index):
                        log.sliced.append(name)
                        return view[index]

                    def __getattr__(self, attr):
                        return getattr(view, attr)

                return Slice()

            def __getattr__(self, attr):
                return getattr(self.f, attr)

        return Handle()


@pytest.mark.parametrize("layout", ["flat", "vl"])
def test_each_rank_reads_only_its_slices_and_they_equal_the_full_checkpoint(tmp_path, layout, monkeypatch):
    reference, config = load_model("tiny", dtype=torch.float32, progress=False)
    save_checkpoint(reference, tmp_path, config, max_shard_bytes=64 << 10, layout=layout)
    full = {name: t.detach() for name, t in reference.state_dict().items()}
    for tp in (1, 2):
        for rank in range(tp):
            log = ReadLog(checkpoint.safe_open)
            monkeypatch.setattr(checkpoint, "safe_open", log)
            model = load_shard_model(tmp_path, groups(rank, tp), dtype=torch.float32, device=CPU)
            monkeypatch.undo()
            assert_rank_holds_its_slices(model, full, rank, tp)
            read = [n.removeprefix("language_model.") for n in log.whole + log.sliced]
            assert not any(".mtp." in n for n in read)
            other = f".experts.{2 * (1 - rank)}." if tp == 2 else None  # 4 experts: 2 per rank
            assert other is None or not any(other in n for n in read)
            assert bool(log.sliced) == (tp > 1) and not any("q_proj" in n for n in log.whole if tp > 1)
            assert all(m.stacked is not None for m in model.modules() if isinstance(m, SparseMoE))


def test_a_rank_from_the_checkpoint_computes_what_the_rank_from_the_preset_does(tmp_path):
    reference, config = load_model("tiny", dtype=torch.float32, progress=False)
    save_checkpoint(reference, tmp_path, config)
    from_files = load_shard_model(tmp_path, groups(0, 1), dtype=torch.float32, device=CPU)
    from_preset = load_shard_model("tiny", groups(0, 1), dtype=torch.float32, device=CPU, seed=0)
    for (name, a), (_, b) in zip(from_files.named_parameters(), from_preset.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_random_weights_drawn_on_the_device_agree_across_ranks():
    def drawn(rank: int, tp: int):
        config = tiny()
        return load_shard_model(
            config, groups(rank, tp), dtype=torch.bfloat16, device=CPU, seed=5, random_init="device"
        )

    whole = drawn(0, 1)
    full = {name: t.detach() for name, t in whole.named_parameters()}
    router = [t.dtype for n, t in full.items() if keeps_fp32(n)]
    assert router and set(router) == {torch.float32}
    assert full["lm_head.weight"].dtype == torch.bfloat16
    for rank in range(2):
        assert_rank_holds_its_slices(drawn(rank, 2), full, rank, 2)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), drawn(0, 1).parameters(), strict=True))
