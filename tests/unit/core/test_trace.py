import json
from array import array

import pytest

from vllm_moe_offload.core.trace import TraceHeader, TraceWriter, read_trace


def u16(*ids):
    return array("H", ids).tobytes()


def test_binary_round_trip_and_step_numbering(tmp_path):
    path = tmp_path / "t.bin"
    w = TraceWriter(str(path), TraceHeader(num_layers=2, experts_per_layer=8, top_k=2))
    w.write(0, 2, u16(1, 2, 3, 4))  # step 0, 2 tokens
    w.write(1, 2, u16(5, 6, 7, 0))
    w.write(0, 2, u16(7, 1))  # layer order restarts: step 1
    w.close()
    header, records = read_trace(str(path))
    assert header == TraceHeader(2, 8, 2)
    rows = [(r.step, r.layer, r.num_tokens, r.expert_ids) for r in records]
    assert rows == [(0, 0, 2, [1, 2, 3, 4]), (0, 1, 2, [5, 6, 7, 0]), (1, 0, 1, [7, 1])]


def test_jsonl_traces_are_read_too(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"layer": l, "token_idx": t, "topk_ids": [l, t]})
                              for t in range(2) for l in range(3)))
    header, records = read_trace(str(path))
    assert header is None
    assert [(r.layer, r.expert_ids) for r in records][:3] == [(0, [0, 0]), (1, [1, 0]), (2, [2, 0])]


class _FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does (part of the
    write on disk, then ENOSPC)."""

    def __init__(self, f, room):
        self.f, self.room = f, room
        self.closed = False

    def write(self, data):
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def close(self):
        self.closed = True
        self.f.close()


def test_a_full_disk_stops_the_trace_at_its_last_whole_record(tmp_path, caplog):
    """The writer runs inside the engine's step: a failed write must not raise there,
    and what was written must stay readable (no half record at its end)."""
    path = tmp_path / "t.bin"
    w = TraceWriter(str(path), TraceHeader(num_layers=2, experts_per_layer=8, top_k=2))
    w._file = _FullDisk(w._file, room=12 + 8 + 12 + 3)  # a record, a head, 3 bytes
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        w.write(0, 2, u16(1, 2, 3, 4))
        w.write(1, 2, u16(5, 6, 7, 0))  # fails midway
        w.write(0, 2, u16(7, 1))  # after that: nothing, no error
        w.flush()
        w.close()
    assert "writing the routing trace" in caplog.text and "No space left" in caplog.text
    header, records = read_trace(str(path))
    assert [(r.step, r.layer, r.expert_ids) for r in records] == [(0, 0, [1, 2, 3, 4])]


def test_a_killed_writers_trace_reads_up_to_its_last_whole_record(tmp_path, caplog):
    """The OpenAI server often ends its workers before they close their trace: the
    file ends anywhere. Its whole records are read (the replay and the oracle
    refused the whole trace); a file cut inside its header is named."""
    import struct

    path = tmp_path / "t.bin"
    w = TraceWriter(str(path), TraceHeader(num_layers=2, experts_per_layer=8, top_k=2))
    w.write(0, 2, u16(1, 2, 3, 4))
    w.close()
    whole = path.read_bytes()
    for cut in (struct.pack("<IHHI", 0, 1, 2, 2) + u16(5), bytes(7)):  # payload, head
        path.write_bytes(whole + cut)
        with caplog.at_level("WARNING", logger="vllm.moe_offload"):
            _, records = read_trace(str(path))
            assert [(r.layer, r.expert_ids) for r in records] == [(0, [1, 2, 3, 4])]
        assert "ends inside a record" in caplog.text
        caplog.clear()
    path.write_bytes(whole[:10])
    with pytest.raises(ValueError, match="cut short inside its header"):
        read_trace(str(path))
