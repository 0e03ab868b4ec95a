import json
from array import array

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
