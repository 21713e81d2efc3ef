"""Wire helpers for tests that talk to a real `eir serve` over sockets.

Nothing here imports `eir`: requests are encoded and answers decoded by scapy's Diameter layer
(scapy.contrib.diameter), so the bytes on both sides come from an encoder nobody on this
project wrote.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)  # silence AVP name look-up chatter

from scapy.all import raw  # noqa: E402
from scapy.contrib.diameter import AVP, DiamG  # noqa: E402

S13_APPLICATION = 16777252
VENDOR_3GPP = 10415
ME_IDENTITY_CHECK = 324
FLAG_REQUEST, FLAG_PROXIABLE, FLAG_ERROR = 0x80, 0x40, 0x20
AVP_FLAG_VENDOR = 0x80

PEER_HOST, PEER_REALM = "mme.test", "test"
DEFAULT_IMEI = "35209900176148"
DEFAULT_IMSI = "001010123456789"


class ConnectionClosed(AssertionError):
    """The server closed the connection where a message was expected."""


# -- socket framing ---------------------------------------------------------------------------

def _recv_exactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"got {len(chunks)} of {count} bytes before the timeout")
        sock.settimeout(remaining)
        chunk = sock.recv(count - len(chunks))
        if not chunk:
            raise ConnectionClosed(f"connection closed after {len(chunks)} of {count} bytes")
        chunks += chunk
    return bytes(chunks)


def read_message(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One whole Diameter message (framed by its header's length field)."""
    deadline = time.monotonic() + timeout
    head = _recv_exactly(sock, 4, deadline)
    length = int.from_bytes(head[1:4], "big")
    assert length >= 20, f"answer declares length {length}"
    return head + _recv_exactly(sock, length - 4, deadline)


def assert_closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Wait until the server closes the connection; return whatever it sent before."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"connection still open after {timeout}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received)
        except socket.timeout:
            continue
        if not chunk:
            return bytes(received)
        received += chunk


# -- requests, encoded by scapy ---------------------------------------------------------------

def origin_avps(host: str = PEER_HOST, realm: str = PEER_REALM) -> list:
    return [AVP("Origin-Host", val=host), AVP("Origin-Realm", val=realm)]


def cer(hop_by_hop: int = 1, end_to_end: int = 1, host: str = PEER_HOST,
        realm: str = PEER_REALM) -> bytes:
    """A valid Capabilities-Exchange-Request advertising S13."""
    avps = origin_avps(host, realm) + [
        AVP("Host-IP-Address", val="127.0.0.1"),
        AVP("Vendor-Id", val=0),
        AVP("Product-Name", val="scapy MME"),
        AVP("Supported-Vendor-Id", val=VENDOR_3GPP),
        AVP("Auth-Application-Id", val=S13_APPLICATION),
        AVP("Vendor-Specific-Application-Id", val=[
            AVP("Vendor-Id", val=VENDOR_3GPP), AVP("Auth-Application-Id", val=S13_APPLICATION)]),
    ]
    return raw(DiamG(drFlags=FLAG_REQUEST, drCode=257, drAppId=0, drHbHId=hop_by_hop,
                     drEtEId=end_to_end, avpList=avps))


def terminal_information(imei: str | None = DEFAULT_IMEI,
                         software_version: str | None = "23"):
    children = []
    if imei is not None:
        children.append(AVP("IMEI", val=imei))
    if software_version is not None:
        children.append(AVP("Software-Version", val=software_version))
    return AVP("Terminal-Information", val=children)


def ecr_avps(imei: str | None = DEFAULT_IMEI, imsi: str | None = DEFAULT_IMSI,
             software_version: str | None = "23", session_id: str = "mme.test;1;1",
             replace: dict | None = None, extra: tuple = ()) -> list:
    """The AVPs of a valid ECR, in grammar order. `replace` maps an AVP name to the AVPs that
    stand in its place (a list, [] to omit it); `extra` is appended at the end."""
    slots = {
        "Session-Id": [AVP("Session-Id", val=session_id)],
        "Auth-Session-State": [AVP("Auth-Session-State", val=1)],
        "Origin-Host": [AVP("Origin-Host", val=PEER_HOST)],
        "Origin-Realm": [AVP("Origin-Realm", val=PEER_REALM)],
        "Destination-Realm": [AVP("Destination-Realm", val="localdomain")],
        "Terminal-Information": [terminal_information(imei, software_version)],
        "User-Name": [AVP("User-Name", val=imsi)] if imsi is not None else [],
    }
    for name, avps in (replace or {}).items():
        assert name in slots, name
        slots[name] = list(avps)
    return [avp for avps in slots.values() for avp in avps] + list(extra)


def ecr(imei: str | None = DEFAULT_IMEI, imsi: str | None = DEFAULT_IMSI,
        software_version: str | None = "23", session_id: str = "mme.test;1;1",
        hop_by_hop: int = 2, end_to_end: int = 2, flags: int = FLAG_REQUEST | FLAG_PROXIABLE,
        code: int = ME_IDENTITY_CHECK, application: int = S13_APPLICATION,
        avps: list | None = None) -> bytes:
    """An ME-Identity-Check-Request; every header field and the AVP list can be overridden."""
    if avps is None:
        avps = ecr_avps(imei, imsi, software_version, session_id)
    return raw(DiamG(drFlags=flags, drCode=code, drAppId=application, drHbHId=hop_by_hop,
                     drEtEId=end_to_end, avpList=avps))


def open_peer(address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """Connect and complete CER/CEA (asserting 2001); the caller closes the socket."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.sendall(cer())
        answer = parse_answer(read_message(sock, timeout))
        assert (answer.code, answer.result_code) == (257, 2001), answer
    except BaseException:
        sock.close()
        raise
    return sock


# -- answers, decoded by scapy ----------------------------------------------------------------

@dataclass(frozen=True)
class WireAvp:
    """An AVP as scapy dissected it: `value` is the payload bytes, or children if grouped."""

    code: int
    vendor: int
    flags: int
    value: bytes | tuple["WireAvp", ...]
    raw: bytes  # header + payload + padding, as on the wire


def _wire_avp(avp) -> WireAvp:
    flags = int(avp.avpFlags)
    vendor = int(avp.avpVnd) if flags & AVP_FLAG_VENDOR else 0
    encoded = raw(avp)
    if isinstance(avp.val, list):
        value = tuple(_wire_avp(child) for child in avp.val)
    else:
        value = encoded[12 if vendor else 8:int(avp.avpLen)]
    return WireAvp(int(avp.avpCode), vendor, flags, value, encoded)


@dataclass
class Answer:
    flags: int
    code: int
    application: int
    hop_by_hop: int
    end_to_end: int
    avps: list[WireAvp] = field(default_factory=list)

    @property
    def error_bit(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FLAG_REQUEST)

    def all(self, code: int, vendor: int = 0) -> list[WireAvp]:
        return [a for a in self.avps if (a.code, a.vendor) == (code, vendor)]

    def _u32(self, code: int, vendor: int = 0) -> int | None:
        found = self.all(code, vendor)
        assert len(found) <= 1, f"AVP {code} occurs {len(found)} times"
        return int.from_bytes(found[0].value, "big") if found else None

    @property
    def session_id(self) -> str | None:
        found = self.all(263)
        return found[0].value.decode() if found else None

    @property
    def result_code(self) -> int | None:
        return self._u32(268)

    @property
    def equipment_status(self) -> int | None:
        return self._u32(1445, VENDOR_3GPP)

    @property
    def experimental_result(self) -> tuple[int, int] | None:
        """(Vendor-Id, Experimental-Result-Code), or None."""
        found = self.all(297)
        if not found:
            return None
        children = {(c.code, c.vendor): int.from_bytes(c.value, "big") for c in found[0].value}
        return children.get((266, 0)), children.get((298, 0))

    @property
    def experimental_result_code(self) -> int | None:
        result = self.experimental_result
        return result[1] if result else None

    @property
    def failed_avps(self) -> list[WireAvp]:
        """The AVPs inside every Failed-AVP, in order."""
        return [child for failed in self.all(279) for child in failed.value]


def parse_answer(data: bytes) -> Answer:
    """Dissect one Diameter message with scapy."""
    message = DiamG(data)
    assert int(message.drLen) == len(data), (message.drLen, len(data))
    return Answer(int(message.drFlags), int(message.drCode), int(message.drAppId),
                  int(message.drHbHId), int(message.drEtEId),
                  [_wire_avp(avp) for avp in message.avpList])


def check_all(address: tuple[str, int], pairs) -> list[Answer]:
    """One ECR per (imei, imsi) on one new connection, one at a time; the parsed answers."""
    sock = open_peer(address)
    try:
        answers = []
        for number, (imei, imsi) in enumerate(pairs, 10):
            sock.sendall(ecr(imei, imsi, session_id=f"mme.test;1;{number}",
                             hop_by_hop=number, end_to_end=number))
            answers.append(parse_answer(read_message(sock)))
        return answers
    finally:
        sock.close()

