"""Sync: compile what a registry drop directory holds into a new snapshot in the store.

A drop directory holds DIRBS-named list files (eir.registry.formats), native CSV lists and a
GSMA-style TAC file, and optionally `manifest.json`:

    {"files": {"20261120_blacklist.zip": "<sha256 hex>", ...}}

When the manifest is there, every list file must be named in it with its checksum, and every
file it names must be there. Of several full lists of the same name (`20261119_blacklist.zip`,
`20261120_blacklist.zip`) the newest date wins. Anything wrong (a checksum, a zip, a column,
a row) refuses the whole sync with the file, line and field: the store is left untouched and
the snapshot in force keeps serving. A sync whose files are byte-identical to those of the
snapshot in force publishes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from eir.lists import ListError
from eir.registry.entries import ListDelta, ListEntries
from eir.snapshot import SnapshotError, compile_snapshot
from eir.store import Store, StoreError

MANIFEST = "manifest.json"
LIST_SUFFIXES = (".csv", ".zip", ".txt")
_DATE_PREFIX = re.compile(r"^(\d{8}(?:_\d{6})?)_(.+)$")


class SyncError(Exception):
    """The sync was refused; the store is untouched. The message says what and where."""


@dataclass
class SyncResult:
    version: str  # the version in force after the sync
    published: bool  # False: the source held nothing new
    sources: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # files not applied, with why


def sync(source: str, store: Store) -> SyncResult:
    # Imported here: pyarrow loads only when a sync runs; serving never pays for it.
    from eir.registry.formats import parse_path

    if "://" in source:
        raise SyncError(f"{source}: only drop directories are supported so far, not URLs")
    directory = Path(source)
    if not directory.is_dir():
        raise SyncError(f"{directory}: not a directory")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix.lower() in LIST_SUFFIXES)
    if not files:
        raise SyncError(f"{directory}: holds no list files (*.csv, *.zip)")
    digests = {path.name: _sha256(path) for path in files}
    manifest = directory / MANIFEST
    if manifest.exists():
        _verify_manifest(manifest, digests)

    chosen, ignored = _newest_per_list(files)
    lists: list[ListEntries] = []
    tac_names: dict[int, str] = {}
    sources = []
    problems: list[str] = []
    for path in chosen:
        try:
            parsed = parse_path(path, display_name=path.name)
        except ListError as exc:
            problems.extend(exc.problems)
            continue
        if isinstance(parsed, ListDelta):
            ignored.append(f"{path.name}: delta files are not applied yet; "
                           "the full list is used")
            continue
        if isinstance(parsed, dict):
            tac_names.update(parsed)
            sources.append({"name": path.name, "sha256": digests[path.name], "kind": "tac",
                            "rows": len(parsed)})
            continue
        lists.append(parsed)
        sources.append({"name": path.name, "sha256": digests[path.name], "kind": "list",
                        "rows": parsed.rows})
    if problems:
        raise SyncError(str(ListError(problems)))

    with store.locked():
        current = store.current_version()
        if current is not None:
            try:
                in_force = store.open_current().info
            except StoreError:
                in_force = None
            if in_force is not None and _same_files(in_force.sources, sources):
                return SyncResult(current, False, sources, in_force.counts, ignored)
        version = store.next_version()
        try:
            data = compile_snapshot(lists, version, tac_names, sources)
        except SnapshotError as exc:
            raise SyncError(str(exc)) from None
        store.publish(data, version)
    snapshot_info = store.open_current().info
    return SyncResult(version, True, sources, snapshot_info.counts, ignored)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_manifest(manifest: Path, digests: dict[str, str]) -> None:
    try:
        document = json.loads(manifest.read_text(encoding="utf-8"))
        expected = document["files"]
        if not isinstance(expected, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SyncError(f"{manifest}: unreadable manifest: {exc}") from None
    problems = []
    for name, digest in sorted(expected.items()):
        if name not in digests:
            problems.append(f"{manifest}: files.{name}: listed but not in the directory")
        elif str(digest).lower() != digests[name]:
            problems.append(f"{manifest.parent / name}: sha256: {digests[name]} does not match "
                            f"the manifest's {digest}")
    for name in sorted(set(digests) - set(expected)):
        problems.append(f"{manifest.parent / name}: manifest: not listed in {MANIFEST}")
    if problems:
        raise SyncError("\n".join(problems))


def _newest_per_list(files: list[Path]) -> tuple[list[Path], list[str]]:
    """Of dated files with the same list name, the newest; undated files all count."""
    newest: dict[str, tuple[str, Path]] = {}
    chosen, ignored = [], []
    for path in files:
        stem = path.name.rsplit(".", 1)[0]
        match = _DATE_PREFIX.match(stem)
        if not match or "_delta_" in stem:
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


def _same_files(old: list[dict], new: list[dict]) -> bool:
    def key(sources):
        return sorted((s.get("name"), s.get("sha256")) for s in sources)
    return key(old) == key(new)
