"""Atomic, deterministic webdataset shard writing and plain-tarfile reading.

Member names are ``{key}.{suffix}`` (``s000000-000012.jpg``, ``s000000-000012.crop0.png``), keys have
no dots, so webdataset's "split at the first dot of the basename" rule yields the suffixes of
docs/ARCHITECTURE.md ("Shard record"). Tar headers carry no time, user or group, so the same input
and config give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Sample:
    """One output sample: the record and its files by suffix ("jpg", "crop0.png", "canny.png", ...)."""

    key: str
    record: dict
    files: dict[str, bytes] = field(default_factory=dict)


def _tmp_path(path: Path) -> Path:
    # Unique per writer so two processes racing on one part never write the same temp file.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.write_bytes(data)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def _suffix_order(suffix: str) -> tuple:
    # jpg and json first (readers that stream can decide early), then the rest by name.
    return ({"jpg": 0, "json": 1}.get(suffix, 2), suffix)


class ShardWriter:
    """Stream samples into ``path`` through a temp file; ``commit()`` publishes it atomically.

    Streaming keeps memory flat for big parts (img2dataset tars hold ~10k samples). Leaving the
    ``with`` block without ``commit()`` (an exception) deletes the temp file, so a reader never sees
    a partial shard.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = _tmp_path(self.path)
        self._tf = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, s: Sample) -> None:
        if "." in s.key or "/" in s.key:
            raise ValueError(f"sample key {s.key!r} must not contain '.' or '/'")
        files = dict(s.files)
        files["json"] = json.dumps(s.record, ensure_ascii=False).encode("utf-8")
        for suffix in sorted(files, key=_suffix_order):
            data = files[suffix]
            info = tarfile.TarInfo(f"{s.key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._tf.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self) -> int:
        """Close, fsync and rename into place; return the shard's byte size."""
        self._tf.close()
        size = self.tmp.stat().st_size
        _publish(self.tmp, self.path)
        return size

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._tf.closed:
            self._tf.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path: str | os.PathLike, samples: Sequence[Sample]) -> int:
    """Write all samples to ``path`` atomically; return the byte size."""
    with ShardWriter(path) as w:
        for s in samples:
            w.add(s)
        return w.commit()


def read_shard(path: str | os.PathLike) -> Iterator[dict[str, bytes | str]]:
    """Samples of one shard as ``{"__key__": key, suffix: bytes, ...}`` in file order."""
    cur: dict | None = None
    with tarfile.open(path, "r") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, suffix = m.name.split(".", 1)
            if cur is None or cur["__key__"] != key:
                if cur is not None:
                    yield cur
                cur = {"__key__": key}
            f = tf.extractfile(m)
            cur[suffix] = f.read() if f is not None else b""
    if cur is not None:
        yield cur


def shard_paths(out_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(out_dir).glob("shard-*.tar"))


def iter_samples(out_dir: str | os.PathLike) -> Iterator[dict[str, bytes | str]]:
    for p in shard_paths(out_dir):
        yield from read_shard(p)


def ensure_writable_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove it takes a file (``os.access`` says yes to root even on a
    read-only mount); raise ``PermissionError`` with a one-line reason otherwise."""
    import tempfile

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PermissionError(f"{folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"the output folder {folder} is not writable ({e.strerror or e})") from e
    return folder
