"""The S13 application (3GPP TS 29.272 §5.2.4): ME-Identity-Check-Request in, answer out.

Everything the answer holds but the Session-Id and the verdict is the same for every request,
so answers are built from pre-encoded templates: one per verdict.
"""

from __future__ import annotations

from eir.check.service import EquipmentCheck
from eir.core.decision import EquipmentStatus
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
                 counters=None, audit=None):
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
