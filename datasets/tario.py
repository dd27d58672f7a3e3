"""Tar shards read straight from their 512-byte headers: ustar, pax and GNU long names,
checksums checked, read in 1 MiB chunks from any file-like (local files and S3 bodies alike).

Python's ``tarfile`` and WebDataset's per-member stages cost more per sample than decoding the
PNGs they hold; our shards are written by ``datasets/shards.py`` and this reads them back.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Iterator

from sonosynth.infra.storage import StorageError


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


class TarError(StorageError):
    """A shard is not a readable tar (damaged, truncated, or not a tar at all)."""


class _Chunked:
    """Exact-size reads from a file or an HTTP body, fetched in large chunks."""

    def __init__(self, fh: BinaryIO, chunk: int = 1 << 20):
        self.fh, self.chunk, self.buf, self.off = fh, chunk, b"", 0
        self.seekable = bool(getattr(fh, "seekable", lambda: False)())

    def take(self, n: int) -> bytes:
        end = self.off + n
        if end <= len(self.buf):
            out, self.off = self.buf[self.off:end], end
            return out
        parts, need = [self.buf[self.off:]], n - (len(self.buf) - self.off)
        self.buf, self.off = b"", 0
        while need > 0:
            data = self.fh.read(max(self.chunk, need))
            if not data:
                break
            if len(data) > need:
                self.buf, self.off, data = data, need, data[:need]
            parts.append(data)
            need -= len(data)
        return b"".join(parts)

    def skip(self, n: int) -> None:
        left = len(self.buf) - self.off
        if n <= left:
            self.off += n
            return
        self.buf, self.off, n = b"", 0, n - left
        if self.seekable:
            self.fh.seek(n, 1)
            return
        while n > 0 and (data := self.fh.read(min(self.chunk, n))):
            n -= len(data)


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum field matches (unsigned sum, or the signed one old tars wrote)."""
    want, unsigned = _number(header[148:156]), sum(header) - sum(header[148:156]) + 256
    return want == unsigned or want == unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:])


def _pax(body: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(body) and body[i]:
        space = body.index(b" ", i)
        length = int(body[i:space])
        name, _, value = body[space + 1:i + length - 1].partition(b"=")
        out[name.decode()] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def tar_members(fh: BinaryIO, *, data: bool = True, where: str = "tar") -> Iterator[tuple[str, int, int, bytes | None]]:
    """(name, byte offset of its data, size, the data or None) of each regular file in a tar
    stream. Handles ustar, pax ('x') and GNU long-name headers; other entries are skipped."""
    src, pos, pax, long_name = _Chunked(fh), 0, {}, None
    while True:
        header = src.take(_BLOCK)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < _BLOCK or not _checksum_ok(header):
            raise TarError(f"{where}: no valid tar header at byte {pos} (damaged or truncated shard)")
        kind, size = header[156:157], _number(header[124:136])
        pos += _BLOCK
        if kind in (b"x", b"g", b"L", b"K"):  # extended headers: they describe the next member
            body = src.take((size + 511) & ~511)[:size]
            if kind == b"x":
                pax = _pax(body)
            elif kind == b"L":
                long_name = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            pos += (size + 511) & ~511
            continue
        size = int(pax.get("size", size))
        padded = (size + 511) & ~511
        if kind in (b"0", b"\0", b"7"):
            name = pax.get("path") or long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}" if prefix else name
            payload = None
            if data:
                payload = src.take(size)
                if len(payload) < size:
                    raise TarError(f"{where}: member {name} is truncated")
                src.skip(padded - size)
            else:
                src.skip(padded)
            yield name, pos, size, payload
        else:
            src.skip(padded)
        pos += padded
        pax, long_name = {}, None


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) as WebDataset groups members: the key ends at the file name's first dot."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name[:dot], name[dot + 1:].lower()) if dot > name.rfind("/") + 1 else None


def tar_records(fh: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """WebDataset records ({"__key__", "__url__", extension: bytes}) of a tar stream."""
    record: dict[str, Any] = {}
    for name, _, _, payload in tar_members(fh, where=url):
        parts = split_name(name)
        if parts is None:
            continue
        if record.get("__key__") != parts[0]:
            if record:
                yield record
            record = {"__key__": parts[0], "__url__": url}
        record[parts[1]] = payload
    if record:
        yield record


# ---- decoding -------------------------------------------------------------------------------

