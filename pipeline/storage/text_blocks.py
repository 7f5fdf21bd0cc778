"""Text files read a block at a time: the bytes of a CSV, TSV or JSONL file in blocks cut
at line ends, so a file of any size is read in bounded memory and its first rows come
after a few blocks. What the blocks become is the readers' job
(:mod:`.delimited_readers`, :mod:`.table_readers`).
"""

from __future__ import annotations

import codecs
import io
from typing import BinaryIO, Iterator

from pipeline.errors import InputError

# Rows a reader puts in one table (JSONL lines, TSV records, Parquet batch rows).
CHUNK_ROWS = 4096


# Bytes a text reader takes from its file at a time, so a file of any size is read in
# bounded memory and its first rows come after a few blocks, not the whole file. pyarrow's
# CSV reader reads about 32 blocks ahead and needs one row to fit in a block.
TEXT_BLOCK_BYTES = 1 << 20


def blocks(stream: BinaryIO) -> Iterator[bytes]:
    """The file's bytes in blocks cut after a newline (the last one may lack it), the
    byte-order mark Excel's "CSV UTF-8" starts with removed: pyarrow drops it from the first
    column's name, so text-only column types keyed by the name with the mark would miss
    that column and it would be type-guessed (id 007 -> 7). A first block that is not
    line-based text raises :class:`InputError` (:func:`check_text`)."""
    rest, first = b"", True
    while True:
        data = stream.read(TEXT_BLOCK_BYTES)
        if first:
            data, first = data.removeprefix(codecs.BOM_UTF8), False
            check_text(data)
        if not data:
            break
        data = rest + data
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        if cut:
            yield data[:cut]
    if rest:
        yield rest


class Joined(io.RawIOBase):
    """Blocks already read, then the rest of a stream: one readable file for pyarrow.

    A read is filled across blocks (short only at the end, or by the CR it holds back):
    pyarrow takes each read as a block, and a row that straddles two block boundaries
    fails the file."""

    def __init__(self, head: bytes, rest: Iterator[bytes]):
        self._buffer, self._at, self._rest = memoryview(head), 0, rest

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        filled = 0
        while filled < len(target):
            if self._at == len(self._buffer):
                block = next(self._rest, None)
                if block is None:
                    break
                self._buffer, self._at = memoryview(block), 0
            n = min(len(target) - filled, len(self._buffer) - self._at)
            target[filled : filled + n] = self._buffer[self._at : self._at + n]
            self._at += n
            filled += n
        if filled == len(target) > 1 and target[filled - 1] == 0x0D:
            # Never end a block between a CR and what follows: pyarrow (26) drops the LF of
            # a quoted CRLF cut there ("a\r\nb" read back as "a\rb").
            self._at -= 1
            filled -= 1
        return filled


def check_text(head: bytes) -> None:
    """Refuse, with one message, a file that is not line-based text: binary data (a NUL
    byte in its first 8 KB, git's test) or lines ended by CR alone (classic Mac OS), which
    would be one endless line here (blocks are cut at newlines, so the reader would hold
    the whole file) and is rare enough to ask for a conversion."""
    if b"\0" in head[:8192]:
        raise InputError("not a text file: it holds NUL bytes (binary data?); check that the file is the table its name says")
    if b"\r" in head and b"\n" not in head:
        raise InputError("its lines end in CR alone (classic Mac OS line ends); save it with LF or CRLF line ends")
