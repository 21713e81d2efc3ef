"""The local rules: a native CSV list (eir.lists.native) that the console edits, row by row.

The file is `console.local_list`, one of `lists.files`; or, when the lists come from a snapshot
store, a file that eir.lists.sync.publish_local compiles into the store as one more list
beside the registry's (`publish`: a new version; syncs keep it, a rollback goes back to the
local rules of the version it puts back). A change is made on a copy of the
file's rows, written to a temporary file beside it and validated there by
eir.lists.read_native_csv, the function every list file is read with (`eir check`, `eir
serve`, a reload): a change the CLI would refuse is refused with the same `line: field:
problem`, and the file is not touched. A valid copy replaces the file atomically (rename),
and the caller then reloads the lists as POST /v1/lists/reload does.

Rows are kept as the file has them, comment lines (`#...`) included, so that an operator's
notes survive the console's edits; the file is written back with the full header
`imei,status,imsi,reason`. A row is named by its index among the rows and its content
(`RuleRow.tag`): an edit or delete of a row someone changed meanwhile is refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from eir.lists.native import COLUMNS, ListError, read_native_csv
from eir.lists.store import Store
from eir.lists.sync import LOCAL_LIST, publish_local


class RuleEditError(Exception):
    """The change is refused; `problems` says why (validation errors, or a stale row)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class StaleRuleError(RuleEditError):
    """The row to change is not what the person saw: changed or removed meanwhile."""


@dataclass(frozen=True)
class RuleRow:
    index: int  # among the file's rows (the header is not one)
    imei: str
    status: str
    imsi: str
    reason: str

    @property
    def cells(self) -> dict[str, str]:
        return {"imei": self.imei, "status": self.status, "imsi": self.imsi,
                "reason": self.reason}

    @property
    def tag(self) -> str:
        """Names this row's content: an edit must name what it edits."""
        text = "\0".join((self.imei, self.status, self.imsi, self.reason))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def matches(self, query: str) -> bool:
        query = query.casefold()
        return any(query in cell.casefold() for cell in self.cells.values())


class LocalList:
    def __init__(self, path: Path, store: Store | None = None):
        self.path = Path(path)
        self.store = store  # None: the file is one of lists.files, read by every reload

    def publish(self, by: str) -> None:
        """Put the file in force before the reload: with a store, as a new version of it
        (ListError, SyncError, StoreError when refused); without, the reload reads it."""
        if self.store is not None:
            publish_local(self.store, self.path, by)

    def differs_from(self, sources: list[dict]) -> bool:
        """With a store: the file is not what the version in force holds as its local
        rules (`sources`: its snapshot's), e.g. after a rollback or a hand edit."""
        if self.store is None:
            return False
        in_force = [source.get("sha256") for source in sources
                    if source.get("list") == LOCAL_LIST]
        if not in_force:  # none published yet: the same as a file of no rules
            return bool(self.rules())
        content = self.snapshot()
        return content is None or in_force != [hashlib.sha256(content).hexdigest()]

    def _read(self) -> list[list[str] | RuleRow]:
        """The file's rows after the header: comment rows as their cells, rules as RuleRow."""
        try:
            text = self.path.read_bytes().decode("utf-8-sig")
        except FileNotFoundError:
            return []
        rows: list[list[str] | RuleRow] = []
        header = None
        for cells in csv.reader(io.StringIO(text, newline="")):
            if not cells or not "".join(cells).strip():
                continue
            if cells[0].lstrip().startswith("#"):
                rows.append(cells)
            elif header is None:
                header = [cell.strip().lower() for cell in cells]
            else:
                named = dict(zip(header, (cell.strip() for cell in cells)))
                rows.append(RuleRow(len(rows), *(named.get(column, "")
                                                 for column in COLUMNS)))
        return rows

    def rules(self, query: str = "") -> list[RuleRow]:
        return [row for row in self._read()
                if isinstance(row, RuleRow) and (not query or row.matches(query))]

    def find(self, index: int, tag: str) -> RuleRow:
        for row in self.rules():
            if row.index == index and row.tag == tag:
                return row
        raise StaleRuleError([f"rule {index} was changed or removed meanwhile: reload the "
                             "page and try again"])

    def change(self, index: int | None, tag: str | None,
               cells: dict[str, str] | None) -> tuple[RuleRow | None, RuleRow | None]:
        """Add (`index` None), replace (`cells` given) or delete (`cells` None) one rule;
        (before, after). RuleEditError when the result would not load: the file is then
        untouched."""
        rows = self._read()
        before = None
        if index is not None:
            before = self.find(index, tag or "")
        after = None
        if cells is not None:
            after = RuleRow(len(rows) if before is None else before.index,
                            *(cells.get(column, "").strip() for column in COLUMNS))
        if before is None:
            rows.append(after)
        elif after is None:
            del rows[before.index]
        else:
            rows[before.index] = after
        self._replace(rows)
        return before, after

    def _replace(self, rows: list) -> None:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([row.cells[c] for c in COLUMNS] if isinstance(row, RuleRow)
                            else row)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.console.tmp")
        try:
            temporary.write_text(out.getvalue(), encoding="utf-8")
            try:
                read_native_csv(temporary, display_name=self.path.name)
            except ListError as exc:
                raise RuleEditError(exc.problems) from None
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)

    def snapshot(self) -> bytes | None:
        """The file's bytes (to put back if the reload after a change is refused)."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def restore(self, content: bytes | None) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.console.tmp")
        temporary.write_bytes(content or b"")
        os.replace(temporary, self.path)
