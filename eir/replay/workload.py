"""What the harness sends: ECR templates and the order and pace in which they go out.

Three sources: an IMEI/IMSI CSV (`--mix`), a generated mix of verdict classes drawn from the
lists the target serves (`--generate white=60,black=20,...`), or the ECRs of a capture
(`--pcap`, see eir.replay.pcap). Request number i (counted over the whole run, all
connections and processes) uses template `order[i % len(order)]`; a capture is replayed once,
in capture order.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from eir.core.decision import EquipmentStatus, RuleSet, UnknownPolicy
from eir.core.imei import luhn_check_digit
from eir.lists.native import (
    ListError,
    imei_and_imsi,
    load_rule_set,
    read_imei_table,
    read_native_csv,
)
from eir.replay.messages import EcrTemplate, Identity, Verdict, ecr_template

GENERATED_SEQUENCE = 1000  # distinct requests of a generated mix; shares exact per 1000
CLASSES = ("white", "black", "grey", "unknown", "invalid")
DEFAULT_MIX = "white=60,black=20,grey=10,unknown=5,invalid=5"
INVALID_AVP_VALUE = 5004  # what an EIR answers an IMEI of the invalid class
_STATUS_OF_CLASS = {"white": EquipmentStatus.WHITELISTED, "black": EquipmentStatus.BLACKLISTED,
                    "grey": EquipmentStatus.GREYLISTED, "unknown": None}


class WorkloadError(Exception):
    """The workload cannot be built; the message names file, line and field."""


@dataclass
class Workload:
    """Templates and the order they are sent in.

    `subjects[t]` is the (IMEI, IMSI) of template t, for reports; `captured[t]` the verdict
    the capture recorded for it (pcap replay only); `offsets[t]` its send time in the
    capture, in seconds from the first ECR (pcap replay only)."""

    mode: str  # "csv", "generated" or "pcap"
    description: str
    templates: list[EcrTemplate]
    subjects: list[tuple[str | None, str | None]]
    order: list[int]
    cyclic: bool = True  # False: each position once (a capture)
    captured: list[Verdict | None] | None = None
    offsets: list[float] | None = None
    # The error Result-Code a template is meant to provoke (a generated mix's invalid IMEIs:
    # 5004), None for the others; such answers are counted apart from real errors.
    expected_errors: list[int | None] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def natural_count(self) -> int:
        """One pass: each row of the mix, each ECR of the capture, once."""
        return len(self.order)


# -- CSV mix ----------------------------------------------------------------------------------

def read_mix(path: Path, identity: Identity) -> Workload:
    """A CSV with an `imei` column and an optional `imsi` column (other columns, such as a
    native list's `status` and `reason`, are ignored). Blank lines and `#` lines are skipped.
    Every bad row is reported as `file:line: field: problem`."""
    try:
        header, table = read_imei_table(path, "imei,imsi")
    except ListError as exc:
        raise WorkloadError(str(exc)) from None
    if "imei" not in header:
        raise WorkloadError(f"{path}: header: no imei column (expected imei,imsi)")
    problems: list[str] = []
    rows: list[tuple[str, str | None]] = []
    for where, cells in table:
        imei, imsi, row_problems = imei_and_imsi(where, cells)
        problems += row_problems
        if not row_problems:
            rows.append((imei, imsi))
    if problems:
        raise WorkloadError(str(ListError(problems)))
    if not rows:
        raise WorkloadError(f"{path}: no rows after the header")
    templates = [ecr_template(identity, imei, imsi) for imei, imsi in rows]
    return Workload("csv", f"{len(rows):,} IMEI/IMSI rows from {path}", templates, rows,
                    list(range(len(rows))))


# -- generated mix ----------------------------------------------------------------------------

def parse_mix(text: str) -> dict[str, float]:
    """`white=60,black=20,grey=10,unknown=5,invalid=5` → shares (classes left out: 0)."""
    shares: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in CLASSES:
            raise WorkloadError(f"--generate: {part.strip()!r}: expected CLASS=SHARE with CLASS "
                                f"one of {', '.join(CLASSES)}")
        if key in shares:
            raise WorkloadError(f"--generate: {key} given twice")
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not share >= 0:
            raise WorkloadError(f"--generate: {key}: {value.strip()!r} is not a share "
                                "(a number >= 0)")
        shares[key] = share
    if sum(shares.values()) <= 0:
        raise WorkloadError("--generate: the shares add up to 0")
    return {key: share for key, share in shares.items() if share > 0}


def generate_mix(text: str, lists: list[Path], identity: Identity,
                 seed: int = 1) -> Workload:
    """A deterministic sequence of GENERATED_SEQUENCE requests whose classes follow the shares,
    evenly interleaved. white/black/grey IMEIs are drawn from the list files (the lists the
    target serves) and each is checked with our decision engine to get that verdict there;
    unknown IMEIs match no rule; invalid IMEIs are not digits (the EIR answers 5004)."""
    shares = parse_mix(text)
    rng = random.Random(seed)
    pools = _pools(shares, lists, rng)
    sequence = _interleave(shares, GENERATED_SEQUENCE)
    cursor = dict.fromkeys(shares, 0)
    subjects: list[tuple[str | None, str | None]] = []
    for cls in sequence:
        pool = pools[cls]
        subjects.append(pool[cursor[cls] % len(pool)])
        cursor[cls] += 1
    templates = [ecr_template(identity, imei, imsi) for imei, imsi in subjects]
    described = ", ".join(f"{cls} {share:g}" for cls, share in shares.items())
    names = ", ".join(str(path) for path in lists)
    return Workload("generated", f"generated mix ({described}) from {names}", templates,
                    subjects, list(range(len(templates))),
                    expected_errors=[INVALID_AVP_VALUE if cls == "invalid" else None
                                     for cls in sequence])


def _interleave(shares: dict[str, float], length: int) -> list[str]:
    """Classes in an order where every prefix is as close to the shares as it can be."""
    total = sum(shares.values())
    assigned = dict.fromkeys(shares, 0)
    sequence = []
    for position in range(1, length + 1):
        cls = max(shares, key=lambda c: shares[c] / total * position - assigned[c])
        assigned[cls] += 1
        sequence.append(cls)
    return sequence


MAX_RULES_SAMPLED = 20_000
PER_RULE = 32  # IMEIs drawn from one range or TAC
POOL_SIZE = GENERATED_SEQUENCE


def _pools(shares: dict[str, float], lists: list[Path],
           rng: random.Random) -> dict[str, list[tuple[str, str | None]]]:
    wanted = set(shares)
    pools: dict[str, list[tuple[str, str | None]]] = {cls: [] for cls in wanted}
    needs_lists = wanted & {"white", "black", "grey", "unknown"}
    if needs_lists:
        if not lists:
            raise WorkloadError("--generate: give the lists the target serves with --list FILE")
        rule_set, candidates = _candidates_of(lists, rng)
        wanted_status = {_STATUS_OF_CLASS[cls]: cls for cls in wanted if cls != "invalid"
                         and cls != "unknown"}
        for found in candidates:
            for imei14, imsi in found:
                imsi = imsi or _random_imsi(rng)
                status = rule_set.decide(imei14, imsi).status
                cls = wanted_status.get(status) if status is not None else None
                if cls is not None and len(pools[cls]) < POOL_SIZE:
                    pools[cls].append((imei14 + luhn_check_digit(imei14), imsi))
        if "unknown" in wanted:
            for _ in range(POOL_SIZE * 20):
                imei14 = f"{rng.randrange(10 ** 14):014d}"
                imsi = _random_imsi(rng)
                if rule_set.decide(imei14, imsi).status is None:
                    pools["unknown"].append((imei14 + luhn_check_digit(imei14), imsi))
                    if len(pools["unknown"]) >= POOL_SIZE:
                        break
    if "invalid" in wanted:
        # Letters where digits belong: the EIR must answer 5004 DIAMETER_INVALID_AVP_VALUE.
        pools["invalid"] = [(f"{rng.randrange(10 ** 8):08d}INVALID", _random_imsi(rng))
                            for _ in range(16)]
    empty = [cls for cls in wanted if not pools[cls]]
    if empty:
        names = ", ".join(str(path) for path in lists)
        raise WorkloadError(f"--generate: no {' or '.join(empty)} IMEI can be drawn from "
                            f"{names}: give other shares or other --list files")
    for pool in pools.values():
        rng.shuffle(pool)
    return pools


def _candidates_of(lists: list[Path], rng: random.Random):
    """(rule set, candidate (IMEI, IMSI) groups) of the lists the target serves: native list
    files, or one directory: a snapshot store (its version in force) or a registry drop
    directory (DIRBS files, compiled as `eir sync` would, into a scratch store)."""
    directories = [path for path in lists if path.is_dir()]
    if not directories:
        try:
            rules = [rule for path in lists for rule in read_native_csv(path)]
            rule_set = load_rule_set(lists, UnknownPolicy.UNKNOWN)
        except ListError as exc:
            raise WorkloadError(f"--list:\n{exc}") from None
        if len(rules) > MAX_RULES_SAMPLED:
            rules = rng.sample(rules, MAX_RULES_SAMPLED)
        return rule_set, (_candidates(rule, rng) for rule in rules)
    if len(lists) > 1:
        raise WorkloadError(f"--list {directories[0]}: a store or drop directory is the whole "
                            "list the target serves: give it alone")
    snapshot = _snapshot_of(directories[0])
    return RuleSet(snapshot, UnknownPolicy.UNKNOWN), [
        snapshot.sample_subjects(rng, MAX_RULES_SAMPLED)]


def _snapshot_of(directory: Path):
    from eir.core.config import SyncSettings
    from eir.lists.store import Store, StoreError
    from eir.lists.sync import SyncError, sync_configured

    try:
        if Store(directory).current_version() is not None:
            return Store(directory).open_current()
        scratch = Path(tempfile.mkdtemp(prefix="eir-replay-"))
        try:
            store = Store(scratch / "store", keep=1)
            sync_configured(SyncSettings(source=str(directory)), store)
            return store.open_current()  # mapped: the files may go
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except (StoreError, SyncError) as exc:
        raise WorkloadError(f"--list {directory}: neither a store nor a drop directory that "
                            f"syncs: {exc}") from None


def _candidates(rule, rng: random.Random) -> list[tuple[str, str | None]]:
    imsi = rule.imsi or _random_imsi(rng)
    if rule.imei is not None:
        return [(rule.imei, imsi)]
    if rule.imei_range is not None:
        start, end = rule.imei_range
        return [(f"{rng.randint(start, end):014d}", rule.imsi or _random_imsi(rng))
                for _ in range(min(PER_RULE, end - start + 1))]
    return [(f"{rule.tac}{rng.randrange(10 ** 6):06d}", rule.imsi or _random_imsi(rng))
            for _ in range(PER_RULE)]


def _random_imsi(rng: random.Random) -> str:
    return f"00101{rng.randrange(10 ** 10):010d}"
