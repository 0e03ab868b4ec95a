"""The quantized slow tier (runtime/quant.py): codes, error bounds, bytes, stores."""

import os

import pytest
import torch

from vllm_moe_offload.core.config import OffloadConfig
from vllm_moe_offload.runtime.expert_cache import ExpertCache
from vllm_moe_offload.runtime.modes import device_mode_problem
from vllm_moe_offload.runtime.quant import (GroupQuant, MixedStore, QuantizedStore, _pack,
                                            _unpack)
from vllm_moe_offload.runtime.store import (DiskStore, ExpertLayout, ExpertUnavailable,
                                            HostStore, TensorSpec)

SLOT = ExpertLayout((TensorSpec((16, 64), torch.bfloat16), TensorSpec((64, 8 * 4), torch.bfloat16)))
L, E = 2, 4
FP = {"model": "tiny", "dtype": "bfloat16", "vllm": "test"}


def expert(layer, e):
    g = torch.Generator().manual_seed(layer * 10 + e)
    return [(torch.randn(s.shape, generator=g) * 0.05).to(s.dtype) for s in SLOT.tensors]


def empty():
    return [torch.zeros(s.shape, dtype=s.dtype) for s in SLOT.tensors]


def decoded(codec, tensors):
    out = [torch.empty_like(t) for t in tensors]
    codec.decode(codec.encode(tensors), out)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_the_cpu_decode_gives_the_reference_s_bits(monkeypatch, bits, dtype):
    """`_decode_cpu` (chunked, byte tables) against the reference decode: the same
    bits, across chunk boundaries (a last chunk cut short too) and group sizes."""
    from vllm_moe_offload.runtime import quant

    for group, chunk in ((32, 96), (64, 1 << 20)):
        monkeypatch.setattr(quant, "_DECODE_CHUNK", chunk)
        codec = GroupQuant(bits, group, "rtn")
        w = (torch.randn(48, 320) * 0.05).to(dtype)  # 15360 values: chunks of 96 / all
        codes, scale, zero = codec.encode([w])
        want = ((_unpack(codes, bits, w.numel()).view(-1, group).float()
                 - zero.float().unsqueeze(1)) * scale.float().unsqueeze(1)).to(dtype)
        got = torch.empty_like(w)
        quant._decode_cpu(codes, scale, zero, got, bits, group)
        assert torch.equal(got.view(-1).view(torch.int16), want.view(-1).view(torch.int16))
        got = torch.empty_like(w)
        codec.decode([codes, scale, zero], [got])  # the path decode takes on a CPU
        assert torch.equal(got.view(-1).view(torch.int16), want.view(-1).view(torch.int16))


def test_a_gather_applies_a_block_transpose_by_strided_copies_and_any_other_by_index():
    """Gather.into: vLLM's CPU prepack (rows in blocks of B, each block column by
    column) is recognised and copied block-wise; any other index is gathered; both
    give what indexing the source gives, padding zeros included."""
    from vllm_moe_offload.runtime.quant import Gather

    rows, cols = 64, 48
    src = [torch.randn(rows, cols).to(torch.bfloat16), torch.randn(32, 16).to(torch.bfloat16)]
    for block in (16, 4):
        t = torch.arange(rows * cols).view(rows // block, block, cols).transpose(1, 2)
        swapped = t.reshape(-1).clone()
        swapped[[5, 6]] = swapped[[6, 5]]  # one pair out of place: not a block transpose
        padded = torch.cat([torch.arange(32 * 16 - 8), torch.full((8,), -1)]).view(32, 16)
        for index, blocked in ((t.reshape(rows, cols), True),
                               (swapped.view(rows, cols), False)):
            gather = Gather([index, padded])
            assert (gather.blocks[0] is not None) == blocked and gather.blocks[1] is None
            want = [s.reshape(-1)[i.reshape(-1).clamp(min=0)].view(i.shape)
                    for s, i in zip(src, (index, padded))]
            want[1].view(-1)[-8:] = 0
            got = [torch.full_like(w, float("nan")) for w in want]
            gather.into(src, got)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (block, blocked)
            assert all(torch.equal(a, b) for a, b in zip(gather(src), want))


def test_the_cpu_decode_runs_in_and_out_of_inference_mode_on_one_thread():
    """Its buffers, kept per thread, are made once: inside vLLM's inference mode (a
    step) they must still serve a decode outside it (loading), and the other way."""
    import threading

    from vllm_moe_offload.runtime import quant

    codec = GroupQuant(4, 64, "rtn")
    w = (torch.randn(64, 128) * 0.05).bfloat16()
    stored = codec.encode([w])
    want = torch.empty_like(w)
    codec.decode(stored, [want], reference=True)
    errors = []

    def run():
        try:
            for inference in (True, False, True):
                got = torch.empty_like(w)
                with torch.inference_mode(inference):
                    codec.decode(stored, [got])
                assert torch.equal(got, want)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=run)  # a thread of its own: fresh buffers
    thread.start()
    thread.join()
    assert errors == [] and quant._DECODE_CHUNK >= w.numel()


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_codes_pack_and_unpack_exactly(bits):
    q = torch.randint(0, 2**bits, (8 * 37,), dtype=torch.uint8)
    packed = _pack(q, bits)
    assert packed.numel() == q.numel() * bits // 8  # exactly `bits` per value
    assert torch.equal(_unpack(packed, bits, q.numel()), q)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_round_to_nearest_is_within_half_a_step(bits):
    codec = GroupQuant(bits, 32, "rtn")
    w = expert(0, 1)
    for t, got, (codes, scale, zero) in zip(w, decoded(codec, w),
                                             zip(*[iter(codec.encode(w))] * 3)):
        step = scale.float().repeat_interleave(32).view(t.shape)
        err = (got.float() - t.float()).abs()
        # half a step, plus the bf16 rounding of the decoded value
        assert bool((err <= 0.5 * step * 1.02 + t.float().abs() * 2**-8).all())


@pytest.mark.parametrize("method", ["rtn", "hqq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_constant_and_narrow_groups_decode_to_their_values(method, dtype):
    """A constant group (range 0) had a scale of 0 and a zero of inf: it decoded to
    NaN, silently, in every decoder. A narrow group far from 0 (fp16 weights at 8
    bits) had a zero of inf. Now both come back within half a step of the scale and
    the dtype's own rounding; other groups are as before."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(4, 256, generator=g) * 0.05).to(dtype)
    w[0, :64] = 0.5
    w[1, :64] = -3.0
    w[2, :64] = 0.0
    w[3, :64] = 1 + torch.arange(64) * 2.0 ** -10  # kept apart in fp16 only
    w[0, 64:128] = -0.002  # its scale an fp16 subnormal
    w[1, 64:128] = 3e-5
    w[2, 64:128] = torch.linspace(-0.0020028, -0.0017520, 64)  # just above the floor
    w[3, 64:128] = torch.linspace(-2e-4, 1e-4, 64)  # no floor, a subnormal scale
    for bits in (8, 4, 3, 2):
        codec = GroupQuant(bits, 64, method)
        stored = codec.encode([w])
        assert all(t.float().isfinite().all() for t in stored[1:])
        for reference in (True, False):
            out = torch.empty_like(w)
            codec.decode(stored, [out], reference=reference)
            step = stored[1].float().repeat_interleave(64).view(w.shape)
            err = (out.float() - w.float()).abs()
            bound = (0.5 if method == "rtn" else 1.0) * step * 1.001 \
                + w.float().abs() * 2 ** -8  # (and the slot dtype's rounding)
            assert bool((err[:, :128] <= bound[:, :128]).all()), (bits, reference)
            assert out.isfinite().all()


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_hqq_is_no_worse_than_round_to_nearest(bits):
    w = expert(1, 3)
    err = {m: sum(float((d.float() - t.float()).abs().mean())
                  for d, t in zip(decoded(GroupQuant(bits, 64, m), w), w))
           for m in ("rtn", "hqq")}
    assert err["hqq"] <= err["rtn"] * 1.001, err
    assert err["hqq"] > 0


def test_error_falls_with_more_bits():
    w = expert(0, 0)
    errs = [float((decoded(GroupQuant(b), w)[0].float() - w[0].float()).norm()) for b in
            (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01 * float(w[0].float().norm())


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_record_bytes(bits):
    layout = GroupQuant(bits, 64).layout(SLOT)
    n = [16 * 64, 64 * 32]
    assert layout.expert_bytes == sum(k * bits // 8 + 4 * (k // 64) for k in n)
    assert layout.expert_bytes < SLOT.expert_bytes * (bits + 1) / 16


def test_a_group_size_that_does_not_divide_names_the_setting():
    with pytest.raises(ValueError) as err:
        GroupQuant(4, 24).check(SLOT)
    assert "store_group_size=24" in str(err.value) and "32" in str(err.value)
    assert "--expert-store-group-size to 32" in str(err.value)


def test_a_dimension_no_group_size_divides_says_to_keep_16_bits():
    odd = ExpertLayout((TensorSpec((8, 1404), torch.bfloat16),))
    with pytest.raises(ValueError, match=r"no group size .*\(--expert-store-bits 16\)"):
        GroupQuant(4, 64).check(odd)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_expert(tmp_path, method, bad):
    """One NaN or inf would have made its whole group of 32 decode non-finite."""
    store = quant_store("host", tmp_path, 4, method)
    tensors = expert(0, 1)
    tensors[0].view(-1)[5] = bad
    with pytest.raises(ValueError, match=r"store_bits=4: expert \(0, 1\): .*NaN or inf"):
        store.put(0, 1, tensors)


def test_a_group_beyond_an_fp16_scale_is_refused():
    """A 2-bit group spanning 2e5: its scale, 6.7e4, overflowed fp16 to inf."""
    w = torch.linspace(-1e5, 1e5, 32).to(torch.bfloat16).view(1, 32)
    with pytest.raises(ValueError, match=r"spans 1.997e\+05.*--expert-store-bits 8"):
        GroupQuant(2, 32).encode([w])
    assert all(t.isfinite().all() for t in GroupQuant(8, 32).encode([w])[1:])


def fill(store):
    for layer in range(L):
        for e in range(E):
            store.put(layer, e, expert(layer, e))
    store.seal()


def quant_store(kind, tmp_path, bits=4, method="hqq", keys=None):
    codec = GroupQuant(bits, 32, method)
    record = codec.layout(SLOT)
    inner = (HostStore(record, L, E, keys=keys) if kind == "host"
             else DiskStore(tmp_path / f"q{bits}.experts", record, L, E,
                            dict(FP, store_codec=codec.describe()), keys=keys))
    return QuantizedStore(inner, codec, SLOT)


@pytest.mark.parametrize("kind", ["host", "disk"])
@pytest.mark.parametrize("bits", [8, 3])
def test_store_holds_the_quantized_form_and_decodes_into_the_slot(tmp_path, kind, bits):
    store = quant_store(kind, tmp_path, bits)
    fill(store)
    assert store.kind == kind and store.nbytes == store.inner.nbytes
    for layer in range(L):
        for e in range(E):
            dst = empty()
            assert store.read_into(layer, e, dst) == store.read_bytes
            assert store.read_bytes == GroupQuant(bits, 32).layout(SLOT).expert_bytes
            want = decoded(store.codec, expert(layer, e))
            assert all(torch.equal(a, b) for a, b in zip(dst, want))
    if kind == "disk":  # the file holds the quantized records, and is reused as such
        assert store.record_bytes < SLOT.record_bytes
        assert os.path.getsize(store.path) == 4096 + L * E * (store.record_bytes + 8)
        again = quant_store(kind, tmp_path, bits)
        assert again.reused
        dst = empty()
        again.read_into(1, 2, dst)
        assert all(torch.equal(a, b) for a, b in zip(dst, decoded(store.codec, expert(1, 2))))
    store.close()


def test_disk_store_of_another_codec_is_not_reused(tmp_path):
    fill(quant_store("disk", tmp_path, 4, "hqq"))
    assert quant_store("disk", tmp_path, 4, "hqq").reused
    other = quant_store("disk", tmp_path, 4, "rtn")  # same layout, other codes
    assert not other.reused and "stale" in other.problem


def test_hqq_early_stop_does_not_depend_on_the_thread_count():
    """A damaged record is encoded again, maybe by a process with other threads. The
    early stop's whole-tensor error, a torch mean, once split its reduction over
    threads and rounded with them: on the 2026-12-07 host these two experts got other
    codes at 2 threads than at 1 (of all 6, at 2 or 4 threads: 1 at 3 bits, 2 at 2
    bits). Now the error sums rows (torch splits those only over rows) in a fixed
    order. (Elementwise ops may still round differently at the ends of threads'
    chunks at odd thread counts: a review found no code changed in 46 encodes.)"""
    g = torch.Generator().manual_seed(0)
    experts = [torch.randn(s, generator=g) * 0.02 for s in ((768, 2048), (2048, 768))
               for _ in range(3)]
    threads = torch.get_num_threads()
    try:
        for bits, w in ((2, experts[0]), (3, experts[3])):
            codes = []
            for n in (1, 2):
                torch.set_num_threads(n)
                codes.append(GroupQuant(bits, 64).encode([w]))
            assert all(torch.equal(a, b) for a, b in zip(*codes)), bits
    finally:
        torch.set_num_threads(threads)


def test_damaged_quantized_record_is_re_derived_encoded_and_repaired(tmp_path, caplog):
    store = quant_store("disk", tmp_path, 4)
    fill(store)
    store.rederive = expert  # the checkpoint's copy, in slot layout
    offset = 4096 + (1 * E + 2) * store.record_bytes
    with open(store.path, "r+b") as f:
        f.seek(offset + 3)
        f.write(b"\xff\x00")
    dst = empty()
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        store.read_into(1, 2, dst)
    assert all(torch.equal(a, b) for a, b in zip(dst, decoded(store.codec, expert(1, 2))))
    assert store.repairs == 1 and "repaired the record" in caplog.text
    assert "codes that differ" not in caplog.text  # the sealed codes, encoded again
    caplog.clear()
    # encoded again to other codes (another CPU rounds its vector sums another way):
    # still a repair, unlike an unquantized store's record, and said so
    other = [t * 1.01 for t in expert(1, 2)]
    store.rederive = lambda layer, e: other
    with open(store.path, "r+b") as f:
        f.seek(offset + 3)
        f.write(b"\x00\xff")
    dst = empty()
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        store.read_into(1, 2, dst)
    assert all(torch.equal(a, b) for a, b in zip(dst, decoded(store.codec, other)))
    assert store.repairs == 2 and "codes that differ from the record sealed" in caplog.text
    store.read_into(1, 2, dst)  # the repaired record reads back under its own checksum
    assert store.repairs == 2
    again = quant_store("disk", tmp_path, 4)  # and so does the file: a restart reuses it
    assert again.reused  # (its table's digest in the header matches the new checksum)
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        again.read_into(1, 2, dst)  # before: every start re-derived and re-encoded it
    assert again.repairs == 0 and caplog.text == ""
    assert all(torch.equal(a, b) for a, b in zip(dst, decoded(store.codec, other)))
    store.rederive = None
    with open(store.path, "r+b") as f:
        f.seek(offset + 3)
        f.write(b"\xff\x00")
    with pytest.raises(ExpertUnavailable):
        store.read_into(1, 2, empty())


def test_two_instances_repairing_other_records_leave_a_valid_store(tmp_path):
    """Two instances serving one store each repair a record to other codes: each
    amends the file's checksum table as it is now, so the file stays valid (before,
    each wrote a header over its own table, and the next start rebuilt it all)."""
    fill(quant_store("disk", tmp_path, 4))
    a, b = quant_store("disk", tmp_path, 4), quant_store("disk", tmp_path, 4)
    other = {key: [t * 1.01 for t in expert(*key)] for key in ((0, 1), (1, 2))}
    for store, key in ((a, (0, 1)), (b, (1, 2))):
        store.rederive = lambda layer, e: other[(layer, e)]
        offset = 4096 + (key[0] * E + key[1]) * store.record_bytes
        with open(store.path, "r+b") as f:
            f.seek(offset + 3)
            f.write(b"\xff\x00")
        store.read_into(*key, empty())
        assert store.repairs == 1
    again = quant_store("disk", tmp_path, 4)
    assert again.reused  # the header's digest matches the table with both amendments
    for key in other:
        dst = empty()
        again.read_into(*key, dst)
        assert all(torch.equal(x, y) for x, y in zip(dst, decoded(again.codec, other[key])))
    assert again.repairs == 0


def test_cache_counts_the_quantized_bytes(tmp_path):
    """Host mode here; on a GPU the host store runs device mode, whose fill decodes
    (device_cases.py), and the disk store host mode."""
    store = quant_store("host", tmp_path, 4)
    fill(store)
    assert device_mode_problem(torch.device("cuda"), store) is None
    assert "disk store is read by the host" in device_mode_problem(
        torch.device("cuda"), quant_store("disk", tmp_path, 4))
    cache = ExpertCache(store, num_slots=E, device="cpu")
    ids = torch.tensor([[0, 1], [2, 1]])
    slots = cache.map_to_slots(0, ids)
    got = [cache.buffers[i][slots[1, 0]] for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, decoded(store.codec, expert(0, 2))))
    t = cache.stats.totals()
    assert t.misses == 3 and t.bytes_loaded == 3 * store.read_bytes
    assert store.read_bytes < cache.slot_bytes / 3


def test_no_store_bit_width_means_host_work_on_a_gpu():
    """Device mode decodes a quantized store, and a mixed-precision one (each of its
    two stores read by record row): the host store keeps graphs on at any width."""
    for spec in ({"store": "host"}, {"store": "host", "store_bits": 4},
                 {"store": "host", "store_bits": 4, "store_hot_bits": 8,
                  "task_profiles_path": "profiles.json"}):
        assert OffloadConfig.from_dict(spec).host_work_reason(on_gpu=True) is None


def test_triton_decode_kernel_is_bit_identical_to_torch_in_the_interpreter():
    """Triton's interpreter runs the CUDA decode kernel on the CPU (tests/gpu runs
    the same cases on a GPU)."""
    pytest.importorskip("triton")
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "tests.unit.runtime.dequant_cases", "cpu"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 16 and all(v is None for v in results.values()), results


def test_biases_are_kept_as_they_are():
    layout = ExpertLayout(SLOT.tensors + (TensorSpec((16,), torch.bfloat16),
                                          TensorSpec((64,), torch.bfloat16)))
    codec = GroupQuant(4, 32)
    codec.check(layout)
    g = torch.Generator().manual_seed(1)
    expert = [torch.randn(s.shape, generator=g).to(s.dtype) for s in layout.tensors]
    stored = codec.encode(expert)
    assert [tuple(t.shape) for t in stored] == [s.shape for s in codec.layout(layout).tensors]
    out = [torch.empty_like(t) for t in expert]
    codec.decode(stored, out)
    assert torch.equal(out[2], expert[2]) and torch.equal(out[3], expert[3])
    assert torch.equal(out[0], decoded(codec, expert[:2])[0])


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_mixed_store_keeps_hot_experts_at_more_bits(tmp_path, kind):
    hot_keys = [(0, 1), (1, 3)]
    cold_keys = [(l, e) for l in range(L) for e in range(E) if (l, e) not in hot_keys]
    hot = quant_store(kind, tmp_path, 16, keys=hot_keys)
    cold = quant_store(kind, tmp_path, 2, keys=cold_keys)
    store = MixedStore(hot, cold)
    problem = device_mode_problem(torch.device("cuda"), store)
    assert (problem is None) if kind == "host" else "disk store is read by the host" in problem
    fill(store)
    assert store.nbytes == 2 * hot.record_bytes + 6 * cold.record_bytes
    assert hot.read_bytes == SLOT.expert_bytes > 4 * cold.read_bytes
    for layer in range(L):
        for e in range(E):
            dst = empty()
            codec = hot.codec if (layer, e) in hot_keys else cold.codec
            assert store.read_into(layer, e, dst) == store.read_bytes_of(layer, e)
            assert store.read_bytes_of(layer, e) == (
                hot.read_bytes if (layer, e) in hot_keys else cold.read_bytes)
            want = decoded(codec, expert(layer, e))
            assert all(torch.equal(a, b) for a, b in zip(dst, want))
    assert torch.equal(decoded(hot.codec, expert(0, 1))[0], expert(0, 1)[0])  # 16: exact
    cache = ExpertCache(store, num_slots=E, device="cpu")
    cache.map_to_slots(1, torch.tensor([[3, 0]]))
    assert cache.stats.totals().bytes_loaded == hot.read_bytes + cold.read_bytes
    store.close()


def test_a_repair_does_not_sign_a_checksum_table_damaged_since_the_start(tmp_path, caplog):
    """Amending re-signed whatever table was on disk: an entry damaged after the store
    was opened became the one every later start checks its record against."""
    fill(quant_store("disk", tmp_path, 4))
    store = quant_store("disk", tmp_path, 4)
    table_at = 4096 + L * E * store.record_bytes
    with open(store.path, "r+b") as f:  # another record's checksum entry damaged
        f.seek(table_at + 8 * 1 + 2)
        f.write(b"\x5a")
    other = [t * 1.01 for t in expert(1, 2)]
    store.rederive = lambda layer, e: other
    with open(store.path, "r+b") as f:
        f.seek(4096 + (1 * E + 2) * store.record_bytes + 3)
        f.write(b"\xff\x00")
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        store.read_into(1, 2, empty())  # served from the checkpoint
    assert "no longer matches its header" in caplog.text
    again = quant_store("disk", tmp_path, 4)
    assert not again.reused and "table of checksums is damaged" in again.problem
