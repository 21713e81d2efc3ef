"""The registry's manifest, `manifest.json`: what a publication holds, and where it stands in
the registry's sequence of publications.

    {"sequence": 42,                          an integer, larger at every publication
     "published": "2026-12-06T04:00:00Z",     when the registry made it (RFC 3339, with zone)
     "files": {"20261206_blacklist.zip": "<sha256 hex>", ...}}

A signature (`manifest.json.sig`, eir.lists.sync) covers these exact bytes, so the sequence and
the time are as authentic as the checksums: an old signed manifest served again is still
sequence 41, and a sync refuses it once 42 is in force (eir.lists.sync). `sequence` and `published`
are required when the manifest is signed; either present requires the other.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass

MAX_SEQUENCE = (1 << 63) - 1  # fits every registry's counter, and SQL's BIGINT


class ManifestError(ValueError):
    """The manifest cannot be read; the message names it and every problem."""


@dataclass(frozen=True)
class Manifest:
    files: dict[str, str]  # name: sha256 hex (lower case)
    sequence: int | None
    published: str | None  # normalised to UTC, "YYYY-MM-DDTHH:MM:SSZ"
    sha256: str  # of the manifest's bytes: which manifest, exactly

    def provenance(self, signer: str | None) -> dict:
        """What a snapshot records of the manifest it was compiled from (eir lists status)."""
        return {"sequence": self.sequence, "published": self.published,
                "sha256": self.sha256, "signer": signer}


def parse_manifest(data: bytes, where: str) -> Manifest:
    """The manifest in `data`; ManifestError (every problem, `where: field: problem`)."""
    try:
        document = json.loads(data.decode("utf-8"))
        files = document["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{where}: unreadable manifest: {exc}") from None
    problems = []
    sequence = document.get("sequence")
    published = document.get("published")
    if sequence is not None and (isinstance(sequence, bool) or not isinstance(sequence, int)
                                 or not 0 <= sequence <= MAX_SEQUENCE):
        problems.append(f"{where}: sequence: {_shown(sequence)} is not an integer from 0 to "
                        f"{MAX_SEQUENCE}")
    if published is not None:
        try:
            published = _utc(published)
        except ValueError as exc:
            problems.append(f"{where}: published: {exc}")
    if (sequence is None) != (document.get("published") is None):
        missing = "sequence" if sequence is None else "published"
        problems.append(f"{where}: {missing}: missing (sequence and published go together)")
    if problems:
        raise ManifestError("\n".join(problems))
    return Manifest({name: str(digest).lower() if isinstance(digest, str) else digest
                     for name, digest in files.items()},
                    sequence, published, hashlib.sha256(data).hexdigest())


def _utc(value) -> str:
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError(f"{_shown(value)} is not an RFC 3339 time")
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{_shown(value)} is not an RFC 3339 time "
                         "(e.g. 2026-12-06T04:00:00Z)") from None
    if moment.tzinfo is None:
        raise ValueError(f"{_shown(value)} has no time zone (e.g. 2026-12-06T04:00:00Z)")
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 64 else f"{text[:60]}...({len(text)} characters)"
