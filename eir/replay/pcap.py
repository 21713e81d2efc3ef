"""Captures: write the harness's traffic as a pcap, read the Diameter ECRs and ECAs of one.

Writing is done here with struct (classic pcap, LINKTYPE_RAW: IPv4/IPv6 packets) because it
runs while the load runs: building packets with scapy would cost tens of microseconds each.
Every connection becomes a TCP stream with its handshake, the bytes exactly as written and
read (several messages per segment when they went out together), and its FIN exchange. The
EIR's side is written with port 3868, Diameter's registered port, so that Wireshark and
tshark dissect it as Diameter with no "Decode As"; the addresses and the client ports are the
real ones.

Reading uses scapy (pcap and pcapng, any link type scapy knows): TCP streams are reassembled
by sequence number (segments out of order, retransmitted or overlapping; several messages per
segment, a message over several segments; a capture that starts in the middle of a stream is
resynchronised on the first plausible Diameter header), and SCTP DATA chunks are collected
(fragments joined, retransmitted TSNs dropped). Every ECR is then paired with its ECA by
hop-by-hop and end-to-end id on the same association, else by Session-Id.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from eir.diameter.codec import AvpLengthError, decode_avps, parse_header
from eir.diameter.constants import (
    APPLICATION_S13,
    COMMAND_ME_IDENTITY_CHECK,
    FLAG_REQUEST,
    FLAG_RETRANSMIT,
)
from eir.replay.messages import Verdict, ecr_fields, session_id_of, verdict_of

DIAMETER_PORT = 3868
LINKTYPE_RAW = 101
SNAPLEN = 262144
MAX_SEGMENT = 65495  # IPv4 total length 65535 - 20 (IP) - 20 (TCP)
_GLOBAL_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")
_PCAP_MAGIC = 0xA1B2C3D4
_TCP = struct.Struct("!HHIIBBHHH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
TCP_FIN, TCP_SYN, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x08, 0x10


# -- writing ----------------------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class PcapWriter:
    """A classic pcap file of raw IP packets, written as the run goes."""

    def __init__(self, path: str | Path):
        self.file = open(path, "wb")
        self.file.write(_GLOBAL_HEADER.pack(_PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW))
        self.ip_id = 0

    def flow(self, client: tuple, server: tuple) -> "TcpFlow":
        return TcpFlow(self, client, server)

    def packet(self, data: bytes, at_ns: int | None = None) -> None:
        at_ns = time.time_ns() if at_ns is None else at_ns
        seconds, nanoseconds = divmod(at_ns, 1_000_000_000)
        self.file.write(_RECORD_HEADER.pack(seconds, nanoseconds // 1000, len(data), len(data)))
        self.file.write(data)

    def close(self) -> None:
        self.file.close()


class TcpFlow:
    """One TCP connection as packets: handshake at creation, data, FIN exchange at close."""

    def __init__(self, writer: PcapWriter, client: tuple, server: tuple):
        self.writer = writer
        self.client_ip = ipaddress.ip_address(client[0])
        self.server_ip = ipaddress.ip_address(server[0])
        self.client_port, self.server_port = client[1], DIAMETER_PORT
        self.client_seq = 0x10000000 + self.client_port
        self.server_seq = 0x20000000 + self.client_port
        self._segment(True, TCP_SYN, b"")
        self.client_seq += 1
        self._segment(False, TCP_SYN | TCP_ACK, b"")
        self.server_seq += 1
        self._segment(True, TCP_ACK, b"")

    def client_sent(self, data: bytes) -> None:
        self._data(True, data)

    def server_sent(self, data: bytes) -> None:
        self._data(False, data)

    def close(self) -> None:
        self._segment(True, TCP_FIN | TCP_ACK, b"")
        self.client_seq += 1
        self._segment(False, TCP_FIN | TCP_ACK, b"")
        self.server_seq += 1
        self._segment(True, TCP_ACK, b"")

    def _data(self, from_client: bool, data: bytes) -> None:
        for start in range(0, len(data), MAX_SEGMENT):
            piece = data[start:start + MAX_SEGMENT]
            self._segment(from_client, TCP_PSH | TCP_ACK, piece)
            if from_client:
                self.client_seq = (self.client_seq + len(piece)) & 0xFFFFFFFF
            else:
                self.server_seq = (self.server_seq + len(piece)) & 0xFFFFFFFF

    def _segment(self, from_client: bool, flags: int, payload: bytes) -> None:
        if from_client:
            source, destination = self.client_ip, self.server_ip
            ports, seq, ack = (self.client_port, self.server_port), self.client_seq, \
                self.server_seq
        else:
            source, destination = self.server_ip, self.client_ip
            ports, seq, ack = (self.server_port, self.client_port), self.server_seq, \
                self.client_seq
        if not flags & TCP_ACK:
            ack = 0
        header = _TCP.pack(ports[0], ports[1], seq, ack, 5 << 4, flags, 65535, 0, 0)
        segment = header + payload
        length = len(segment)
        if source.version == 4:
            pseudo = source.packed + destination.packed + struct.pack("!BBH", 0, 6, length)
        else:
            pseudo = source.packed + destination.packed + struct.pack("!I3xB", length, 6)
        checksum = _checksum(pseudo + segment)
        segment = header[:16] + struct.pack("!H", checksum) + header[18:] + payload
        if source.version == 4:
            self.writer.ip_id = (self.writer.ip_id + 1) & 0xFFFF
            ip = _IPV4.pack(0x45, 0, 20 + length, self.writer.ip_id, 0x4000, 64, 6, 0,
                            source.packed, destination.packed)
            ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        else:
            ip = _IPV6.pack(0x60000000, length, 6, 64, source.packed, destination.packed)
        self.writer.packet(ip + segment)


def _records(path: Path):
    """(timestamp, header, data) of each record of a pcap written by PcapWriter."""
    with open(path, "rb") as file:
        file.read(_GLOBAL_HEADER.size)
        while True:
            head = file.read(_RECORD_HEADER.size)
            if len(head) < _RECORD_HEADER.size:
                return
            seconds, microseconds, length, _ = _RECORD_HEADER.unpack(head)
            yield (seconds, microseconds), head, file.read(length)


def merge_pcaps(parts: list[Path], output: Path) -> None:
    """One pcap from the parts written by worker processes, records in time order."""
    with open(output, "wb") as out:
        out.write(_GLOBAL_HEADER.pack(_PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW))
        for _, head, data in heapq.merge(*(_records(part) for part in parts),
                                         key=lambda record: record[0]):
            out.write(head)
            out.write(data)


# -- reading ----------------------------------------------------------------------------------

class CaptureError(Exception):
    """The capture cannot be read; the message names the file."""


@dataclass
class CapturedEcr:
    time: float  # capture timestamp, seconds
    raw: bytes
    imei: str | None
    imsi: str | None
    answer: Verdict | None  # what the captured ECA said; None: no ECA in the capture


@dataclass
class Capture:
    ecrs: list[CapturedEcr]
    packets: int = 0
    messages: int = 0  # Diameter messages found (any command)
    answers: int = 0  # ECAs found
    unpaired_answers: int = 0  # ECAs whose ECR is not in the capture
    notes: list[str] = field(default_factory=list)


MAX_MESSAGE = 1 << 20  # no sane Diameter message is larger; a bigger length means no sync


def _plausible_header(buffer: bytes | bytearray, pos: int) -> int | None:
    """The length of the message at pos if its header looks like Diameter's, else None."""
    if len(buffer) - pos < 20:
        return None
    word, flags_word = struct.unpack_from("!II", buffer, pos)
    length = word & 0xFFFFFF
    if word >> 24 != 1 or length < 20 or length & 3 or length > MAX_MESSAGE:
        return None
    if flags_word >> 24 & 0x0F:  # reserved flag bits must be 0
        return None
    return length


class _StreamDirection:
    """One direction of a TCP connection: segments in, whole Diameter messages out."""

    def __init__(self) -> None:
        self.next_seq: int | None = None
        self.pending: dict[int, bytes] = {}  # segments beyond a gap, by sequence number
        self.buffer = bytearray()
        self.synced = False  # True once the buffer starts on a message boundary
        self.skipped = 0  # bytes dropped while resynchronising

    def syn(self, seq: int) -> None:
        self.next_seq = (seq + 1) & 0xFFFFFFFF
        self.synced = True
        self.pending.clear()
        self.buffer.clear()

    def segment(self, seq: int, data: bytes) -> list[bytes]:
        if not data:
            return []
        if self.next_seq is None:  # the capture began in the middle of this stream
            self.next_seq = seq
        delta = (seq - self.next_seq + (1 << 31)) % (1 << 32) - (1 << 31)
        if delta > 0:
            self.pending[seq] = data
            return []
        if -delta >= len(data):
            return []  # a retransmission of bytes already taken
        self._append(data[-delta:])
        while self.pending:  # segments that the gap held back, now in order
            for pending_seq in list(self.pending):
                delta = (pending_seq - self.next_seq + (1 << 31)) % (1 << 32) - (1 << 31)
                if delta <= 0:
                    data = self.pending.pop(pending_seq)
                    if -delta < len(data):
                        self._append(data[-delta:])
                    break
            else:
                break
        return self._messages()

    def _append(self, data: bytes) -> None:
        self.buffer += data
        self.next_seq = (self.next_seq + len(data)) & 0xFFFFFFFF

    def _messages(self) -> list[bytes]:
        buffer = self.buffer
        messages = []
        pos = 0
        while True:
            if not self.synced:
                pos = self._resync(pos)
                if not self.synced:
                    break
            length = _plausible_header(buffer, pos)
            if length is None:
                if len(buffer) - pos < 20:
                    break
                self.synced = False  # garbage where a header should be: look for the next
                continue
            if len(buffer) - pos < length:
                break
            messages.append(bytes(buffer[pos:pos + length]))
            pos += length
        del buffer[:pos]
        return messages

    def _resync(self, pos: int) -> int:
        """The first position from pos on where a whole, well-formed message starts."""
        buffer = self.buffer
        while len(buffer) - pos >= 20:
            length = _plausible_header(buffer, pos)
            if length is not None:
                if len(buffer) - pos < length:
                    return pos  # maybe; wait for the rest before deciding
                try:
                    decode_avps(bytes(buffer[pos:pos + length]), 20, length)
                except AvpLengthError:
                    pass
                else:
                    self.synced = True
                    return pos
            pos += 1
            self.skipped += 1
        return pos


class _SctpDirection:
    """One direction of an SCTP association: DATA chunks in, whole user messages out."""

    def __init__(self) -> None:
        self.seen_tsns: set[int] = set()
        self.fragments: dict[int, list[bytes]] = {}  # stream id → fragments so far

    def chunk(self, tsn: int, stream: int, beginning: bool, ending: bool,
              data: bytes) -> list[bytes]:
        if tsn in self.seen_tsns:
            return []  # retransmitted
        self.seen_tsns.add(tsn)
        if beginning and ending:
            return [data]
        if beginning:
            self.fragments[stream] = [data]
            return []
        parts = self.fragments.get(stream)
        if parts is None:
            return []  # a middle or last fragment whose first one is not in the capture
        parts.append(data)
        if ending:
            del self.fragments[stream]
            return [b"".join(parts)]
        return []


def read_capture(path: Path) -> Capture:
    """Every ECR of a pcap/pcapng capture, in capture order, with its captured answer."""
    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    try:
        from scapy.all import IP, SCTP, TCP, IPv6, PcapReader, Scapy_Exception
    except ImportError:
        raise CaptureError("reading captures needs scapy: install open EIR again "
                           "(pip install -e .)") from None
    tcp_streams: dict[tuple, _StreamDirection] = {}
    sctp_streams: dict[tuple, _SctpDirection] = {}
    messages: list[tuple[float, tuple, bytes]] = []  # (time, (src, sport, dst, dport), raw)
    packets = 0
    try:
        reader = PcapReader(str(path))
    except (OSError, Scapy_Exception) as exc:
        raise CaptureError(f"{path}: cannot read as pcap or pcapng: {exc}") from None
    with reader:
        try:
            for packet in reader:
                packets += 1
                ip = packet.getlayer(IP) or packet.getlayer(IPv6)
                if ip is None:
                    continue
                when = float(packet.time)
                # Scapy finds the headers; the bytes are taken as captured (`original`), not
                # rebuilt from what scapy made of the payload (its Diameter layer, when
                # loaded, would dissect half messages and build them back differently).
                if ip.haslayer(TCP):
                    tcp = ip[TCP]
                    segment = _transport_bytes(ip, tcp.original, IP)
                    key = (ip.src, tcp.sport, ip.dst, tcp.dport)
                    direction = tcp_streams.get(key)
                    if direction is None:
                        direction = tcp_streams[key] = _StreamDirection()
                    if tcp.flags & TCP_SYN:
                        direction.syn(tcp.seq)
                        continue
                    for raw in direction.segment(tcp.seq, segment[tcp.dataofs * 4:]):
                        messages.append((when, key, raw))
                elif ip.haslayer(SCTP):
                    sctp = ip[SCTP]
                    key = (ip.src, sctp.sport, ip.dst, sctp.dport)
                    direction = sctp_streams.get(key)
                    if direction is None:
                        direction = sctp_streams[key] = _SctpDirection()
                    for chunk in _sctp_data_chunks(_transport_bytes(ip, sctp.original, IP)):
                        for raw in direction.chunk(*chunk):
                            if _plausible_header(raw, 0) == len(raw):
                                messages.append((when, key, raw))
        except (EOFError, Scapy_Exception, struct.error) as exc:
            raise CaptureError(f"{path}: capture cut short after packet {packets} "
                               f"({len(messages)} Diameter messages read): {exc}") from None
    capture = _pair(messages)
    capture.packets = packets
    skipped = sum(d.skipped for d in tcp_streams.values())
    if skipped:
        capture.notes.append(f"{skipped} bytes of TCP streams skipped to find the first "
                             "Diameter header (a capture that began mid-stream)")
    gaps = sum(1 for d in tcp_streams.values() if d.pending)
    if gaps:
        capture.notes.append(f"{gaps} TCP stream direction(s) with missing segments: the "
                             "messages after the gap are not read")
    return capture


def _transport_bytes(ip, original: bytes, ipv4_class) -> bytes:
    """The transport segment as captured, without the link layer's trailer padding."""
    if isinstance(ip, ipv4_class):
        return original[:max(0, ip.len - ip.ihl * 4)]
    if ip.nh in (6, 132):  # no extension header: the payload length is the segment's
        return original[:ip.plen]
    return original


_SCTP_CHUNK = struct.Struct("!BBH")
_SCTP_DATA = struct.Struct("!IHHI")


def _sctp_data_chunks(packet: bytes):
    """(tsn, stream, beginning, ending, data) of each DATA chunk of an SCTP packet."""
    pos = 12  # common header: ports, verification tag, checksum
    while len(packet) - pos >= 4:
        kind, flags, length = _SCTP_CHUNK.unpack_from(packet, pos)
        if length < 4 or pos + length > len(packet):
            return
        if kind == 0 and length >= 16:
            tsn, stream, _, _ = _SCTP_DATA.unpack_from(packet, pos + 4)
            yield tsn, stream, bool(flags & 2), bool(flags & 1), packet[pos + 16:pos + length]
        pos += (length + 3) & ~3


def _is_ecr(header) -> bool:
    return header.code == COMMAND_ME_IDENTITY_CHECK and header.application == APPLICATION_S13


def _pair(messages: list[tuple[float, tuple, bytes]]) -> Capture:
    ecrs: list[CapturedEcr] = []
    by_ids: dict[tuple, int] = {}  # (src, sport, dst, dport, hbh, e2e) → index in ecrs
    by_session: dict[str, list[int]] = {}  # Session-Id → unanswered ECRs
    capture = Capture(ecrs, messages=len(messages))
    for when, key, raw in messages:
        header = parse_header(raw)
        if not _is_ecr(header):
            continue
        ids = (*key, header.hop_by_hop, header.end_to_end)
        if header.flags & FLAG_REQUEST:
            if header.flags & FLAG_RETRANSMIT and ids in by_ids:
                continue  # the same request again (T bit): replay it once
            fields = ecr_fields(raw)
            by_ids[ids] = len(ecrs)
            if fields.session_id is not None:
                by_session.setdefault(fields.session_id, []).append(len(ecrs))
            ecrs.append(CapturedEcr(when, raw, fields.imei, fields.imsi, None))
            continue
        capture.answers += 1
        src, sport, dst, dport = key
        index = by_ids.pop((dst, dport, src, sport, header.hop_by_hop, header.end_to_end),
                           None)
        if index is None:  # answered over another connection (a relay): match the session
            waiting = by_session.get(session_id_of(raw) or "")
            while waiting and ecrs[waiting[0]].answer is not None:
                waiting.pop(0)
            index = waiting.pop(0) if waiting else None
        if index is None or ecrs[index].answer is not None:
            capture.unpaired_answers += 1
            continue
        ecrs[index].answer = verdict_of(raw)
    return capture
