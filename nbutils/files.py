"""Atomic file writes, JSON/JSONL and sha256: the one place the project writes artifacts.

Every artifact goes to a temporary file in the same folder and is renamed into place, so a reader
(or a crash) never sees half a file and a failed write leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary file path beside ``path`` (same extension); on success rename it onto
    ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix="".join(path.suffixes[-2:]), dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    # e.g. no space left: say which artifact, and that its previous version is intact
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot write {path} ({exc.strerror or exc}); its previous version, if any, is intact",
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)  # set aside, not deleted, until the new folder is in place
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot write {path} ({exc.strerror or exc}); its previous version, if any, is intact",
        ) from None
    finally:
        # whatever interrupted the swap: put the previous version back
        if old.exists() and not path.exists():
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: Path, data: bytes) -> Path:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> Path:
    """Pretty, key-sorted JSON, written atomically."""
    return write_text(
        path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True, default=str) + "\n"
    )


def to_jsonl(rows: list[dict]) -> str:
    """JSON Lines text with stable key order."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_csv(path: Path, rows: list[dict], columns: tuple) -> Path:
    """Write ``rows`` as CSV with a header of ``columns`` (other keys ignored), atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, text.getvalue())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """JSON Lines, written atomically."""
    return write_text(path, to_jsonl(rows))


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON Lines file this project wrote."""
    return [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]


def read_json(path: Path):
    """A JSON file this project wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
