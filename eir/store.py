"""The snapshot store: a directory of immutable, versioned snapshots and a pointer to the one
in force.

    STORE/snapshots/000007.eirsnap   one compiled snapshot per version, never modified
    STORE/CURRENT                    the version in force ("000007\\n")
    STORE/.lock                      held while publishing or rolling back

Publishing writes the new snapshot under a temporary name, fsyncs it, renames it into place,
then replaces CURRENT the same way. A crash (kill -9, power loss) at any point leaves CURRENT
naming a complete snapshot: the previous one or the new one, never a mix, never none. Servers
poll CURRENT and map the snapshot it names. The last `keep` versions are kept for rollback;
a rollback pins the store, so that the next sync does not publish again what was rolled
back, until `unpin`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eir.snapshot import Snapshot, SnapshotError, SnapshotInfo

SUFFIX = ".eirsnap"


class StoreError(Exception):
    """The store cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class StoredVersion:
    version: str
    path: Path
    info: SnapshotInfo
    in_force: bool

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.info.created)


class Store:
    def __init__(self, root: Path | str, keep: int = 5):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = Path(root)
        self.keep = keep
        self.snapshots = self.root / "snapshots"
        self.states = self.root / "lists"
        self.pointer = self.root / "CURRENT"
        self.pin = self.root / "PINNED"

    # -- reading ------------------------------------------------------------------------

    def current_version(self) -> str | None:
        try:
            text = self.pointer.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.pointer}: unreadable: {exc}") from None
        return text or None

    def path_of(self, version: str) -> Path:
        return self.snapshots / f"{version}{SUFFIX}"

    def open_current(self) -> Snapshot:
        version = self.current_version()
        if version is None:
            raise StoreError(f"{self.root}: the store holds no snapshot yet (run eir sync)")
        try:
            return Snapshot.open(self.path_of(version))
        except SnapshotError as exc:
            raise StoreError(str(exc)) from None

    def versions(self) -> list[StoredVersion]:
        """Every stored version, newest first."""
        current = self.current_version()
        found = []
        for path in sorted(self.snapshots.glob(f"*{SUFFIX}"), reverse=True):
            version = path.name[:-len(SUFFIX)]
            try:
                info = Snapshot.open(path).info
            except SnapshotError:
                continue  # not ours or damaged: never offered for rollback
            found.append(StoredVersion(version, path, info, version == current))
        return found

    # -- writing ------------------------------------------------------------------------

    @contextmanager
    def locked(self):
        """Serialise writers (two syncs, a sync and a rollback) on this store."""
        self.snapshots.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def next_version(self) -> str:
        numbers = [int(p.name[:-len(SUFFIX)]) for p in self.snapshots.glob(f"*{SUFFIX}")
                   if p.name[:-len(SUFFIX)].isdigit()]
        return f"{max(numbers, default=0) + 1:06d}"

    def publish(self, data: bytes, version: str) -> Path:
        """Store a compiled snapshot and put it in force (call inside `locked()`)."""
        snapshot = Snapshot.from_bytes(data)  # refuse to publish what could not be opened
        if snapshot.version != version:
            # Servers compare CURRENT with the version in the snapshot they serve.
            raise StoreError(f"snapshot says version {snapshot.version}, published as "
                             f"{version}")
        path = self.path_of(version)
        _atomic_write(path, data)
        _atomic_write(self.pointer, f"{version}\n".encode("ascii"))
        self._prune()
        return path

    def rollback(self, version: str | None = None) -> str:
        """Put `version` (default: the one before the version in force) back in force."""
        with self.locked():
            versions = self.versions()
            current = self.current_version()
            if version is None:
                older = [v for v in versions if current is None or v.version < current]
                if not older:
                    raise StoreError(f"{self.root}: no version older than {current} is kept")
                version = older[0].version
            elif version not in {v.version for v in versions}:
                kept = ", ".join(v.version for v in versions) or "none"
                raise StoreError(f"{self.root}: version {version} is not kept (kept: {kept})")
            _atomic_write(self.pointer, f"{version}\n".encode("ascii"))
            # Pinned: the next sync would otherwise publish again what was just rolled back.
            _atomic_write(self.pin, f"{version}\n".encode("ascii"))
            return version

    def pinned(self) -> str | None:
        """The version a rollback pinned (syncs are refused until unpin), or None."""
        try:
            return self.pin.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            return None

    def unpin(self) -> str | None:
        """Let syncs publish again; returns the version that was pinned."""
        with self.locked():
            pinned = self.pinned()
            self.pin.unlink(missing_ok=True)
            return pinned

    def save_state(self, name: str, data: bytes) -> str:
        """Store a list state (eir.registry.state) under a content-derived name; returns it."""
        file_name = f"{_safe(name)}-{hashlib.sha256(data).hexdigest()[:16]}.state"
        path = self.states / file_name
        if not path.exists():
            self.states.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, data)
        return file_name

    def load_state(self, file_name: str) -> bytes:
        try:
            return (self.states / file_name).read_bytes()
        except OSError as exc:
            raise StoreError(f"{self.states / file_name}: list state unreadable: "
                             f"{exc.strerror or exc}") from None

    def _prune(self) -> None:
        current = self.current_version()
        stored = sorted(self.snapshots.glob(f"*{SUFFIX}"), reverse=True)
        for path in stored[self.keep:]:
            if path.name != f"{current}{SUFFIX}":
                path.unlink(missing_ok=True)
        for directory in (self.snapshots, self.states, self.root):
            for leftover in directory.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)  # from a writer that died mid-write
        referenced = set()
        for version in self.versions():
            referenced.update(version.info.states.values())
        if self.states.is_dir():
            for state in self.states.glob("*.state"):
                if state.name not in referenced:
                    state.unlink(missing_ok=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
