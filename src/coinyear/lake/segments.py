"""Lake stage, the spool's segment files: the on-disk format `coinyear.lake.spool` keeps acknowledged records in.

A segment is a sequence of frames, one a write: an 8-byte header (payload length, crc32 of the payload), then the
payload, an Arrow IPC stream (a pickled list of dicts in segments of older versions). Appends are fsync'ed and
never leave a torn frame behind; a torn tail (a crash mid-write, never acknowledged) is ignored when read.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("<II")  # payload length, crc32 of the payload
PICKLED = b"\x80"  # first byte of a pickle: the frames of older versions (a list of dicts); Arrow IPC starts 0xFF


def encode_frame(data: pa.Table | list[dict]) -> bytes:
    """One spool record: an Arrow IPC stream (a list of dicts is pickled, the format of older versions)."""
    if isinstance(data, pa.Table):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, data.schema) as writer:
            writer.write_table(data)
        payload = sink.getvalue().to_pybytes()
    else:
        payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _payloads(path: Path) -> Iterator[bytes]:
    """The payload of each complete frame of a spool segment, read one at a time; a torn tail (never
    acknowledged) is ignored."""
    with open(path, "rb") as file:
        offset = 0
        while len(header := file.read(FRAME_HEADER.size)) == FRAME_HEADER.size:
            length, crc = FRAME_HEADER.unpack(header)
            payload = file.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                log.warning("spool segment %s: torn record at byte %d ignored", path.name, offset)
                return
            yield payload
            offset += FRAME_HEADER.size + length


def read_frames(path: Path) -> list[pa.Table | list[dict]]:
    """Every complete frame of a spool segment; a torn tail (never acknowledged) is ignored."""
    return [pickle.loads(payload) if payload[:1] == PICKLED else pa.ipc.open_stream(payload).read_all()
            for payload in _payloads(path)]


def count_rows(path: Path) -> int:
    """The records in a spool segment, counted in the memory of one frame (an Arrow frame's batches are counted
    from their metadata, never copied)."""
    rows = 0
    for payload in _payloads(path):
        if payload[:1] == PICKLED:
            rows += len(pickle.loads(payload))
        else:
            rows += sum(batch.num_rows for batch in pa.ipc.open_stream(payload))
    return rows


def read_segment(path: Path) -> list[dict]:
    """Every complete record of a spool segment (or a quarantined one) as dicts; a torn tail is ignored."""
    records: list[dict] = []
    for frame in read_frames(path):
        records.extend(frame.to_pylist() if isinstance(frame, pa.Table) else frame)
    return records


def append_synced(fd: int, data: bytes, good: int) -> None:
    """Append `data` to the segment open (O_APPEND, unbuffered) at `fd` and fsync it, or fail with the file cut
    back to its first `good` bytes.

    A user-space buffer would keep the unwritten part of a failed frame and write it with the next one: a record
    whose caller was told it failed would then land after all. A torn frame left behind would hide every frame
    written after it. So: plain os.write, and on failure the tail is cut off (and cut again before the next
    append when even that failed).
    """
    try:
        if os.fstat(fd).st_size != good:  # an earlier failed append whose tail could not be cut off then
            os.ftruncate(fd, good)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]  # a short write (a file-size limit, a nearly full disk) goes on here
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, good)
        except OSError as error:
            log.error("cannot cut a failed spool write back to %d bytes (retried before the next write): %s",
                      good, error)
        raise


def fsync_dir(path: Path) -> None:
    """fsync a folder: a file created, renamed or deleted in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
