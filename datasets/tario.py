"""Tar shards read straight from their 512-byte headers: ustar, pax and GNU long names,
checksums checked, read in 1 MiB chunks from any file-like (local files and S3 bodies alike).

Python's ``tarfile`` and WebDataset's per-member stages cost more per sample than decoding the
PNGs they hold; our shards are written by ``datasets/shards.py`` and this reads them back.

A damaged shard is a ``CorruptShardError`` naming its URL, the byte offset where it broke and
the member: a bad header, a member or header cut short, a stream that ends without the tar's
end-of-archive blocks (a shard cut at a member boundary would otherwise lose its tail silently).
Members named with a ``..`` component or an absolute path are refused (``UnsafeMemberError``).
"""

from __future__ import annotations

import re
from typing import Any, BinaryIO, Iterator, Literal

from sonosynth.infra.config import Config
from sonosynth.infra.stage import StageFailed
from sonosynth.infra.storage import StorageError


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
REWRITE_FIX = ("delete the shard and re-run the stage that wrote the dataset (the same command rewrites only "
               "the missing shard), or read past it with the reader's on_error: skip")
OnError = Literal["raise", "skip"]


class ReaderConfig(Config):
    """How the dataset readers treat damaged inputs."""

    on_error: OnError = "raise"
    """'raise': a truncated shard, a member that does not decode (a corrupt PNG) or a shard the
    manifest lists but storage lacks stops the job with an error naming the shard, the byte offset
    and the member. 'skip': that sample (or the rest of the shard) is left out, logged once per
    shard and counted (the reader's ``skipped``, for the job's metrics). Tar members named with
    '..' or an absolute path are refused under both."""


def check_on_error(on_error: str) -> OnError:
    """``on_error`` itself, or a ValueError naming the two values it may take."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    return on_error  # type: ignore[return-value]


class TarError(StorageError):
    """A shard is not a readable tar (damaged, truncated, or not a tar at all)."""


class CorruptShardError(TarError, StageFailed):
    """A shard, or a member of it, is damaged, cut short or missing (exit 1). The message names
    the shard's URL, the byte offset where it broke, the member and the fix; the fields say the
    same for programs, ``reason`` being what a reader with ``on_error: skip`` counts it as."""

    def __init__(self, message: str, *, shard: str = "", reason: str = "corrupt_sample",
                 offset: int | None = None, member: str | None = None):
        super().__init__(message)
        self.shard, self.reason, self.offset, self.member = shard, reason, offset, member


class UnsafeMemberError(CorruptShardError):
    """A member named with a ``..`` component or an absolute path: refused under every policy."""


class _Chunked:
    """Exact-size reads from a file or an HTTP body, fetched in large chunks."""

    def __init__(self, fh: BinaryIO, chunk: int = 1 << 20):
        self.fh, self.chunk, self.buf, self.off = fh, chunk, b"", 0
        self.seekable = bool(getattr(fh, "seekable", lambda: False)())
        self.end: int | None = None

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

    def skip(self, n: int) -> int:
        """Move ``n`` bytes on; returns how many there were (fewer at the end of the stream)."""
        left = len(self.buf) - self.off
        if n <= left:
            self.off += n
            return n
        self.buf, self.off, rest = b"", 0, n - left
        if self.seekable:
            here = self.fh.tell()
            if self.end is None:
                self.end = self.fh.seek(0, 2)
            self.fh.seek(min(here + rest, self.end))
            return left + max(0, min(rest, self.end - here))
        while rest > 0 and (data := self.fh.read(min(self.chunk, rest))):
            rest -= len(data)
        return n - rest


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


def unsafe_name(name: str) -> bool:
    """Whether a member name is absolute or climbs out with ``..`` (never written by sonosynth)."""
    return name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name)


def _broken(where: str, problem: str, offset: int, member: str | None = None,
            reason: str = "truncated_shard") -> CorruptShardError:
    return CorruptShardError(f"{where}: {problem}; {REWRITE_FIX}", shard=where, reason=reason, offset=offset,
                             member=member)


def tar_members(fh: BinaryIO, *, data: bool = True, where: str = "tar") -> Iterator[tuple[str, int, int, bytes | None]]:
    """(name, byte offset of its data, size, the data or None) of each regular file in a tar
    stream. Handles ustar, pax ('x') and GNU long-name headers; other entries are skipped.
    ``where`` (the shard's URL) names the shard in errors."""
    src, pos, pax, long_name = _Chunked(fh), 0, {}, None
    while True:
        header = src.take(_BLOCK)
        if header == _ZERO_BLOCK:
            return
        if not header:
            raise _broken(where, f"ends at byte {pos} without the tar end-of-archive blocks (truncated)", pos)
        if len(header) < _BLOCK:
            raise _broken(where, f"is truncated at byte {pos + len(header)}, inside the tar header at byte {pos}",
                          pos + len(header))
        if not _checksum_ok(header):
            raise _broken(where, f"no valid tar header at byte {pos} (damaged or truncated shard)", pos)
        kind, size = header[156:157], _number(header[124:136])
        pos += _BLOCK
        padded = (size + 511) & ~511
        if kind in (b"x", b"g", b"L", b"K"):  # extended headers: they describe the next member
            body = src.take(padded)[:size]
            if len(body) < size:
                raise _broken(where, f"is truncated at byte {pos + len(body)}, inside the extended header "
                                     f"at byte {pos - _BLOCK}", pos + len(body))
            if kind == b"x":
                pax = _pax(body)
            elif kind == b"L":
                long_name = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            pos += padded
            continue
        size = int(pax.get("size", size))
        padded = (size + 511) & ~511
        name = pax.get("path") or long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}" if prefix else name
        if unsafe_name(name):
            raise UnsafeMemberError(
                f"{where}: member {name!r} (header at byte {pos - _BLOCK}) is named with an absolute path or a "
                "'..' component; refused: sonosynth shards name members <key>.<ext> (this tar was not written "
                "by sonosynth, or was tampered with: rewrite the dataset with `sonosynth ingest`)",
                shard=where, reason="unsafe_member", offset=pos - _BLOCK, member=name)
        if kind in (b"0", b"\0", b"7"):
            payload = src.take(size) if data else None
            got = len(payload) if payload is not None else src.skip(size)
            if got < size:
                raise _broken(where, f"member {name} is truncated at byte {pos + got} (its {size} bytes start at "
                                     f"byte {pos} and the shard ends at byte {pos + got})", pos + got, name)
            src.skip(padded - size)
            yield name, pos, size, payload
        else:
            src.skip(padded)
        pos += padded
        pax, long_name = {}, None


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) as WebDataset groups members: the key ends at the file name's first dot."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name[:dot], name[dot + 1:].lower()) if dot > name.rfind("/") + 1 else None


def tar_records(fh: BinaryIO, url: str, *, offsets: bool = False) -> Iterator[dict[str, Any]]:
    """WebDataset records ({"__key__", "__url__", extension: bytes}) of a tar stream; with
    ``offsets``, also "__offsets__": {extension: byte offset of that member's data}. When the
    shard breaks in a later sample's member, the record before it (read whole) still comes out."""
    record: dict[str, Any] = {}
    try:
        for name, offset, _, payload in tar_members(fh, where=url):
            parts = split_name(name)
            if parts is None:
                continue
            if record.get("__key__") != parts[0]:
                if record:
                    yield record
                record = {"__key__": parts[0], "__url__": url, **({"__offsets__": {}} if offsets else {})}
            record[parts[1]] = payload
            if offsets:
                record["__offsets__"][parts[1]] = offset
    except CorruptShardError as err:
        broken_key = (split_name(err.member) or (None,))[0] if err.member else None
        if record and broken_key is not None and broken_key != record["__key__"] \
                and not isinstance(err, UnsafeMemberError):
            yield record
        raise
    if record:
        yield record
