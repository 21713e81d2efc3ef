"""Sync: compile what a registry publishes into a new snapshot in the store.

The source is a drop directory, or an https:// URL where the registry publishes the same
files. A drop directory holds DIRBS-named list files (eir.lists.formats), native CSV lists
and a GSMA-style TAC file, and optionally `manifest.json` (eir.lists.manifest):

    {"sequence": 42, "published": "2026-12-06T04:00:00Z",
     "files": {"20261120_blacklist.zip": "<sha256 hex>", ...}}

When the manifest is there, every list file must be named in it with its checksum, and every
file it names must be there. Of several full lists of the same name (`20261119_blacklist.zip`,
`20261120_blacklist.zip`) the newest date wins.

What is published is what was verified: each file is read once, from a descriptor opened
without following links, hashed while it is copied into the sync's scratch directory in the
store; the copy is checked against the manifest, parsed, then removed. Renaming another file
over a list after its check changes nothing. Every name a sync would read (list suffixes,
the manifest, its signature) must be a regular file: a symbolic link, a pipe, a device or a
directory by such a name refuses the sync, named.

No going back. The store remembers the highest manifest sequence it ever published
(STORE/SEQUENCE) and the manifest of each version (eir lists status). A manifest with a lower
sequence is refused as a rollback, even when validly signed; one with the sequence in force
is a no-op (nothing read beyond the manifest); once a sequence was published, a source without
one is refused. A source without a sequence (unsigned: no manifest, or one without
`sequence`) syncs with a warning, and then only the date in a full list's file name keeps an
older list from replacing the one in force (it is ignored, with a note). `eir lists rollback`
(eir.lists.store) stays the operator's way back; it pins the store, and is journaled.

A URL source must publish `manifest.json` at that URL (there is no directory listing over
HTTP): eir.lists.fetch downloads it and the files it names, with conditional requests (ETag,
Last-Modified), into a cache in the store (STORE/download/), each checked against its sha256
before it is kept; the cache is then synced from as a drop directory. Redirects are followed
only within the source's scheme, host and port; plain http:// needs `allow_http` and a public
key; TLS trust and a client certificate come from eir.lists.fetch.Transport (the `sync` settings).

With a public key (`public_key`, an Ed25519 key in a PEM file), the source must hold
`manifest.json.sig`: the Ed25519 signature over the exact bytes of manifest.json, either the
raw 64 bytes or their base64 (whitespace ignored), e.g. made with
`openssl pkeyutl -sign -rawin -inkey registry-key.pem -in manifest.json -out manifest.json.sig`.
The manifest is then required, with its sequence, and a missing or bad signature refuses the
sync; for a URL it (and the sequence) is checked before any list file is downloaded. The
key's fingerprint (key_fingerprint) is recorded with the version.

Deltas (`<date>_blacklist_delta_<base>_<run>_<reason>.csv`, and the import-side stolen and
pairing deltas) are applied to the list in force, one run at a time in run order: a delta
whose base is not the run of the list in force is refused. The store keeps each list's state
(eir.lists.state) so the next sync can apply the next delta; a DIRBS zip that holds a full
list with its deltas makes the full list that of their run. Deltas already applied (the same
file and checksum, or a run not newer than the list's) are skipped; lists in force that the
source does not mention stay in force.

Anything wrong (a download, a redirect, a signature, a sequence, a checksum, a zip, a column, a
row, a cell over its limit, a delta's base) refuses the whole sync with the URL or file, line
and field: the store's snapshots, list states, CURRENT and journal are left untouched and the
snapshot in force keeps serving (files already downloaded and verified stay in the download
cache). A sync that brings nothing new publishes nothing; a newer sequence publishes a new
version even when no list changed, so that the version in force names the newest manifest.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
import re
import stat
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from eir.lists.entries import ListDelta, ListEntries
from eir.lists.fetch import (
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE,
    FetchError,
    Transport,
    is_url,
    mirrored,
)
from eir.lists.manifest import Manifest, ManifestError, parse_manifest
from eir.lists.names import FULL_NAME
from eir.lists.native import ListError, read_native_entries
from eir.lists.snapshot import SnapshotError, write_snapshot
from eir.lists.state import DeltaError, ListState
from eir.lists.store import Store, StoreError

MANIFEST = "manifest.json"
DOWNLOADS = "download"  # STORE/download/: the cache of URL sources
LIST_SUFFIXES = (".csv", ".zip", ".txt")
_DATE_PREFIX = re.compile(r"^(\d{8}(?:_\d{6})?)_(.+)$")
# The name of the console's local rules among a store's lists (publish_local). A drop
# directory's list is named by its file (with a suffix) or by what follows its date: a
# name with a space and no suffix is none of them.
LOCAL_LIST = "local rules"


@dataclass
class SyncCounters:
    """Outcomes of the syncs this process ran, ready for metrics (the operations work
    exposes them): how many published, found nothing new, or were refused, and when the
    last one that was not refused ended."""

    published: int = 0
    up_to_date: int = 0
    refused: int = 0
    last_success: float | None = None  # time.time()
    last_refusal: str | None = None

    def record(self, result: "SyncResult | None", refusal: Exception | None = None) -> None:
        if refusal is not None:
            self.refused += 1
            self.last_refusal = str(refusal).splitlines()[0] if str(refusal) else "refused"
            return
        if result.published:
            self.published += 1
        else:
            self.up_to_date += 1
        self.last_success = time.time()


class SyncError(Exception):
    """The sync was refused; the store is untouched. The message says what and where."""


@dataclass
class SyncResult:
    version: str  # the version in force after the sync
    published: bool  # False: the source held nothing new
    sources: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # files not applied, with why
    fetched: list[str] = field(default_factory=list)  # URL sources: what was downloaded
    warnings: list[str] = field(default_factory=list)  # weaker guarantees than signed lists


def sync(source: str, store: Store, public_key: Path | str | None = None,
         transport: Transport | None = None) -> SyncResult:
    """Apply what `source` (a drop directory, or an https:// URL) holds to `store`; with
    `public_key` (a PEM file) its manifest must carry a valid Ed25519 signature. `transport`:
    how a URL is fetched (TLS trust, client certificate, whether http:// may be used)."""
    key = Path(public_key) if public_key else None
    if is_url(source):
        return sync_url(source, store, key, transport or Transport())
    if "://" in source:
        raise SyncError(f"{source}: neither a drop directory nor an http:// or https:// URL")
    return sync_directory(Path(source), store, key)


def sync_configured(settings, store: Store) -> SyncResult:
    """`sync` with the configuration's `sync` section (eir.core.config.SyncSettings)."""
    return sync(settings.source, store, settings.public_key, Transport.of(settings))


def sync_url(url: str, store: Store, public_key: Path | None = None,
             transport: Transport | None = None) -> SyncResult:
    """Download what `url` publishes into STORE/download/ and sync from that copy."""
    transport = transport or Transport()
    if url.lower().startswith("http://"):
        # In clear, anyone on the path can change the lists; only a signature can tell.
        if not transport.allow_http:
            raise SyncError(f"{url}: plain http:// refused: use https://, or set "
                            "sync.allow_http: true together with sync.public_key")
        if public_key is None:
            raise SyncError(f"{url}: plain http:// needs a signed manifest: sync.allow_http "
                            "is set, but sync.public_key is not")
    # A bad key is refused before any request; a bad signature, or a manifest older than the
    # one in force, before any list download.
    verifier = None if public_key is None else _load_key(public_key)
    _refuse_if_pinned(store)

    def check(manifest_bytes: bytes, signature: bytes | None, base: str) -> None:
        if verifier is not None:
            _verify_signature(verifier, public_key, manifest_bytes, signature,
                              base + MANIFEST, base + SIGNATURE)
        _standing(store, _manifest(manifest_bytes, base + MANIFEST), verifier is not None,
                  base + MANIFEST)

    try:
        with mirrored(url, store.root / DOWNLOADS, signature=public_key is not None,
                      check=check, transport=transport) as fetched:
            result = sync_directory(fetched.directory, store, public_key)
    except FetchError as exc:
        raise SyncError(str(exc)) from None
    result.fetched = ([f"{name}: downloaded" for name in fetched.downloaded]
                      + [f"{name}: not modified" for name in fetched.not_modified])
    return result


def sync_directory(directory: Path, store: Store,
                   public_key: Path | None = None) -> SyncResult:
    """Apply what the drop directory holds to `store` (see the module's docstring)."""
    # Imported here: pyarrow loads only when a sync runs; serving never pays for it.
    from eir.lists import formats

    if not directory.is_dir():
        raise SyncError(f"{directory}: not a directory")
    _refuse_if_pinned(store)  # before the work; checked again under the lock
    files, has_manifest, has_signature = _drop_contents(directory)
    manifest_path = directory / MANIFEST
    manifest_bytes = _read_small(manifest_path, MAX_MANIFEST_BYTES) if has_manifest else None
    signer = None
    if public_key is not None:
        verifier = _load_key(public_key)
        if manifest_bytes is None:
            raise SyncError(f"{manifest_path}: missing, but a public key ({public_key}) is "
                            f"configured: the source must hold a signed {MANIFEST}")
        signature_path = directory / SIGNATURE
        _verify_signature(verifier, public_key, manifest_bytes,
                          _read_small(signature_path, MAX_SIGNATURE_BYTES)
                          if has_signature else None,
                          str(manifest_path), str(signature_path))
        signer = key_fingerprint(verifier)
    manifest = None if manifest_bytes is None else _manifest(manifest_bytes, str(manifest_path))
    publication = _Publication(manifest, signer, str(manifest_path))
    warnings = _unsequenced_warnings(directory, manifest)
    if _standing(store, manifest, signer is not None, str(manifest_path)) == "same":
        return _unchanged(store, publication, warnings)
    if not files:
        raise SyncError(f"{directory}: holds no list files "
                        f"({', '.join('*' + suffix for suffix in LIST_SUFFIXES)})")

    chosen, ignored = _newest_per_list(files)
    try:
        with store.scratch() as scratch:
            # Each file is read once: hashed while copied into the scratch directory, and
            # the copy is what is checked against the manifest, parsed and published. The
            # drop directory may change meanwhile (a file renamed over another); what it
            # then holds is never read again.
            copies = scratch / "input"
            copies.mkdir()
            parsing = {path.name for path in chosen}
            digests = {path.name: _read_once(path, copies / path.name
                                             if path.name in parsing else None)
                       for path in files}
            if manifest is not None:
                _verify_manifest(manifest_path, manifest, digests)
            parsed: list[tuple[Path, list]] = []
            problems: list[str] = []
            for path in chosen:
                copy = copies / path.name
                try:
                    parsed.append((copy, formats.parse_all(copy, display_name=path.name,
                                                           scratch=scratch)))
                except ListError as exc:
                    problems.extend(exc.problems)
                copy.unlink()  # parsed (full lists now sorted in the scratch): space back
            if problems:
                raise SyncError(str(ListError(problems)))
            updates = _updates(parsed, digests)
            del parsed  # _apply consumes updates: the parsed lists are dropped in it
            result = _apply(store, updates, ignored, scratch, publication)
    except OSError as exc:
        # A full disk (or a read error) before CURRENT switched: the version in force stays.
        raise SyncError(f"cannot sync into {store.root}: {exc}") from None
    result.warnings = warnings + result.warnings
    return result


@dataclass(frozen=True)
class _Publication:
    """The manifest a sync works from (None: the source has none), who signed it, where."""

    manifest: Manifest | None
    signer: str | None  # key_fingerprint of the key that verified it
    where: str  # the manifest's path or URL, for messages

    @property
    def provenance(self) -> dict | None:
        return None if self.manifest is None else self.manifest.provenance(self.signer)


def _manifest(data: bytes, where: str) -> Manifest:
    try:
        return parse_manifest(data, where)
    except ManifestError as exc:
        raise SyncError(str(exc)) from None


def _in_force_manifest(store: Store) -> tuple[str | None, dict | None]:
    """(version in force, the provenance of the manifest it was compiled from)."""
    current = store.current_version()
    if current is None:
        return None, None
    return current, store.open_current().info.manifest


def _standing(store: Store, manifest: Manifest | None, signed: bool, where: str) -> str:
    """Where `manifest` stands: "same" as the manifest of the version in force, or "newer"
    (also when there is no sequence to compare: the dates in file names decide, in _apply).
    A sequence below the highest this store has published is refused as a rollback (even
    after an operator's rollback and unpin: an attacker could otherwise serve any sequence
    between the rolled-back one and the newest); so is a missing one once there was one."""
    if signed and manifest.sequence is None:
        raise SyncError(f"{where}: sequence: missing: a signed manifest must carry "
                        "`sequence` and `published`, so that an old one cannot be served again")
    version, in_force = _in_force_manifest(store)
    in_force_sequence = None if in_force is None else in_force.get("sequence")
    highest = store.highest_sequence()
    sequence = None if manifest is None else manifest.sequence
    if highest is None:
        return "newer"
    if sequence is None:
        raise SyncError(f"{where}: sequence: " + ("missing" if manifest else "no manifest") +
                        f", but this store has published sequence {highest} (version "
                        f"{version} in force): refused (a source without a sequence could be "
                        "an old one)")
    if sequence < highest:
        newest = (f" (published {in_force.get('published')}) of version {version} in force"
                  if highest == in_force_sequence else
                  f", the newest this store has published (version {version} in force is "
                  f"from sequence {in_force_sequence}, put back by a rollback)")
        raise SyncError(f"{where}: sequence: {sequence} (published {manifest.published}) is "
                        f"older than sequence {highest}{newest}: refused as a rollback")
    return "same" if sequence == in_force_sequence else "newer"


def _unsequenced_warnings(directory: Path, manifest: Manifest | None) -> list[str]:
    if manifest is None:
        return [f"{directory}: no {MANIFEST}: files are not checked against checksums, and "
                "only the dates in file names keep an older list from replacing a newer one"]
    if manifest.sequence is None:
        return [f"{directory / MANIFEST}: no sequence: only the dates in file names keep an "
                "older list from replacing a newer one (registries: see README, signed lists)"]
    return []


def _unchanged(store: Store, publication: _Publication, warnings: list[str]) -> SyncResult:
    """The source holds the publication in force again: nothing to parse or publish."""
    snapshot = store.open_current()
    note = f"{publication.where}: sequence {publication.manifest.sequence} is in force already"
    if snapshot.info.manifest.get("sha256") != publication.manifest.sha256:
        note += " (with other bytes: a registry must raise the sequence at every publication)"
    return SyncResult(snapshot.version, False, snapshot.info.sources, snapshot.info.counts,
                      [note], warnings=warnings)


def _apply(store: Store, updates: dict[str, "_Update"], ignored: list[str],
           scratch: Path, publication: _Publication) -> SyncResult:
    """Apply parsed updates to the lists in force and publish the compiled result.
    `updates` is consumed (emptied): see _compile for why."""
    with store.locked():
        _refuse_if_pinned(store)
        # Again under the lock: another sync may have published meanwhile.
        if _standing(store, publication.manifest, publication.signer is not None,
                     publication.where) == "same":
            return _unchanged(store, publication, [])
        in_force = _in_force(store)
        current = store.current_version()
        states, changed = _updated_states(in_force, updates, ignored, scratch, publication)
        updates.clear()
        if current is not None and not changed:
            return SyncResult(current, False, _sources(states),
                              store.open_current().info.counts, ignored)
        version = _compile(store, states, in_force, current, scratch, publication.provenance)
    return SyncResult(version, True, _sources(states),
                      store.open_current().info.counts, ignored)


def _updated_states(in_force: dict[str, ListState], updates: dict[str, "_Update"],
                    ignored: list[str], scratch: Path, publication: _Publication
                    ) -> tuple[dict[str, ListState], bool]:
    """Every list's state after the updates, and whether any list (or the publication)
    changed."""
    states = dict(in_force)
    # A newer sequence is a new publication even if no list changed: the version in
    # force then names the manifest the registry published last.
    changed = publication.manifest is not None and publication.manifest.sequence is not None
    for name, update in updates.items():
        state = states.get(name)
        full = update.full
        if full is not None and state is not None and full.run and state.run and \
                _run_number(full.run) < _run_number(state.run):
            ignored.append(f"{_label(full.files[0])}: run {full.run} is older "
                           f"than the {name} list in force (run {state.run})")
        elif full is not None and state is not None and \
                _dated_before(full.files[0], state.files[0]):
            ignored.append(f"{_label(full.files[0])}: dated before the {name} list in "
                           f"force ({_label(state.files[0])}): an older list does not "
                           "replace a newer one")
        elif full is not None and (state is None or full.files[0] not in state.files):
            state = full
            changed = True
        for run_deltas, run_files in update.deltas:
            if state is None and not run_deltas[0].base:
                # Import-side deltas (stolen, pairing) name no base: the list starts empty.
                state = ListState(name, "", ListEntries(name))
            if state is None:
                names = ", ".join(f.rpartition("@")[0] for f in run_files)
                raise SyncError(f"{names}: delta for the {name} list, but no full list "
                                "of it is in force or in the source")
            if all(f in state.files for f in run_files) or (
                    run_deltas[0].run and state.run and _run_number(run_deltas[0].run)
                    <= _run_number(state.run)):
                continue  # already applied, or already part of the full list
            try:
                state = state.apply(run_deltas, run_files, scratch)
            except DeltaError as exc:
                raise SyncError(str(exc)) from None
            changed = True
        if state is not None:
            states[name] = state
    return states, changed


def _compile(store: Store, states: dict[str, ListState], in_force: dict[str, ListState],
             current: str | None, scratch: Path, manifest: dict | None,
             by: str | None = None) -> str:
    """Save the states that changed, compile them into a snapshot that records `manifest`
    (a registry manifest's provenance) and publish it, journaled `by` whom (None: a sync),
    under the lock; its version. `in_force`: the states of version `current`; `states` is
    updated to the saved states."""
    version = store.next_version()
    # States are saved before compiling, each written block by block from its mapped
    # or spilled entries; unchanged ones keep their file. If the compile is refused, the
    # unreferenced state files are removed by the next publish.
    kept = {} if current is None else store.open_current().info.states
    state_files = {name: kept[name] if state is in_force.get(name) and name in kept
                   else store.save_state(name, version, state.save)
                   for name, state in states.items()}
    # The snapshot is compiled from the saved states, mapped, and what the parse and the
    # deltas left in the scratch directory is dropped now: its tables are unlinked
    # (eir.lists.table), so their space comes back here, before the compile spills the
    # snapshot's sections (at 1.2 billion IMEIs: 14 GB that would otherwise be taken
    # three times over: scratch table, state, snapshot).
    for name, file_name in state_files.items():
        states[name] = ListState.open(store.state_path(file_name))
    lists = [state.entries for state in states.values() if state.entries is not None]
    tac_names: dict[int, str] = {}
    for state in states.values():
        tac_names.update(state.tac_names)
    temporary = store.snapshot_temporary(version)
    try:
        with open(temporary, "wb") as out:
            write_snapshot(out, lists, version, tac_names, _sources(states),
                           states=state_files, scratch=scratch, manifest=manifest)
    except SnapshotError as exc:
        temporary.unlink(missing_ok=True)
        raise SyncError(str(exc)) from None
    except BaseException:  # a full disk: leave no partial file behind
        temporary.unlink(missing_ok=True)
        raise
    store.publish_file(temporary, version, by=by)
    return version


def publish_local(store: Store, path: Path, by: str | None = None) -> str:
    """Put the native CSV list `path` (the console's local rules) in force in `store` as
    the list LOCAL_LIST, beside the registry's lists in force, as a new version (journaled,
    `by` whom); that version. A sync keeps it (lists the source does not mention stay in
    force), a rollback puts back the local rules of the version it returns to. The file is
    validated as every list file is (ListError); a pinned store refuses (SyncError): the
    operator rolled back on purpose, and unpins first."""
    entries = read_native_entries(path, display_name=path.name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with store.scratch() as scratch, store.locked():
        pinned = store.pinned()
        if pinned is not None:
            raise SyncError(f"{store.root}: pinned at version {pinned} by a rollback: local "
                            "rules are not published over it; unpin first (the console's "
                            "Lists page, or `eir lists unpin`)")
        in_force = _in_force(store)
        states = dict(in_force)
        states[LOCAL_LIST] = ListState(LOCAL_LIST, "", entries,
                                       files=[_file_id(path.name, digest)])
        current = store.current_version()
        # The registry's manifest stays that of the version in force: the next sync of the
        # same sequence changes nothing, a newer one publishes (keeping these rules).
        manifest = None if current is None else store.open_current().info.manifest
        try:
            return _compile(store, states, in_force, current, scratch, manifest, by=by)
        except OSError as exc:
            raise SyncError(f"cannot publish {path.name} into {store.root}: {exc}") from None


def _refuse_if_pinned(store: Store) -> None:
    pinned = store.pinned()
    if pinned is not None:
        raise SyncError(f"{store.root}: pinned at version {pinned} by a rollback; "
                        "`eir lists unpin` lets syncs publish again")


@dataclass
class _Update:
    """What the source holds for one list: a full list and/or deltas grouped by run."""

    full: ListState | None = None
    deltas: list[tuple[list[ListDelta], list[str]]] = field(default_factory=list)


def _file_id(label: str, digest: str) -> str:
    """How a list state remembers the files it was built from: name (a zip member as
    `archive.zip!member.csv`) and the sha256 of the file as delivered."""
    return f"{label}@{digest}"


def _updates(parsed: list[tuple[Path, list]], digests: dict[str, str]) -> dict[str, _Update]:
    updates: dict[str, _Update] = {}
    by_run: dict[tuple[str, str, str], tuple[list[ListDelta], list[str]]] = {}
    for path, results in parsed:
        digest = digests[path.name]
        file_id = _file_id(path.name, digest)
        full_results = [r for r in results if not isinstance(r, ListDelta)]
        deltas = [r for r in results if isinstance(r, ListDelta)]
        # A DIRBS zip holds the full list with the deltas that led to it: the full list is
        # then from their run.
        runs = {d.run for d in deltas if d.run}
        full_run = max(runs, key=_run_number) if runs else ""
        for result in full_results:
            name = _list_name(path)
            if len(full_results) > 1:
                # Several full lists in one zip: each is named by its member, not the zip.
                member = getattr(result, "name", "").rpartition("!")[2]
                name = _list_name(Path(member)) if member else name
                if name in updates and updates[name].full is not None:
                    raise SyncError(f"{path.name}: holds several full lists that cannot be "
                                    f"told apart ({name}); publish one per file")
            if isinstance(result, dict):
                state = ListState(name, "", None, dict(result), [file_id])
            else:
                state = ListState(name, full_run, result, files=[file_id])
            updates.setdefault(name, _Update()).full = state
        for delta in deltas:
            key = (delta.list_name, delta.base, delta.run)
            group = by_run.setdefault(key, ([], []))
            group[0].append(delta)
            member_id = _file_id(delta.added.name or delta.removed.name, digest)
            if member_id not in group[1]:
                group[1].append(member_id)
    for (name, _, _run), group in sorted(by_run.items(),
                                        key=lambda item: _run_number(item[0][2])):
        updates.setdefault(name, _Update()).deltas.append(group)
    for update in updates.values():
        full = update.full
        if full is not None and not full.run and full.entries is not None:
            # dirbs-listgen writes a full list and the deltas of its run side by side, with
            # the same date in their names, then zips them: unzipped into a drop directory,
            # the full list is from their run all the same.
            day = _date_of(full.files[0])
            same_day_runs = [deltas[0].run for deltas, files in update.deltas
                             if day and deltas[0].run
                             and any(_date_of(f) == day for f in files)]
            if same_day_runs:
                update.full = replace(full, run=max(same_day_runs, key=_run_number))
    return updates


def _date_of(file_id: str) -> str | None:
    """The `YYYYMMDD[_HHMMSS]` a list file's name (a zip member's, for a member) starts with."""
    name = Path(_label(file_id).rpartition("!")[2]).name
    match = _DATE_PREFIX.match(name.rsplit(".", 1)[0])
    return match.group(1) if match else None


def _list_name(path: Path) -> str:
    """`20261120_blacklist.zip` → `blacklist`; undated files are lists of their own."""
    stem = path.name.rsplit(".", 1)[0]
    match = _DATE_PREFIX.match(stem)
    return match.group(2) if match else path.name


def _run_number(run: str) -> int:
    try:
        return int(run)
    except ValueError:
        return -1


def _in_force(store: Store) -> dict[str, ListState]:
    if store.current_version() is None:
        return {}
    try:
        info = store.open_current().info
    except StoreError:
        return {}
    states = {}
    for name, file_name in info.states.items():
        try:
            states[name] = ListState.open(store.state_path(file_name))
        except (ValueError, KeyError, EOFError, OSError, zipfile.BadZipFile) as exc:
            raise StoreError(f"{store.states / file_name}: list state unreadable ({exc}); "
                             "sync full lists to rebuild it") from None
    return states


def _sources(states: dict[str, ListState]) -> list[dict]:
    """One entry per file in force: name, sha256, list, run, and the list's rows."""
    sources = []
    for name, state in states.items():
        rows = state.entries.rows if state.entries is not None else len(state.tac_names)
        for index, file_id in enumerate(state.files):
            label, _, digest = file_id.rpartition("@")
            sources.append({"name": label, "sha256": digest, "list": name, "run": state.run,
                            "rows": rows if index == 0 else None})
    return sources


def _drop_contents(directory: Path) -> tuple[list[Path], bool, bool]:
    """(list files, whether manifest.json and manifest.json.sig are there). Every name a
    sync would read must be a regular file: a symbolic link (which could point anywhere) or
    a device, pipe or directory by such a name refuses the sync, each named."""
    files, problems = [], []
    has = {MANIFEST: False, SIGNATURE: False}
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if name not in has and not name.lower().endswith(LIST_SUFFIXES):
                continue
            path = directory / name
            if entry.is_symlink():
                problems.append(f"{path}: a symbolic link: refused (a sync reads only "
                                "regular files from a drop directory)")
            elif not entry.is_file(follow_symlinks=False):
                problems.append(f"{path}: not a regular file: refused")
            elif name in has:
                has[name] = True
            else:
                files.append(path)
    if problems:
        raise SyncError("\n".join(sorted(problems)))
    return sorted(files), has[MANIFEST], has[SIGNATURE]


def _open_regular(path: Path):
    """`path` opened for reading if it is a regular file and not a symbolic link at the
    moment of opening (a link or FIFO put there after the directory was listed is refused)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SyncError(f"{path}: a symbolic link: refused (a sync reads only regular "
                            "files from a drop directory)") from None
        raise SyncError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise SyncError(f"{path}: not a regular file: refused")
    return os.fdopen(descriptor, "rb")


def _read_once(path: Path, copy: Path | None) -> str:
    """The sha256 of the regular file `path`, read once; with `copy`, the bytes hashed are
    written there too (the copy is what gets parsed)."""
    digest = hashlib.sha256()
    with _open_regular(path) as source:
        out = open(copy, "xb") if copy is not None else None
        try:
            while True:
                try:
                    block = source.read(1 << 20)
                except OSError as exc:
                    raise SyncError(f"{path}: cannot read: {exc.strerror or exc}") from None
                if not block:
                    break
                digest.update(block)
                if out is not None:
                    out.write(block)
        finally:
            if out is not None:
                out.close()
    return digest.hexdigest()


def _read_small(path: Path, cap: int) -> bytes:
    """A manifest or signature: a regular file of at most `cap` bytes, read once."""
    with _open_regular(path) as source:
        try:
            data = source.read(cap + 1)
        except OSError as exc:
            raise SyncError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise SyncError(f"{path}: larger than the limit of {cap} bytes")
    return data


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SyncError(f"{path}: cannot read: {exc.strerror or exc}") from None


def key_fingerprint(key) -> str:
    """`SHA256:` and the hex sha256 of the public key's DER SubjectPublicKeyInfo, which
    `openssl pkey -pubin -in registry.pub.pem -outform DER | sha256sum` prints too."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def _load_key(path: Path):
    """The Ed25519 public key of a PEM file (`-----BEGIN PUBLIC KEY-----`)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read(path)
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SyncError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SyncError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def _verify_signature(key, key_path: Path, manifest: bytes, signature: bytes | None,
                      manifest_name: str, signature_name: str) -> None:
    from cryptography.exceptions import InvalidSignature

    if signature is None:
        raise SyncError(f"{signature_name}: missing: the signature over {manifest_name} is "
                        f"required by the public key {key_path}")
    raw = signature
    if len(raw) != 64:  # not raw: base64 of the 64 bytes (line breaks allowed)
        try:
            raw = base64.b64decode(b"".join(signature.split()), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
    if len(raw) != 64:
        raise SyncError(f"{signature_name}: not an Ed25519 signature (64 bytes, raw or "
                        f"base64; got {len(signature)} bytes)")
    try:
        key.verify(raw, manifest)
    except InvalidSignature:
        raise SyncError(f"{signature_name}: signature over {manifest_name} does not verify "
                        f"with {key_path}") from None


def _verify_manifest(manifest_path: Path, manifest: Manifest,
                     digests: dict[str, str]) -> None:
    expected = manifest.files
    problems = []
    for name, digest in sorted(expected.items()):
        if name not in digests:
            there = (manifest_path.parent / name).is_file() and "/" not in name
            problems.append(f"{manifest_path}: files.{name}: " + (
                f"not a list file (lists end in {', '.join(LIST_SUFFIXES)})" if there
                else "listed but not in the directory"))
        elif digest != digests[name]:
            problems.append(f"{manifest_path.parent / name}: sha256: {digests[name]} does not "
                            f"match the manifest's {digest}")
    for name in sorted(set(digests) - set(expected)):
        problems.append(f"{manifest_path.parent / name}: manifest: not listed in {MANIFEST}")
    if problems:
        raise SyncError("\n".join(problems))


def _label(file_id: str) -> str:
    return file_id.rpartition("@")[0]


def _dated_before(file_id: str, in_force_id: str) -> bool:
    """Whether a full list's file is dated (`YYYYMMDD[_HHMMSS]_` in its name) before the
    file the list in force was built from: for sources without a sequence, the only sign
    that a list served again is an old one."""
    dates = [_DATE_PREFIX.match(_label(f).rsplit(".", 1)[0]) for f in (file_id, in_force_id)]
    return all(dates) and dates[0].group(1) < dates[1].group(1)


def _newest_per_list(files: list[Path]) -> tuple[list[Path], list[str]]:
    """Of dated files with the same list name, the newest; undated files all count."""
    newest: dict[str, tuple[str, Path]] = {}
    chosen, ignored = [], []
    for path in files:
        stem = path.name.rsplit(".", 1)[0]
        match = _DATE_PREFIX.match(stem)
        # Only DIRBS full lists supersede each other; every dated delta (per-reason, stolen,
        # pairing) carries changes of its own and is applied.
        if not match or not FULL_NAME.match(path.name):
            chosen.append(path)
            continue
        date, name = match.groups()
        previous = newest.get(name)
        if previous is None or date > previous[0]:
            if previous is not None:
                ignored.append(f"{previous[1].name}: superseded by {path.name}")
            newest[name] = (date, path)
        else:
            ignored.append(f"{path.name}: superseded by {previous[1].name}")
    return chosen + [path for _, path in newest.values()], ignored


