from pathlib import Path

import pytest
import torch

from vllm_moe_offload.core.trace import TraceRecord
from vllm_moe_offload.runtime.predictors import (LookaheadHead, NextGatePredictor,
                                                 OraclePredictor, load_lookahead,
                                                 model_fingerprint, save_lookahead)

L, E, H = 4, 8, 16


def gates(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(E, H, generator=g) for _ in range(L)]


def test_next_gate_uses_the_target_layers_gate():
    gs = gates()
    p = NextGatePredictor(gs, depth=2, top_k=2)
    x = torch.randn(5, H)
    out = p.predict(1, x)
    assert [t for t, _ in out] == [2, 3]
    assert sorted(out[0][1]) == torch.unique((x @ gs[2].T).topk(2, dim=-1).indices).tolist()
    assert p.predict(3, x) == []  # the last layer has nothing ahead


def test_fresh_lookahead_head_equals_next_gate():
    g = gates()[2]
    x = torch.randn(7, H)
    assert torch.allclose(LookaheadHead(g, 8)(x), x @ g.T, atol=1e-5)


def test_sidecar_round_trip_and_refusal(tmp_path):
    pytest.importorskip("safetensors")
    gs = gates()
    heads = {(l, d): LookaheadHead(gs[l + d], 8) for d in (1, 2) for l in range(L - d)}
    with torch.no_grad():
        heads[(0, 1)].down.bias.fill_(0.5)  # something trained
    path = tmp_path / "h.safetensors"
    save_lookahead(path, heads, model_fingerprint(gs), depth=2, top_k=2, num_layers=L)
    p = load_lookahead(path, gs, depth=2, top_k=2)
    x = torch.randn(3, H)
    assert torch.allclose(p.logits(0, 1, x), heads[(0, 1)](x))
    shallow = load_lookahead(path, gs, depth=1, top_k=2)  # distance 2's heads not built
    assert sorted(shallow.heads) == [(l, 1) for l in range(L - 1)]
    with pytest.raises(ValueError, match="trained for another model"):
        load_lookahead(path, gates(seed=1), depth=2, top_k=2)
    with pytest.raises(ValueError, match="prefetch_depth=3 exceeds the depth 2"):
        load_lookahead(path, gs, depth=3, top_k=2)
    (tmp_path / "junk.safetensors").write_bytes(b"not a sidecar")
    with pytest.raises(ValueError, match="is not a lookahead sidecar"):
        load_lookahead(tmp_path / "junk.safetensors", gs, depth=1, top_k=2)


def test_a_sidecar_write_that_stops_midway_leaves_the_old_one(tmp_path, monkeypatch):
    """It was written in place: a crash or Ctrl-C mid-write destroyed the good one."""
    st = pytest.importorskip("safetensors.torch")
    gs = gates()
    heads = {(l, 1): LookaheadHead(gs[l + 1], 8) for l in range(L - 1)}
    path = tmp_path / "h.safetensors"
    save_lookahead(path, heads, model_fingerprint(gs), depth=1, top_k=2, num_layers=L)
    good = path.read_bytes()

    def stops(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a sidecar")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", stops)
    with pytest.raises(KeyboardInterrupt):
        save_lookahead(path, heads, model_fingerprint(gs), depth=1, top_k=2, num_layers=L)
    assert path.read_bytes() == good and sorted(tmp_path.iterdir()) == [path]


def test_oracle_replays_the_trace_step_by_step():
    records = [TraceRecord(s, l, 2, [s, l, (s + l) % E, 1]) for s in range(2) for l in range(L)]
    p = OraclePredictor(records, depth=1, top_k=2, num_layers=L)
    x = torch.zeros(2, H)
    seen = [p.predict(l, x) for s in range(2) for l in range(L)]
    assert seen[0] == [(1, sorted({0, 1, 1, 1}))]
    assert seen[L] == [(1, sorted({1, 1, 2, 1}))]  # step 1, layer 0 predicts layer 1


def test_batched_prediction_equals_head_by_head():
    gs = gates()
    heads = {(l, d): LookaheadHead(gs[l + d], 8) for d in (1, 2, 3) for l in range(L - d)}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for h in heads.values():  # make the MLP and the norm matter
            for prm in h.parameters():
                prm.add_(0.3 * torch.randn(prm.shape, generator=g))
    from vllm_moe_offload.runtime.predictors import LookaheadPredictor
    for p in (LookaheadPredictor(heads, 3, 2, L), NextGatePredictor(gs, 3, 2)):
        x = torch.randn(6, H, generator=g)
        for layer in range(L):
            targets = list(p.targets(layer))
            if not targets:
                assert p.predict(layer, x) == []
                continue
            fused = p.all_logits(layer, x)
            for i, t in enumerate(targets):
                torch.testing.assert_close(fused[i], p.logits(layer, t - layer, x))
            want = [(t, torch.unique(p.logits(layer, t - layer, x).topk(2, -1).indices).tolist())
                    for t in targets]
            assert [(t, sorted(e)) for t, e in p.predict(layer, x)] == want


def test_predictions_come_most_wanted_first():
    """Where the prefetch budget runs out (expert_cache._prefetch takes them in order),
    the experts most rows named are loaded, not the lowest ids."""
    g = torch.zeros(E, H)
    g[5, 0], g[4, 0] = 2.0, 1.0  # hidden[:, 0] > 0: experts 5 and 4
    g[1, 1], g[0, 1] = 2.0, 1.0  # hidden[:, 1] > 0: experts 1 and 0
    p = NextGatePredictor([g] * L, depth=1, top_k=2)
    x = torch.zeros(3, H)
    x[:2, 0] = 1.0  # two rows want 5 and 4, one row 1 and 0
    x[2, 1] = 1.0
    assert p.predict(0, x) == [(1, [4, 5, 0, 1])]
