"""Requests built with python-diameter (PyPI `diameter`), an encoder nobody on this project wrote.

Used by the interop, tshark and SCTP tests, and by bench/ (hotpath.py's ECR stream, the CEA
of pydiameter_eir.py). Nothing here imports `eir`. python-diameter has no stream framer:
answers are cut off the socket by helpers_wire.read_message.
"""

from __future__ import annotations

import socket

from diameter.message import Message
from diameter.message.avp.grouped import TerminalInformation, VendorSpecificApplicationId
from diameter.message.commands import CapabilitiesExchangeRequest, MeIdentityCheckRequest

S13 = 16777252
TGPP = 10415
S13_VSAI = VendorSpecificApplicationId(vendor_id=TGPP, auth_application_id=S13)
MME_HOST, MME_REALM = b"mme.localdomain", b"localdomain"
EIR_REALM = b"localdomain"


def set_s13_capabilities(message: Message, product_name: str,
                         host_ip: str = "127.0.0.1") -> Message:
    """Fill the capabilities of a CER or CEA: this node speaks S13 (3GPP), nothing else."""
    message.host_ip_address = host_ip
    message.vendor_id = 0
    message.product_name = product_name
    message.supported_vendor_id = TGPP
    message.auth_application_id = S13
    message.vendor_specific_application_id = S13_VSAI
    return message


def build_cer(origin_host: bytes = MME_HOST, origin_realm: bytes = MME_REALM,
              product_name: str = "python-diameter MME", host_ip: str = "127.0.0.1",
              hop_by_hop: int = 1) -> bytes:
    """A Capabilities-Exchange-Request advertising S13; end-to-end id = hop-by-hop id."""
    cer = CapabilitiesExchangeRequest()
    cer.header.hop_by_hop_identifier = cer.header.end_to_end_identifier = hop_by_hop
    cer.origin_host, cer.origin_realm = origin_host, origin_realm
    return set_s13_capabilities(cer, product_name, host_ip).as_bytes()


def build_ecr(imei: str, imsi: str, session_id: str, hop_by_hop: int,
              end_to_end: int | None = None, origin_host: bytes = MME_HOST,
              origin_realm: bytes = MME_REALM, software_version: str = "23"
              ) -> MeIdentityCheckRequest:
    """An ME-Identity-Check-Request (call .as_bytes() to send it); end-to-end id defaults to
    the hop-by-hop id. Destination-Realm is the EIR's, localdomain."""
    ecr = MeIdentityCheckRequest()
    ecr.header.application_id = S13  # python-diameter leaves it 0
    ecr.header.hop_by_hop_identifier = hop_by_hop
    ecr.header.end_to_end_identifier = hop_by_hop if end_to_end is None else end_to_end
    ecr.session_id = session_id
    ecr.auth_session_state = 1  # NO_STATE_MAINTAINED
    ecr.origin_host, ecr.origin_realm = origin_host, origin_realm
    ecr.destination_realm = EIR_REALM
    ecr.terminal_information = TerminalInformation(imei=imei, software_version=software_version)
    ecr.user_name = imsi
    return ecr


def read_answer(sock: socket.socket, timeout: float = 5.0) -> Message:
    """One whole Diameter message off a stream socket, decoded by python-diameter."""
    # Imported here, not at the top: bench/hotpath.py imports the builders above and should
    # not load scapy (which helpers_wire imports) into the process it measures.
    from helpers_wire import read_message
    return Message.from_bytes(read_message(sock, timeout))


def exchange(sock: socket.socket, data: bytes, timeout: float = 5.0) -> Message:
    """Send one request, return the next message the peer sends, decoded."""
    sock.sendall(data)
    return read_answer(sock, timeout)
