"""Whether a split's image files can be read: the checks of one file, the manifest of their verdicts, and the
check the ranks share at start.

Two checks of one file:

* :func:`file_damage`, the start-up check: a file's first and last bytes, for what DALI's decoders fail on
  without naming the file - headers they cannot parse, content that is no image - and what the GPU decoders
  decode without any error, grey where the data is missing: a truncated JPEG;
* :func:`check_image`, a full decode with PIL: what ``python -m pipelines.verify`` runs, what a manifest
  records (pipelines.manifest, written by ``python -m pipelines.verify ROOT --manifest``), and what
  ``data.on_corrupt=skip`` runs at start, as it must to drop every undecodable file.

At start (:func:`matching_manifest`, :func:`shared_scan`) a split's manifest that matches the listing - same
files, labels, sizes and mtimes - serves its verdicts and no file is read; otherwise rank r checks the r-th
1/world of the files and the findings are combined over the host-side gloo group, so that every rank reaches
the same answer.

Everything parallel here runs in threads: this runs inside the training process, where a fork copies locks
that DALI's and torch's threads hold, and the child can wait on them forever.
"""
from __future__ import annotations

import io
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from PIL import Image

from fdmobilenet.cli import DataError
from pipelines import manifest
from pipelines.base import shard_bounds
from pipelines.imagefolder import list_samples

T, R = TypeVar("T"), TypeVar("R")
# Every JPEG file starts with the start-of-image marker and (unless cut short) ends with the end-of-image one.
JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
# The version of check_image's verdicts that a manifest records: raise it when check_image finds other files
# than before, so that manifests written by the older check are not trusted.
CHECK_VERSION = 1
Member = tuple[str, str, int, "int | None"]   # (name for messages, file, byte offset, size or None = whole file)
TAIL_BYTES = 64          # room for the zero padding some writers put after the end-of-image marker
HEADER_BYTES = 1 << 16   # JPEG headers (tables, frame, EXIF) nearly always fit; longer ones are read whole
SCAN_THREADS = 16        # the scan waits on reads (a network file system most): more threads than cores
# frame headers (SOF0-15): C4 (DHT), C8 (reserved) and CC (DAC) share the range but are not frames
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
DAMAGE = {"empty": "empty file(s) (0 bytes)", "truncated": "truncated JPEG(s)",
          "headers": "JPEG(s) whose headers cannot be parsed", "not an image": "file(s) that are not an image",
          "undecodable": "undecodable file(s)", "unreadable": "unreadable file(s) (cannot be opened or read)"}


# ------------------------------------------------------------------------------------------ full decode
@dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    severity: str = "error"   # error: the loaders cannot use it | warning: usable, but not what it claims

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.reason}"


def check_image(path: str) -> Problem | None:
    """Fully decode one file; None when it is a good JPEG."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return Problem(path, "empty file (0 bytes)")
        with open(path, "rb") as f:
            head = f.read(len(JPEG_SOI))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # EXIF/ICC noise is not our concern; decode failures raise
            with Image.open(path) as im:
                fmt = im.format
                im.load()
    except Image.DecompressionBombError as e:
        return Problem(path, f"too large to decode safely: {e}")
    except Image.UnidentifiedImageError:
        return Problem(path, "not an image (PIL cannot identify the content)")
    except (OSError, SyntaxError, ValueError) as e:
        if "truncated" in str(e):
            return Problem(path, f"truncated image data ({e})")
        return Problem(path, f"unreadable or corrupt: {type(e).__name__}: {e}")
    if head != JPEG_SOI:
        return Problem(path, f"not a JPEG: the content is {fmt} (decodes, but the name/format differ)", "warning")
    return None


def check_file(path: str) -> tuple[int, int, Problem | None]:
    """(size, mtime_ns, :func:`check_image`'s verdict). The stat comes first, so a file changed while or after
    it is decoded has another mtime than its manifest line and no longer matches it."""
    try:
        st = os.stat(path)
    except OSError as e:
        return -1, -1, Problem(path, f"unreadable: {e}")
    return st.st_size, st.st_mtime_ns, check_image(path)


def map_files(fn: Callable[[T], R], items: list[T], workers: int, chunk: int = 64) -> list[R]:
    """``[fn(x) for x in items]`` in ``workers`` threads, ``chunk`` items per task."""
    workers = max(1, min(workers, -(-len(items) // chunk)))
    if workers == 1:
        return [fn(x) for x in items]
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [r for part in pool.map(lambda c: [fn(x) for x in c], chunks) for r in part]


def write_manifest(split: Path, checked: dict[str, tuple[int, int, Problem | None]]) -> Path | None:
    """The manifest of ``split`` in its loader's listing order, from ``checked`` (path -> check_file's
    result; a file missing there is checked now); None for a split without class folders."""
    try:
        _, samples = list_samples(split, allow_empty=True)
    except FileNotFoundError:
        return None
    prefix = len(str(split)) + 1
    entries = []
    for path, label in samples:
        size, mtime_ns, problem = checked[path] if path in checked else check_file(path)
        entries.append((path[prefix:], size, mtime_ns, label, problem.severity if problem else "ok",
                        problem.reason if problem else ""))
    return manifest.write(split, entries, CHECK_VERSION)


# ------------------------------------------------------------------------------------- start-up check
def _decodes(data: bytes, headers_only: bool = False) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:   # open() parses every marker up to the scan data
            if not headers_only:
                im.load()
        return True
    except Exception:    # any failure to decode is the answer, whatever PIL calls it
        return False


def jpeg_headers(data: bytes) -> Optional[bool]:
    """Whether the marker segments after a JPEG's start-of-image chain up to a start-of-scan, with a frame
    header before it: what a decoder parses before the first pixel; None when ``data`` ends before the scan.
    Walks the segments' length fields only: PIL's header parse costs about twice the whole check per file
    (benchmarks/RESULTS.md, "Start-up data check")."""
    i, frame = 2, False
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:               # fill bytes before a marker
            i += 1
            continue
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD9:   # stuffing, TEM, RSTn, SOI, EOI: not headers
            return False
        if marker == 0xDA:
            return frame
        frame |= marker in SOF_MARKERS
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return False
        i += 2 + length
    return None


def file_damage(path: str, offset: int = 0, size: Optional[int] = None) -> Optional[str]:
    """What is wrong with an image (``size`` bytes at ``offset`` of ``path``; the whole file by default) as far
    as its first and last bytes tell: None, or a key of DAMAGE. A JPEG must have parsable headers
    (:func:`jpeg_headers`) and end with its end-of-image marker - when the marker is missing a full decode
    decides (trailing data is rare); other content must be an image PIL identifies (PNG, ...). Damage inside
    the compressed data is left to the decoders, which name the file."""
    with open(path, "rb") as f:
        if size is None:
            size = os.fstat(f.fileno()).st_size
        if size == 0:
            return "empty"
        f.seek(offset)
        head = f.read(min(size, HEADER_BYTES))
        if not head.startswith(JPEG_SOI):
            if _decodes(head, headers_only=True):
                return None
            f.seek(offset)
            return None if len(head) < size and _decodes(f.read(size), headers_only=True) else "not an image"
        headers = jpeg_headers(head)
        if headers is None and len(head) < size:     # headers longer than the first piece: read it all
            f.seek(offset)
            headers = jpeg_headers(f.read(size))
        if headers is None:
            return "truncated"                       # the data ends inside the headers
        if not headers:
            return "headers"
        f.seek(offset + max(2, size - TAIL_BYTES))
        if f.read(min(TAIL_BYTES, size - 2)).rstrip(b"\x00\r\n\t ").endswith(JPEG_EOI):
            return None
        f.seek(offset)                  # no marker at the end: decode it to be sure (rare: trailing data)
        return None if _decodes(f.read(size)) else "truncated"


def member_damage(item: Member) -> Optional[str]:
    """:func:`file_damage` of a listed item; a file that cannot be read is 'unreadable'."""
    try:
        return file_damage(*item[1:])
    except OSError:          # gone since the listing, no permission, an I/O error
        return "unreadable"


def decode_damage(item: Member) -> Optional[str]:
    """on_corrupt=skip's check: a full decode; only errors count (a PNG named .jpg decodes)."""
    problem = check_image(item[1])
    return "undecodable" if problem is not None and problem.severity == "error" else None


# ---------------------------------------------------------------------------------------- the ranks
def _my_share(n: int, rank: int, world_size: int, group) -> tuple[int, int]:
    """[begin, end) of the ``n`` items this process checks: its 1/world share when the ranks combine their
    findings over ``group``, else all of them."""
    return shard_bounds(n, rank, world_size) if group is not None else (0, n)


def _stat(path: str) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except OSError:
        return None


def _combined(obj: Any, world_size: int, group) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``group``: the gloo group; None: this process only)."""
    if group is None or world_size == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def shared_scan(items: list[Member], damage: Callable[[Member], Optional[str]], where: Path, rank: int,
                world_size: int, group, threads: int) -> tuple[list[tuple[str, str]], int, float]:
    """(name, damage) of every damaged item, found by every rank checking its share; (that list, items this
    process checked, seconds)."""
    begin, end = _my_share(len(items), rank, world_size, group)
    start = time.perf_counter()
    found = map_files(damage, items[begin:end], threads, chunk=512)
    mine = [(item[0], d) for item, d in zip(items[begin:end], found) if d is not None]
    combined = _combined((len(items), mine), world_size, group)
    if len({n for n, _ in combined}) > 1:
        raise DataError(f"the ranks list different numbers of files in {where} "
                        f"({', '.join(str(n) for n, _ in combined)}): do they all see the same data.root?")
    return sorted(b for _, bad in combined for b in bad), end - begin, time.perf_counter() - start


def matching_manifest(folder: Path, samples: list[tuple[str, int]], rank: int, world_size: int, group
                      ) -> tuple[Optional[manifest.Manifest], str]:
    """The split's manifest when it matches the listing on every rank (each rank stats its share of the
    files), else None and why not."""
    try:
        found = manifest.read(folder)
    except ValueError as e:
        found, why = None, str(e)
    else:
        why = f"no manifest {folder / manifest.NAME}" if found is None else ""
    if found is not None and found.check_version != CHECK_VERSION:
        why = (f"{found.path} holds the verdicts of check version {found.check_version}, this is "
               f"{CHECK_VERSION}; write it again")
    elif found is not None:
        begin, end = _my_share(len(samples), rank, world_size, group)
        stats = map_files(_stat, [path for path, _ in samples[begin:end]], SCAN_THREADS, chunk=512)
        diff = found.mismatch(str(folder), samples, stats, begin)
        why = f"{found.path} does not match the folder: {diff}; write it again" if diff else ""
    whys = [w for w in _combined(why, world_size, group) if w]
    return (found, "") if not whys else (None, whys[0])
