"""The equipment check both interfaces run (S13: eir.interfaces.s13, N5g-eir:
eir.interfaces.sbi): decide, observe, count, audit -- written once, so that the two cannot
drift apart. Hot path: one call per request, on the event loop."""

from __future__ import annotations

from eir.check.observations import RAT_EUTRAN
from eir.core.decision import RuleSet, Verdict, today


class EquipmentCheck:
    """The rule set in force and the observation log, shared by the interfaces of a server."""

    def __init__(self, rule_set: RuleSet, observations=None):
        # Swapped whole by the server on reload; a check reads it once, so it sees one
        # snapshot from start to end.
        self.rule_set = rule_set
        # None, or an eir.check.observations.ObservationLog: every decided check is recorded.
        self.observations = observations

    def run(self, imei: str, imsi: str | None, client: bytes, verdict_counts=None, audit=None,
            interface: str = "s13", rat: str = RAT_EUTRAN) -> Verdict:
        """The verdict on a normalised IMEI (with the IMSI if known), observed as seen through
        `rat` (eir.check.observations: RAT_EUTRAN for S13, RAT_NR for N5g-eir), counted in
        `verdict_counts` (a dict by status, or None) and handed to `audit` (None, or an
        eir.core.logs.AuditLog) as asked by `client` (Origin-Host, or User-Agent/address)."""
        rule_set = self.rule_set
        day = today()
        verdict = rule_set.decide(imei, imsi, day)
        observations = self.observations
        if observations is not None:
            observations.record(day, imei, imsi, rat)
        if verdict_counts is not None:
            verdict_counts[verdict.status] += 1
        if audit is not None:
            audit.record(client, imei, imsi, verdict, rule_set.version, interface)
        return verdict

    def record_all(self, day: int, records: list, rule_set: RuleSet, verdict_counts=None,
                   audit=None, interface: str = "s13", rat: str = RAT_EUTRAN) -> None:
        """What run() does after deciding, for verdicts decided elsewhere (the S13 fast path,
        eir.interfaces.s13): `records` holds (imei, imsi, verdict, client, ...) in the order
        they were decided on `day` by `rule_set`. Kept in step with run(): the fast path's
        differential tests compare observations, counters and audit."""
        observations = self.observations
        version = rule_set.version if audit is not None else None
        for imei, imsi, verdict, client, _ in records:
            if observations is not None:
                observations.record(day, imei, imsi, rat)
            if verdict_counts is not None:
                verdict_counts[verdict.status] += 1
            if audit is not None:
                audit.record(client, imei, imsi, verdict, version, interface)
