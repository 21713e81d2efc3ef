"""The S13 application (3GPP TS 29.272 §5.2.4): ME-Identity-Check-Request in, answer out.

Everything the answer holds but the Session-Id and the verdict is the same for every request,
so answers are built from pre-encoded templates: one per verdict.

The fast path: when eir.lists._lookup is built and `diameter.fast_path` is on, `answer_run`
answers runs of plain ECRs in one C call (eir/lists/_ecr.c: framing checks, validation, the
decision, the answer from these templates) and hands every other request back to the generic
path (eir.diameter.peer calls it); what the generic path does per verdict (observe, count,
audit: EquipmentCheck.record_all) is done here for the run, in one loop.
"""

from __future__ import annotations

from eir.check.service import EquipmentCheck
from eir.core.decision import EquipmentStatus, today
from eir.core.imei import ImeiError, is_imsi, normalise_imei
from eir.diameter.codec import Avp, Header, encode_avp, encode_message
from eir.diameter.constants import (
    APPLICATION_S13,
    AVP_FLAG_MANDATORY,
    FLAG_PROXIABLE,
    VENDOR_3GPP,
    ExperimentalResultCode,
    ResultCode,
)
from eir.diameter.dictionary import AvpError, AvpIndex, CommandDef, Dictionary
from eir.diameter.peer import AnswerBuilder, LocalIdentity

try:
    from eir.lists._lookup import answer_ecrs
except ImportError:  # the optional C extension is not built: the generic path answers all
    answer_ecrs = None

NO_STATE_MAINTAINED = 1
INTERFACE = "s13"  # the audit records' `interface`
# A verdict's name as PeerConnection.answered counts it (Verdict.status_name, without the
# cost of an Enum's `name` on the hot path).
OUTCOMES: dict[EquipmentStatus | None, str] = {status: status.name for status in EquipmentStatus}
OUTCOMES[None] = "UNKNOWN"


class S13Application:
    application_id = APPLICATION_S13
    vendor_id = VENDOR_3GPP

    def __init__(self, dictionary: Dictionary, local: LocalIdentity, check: EquipmentCheck,
                 counters=None, audit=None, fast_path: bool = True):
        self.dictionary = dictionary
        # The rule set in force and the observation log (shared with N5g-eir).
        self.check = check
        # None, or eir.interfaces.metrics.DiameterCounters: verdicts counted by status (a
        # dict bump).
        self.verdict_counts = counters.verdicts if counters is not None else None
        # None, or eir.core.logs.AuditLog: verdicts handed to its writer thread.
        self.audit = audit
        self.answers = AnswerBuilder(dictionary, local, counters)
        encode = dictionary.encode
        self._terminal_information = dictionary["Terminal-Information"]
        # Vendor-Specific-Application-Id and Auth-Session-State: in every ECA, errors too.
        self._common = encode("Vendor-Specific-Application-Id", [
            encode("Vendor-Id", VENDOR_3GPP),
            encode("Auth-Application-Id", APPLICATION_S13)]) + encode(
            "Auth-Session-State", NO_STATE_MAINTAINED)
        success = encode("Result-Code", int(ResultCode.SUCCESS))
        self._templates = {
            status: self._common + success + self.answers.origin + encode(
                "Equipment-Status", int(status))
            for status in EquipmentStatus}
        self._templates[None] = self._common + encode("Experimental-Result", [
            encode("Vendor-Id", VENDOR_3GPP),
            encode("Experimental-Result-Code",
                   int(ExperimentalResultCode.ERROR_EQUIPMENT_UNKNOWN))]) + self.answers.origin
        # The C fast path's templates, by status value, then None (5422).
        self._fast_templates = tuple(self._templates[status] for status in (*EquipmentStatus,
                                                                              None))
        # None: every request takes the generic path (diameter.fast_path off, or no C).
        self.answer_run = self._answer_run if fast_path and answer_ecrs is not None else None
        self.answer_outcomes = OUTCOMES  # how PeerConnection counts the fast path's verdicts
        self.fast_answers = 0  # requests the fast path answered

    def _answer_run(self, messages: list[bytes], start: int, end: int, max_avps: int,
                    answers: bool) -> tuple[bytes, int, list]:
        """Answer messages[start:stop] in C, `stop` being the first one the fast path does not
        take (or `end`): (answers, stop, records), a record per answer (IMEI, IMSI, verdict,
        Origin-Host, and the answer bytes when `answers`, else None); see eir/lists/_ecr.c.
        The verdicts are observed, counted and audited here, as check.run does."""
        check = self.check
        rule_set = check.rule_set
        day = today()
        out, stop, records = answer_ecrs(
            messages, start, end, max_avps, self._fast_templates,
            getattr(getattr(rule_set, "snapshot", None), "hot_lookup", None), rule_set.decide,
            day, answers)
        if records:
            self.fast_answers += len(records)
            check.record_all(day, records, rule_set, self.verdict_counts, self.audit, INTERFACE)
        return out, stop, records

    def handle_request(self, header: Header, command: CommandDef,
                       avps: AvpIndex) -> tuple[bytes, str]:
        session_id = avps["Session-Id"][0]
        terminal = avps.groups["Terminal-Information"][0]
        imei_avp = terminal.get("IMEI")
        if imei_avp is None:
            # The grammar makes IMEI optional (3GPP2-MEID may stand instead), but we decide
            # on IMEIs only.
            raise AvpError(ResultCode.MISSING_AVP, self._wrap_terminal(
                self.dictionary["IMEI"].empty_instance()), "Terminal-Information: IMEI is missing")
        imei_avp = imei_avp[0]
        try:
            imei = normalise_imei(imei_avp.data.decode())
        except ImeiError as exc:
            raise AvpError(ResultCode.INVALID_AVP_VALUE, self._wrap_terminal(imei_avp.encode()),
                           f"Terminal-Information: IMEI: {exc}") from None
        user_name = avps.get("User-Name")
        imsi = None
        if user_name:
            imsi = user_name[0].data.decode()
            if not is_imsi(imsi):
                raise AvpError(ResultCode.INVALID_AVP_VALUE, user_name[0].encode(),
                               f"User-Name: {imsi[:20]!r} is not an IMSI (5 to 15 digits)")
        verdict = self.check.run(imei, imsi, avps["Origin-Host"][0].data, self.verdict_counts,
                                 self.audit, INTERFACE)
        body = encode_avp(263, AVP_FLAG_MANDATORY, 0, session_id.data) + self._templates[
            verdict.status]
        proxy_info = avps.get("Proxy-Info")
        if proxy_info:
            body += b"".join(avp.encode() for avp in proxy_info)
        return encode_message(header.flags & FLAG_PROXIABLE, header.code, header.application,
                              header.hop_by_hop, header.end_to_end, body), OUTCOMES[
            verdict.status]

    def error_answer(self, header: Header, session_id: Avp | None, error: AvpError) -> bytes:
        return self.answers.error(header, session_id, error.result_code, error.failed_avp,
                                  error.text, extra=self._common)

    def _wrap_terminal(self, child: bytes) -> bytes:
        t = self._terminal_information
        return encode_avp(t.code, t.flags, t.vendor, child)
