import os

import pytest
import torch

from vllm_moe_offload.runtime.store import (DiskStore, ExpertLayout, HostStore,
                                            StoreFileError, TensorSpec, store_file_name)

LAYOUT = ExpertLayout((TensorSpec((6, 4), torch.bfloat16), TensorSpec((4, 3), torch.bfloat16)))
L, E = 2, 3
FP = {"model": "tiny", "dtype": "bfloat16", "vllm": "test"}


def expert(layer, e):
    g = torch.Generator().manual_seed(layer * 10 + e)
    return [torch.randn(s.shape, generator=g).to(s.dtype) for s in LAYOUT.tensors]


def fill(store):
    for layer in range(L):
        for e in range(E):
            store.put(layer, e, expert(layer, e))
    store.seal()


def empty_slot():
    return [torch.zeros(s.shape, dtype=s.dtype) for s in LAYOUT.tensors]


def test_layout_sizes():
    assert LAYOUT.expert_bytes == (24 + 12) * 2
    assert LAYOUT.record_bytes == 4096


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_round_trip(tmp_path, kind):
    store = (HostStore(LAYOUT, L, E) if kind == "host"
             else DiskStore(tmp_path / "s.experts", LAYOUT, L, E, FP))
    fill(store)
    for layer in range(L):
        for e in range(E):
            dst = empty_slot()
            assert store.read_into(layer, e, dst) == LAYOUT.expert_bytes
            for got, want in zip(dst, expert(layer, e)):
                assert torch.equal(got, want)
    store.close()


def test_disk_store_is_reused_when_valid(tmp_path):
    path = tmp_path / "s.experts"
    fill(DiskStore(path, LAYOUT, L, E, FP))
    again = DiskStore(path, LAYOUT, L, E, FP)
    assert again.reused and again.is_complete()
    dst = empty_slot()
    again.read_into(1, 2, dst)
    assert torch.equal(dst[1], expert(1, 2)[1])


def test_truncated_file_is_rebuilt_not_read(tmp_path):
    path = tmp_path / "s.experts"
    fill(DiskStore(path, LAYOUT, L, E, FP))
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(StoreFileError, match="truncated"):
        DiskStore.validate(_bare(path))
    store = DiskStore(path, LAYOUT, L, E, FP)
    assert not store.reused and "truncated" in store.problem
    with pytest.raises(RuntimeError, match="before the store was sealed"):
        store.read_into(0, 0, empty_slot())
    fill(store)
    assert DiskStore(path, LAYOUT, L, E, FP).reused


def test_stale_file_for_another_model_is_rebuilt(tmp_path):
    path = tmp_path / "s.experts"
    fill(DiskStore(path, LAYOUT, L, E, dict(FP, model="other")))
    store = DiskStore(path, LAYOUT, L, E, FP)
    assert not store.reused and "stale" in store.problem


def test_unsealed_build_is_not_reused(tmp_path):
    path = tmp_path / "s.experts"
    fill(DiskStore(path, LAYOUT, L, E, FP))
    head = bytearray(path.read_bytes())
    i = head.index(b'"sealed": true')
    head[i:i + 14] = b'"sealed":false'
    path.write_bytes(bytes(head))
    store = DiskStore(path, LAYOUT, L, E, FP)
    assert not store.reused and "unsealed" in store.problem


def test_garbage_file_is_not_a_store(tmp_path):
    path = tmp_path / "s.experts"
    path.write_bytes(b"hello" * 1000)
    store = DiskStore(path, LAYOUT, L, E, FP)
    assert not store.reused and "not an expert store" in store.problem


def test_seal_refuses_a_store_with_missing_experts(tmp_path):
    store = DiskStore(tmp_path / "s.experts", LAYOUT, L, E, FP)
    store.put(0, 0, expert(0, 0))
    with pytest.raises(RuntimeError, match="never arrived"):
        store.seal()


def test_unwritable_directory_names_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the directory should be
    with pytest.raises(ValueError) as err:
        DiskStore(blocker / "sub" / "s.experts", LAYOUT, L, E, FP)
    assert "store_dir" in str(err.value) and "--expert-store-dir" in str(err.value)


def test_layout_mismatch_is_refused():
    store = HostStore(LAYOUT, L, E)
    with pytest.raises(ValueError, match="do not match"):
        store.put(0, 0, [torch.zeros(6, 4, dtype=torch.bfloat16)])


def test_file_name_depends_on_fingerprint():
    assert store_file_name(FP) != store_file_name(dict(FP, dtype="float16"))
    assert store_file_name(FP).startswith("tiny-")


def _bare(path):
    """A DiskStore object that only knows its path and fingerprint (for validate)."""
    s = DiskStore.__new__(DiskStore)
    s.path, s.num_layers, s.experts_per_layer, s.layout = path, L, E, LAYOUT
    s.fingerprint = dict(FP, layout=LAYOUT.describe(), num_layers=L,
                         experts_per_layer=E, record_bytes=LAYOUT.record_bytes)
    return s
