"""Routing traces: every MoE layer call's routed expert ids, per forward step.

File format (little-endian), version 1:
    header  b"MOETRACE" | u32 version | u32 num_layers | u32 experts_per_layer | u32 top_k
    record  u32 step | u16 layer | u16 top_k | u32 num_tokens | u16 ids[num_tokens * top_k]
`step` counts forward passes of the engine (a new step starts at layer 0's call);
ids are row-major [num_tokens, top_k], in the router's order. `read_trace` also
accepts JSONL lines `{"layer": l, "token_idx": t, "topk_ids": [...]}`.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from array import array
from dataclasses import dataclass
from typing import BinaryIO, Iterator

MAGIC = b"MOETRACE"
VERSION = 1
_HEADER = struct.Struct("<8sIIII")
_RECORD = struct.Struct("<IHHI")
logger = logging.getLogger("vllm.moe_offload")


@dataclass(frozen=True)
class TraceHeader:
    num_layers: int
    experts_per_layer: int
    top_k: int


@dataclass(frozen=True)
class TraceRecord:
    step: int
    layer: int
    top_k: int
    expert_ids: list[int]  # flat [num_tokens * top_k]

    @property
    def num_tokens(self) -> int:
        return len(self.expert_ids) // self.top_k if self.top_k else 0


class TraceWriter:
    """Writes a trace as the engine runs. A write that fails (a full disk) stops
    the trace, cut back to its last whole record, with a warning: it runs inside
    the engine's step, which must not fail for it."""

    def __init__(self, path: str, header: TraceHeader):
        self.path = path
        self._file: BinaryIO | None = open(path, "wb")
        self._file.write(_HEADER.pack(MAGIC, VERSION, header.num_layers,
                                      header.experts_per_layer, header.top_k))
        self._step = -1
        self._last_layer = None

    def write(self, layer: int, top_k: int, ids_u16: bytes) -> None:
        """`ids_u16`: the layer call's [tokens, top_k] ids as little-endian u16."""
        if self._file is None:
            return
        if self._last_layer is None or layer <= self._last_layer:
            self._step += 1  # layer order restarted: a new forward step
        self._last_layer = layer
        num_tokens = len(ids_u16) // (2 * top_k)
        try:
            self._file.write(_RECORD.pack(self._step, layer, top_k, num_tokens))
            self._file.write(ids_u16)
        except OSError as e:
            self._stop(e)

    def flush(self) -> None:
        if self._file is None:
            return
        try:
            self._file.flush()
        except OSError as e:
            self._stop(e)

    def _stop(self, error: OSError) -> None:
        f, self._file = self._file, None
        try:
            f.close()  # (closes the file even where its last flush fails)
        except OSError:
            pass
        try:
            os.truncate(self.path, _whole_records_end(self.path))
        except OSError:
            pass
        logger.warning("expert offload: writing the routing trace %s failed (%s); it "
                       "stops at step %d, readable up to its last whole record",
                       self.path, error.strerror or error, self._step)

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except OSError as e:
                self._stop(e)


def _whole_records_end(path: str) -> int:
    """The end of the last whole record in a binary trace file (0: no header)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        end = _HEADER.size if size >= _HEADER.size else 0
        while end + _RECORD.size <= size:
            f.seek(end)
            _, _, top_k, num_tokens = _RECORD.unpack(f.read(_RECORD.size))
            nxt = end + _RECORD.size + 2 * top_k * num_tokens
            if nxt > size:
                break
            end = nxt
    return end


def read_trace(path: str) -> tuple[TraceHeader | None, Iterator[TraceRecord]]:
    """Open a binary trace (or a JSONL one, whose header is None)."""
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
    if magic != MAGIC:
        return None, _read_jsonl(path)
    f = open(path, "rb")
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        f.close()
        raise ValueError(f"{path}: a routing trace cut short inside its header; record "
                         "it again (trace_path)")
    _, version, layers, experts, top_k = _HEADER.unpack(head)
    if version != VERSION:
        f.close()
        raise ValueError(f"{path}: trace version {version}, this reader knows {VERSION}")
    return TraceHeader(layers, experts, top_k), _read_records(f, path)


def _read_records(f: BinaryIO, path: str) -> Iterator[TraceRecord]:
    """Records up to the last whole one: a writer that was killed (the OpenAI
    server often ends its workers before they close) leaves a cut last record."""
    with f:
        while head := f.read(_RECORD.size):
            payload = b""
            if len(head) == _RECORD.size:
                step, layer, top_k, num_tokens = _RECORD.unpack(head)
                payload = f.read(2 * num_tokens * top_k)
            if len(head) < _RECORD.size or len(payload) < 2 * num_tokens * top_k:
                logger.warning("expert offload: routing trace %s ends inside a record "
                               "(its writer was stopped); read up to its last whole "
                               "record", path)
                return
            ids = array("H")
            ids.frombytes(payload)
            yield TraceRecord(step, layer, top_k, ids.tolist())


def _read_jsonl(path: str) -> Iterator[TraceRecord]:
    with open(path) as f:
        for n, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                ids = list(row["topk_ids"])
                yield TraceRecord(row.get("token_idx", n), row["layer"], len(ids), ids)
