"""Deterministic zip archives: a small writer of regroup's own, and raw entry copies.

Result files are zip archives (``.npz`` compatible) that must be byte-identical for the same
content, whether written in one go or assembled from one-layer parts by copying the parts'
deflate streams as they are (compressing a large mask costs ~10x copying it). ``zipfile``
has no public way to add an entry whose compressed bytes already exist, so regroup writes
its archives itself -- the format is small -- and leaves all *reading* to ``zipfile``
(except the raw bytes of an entry, read at the offsets ``zipfile.ZipInfo`` gives).

What :class:`ZipWriter` writes (PKWARE APPNOTE 6.3), nothing else:

- per entry, in the order added: a local file header, then the raw deflate stream
  (``zlib`` level 6, ``wbits=-15``). CRC and sizes are known before the data, so there is
  no data descriptor. Every entry has the same time stamp (1980-01-01 00:00), mode 0644,
  no comment; the only extra field is zip64's;
- the central directory, one header per entry;
- a zip64 end of central directory record and locator, only when the archive needs them;
- the end of central directory record, without comment.

Zip64 is used per field, only where a value does not fit its 4-byte field (2 bytes for the
entry count): an entry whose size or compressed size reaches 4 GiB - 1 gets the zip64 extra
field in both headers, an entry that starts at or beyond that offset gets it in the central
directory, and an archive with 65535 entries or more, or whose central directory is that
large or starts that far, gets the zip64 end records. Everything written is a function of
the entries' names and bytes alone, so equal content gives equal archives.

A *sealed* archive (``ZipWriter(fp, seal=True)``, used for the one-layer parts of a
streamed run, never for result files) ends with an archive comment holding the SHA-256 of
every byte before it (:data:`SEAL_PREFIX` + 64 hex digits); :func:`check_seal` recomputes
it. It tells a part regroup wrote from one changed since, whatever the change.

For reading, :func:`directory_size` gives the size of the central directory as the end
records declare it (what ``zipfile`` will read and parse), so that a reader can refuse a
huge directory before ``zipfile`` holds it in memory.
"""
from __future__ import annotations

import hashlib
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from .validation import FormatError

__all__ = ["ZipWriter", "raw_entry", "check_seal", "directory_size", "SEAL_PREFIX"]

# A value this large (or larger) moves from its 4-byte (entry count: 2-byte) field to zip64,
# and the field holds all ones instead. Thresholds apart from the all-ones values so that
# tests can lower them instead of writing 4 GiB.
LIMIT = 0xFFFF_FFFF
COUNT_LIMIT = 0xFFFF
_ONES32, _ONES16 = 0xFFFF_FFFF, 0xFFFF

_LOCAL = struct.Struct("<IHHHHHIIIHH")          # local file header
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory file header
_END = struct.Struct("<IHHHHIIH")               # end of central directory record
_END64 = struct.Struct("<IQHHIIQQQQ")           # zip64 end of central directory record
_LOCATOR64 = struct.Struct("<IIQI")             # zip64 end of central directory locator

_DEFLATED = 8
_DOS_TIME, _DOS_DATE = 0, (0 << 9) | (1 << 5) | 1   # 00:00:00, 1980-01-01
_MADE_BY = (3 << 8) | 45                            # Unix, APPNOTE 4.5
_EXTERNAL_ATTR = 0o100644 << 16                     # regular file, rw-r--r--
_UTF8 = 0x800                                       # general purpose flag: UTF-8 name

# The archive comment of a sealed archive: this prefix, then the SHA-256 (hex) of every byte
# of the archive before the comment (the end record, with the comment's length, included).
SEAL_PREFIX = b"regroup-seal sha256:"
_SEAL_SIZE = len(SEAL_PREFIX) + 64

_CHUNK = 1 << 22          # bytes read from a part at a time
_INFLATE_CHUNK = 1 << 24  # most bytes inflated at a time while checking a copied entry


def _field32(value: int) -> int:
    """``value`` as a 4-byte field holds it: all ones when it moves to zip64."""
    return _ONES32 if value >= LIMIT else value


def _zip64_extra(*values: int) -> bytes:
    """The zip64 extended information extra field holding ``values`` (8 bytes each)."""
    return struct.pack(f"<HH{len(values)}Q", 0x0001, 8 * len(values), *values)


class ZipWriter:
    """Write a zip archive to the binary file ``fp``, deterministically (see module doc).

    Offsets are counted from where writing starts, so the archive should start at the
    beginning of ``fp``. Use as a context manager: leaving the block normally writes the
    central directory; leaving it by an exception writes nothing more (the archive is left
    incomplete, for :func:`regroup._atomic.atomic_write` to discard).
    """

    def __init__(self, fp: BinaryIO, *, seal: bool = False) -> None:
        self._fp = fp
        self._pos = 0
        self._hash = hashlib.sha256() if seal else None
        self._entries: list[tuple[bytes, int, int, int, int, int]] = []
        self._names: set[bytes] = set()

    def __enter__(self) -> ZipWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def _write(self, data: bytes) -> None:
        self._fp.write(data)
        self._pos += len(data)
        if self._hash is not None:
            self._hash.update(data)

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Add the entry ``name`` holding ``data``, deflated at level 6."""
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = comp.compress(data) + comp.flush()
        self.write_raw(name, zlib.crc32(data), memoryview(data).nbytes, len(body), [body])

    def write_raw(self, name: str, crc: int, size: int, compress_size: int,
                  chunks: Iterable[bytes]) -> None:
        """Add the entry ``name`` whose raw deflate stream (``compress_size`` bytes in all)
        is ``chunks``, ``size`` bytes with CRC-32 ``crc`` once inflated (as
        :func:`raw_entry` yields it, so a copy is written as :meth:`write` wrote the
        original). The stream is not checked here."""
        try:
            raw_name, flags = name.encode("ascii"), 0
        except UnicodeEncodeError:
            raw_name, flags = name.encode("utf-8"), _UTF8
        if len(raw_name) > 0xFFFF:
            raise ValueError(f"zip entry name too long: {name[:80]!r}...")
        if raw_name in self._names:
            raise ValueError(f"duplicate zip entry {name!r}")
        offset = self._pos
        if size >= LIMIT or compress_size >= LIMIT:
            extra, version = _zip64_extra(size, compress_size), 45
            sizes = (_ONES32, _ONES32)
        else:
            extra, version, sizes = b"", 20, (compress_size, size)
        self._write(_LOCAL.pack(0x04034B50, version, flags, _DEFLATED, _DOS_TIME, _DOS_DATE,
                                crc, *sizes, len(raw_name), len(extra)))
        self._write(raw_name + extra)
        written = 0
        for chunk in chunks:
            self._write(chunk)
            written += len(chunk)
        if written != compress_size:
            raise ValueError(f"zip entry {name!r}: {written} bytes of data, "
                             f"{compress_size} announced")
        self._names.add(raw_name)
        self._entries.append((raw_name, flags, crc, size, compress_size, offset))

    def close(self) -> None:
        """Write the central directory and the end records."""
        start = self._pos
        for raw_name, flags, crc, size, csize, offset in self._entries:
            zip64_sizes = size >= LIMIT or csize >= LIMIT
            big = ([size, csize] if zip64_sizes else []) + ([offset] if offset >= LIMIT else [])
            extra = _zip64_extra(*big) if big else b""
            self._write(_CENTRAL.pack(
                0x02014B50, _MADE_BY, 45 if big else 20, flags, _DEFLATED, _DOS_TIME,
                _DOS_DATE, crc, *((_ONES32,) * 2 if zip64_sizes else (csize, size)),
                len(raw_name), len(extra), 0, 0, 0, _EXTERNAL_ATTR, _field32(offset)))
            self._write(raw_name + extra)
        count, cd_size, end64 = len(self._entries), self._pos - start, self._pos
        zip64 = count >= COUNT_LIMIT or cd_size >= LIMIT or start >= LIMIT
        if zip64:
            self._write(_END64.pack(0x06064B50, _END64.size - 12, _MADE_BY, 45, 0, 0,
                                    count, count, cd_size, start))
            self._write(_LOCATOR64.pack(0x07064B50, 0, end64, 1))
        short_count = _ONES16 if count >= COUNT_LIMIT else count
        comment = _SEAL_SIZE if self._hash is not None else 0
        self._write(_END.pack(0x06054B50, 0, 0, short_count, short_count, _field32(cd_size),
                              _field32(start), comment))
        if self._hash is not None:     # the seal itself is outside what it hashes
            self._fp.write(SEAL_PREFIX + self._hash.hexdigest().encode())


def check_seal(fp: BinaryIO) -> str:
    """The SHA-256 (hex) a sealed archive open as ``fp`` holds, once recomputed from its
    bytes and found equal; :class:`~regroup.FormatError` for an archive without a seal or
    whose bytes changed since it was sealed. Reads the whole file, in chunks."""
    try:
        size = fp.seek(0, 2)
        if size < _SEAL_SIZE + _END.size:
            raise FormatError("no content seal (too short)")
        fp.seek(size - _SEAL_SIZE)
        tail = fp.read(_SEAL_SIZE)
        if not tail.startswith(SEAL_PREFIX):
            raise FormatError("no content seal")
        fp.seek(0)
        h, left = hashlib.sha256(), size - _SEAL_SIZE
        while left:
            chunk = fp.read(min(left, _CHUNK))
            if not chunk:
                raise FormatError("truncated while checking the content seal")
            h.update(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise FormatError(str(exc)) from None
    digest = h.hexdigest()
    if tail[len(SEAL_PREFIX):] != digest.encode():
        raise FormatError("its content hash does not match its bytes (changed since it was "
                          "written)")
    return digest


def directory_size(fp: BinaryIO) -> int | None:
    """The size in bytes of the central directory of the zip archive open as ``fp``, as its
    end record (or zip64 end record) declares it, found as ``zipfile`` finds it; None when
    there is no end record (``zipfile`` will refuse the file)."""
    size = fp.seek(0, 2)
    if size < _END.size:
        return None
    fp.seek(size - _END.size)
    data = fp.read(_END.size)
    if data[:4] == b"PK\x05\x06" and data[-2:] == b"\0\0":
        end = size - _END.size
    else:       # an archive comment: the last signature in the last 64 KiB (as zipfile)
        low = max(size - (1 << 16) - _END.size, 0)
        fp.seek(low)
        tail = fp.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _END.size:
            return None
        end, data = low + at, tail[at:at + _END.size]
    cd_size = _END.unpack(data)[5]
    if end >= _LOCATOR64.size + _END64.size:
        fp.seek(end - _LOCATOR64.size)
        if fp.read(4) == b"PK\x06\x07":     # zip64: its end record's size replaces it
            fp.seek(end - _LOCATOR64.size - _END64.size)
            rec = fp.read(_END64.size)
            if len(rec) == _END64.size and rec[:4] == b"PK\x06\x06":
                cd_size = _END64.unpack(rec)[8]
    return cd_size


def raw_entry(fp: BinaryIO, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """Yield the raw deflate stream of the entry ``info`` of the zip archive open as ``fp``
    (``info`` from ``zipfile.ZipFile(fp).getinfo``), checking it on the way: the stream
    must end exactly after ``info.compress_size`` bytes and inflate to ``info.file_size``
    bytes with CRC ``info.CRC``; the last chunk is yielded only once it has passed.

    The bytes read are the bytes checked (one pass, no window for the file to change in
    between). Raises :class:`~regroup.FormatError` for anything unreadable.
    """
    try:
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise FormatError(f"compression method {info.compress_type}, not deflate")
        fp.seek(info.header_offset)
        local = fp.read(_LOCAL.size)
        if len(local) != _LOCAL.size or local[:4] != b"PK\x03\x04":
            raise FormatError("no local file header")
        name_len, extra_len = struct.unpack_from("<HH", local, 26)
        encoding = "utf-8" if info.flag_bits & _UTF8 else "cp437"     # as zipfile reads it
        if fp.read(name_len).decode(encoding, "replace") != info.orig_filename:
            raise FormatError("the local file header names another entry")
        fp.seek(extra_len, 1)
        inflate = zlib.decompressobj(-15)
        crc = size = 0
        left = info.compress_size
        pending = b""
        while left:
            chunk = fp.read(min(left, _CHUNK))
            if not chunk:
                raise FormatError("truncated entry")
            left -= len(chunk)
            data = chunk
            while data:     # inflate at most _INFLATE_CHUNK bytes at a time
                out = inflate.decompress(data, _INFLATE_CHUNK)
                crc, size = zlib.crc32(out, crc), size + len(out)
                if inflate.eof:     # (past its end, zlib would keep the input as it is)
                    if left or inflate.unused_data or inflate.unconsumed_tail:
                        raise FormatError("the deflate stream ends before the entry")
                    break
                data = inflate.unconsumed_tail
            if pending:
                yield pending
            pending = chunk
        out = inflate.flush()
        crc, size = zlib.crc32(out, crc), size + len(out)
        if not inflate.eof:
            raise FormatError("the deflate stream does not end with the entry")
        if size != info.file_size or crc != info.CRC:
            raise FormatError(f"bad CRC-32 or size (CRC {crc:08x}, {size} bytes; "
                              f"expected {info.CRC:08x}, {info.file_size} bytes)")
    except (OSError, zlib.error) as exc:
        raise FormatError(str(exc)) from None
    if pending:
        yield pending
