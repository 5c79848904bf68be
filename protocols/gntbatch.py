"""The batched grant ops' bodies: Xen's arrays of gnttab_map_grant_ref,
gnttab_unmap_grant_ref and gnttab_copy as raw little-endian structs, carried
in BINARY frames (protocols/hypercall.py).  Pure code, no I/O; both ends use
it.  docs/hypervisor-socket.md gives every offset.

Every body -- call and reply -- is a u32 count followed by that many
fixed-size entries, nothing else (a reply that carries descriptors has the
frame's own u32 descriptor count before it):

    GNTTAB_MAP_BATCH    call  n x MAP_OP     {u16 domid, u16 flags, u32 ref}
                        reply n x MAP_RESULT {i16 status, u16 pad, u32 handle, u32 gfn}
                              + one descriptor per entry whose status is GNTST_okay, in order
    GNTTAB_UNMAP_BATCH  call  n x u32 handle
                        reply n x i16 status
    GNTTAB_COPY_BATCH   call  n x COPY_OP    {u32 src ref|gfn, u16 src domid, u16 src offset,
                                              u32 dst ref|gfn, u16 dst domid, u16 dst offset,
                                              u16 len, u16 flags}
                        reply n x i16 status

A call's count must be 1..the op's cap and the body exactly 4 + n * entry
bytes; anything else is a `BatchError` (a ValueError: the hypervisor answers
EINVAL and goes on).  One entry's failure is that entry's status only, as in
Xen.
"""

from __future__ import annotations

import struct

MAX_BATCH = 256  # entries per call: one call must not hold the hypervisor's loop for long
# A map answers one descriptor per entry in one sendmsg, and Linux passes at
# most SCM_MAX_FD (253) descriptors in one message.
MAX_MAP_BATCH = 128

# gnttab_map_grant_ref.flags / gnttab_copy.flags bits (grant_table.h)
GNTMAP_host_map = 1 << 1
GNTMAP_readonly = 1 << 2
GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1
DOMID_SELF = 0x7FF0

COUNT = struct.Struct("<I")
MAP_OP = struct.Struct("<HHI")  # domid, flags, ref
MAP_RESULT = struct.Struct("<hHII")  # status, pad, handle, gfn
HANDLE = struct.Struct("<I")
STATUS = struct.Struct("<h")
COPY_OP = struct.Struct("<IHHIHHHH")  # src ref, src domid, src offset, dst ref, dst domid, dst offset, len, flags


class BatchError(ValueError):
    """A batch body that is not what its op says (the caller's mistake)."""


def _encode(entry: struct.Struct, rows, limit: int) -> bytes:
    rows = list(rows)
    if not 1 <= len(rows) <= limit:
        raise BatchError(f"a batch has 1..{limit} entries, not {len(rows)}")
    try:
        return COUNT.pack(len(rows)) + b"".join(entry.pack(*row) for row in rows)
    except struct.error as exc:  # a value outside its field (a negative gref, a domid above 65535)
        raise BatchError(f"a batch entry does not fit {entry.format}: {exc}") from None


def _decode(entry: struct.Struct, body: bytes, limit: int, what: str) -> list[tuple]:
    if len(body) < COUNT.size:
        raise BatchError(f"{what}: a {len(body)}-byte body has no count")
    (count,) = COUNT.unpack_from(body)
    if not 1 <= count <= limit:
        raise BatchError(f"{what}: count must be 1..{limit}, not {count}")
    if len(body) != COUNT.size + count * entry.size:
        raise BatchError(f"{what}: {count} entries of {entry.size} bytes need a body of "
                         f"{COUNT.size + count * entry.size} bytes, not {len(body)}")
    return list(entry.iter_unpack(memoryview(body)[COUNT.size:]))


# -- GNTTAB_MAP_BATCH ------------------------------------------------------------------
def encode_map(ops) -> bytes:
    """ops: (domid, gref, readonly) each."""
    return _encode(MAP_OP, ((d, GNTMAP_host_map | (GNTMAP_readonly if ro else 0), g) for d, g, ro in ops),
                   MAX_MAP_BATCH)


def decode_map(body: bytes) -> list[tuple[int, int, int]]:
    """-> (domid, flags, gref) each."""
    return _decode(MAP_OP, body, MAX_MAP_BATCH, "GNTTAB_MAP_BATCH")


def encode_map_results(results) -> bytes:
    """results: (status, handle, gfn) each (handle and gfn 0 on failure)."""
    return _encode(MAP_RESULT, ((s, 0, h, g) for s, h, g in results), MAX_MAP_BATCH)


def decode_map_results(body: bytes) -> list[tuple[int, int, int]]:
    return [(s, h, g) for s, _, h, g in _decode(MAP_RESULT, body, MAX_MAP_BATCH, "GNTTAB_MAP_BATCH reply")]


# -- GNTTAB_UNMAP_BATCH ----------------------------------------------------------------
def encode_unmap(handles) -> bytes:
    return _encode(HANDLE, ((h,) for h in handles), MAX_BATCH)


def decode_unmap(body: bytes) -> list[int]:
    return [h for (h,) in _decode(HANDLE, body, MAX_BATCH, "GNTTAB_UNMAP_BATCH")]


# -- statuses (UNMAP and COPY replies) -------------------------------------------------
def encode_statuses(statuses) -> bytes:
    return _encode(STATUS, ((s,) for s in statuses), MAX_BATCH)


def decode_statuses(body: bytes) -> list[int]:
    return [s for (s,) in _decode(STATUS, body, MAX_BATCH, "status array")]


# -- GNTTAB_COPY_BATCH -----------------------------------------------------------------
def encode_copy(ops) -> bytes:
    """ops: (src_ref, src_domid, src_offset, dst_ref, dst_domid, dst_offset, len, flags)
    each, a struct gnttab_copy: an end is a gref of its domid when its
    GNTCOPY_*_gref flag is set, else one of the caller's own gfns with
    domid DOMID_SELF."""
    return _encode(COPY_OP, ops, MAX_BATCH)


def decode_copy(body: bytes) -> list[tuple[int, int, int, int, int, int, int, int]]:
    return _decode(COPY_OP, body, MAX_BATCH, "GNTTAB_COPY_BATCH")
