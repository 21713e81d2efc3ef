"""The snapshot store: a directory of immutable, versioned snapshots and a pointer to the one
in force.

    STORE/snapshots/000007.eirsnap   one compiled snapshot per version, never modified
    STORE/CURRENT                    the version in force ("000007\\n")
    STORE/lists/*.state              each list as of the version(s) naming it (deltas apply
                                     to these; see eir.lists.state)
    STORE/tmp/sync-*                 a running sync's sort runs (see eir.lists.table)
    STORE/.lock                      held while publishing or rolling back
    STORE/journal.jsonl              every change of the version in force, one JSON line
                                     each, never rewritten: what an auditor reads
    STORE/SEQUENCE                   the highest registry manifest sequence ever published
                                     here (eir.lists.sync refuses older ones, even after a
                                     rollback)

The journal records each publish (version, the registry manifest's sequence, time, sha256
and signer, and every file in force with its sha256), each rollback and unpin (the version
before and after, and who: user, uid, pid and command), so that the lists in force on any
day can be shown long after their snapshots were pruned. A rollback is also logged.

Publishing writes the new snapshot under a temporary name, fsyncs it, renames it into place,
then replaces CURRENT the same way. A crash (kill -9, power loss) at any point leaves CURRENT
naming a complete snapshot: the previous one or the new one, never a mix, never none. Servers
poll CURRENT and map the snapshot it names. The last `keep` versions are kept for rollback;
a rollback pins the store, so that the next sync does not publish again what was rolled
back, until `unpin`.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from eir.lists.snapshot import Snapshot, SnapshotError, SnapshotInfo

SUFFIX = ".eirsnap"
JOURNAL = "journal.jsonl"

log = logging.getLogger("eir.store")


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
        self.journal = self.root / JOURNAL
        self.sequence = self.root / "SEQUENCE"

    # -- reading ------------------------------------------------------------------------

    def current_version(self) -> str | None:
        try:
            text = self.pointer.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.pointer}: unreadable: {exc}") from None
        return text or None

    @staticmethod
    def version_named(text: str) -> str:
        """A version as an operator types it: `3` is version 000003 (versions are numbered
        with six digits); anything else is taken as it is."""
        return f"{int(text):06d}" if text.isascii() and text.isdigit() and len(text) <= 6 \
            else text

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
        temporary = self.snapshot_temporary(version)
        temporary.write_bytes(data)
        return self.publish_file(temporary, version)

    def snapshot_temporary(self, version: str) -> Path:
        """Where to write a snapshot before `publish_file` (removed by the next publish if a
        writer dies)."""
        self.snapshots.mkdir(parents=True, exist_ok=True)
        return self.snapshots / f".{version}{SUFFIX}.{os.getpid()}.tmp"

    def publish_file(self, temporary: Path, version: str, by: str | None = None) -> Path:
        """Put the snapshot written to `temporary` in force under `version` (call inside
        `locked()`): checked, made durable, renamed into place, then CURRENT switched;
        journaled (with `by` whom, when not a sync: the console's local rules)."""
        try:
            snapshot = Snapshot.open(temporary)  # refuse to publish what could not be opened
        except SnapshotError as exc:
            temporary.unlink(missing_ok=True)
            raise StoreError(str(exc)) from None
        if snapshot.version != version:
            # Servers compare CURRENT with the version in the snapshot they serve.
            temporary.unlink(missing_ok=True)
            raise StoreError(f"snapshot says version {snapshot.version}, published as "
                             f"{version}")
        info = snapshot.info
        del snapshot
        path = self.path_of(version)
        _durable_replace(temporary, path)
        previous = self.current_version()
        sequence = (info.manifest or {}).get("sequence")
        if sequence is not None and sequence > (self.highest_sequence() or -1):
            _atomic_write(self.sequence, f"{sequence}\n".encode("ascii"))
        _atomic_write(self.pointer, f"{version}\n".encode("ascii"))
        self._record("publish", version, previous, manifest=info.manifest,
                     files=[{"name": source.get("name"), "sha256": source.get("sha256")}
                            for source in info.sources], **({"by": by} if by else {}))
        self._prune()
        return path

    @contextmanager
    def scratch(self):
        """A private scratch directory under STORE/tmp for one sync's spilled sort runs and
        tables, removed afterwards (and, if its sync was killed, by the next one)."""
        base = self.root / "tmp"
        base.mkdir(parents=True, exist_ok=True)
        for stale in base.glob("sync-*"):
            owner = stale.name.split("-")[1]
            if owner.isdigit() and not _alive(int(owner)):
                shutil.rmtree(stale, ignore_errors=True)
        directory = Path(tempfile.mkdtemp(prefix=f"sync-{os.getpid()}-", dir=base))
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def rollback(self, version: str | None = None, by: str | None = None) -> str:
        """Put `version` (default: the one before the version in force) back in force, and
        pin the store. Journaled and logged as the operator's act (`by`: who; default the
        user, uid, pid and command of this process)."""
        with self.locked():
            versions = self.versions()
            current = self.current_version()
            if version is not None:
                version = self.version_named(version)
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
            by = by or operator()
            self._record("rollback", version, current, by=by)
            log.warning("lists: rollback to version %s (was %s) by %s; the store is pinned "
                        "until `eir lists unpin`", version, current, by)
            return version

    def highest_sequence(self) -> int | None:
        """The highest registry manifest sequence ever published in this store (None: no
        sequenced manifest yet). A rollback does not lower it."""
        try:
            text = self.sequence.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.sequence}: unreadable: {exc}") from None
        if not text.isdigit():
            raise StoreError(f"{self.sequence}: {text[:40]!r} is not a sequence number")
        return int(text)

    def pinned(self) -> str | None:
        """The version a rollback pinned (syncs are refused until unpin), or None."""
        try:
            return self.pin.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            return None

    def unpin(self, by: str | None = None) -> str | None:
        """Let syncs publish again; returns the version that was pinned."""
        with self.locked():
            pinned = self.pinned()
            self.pin.unlink(missing_ok=True)
            if pinned is not None:
                by = by or operator()
                self._record("unpin", self.current_version(), pinned, by=by)
                log.warning("lists: store unpinned (was pinned at %s) by %s", pinned, by)
            return pinned

    def _record(self, act: str, version: str | None, previous: str | None, **fields) -> None:
        """One line in the journal (called under the lock, after the act). The act is done
        by then: a journal that cannot be written is logged as an error, not raised as if
        the act had failed."""
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "act": act, "version": version, "previous": previous, **fields},
                          ensure_ascii=True)
        try:
            with open(self.journal, "a", encoding="ascii") as journal:
                journal.write(line + "\n")
                journal.flush()
                os.fsync(journal.fileno())
        except OSError as exc:
            log.error("store: cannot append to %s (%s): not journaled: %s", self.journal,
                      exc.strerror or exc, line)

    def journal_records(self) -> list[dict]:
        """The journal, oldest first (a damaged line is skipped)."""
        try:
            text = self.journal.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            return []
        records = []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def save_state(self, name: str, version: str, write: Callable[[Path], None]) -> str:
        """Store a list state (eir.lists.state), written by `write(path)`, under a name of
        its own for snapshot `version`; returns the file name."""
        file_name = f"{_safe(name)}-{version}.state"
        path = self.states / file_name
        self.states.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{file_name}.{os.getpid()}.tmp")
        try:
            write(temporary)
        except BaseException:  # a full disk: leave no partial file behind
            temporary.unlink(missing_ok=True)
            raise
        _durable_replace(temporary, path)
        return file_name

    def state_path(self, file_name: str) -> Path:
        return self.states / file_name

    def _prune(self) -> None:
        current = self.current_version()
        stored = sorted(self.snapshots.glob(f"*{SUFFIX}"), reverse=True)
        for path in stored[self.keep:]:
            if path.name != f"{current}{SUFFIX}":
                path.unlink(missing_ok=True)
        for directory in (self.snapshots, self.states, self.root):
            for leftover in directory.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)  # from a writer that died mid-write
        referenced: set[str] = set()
        for version in self.versions():
            referenced.update(version.info.states.values())
        if self.states.is_dir():
            for state in self.states.glob("*.state"):
                if state.name not in referenced:
                    state.unlink(missing_ok=True)


def operator() -> str:
    """Who this process acts for: user, uid, pid and command (`eir lists rollback`, or
    `eir serve` for the API)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    program = os.path.basename(sys.argv[0])
    if program in ("__main__.py", "eir"):  # `python -m eir` or the console script
        program = "eir"
    command = " ".join([program] + sys.argv[1:3])[:120]
    return f"{user} (uid {os.getuid()}, pid {os.getpid()}, {command})"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    _durable_replace(temporary, path)


def _durable_replace(temporary: Path, path: Path) -> None:
    """fsync `temporary`, rename it to `path`, fsync the directory: after a crash, `path` is
    the old file or the new one, complete."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
