"""Transparent huge pages (`storm_vlm.huge_pages`): weights placed on them keep their values, Parameter
objects and a storage each, save and reload intact, ties and views left alone; advised tensors too."""

import pytest
import torch
from torch import nn

from helpers import TINY_CONFIG
from storm_vlm.inference import load_model
from storm_vlm.model.configuration import StormConfig
from storm_vlm.huge_pages import advise_huge_pages, huge_page_buffers, huge_pages_unavailable, place_in_huge_pages
from storm_vlm.perf.profiler import build_random_model

pytestmark = pytest.mark.skipif(huge_pages_unavailable() is not None, reason=str(huge_pages_unavailable()))


def advised_huge_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings advised MADV_HUGEPAGE (VmFlags "hg" in /proc/self/smaps)."""
    ranges, current = [], None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            current = (lo, hi)
        elif head == "VmFlags:" and "hg" in line.split()[1:]:
            ranges.append(current)
    return ranges


def on_huge_pages(t: torch.Tensor) -> bool:
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return any(lo <= start and end <= hi for lo, hi in advised_huge_ranges())


def test_buffers_start_at_2_mib_and_64_bytes_each_with_a_storage_of_its_own():
    bufs = huge_page_buffers([100, 0, 4096, 3])
    assert [b.numel() for b in bufs] == [100, 0, 4096, 3]
    assert bufs[0].data_ptr() % (2 * 2**20) == 0
    assert all(b.data_ptr() % 64 == 0 for b in bufs if b.numel())
    assert all(on_huge_pages(b) for b in bufs if b.numel())
    assert len({b.untyped_storage().data_ptr() for b in bufs if b.numel()}) == 3
    bufs[0].fill_(1)
    bufs[2].fill_(7)
    bufs[3].fill_(3)
    assert bufs[0].eq(1).all() and bufs[2].eq(7).all() and bufs[3].eq(3).all()  # no overlaps
    assert bufs[2].untyped_storage().nbytes() == 4096


def test_an_advised_tensor_has_its_whole_huge_pages_advised_and_keeps_its_values():
    t = advise_huge_pages(torch.empty(3 * 2**20))  # 12 MiB: at least four whole 2 MiB pages inside
    inner = t[(-t.data_ptr() % (2 * 2**20)) // 4:][: 4 * 2**20 // 4 * 2]
    assert on_huge_pages(inner)
    want = torch.arange(t.numel(), dtype=torch.float32)
    t.copy_(want)
    assert torch.equal(t, want)


def test_placed_model_keeps_its_parameters_values_and_tokens():
    model = build_random_model(StormConfig(**TINY_CONFIG), seed=1)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 60, (1, 9), generator=torch.Generator().manual_seed(0))
    tokens = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    moved = place_in_huge_pages(model)
    assert moved == sum(p.numel() * p.element_size() for p in params.values())
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert all(on_huge_pages(p) for p in params.values())
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == len(params)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=6, do_sample=False), tokens)


def test_ties_through_one_parameter_stay_tied_and_shared_storages_stay_put():
    shared = nn.Parameter(torch.randn(4, 6))
    a, b = nn.Linear(6, 4), nn.Linear(6, 4)
    a.weight = b.weight = shared  # one Parameter in two modules
    base = torch.randn(48)
    c, d = nn.Module(), nn.Module()
    c.w, d.w = nn.Parameter(base[:24].view(4, 6)), nn.Parameter(base[24:].view(4, 6))  # one storage, two views
    model = nn.ModuleList([a, b, c, d])
    place_in_huge_pages(model)
    assert a.weight is b.weight and on_huge_pages(shared)
    assert on_huge_pages(a.bias) and on_huge_pages(b.bias)
    assert c.w.data_ptr() == base.data_ptr() and d.w.data_ptr() == base.data_ptr() + 24 * 4  # not moved
    assert torch.equal(torch.cat([c.w.flatten(), d.w.flatten()]), base)


def test_the_switch_leaves_weights_where_they_are(monkeypatch):
    monkeypatch.setenv("STORM_VLM_HUGE_PAGES", "0")
    layer = nn.Linear(8, 8)
    ptr = layer.weight.data_ptr()
    assert huge_pages_unavailable() == "STORM_VLM_HUGE_PAGES=0"
    assert place_in_huge_pages(layer) == 0 and layer.weight.data_ptr() == ptr


def test_loaded_cpu_model_is_placed_saves_and_reloads_intact(qwen2_mamba_dir, tmp_path):
    """The loader places a CPU model; saving it again (safetensors, transformers' shared-tensor
    checks) sees separate tensors, and the copy reloads with the same values."""
    model, processor = load_model(qwen2_mamba_dir, device="cpu", precision="float32")
    assert all(on_huge_pages(p) for p in model.parameters())
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    again, _ = load_model(tmp_path / "again", device="cpu", precision="float32")
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), k
