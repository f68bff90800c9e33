"""A split's manifest: every file its loader lists, with size, mtime, label and the verdict of a full decode.

Written once per split by ``python -m pipelines.verify ROOT --manifest``; the check at start
(pipelines.splits, pipelines.integrity) then uses its verdicts instead of reading every file at every start.

    {split}/.manifest.tsv
    line 1    a JSON header: {"manifest": FORMAT, "check_version": N, "files": count}
    then      one line per file, in the loader's listing order (torchvision ImageFolder's):
              relative path TAB size TAB mtime (ns) TAB label TAB verdict (ok | warning | error) TAB reason

``check_version`` is pipelines.integrity.CHECK_VERSION of the check that wrote the verdicts. A manifest counts only
while it matches its split: the same files in the same order with the same labels, sizes and mtimes (a file
replaced or rewritten since has another mtime). Plain text, so ``grep -P '\\terror\\t' .manifest.tsv`` lists
the damaged files. The dot keeps it out of the loaders' listings (torchvision lists class folders only).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

NAME = ".manifest.tsv"
FORMAT = 1

Entry = tuple[str, int, int, int, str, str]   # relative path, size, mtime_ns, label, verdict, reason


def line_start(relpath: str, size: int, mtime_ns: int, label: int) -> str:
    """What a file's line starts with; the verdict and its reason follow."""
    return f"{relpath}\t{size}\t{mtime_ns}\t{label}\t"


def write(folder: Path, entries: list[Entry], check_version: int) -> Path:
    """``folder/NAME`` from ``entries`` (listing order), replaced at once: a reader never sees half a file."""
    for relpath, *_ in entries:
        if any(c in relpath for c in "\t\n\r"):
            raise ValueError(f"{folder / relpath}: a tab or line break in the file name cannot be recorded in "
                             f"{NAME}; rename the file")
    path = folder / NAME
    tmp = path.with_name(NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"manifest": FORMAT, "check_version": check_version, "files": len(entries)}) + "\n")
        for relpath, size, mtime_ns, label, verdict, reason in entries:
            f.write(f"{line_start(relpath, size, mtime_ns, label)}{verdict}\t{' '.join(reason.split())}\n")
    os.replace(tmp, path)
    return path


@dataclass
class Manifest:
    path: Path
    check_version: int
    lines: list[str]      # one per file, without the header

    def errors(self) -> list[tuple[str, str]]:
        """(relative path, reason) of every file whose verdict is 'error'."""
        return [(fields[0], fields[5]) for fields in (line.split("\t") for line in self.lines if "\terror\t" in line)
                if fields[4] == "error"]

    def ok(self) -> dict[str, tuple[int, int]]:
        """relative path -> (size, mtime_ns) of every file whose verdict is 'ok'."""
        rows = (line.split("\t") for line in self.lines)
        return {r[0]: (int(r[1]), int(r[2])) for r in rows if len(r) >= 5 and r[4] == "ok"}

    def mismatch(self, folder: str, samples: list[tuple[str, int]], stats: list[os.stat_result | None],
                 begin: int) -> str | None:
        """None when ``samples[begin:begin + len(stats)]`` (with their ``stats``; None: the file cannot be
        stat'ed) are the manifest's lines there; otherwise the first difference, for a message. ``folder`` is
        the prefix of the sample paths."""
        if len(self.lines) != len(samples):
            return f"it lists {len(self.lines):,} files, the folder holds {len(samples):,}"
        for (path, label), st, line in zip(samples[begin:], stats, self.lines[begin:]):
            if st is None or not line.startswith(line_start(path[len(folder) + 1:], st.st_size, st.st_mtime_ns,
                                                            label)):
                return f"{path} differs (another file, label, size or mtime than when it was written)"
        return None


def read(folder: Path) -> Manifest | None:
    """``folder``'s manifest; None when it has none. A file that is not one raises ValueError naming it."""
    path = folder / NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    lines = text.splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
        version, count = header["check_version"], header["files"]
        if header["manifest"] != FORMAT or count != len(lines) - 1:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a complete manifest of format {FORMAT}; write it again with "
                         f"`python -m pipelines.verify {folder.parent} --manifest`") from None
    return Manifest(path, version, lines[1:])
