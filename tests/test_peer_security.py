"""The peer allowlist (diameter.peers): which Origin-Host, Origin-Realm and source address may
open a connection. Refused: CEA 3010 DIAMETER_UNKNOWN_PEER (E bit), then the connection
closes; the log says what did not match. Without sockets (the decision is the sans-IO peer's),
then end to end against `eir serve` with requests scapy encodes.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from eir.config import ConfigError, load_settings
from eir.diameter.codec import decode_avps
from eir.diameter.constants import APPLICATION_S13, FLAG_ERROR
from eir.diameter.dictionary import AvpError, Grammar
from eir.diameter.identities import PeerIdentities
from eir.diameter.peer import PeerConnection, PeerState
from eir.s13 import S13Application
from eir.security import AllowedPeer, PeerAllowlist, certificate_names
from helpers_wire import (assert_closed_by_server, cer, ecr, open_peer, parse_answer,
                          read_message)
from test_duplicates import ecr as ecr_with_ids
from test_peer_state import D, E, LOCAL, RULE_SET, event_text, one_message, request

SUCCESS, UNKNOWN_PEER = 2001, 3010
CER_CODE = 257


def allowed(host: str, realm: str | None = None, *networks: str) -> AllowedPeer:
    return AllowedPeer(host, realm, tuple(ipaddress.ip_network(n) for n in networks))


def cer_from(host: str = "mme.test", realm: str = "test") -> bytes:
    body = (E("Origin-Host", host) + E("Origin-Realm", realm) + E("Host-IP-Address", "192.0.2.1")
            + E("Vendor-Id", 0) + E("Product-Name", "test MME")
            + E("Auth-Application-Id", APPLICATION_S13))
    return request(CER_CODE, body)


def peer_with(allowlist: PeerAllowlist | None, address: str | None = "10.0.0.7",
              names: tuple[str, ...] | None = None) -> PeerConnection:
    return PeerConnection(D, LOCAL, {APPLICATION_S13: S13Application(D, LOCAL, RULE_SET)},
                          now=0.0, local_addresses=("127.0.0.1",), remote_address=address,
                          allowlist=allowlist,
                          certificate_names=names)


def assert_refused(peer: PeerConnection, message: bytes, why: str) -> None:
    cea = one_message(peer.receive(message, 0.0))
    assert cea.header.code == CER_CODE
    assert cea.value("Result-Code") == UNKNOWN_PEER
    assert cea.header.flags & FLAG_ERROR  # a protocol error (RFC 6733 §7.1.3)
    assert cea.value("Error-Message") == "unknown peer"  # nothing about what was expected
    cea.validate()
    assert peer.closed
    assert "CER refused with 3010 DIAMETER_UNKNOWN_PEER" in peer.closed_reason
    assert why in event_text(peer)


def assert_opens(peer: PeerConnection, message: bytes) -> None:
    assert one_message(peer.receive(message, 0.0)).value("Result-Code") == SUCCESS
    assert peer.state is PeerState.OPEN


MME1 = PeerAllowlist([allowed("mme1.epc.example", "epc.example", "10.0.0.0/24", "2001:db8::/64"),
                      allowed("mme2.epc.example")])


def test_listed_host_and_realm_from_a_listed_network_opens():
    assert_opens(peer_with(MME1), cer_from("mme1.epc.example", "epc.example"))


def test_unknown_origin_host_gets_3010_and_is_disconnected():
    assert_refused(peer_with(MME1), cer_from("mme9.epc.example", "epc.example"),
                   "Origin-Host mme9.epc.example is not in the peer allowlist")


def test_listed_host_from_an_unlisted_address_is_refused():
    assert_refused(peer_with(MME1, address="192.0.2.50"),
                   cer_from("mme1.epc.example", "epc.example"),
                   "mme1.epc.example is allowed only from 10.0.0.0/24, 2001:db8::/64, not from "
                   "192.0.2.50")


def test_listed_host_with_another_realm_is_refused():
    assert_refused(peer_with(MME1), cer_from("mme1.epc.example", "other.example"),
                   "Origin-Realm other.example is not epc.example")


def test_identities_compare_case_insensitively_and_mapped_ipv4_matches_ipv4_networks():
    assert_opens(peer_with(MME1, address="::ffff:10.0.0.9"),
                 cer_from("MME1.EPC.example", "EPC.Example"))


def test_ipv6_source_in_a_listed_ipv6_network_opens():
    assert_opens(peer_with(MME1, address="2001:db8::5"),
                 cer_from("mme1.epc.example", "epc.example"))


def test_entry_without_realm_or_addresses_accepts_any_of_them():
    assert_opens(peer_with(MME1, address="198.51.100.1"), cer_from("mme2.epc.example", "x"))


def test_no_allowlist_or_an_empty_one_accepts_any_peer():
    assert_opens(peer_with(None), cer_from("anyone.example"))
    assert_opens(peer_with(PeerAllowlist([])), cer_from("anyone.example"))


def test_a_repeated_cer_from_an_unlisted_host_closes_an_open_connection():
    peer = peer_with(MME1)
    assert_opens(peer, cer_from("mme1.epc.example", "epc.example"))
    assert_refused(peer, cer_from("mme9.epc.example", "epc.example"), "mme9.epc.example")


def test_origin_host_must_be_among_the_verified_certificate_names():
    assert_opens(peer_with(None, names=("mme.test", "mme-b.test")), cer_from("MME.test"))
    assert_refused(peer_with(None, names=("mme2.test",)), cer_from("mme.test"),
                   "Origin-Host mme.test is not a name its TLS certificate was issued to "
                   "(mme2.test)")


def test_certificate_names_prefer_dns_alt_names_over_the_common_name():
    cert = {"subject": ((("commonName", "CN.Example"),),),
            "subjectAltName": (("DNS", "A.example"), ("IP Address", "10.0.0.1"))}
    assert certificate_names(cert) == ("a.example",)
    assert certificate_names({"subject": ((("commonName", "CN.Example"),),)}) == (
        "cn.example",)
    assert certificate_names({}) is None and certificate_names(None) is None


def test_a_host_listed_twice_is_refused():
    with pytest.raises(ValueError, match="listed twice"):
        PeerAllowlist([allowed("mme1.x"), allowed("MME1.x")])


# -- configuration -------------------------------------------------------------------------

def write_config(tmp_path, text: str):
    path = tmp_path / "eir.yaml"
    path.write_text(text)
    return path


def test_peers_are_read_from_the_config(tmp_path):
    settings = load_settings(write_config(tmp_path, """\
diameter:
  peers:
    - host: mme1.epc.example
      realm: epc.example
      addresses: ["10.0.0.0/24", "::1"]
    - host: mme2.epc.example
"""))
    first, second = settings.diameter.peers
    assert (first.host, first.realm, first.addresses) == ("mme1.epc.example", "epc.example",
                                                          ["10.0.0.0/24", "::1"])
    assert (second.realm, second.addresses) == (None, [])


@pytest.mark.parametrize("entry, line, key, message", [
    ("    - host: mme1\n      addresses: ['10.0.0.1/24']\n", 4, "diameter.peers.0.addresses",
     "host bits set"),
    ("    - host: mme1\n      addresses: ['mme1.example']\n", 4, "diameter.peers.0.addresses",
     "does not appear to be an IPv4 or IPv6 network"),
    ("    - host: 'mme 1'\n", 3, "diameter.peers.0.host", "DiameterIdentity"),
    ("    - realm: x\n", 3, "diameter.peers.0.host", "Field required"),
    ("    - host: mme1\n    - host: MME1\n", 2, "diameter.peers", "MME1 is listed twice"),
])
def test_bad_peer_entries_name_line_and_key(tmp_path, entry, line, key, message):
    path = write_config(tmp_path, "diameter:\n  peers:\n" + entry)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:{line}: {key}: "), text
    assert message in text, text


# -- end to end ----------------------------------------------------------------------------

def allowlist_config(tmp_path, addresses: str = "['127.0.0.0/8', '::1']") -> str:
    return str(write_config(tmp_path, f"""\
diameter:
  peers:
    - host: mme.test
      realm: test
      addresses: {addresses}
"""))


def test_allowed_peer_opens_and_is_served(eir_server, tmp_path):
    server = eir_server("--config", allowlist_config(tmp_path))
    with open_peer(server.address) as sock:
        sock.sendall(ecr())
        assert parse_answer(read_message(sock)).result_code == SUCCESS
    assert "no peer allowlist" not in server.log()


def test_unknown_peer_gets_cea_3010_and_is_disconnected(eir_server, tmp_path):
    server = eir_server("--config", allowlist_config(tmp_path))
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(cer(host="mme9.test"))
        cea = parse_answer(read_message(sock))
        assert (cea.code, cea.result_code, cea.error_bit) == (CER_CODE, UNKNOWN_PEER, True)
        assert cea.all(264) and cea.all(296)  # Origin-Host, Origin-Realm: ours
        assert assert_closed_by_server(sock) == b""
    server.wait_for_log(r"mme9\.test: CER refused with 3010 DIAMETER_UNKNOWN_PEER: Origin-Host "
                        r"mme9\.test is not in the peer allowlist")


def test_allowed_host_from_an_unexpected_address_is_refused(eir_server, tmp_path):
    server = eir_server("--config", allowlist_config(tmp_path, "['10.0.0.0/24']"))
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(cer())
        cea = parse_answer(read_message(sock))
        assert (cea.result_code, cea.error_bit) == (UNKNOWN_PEER, True)
        assert assert_closed_by_server(sock) == b""
    server.wait_for_log(r"mme\.test: CER refused with 3010 DIAMETER_UNKNOWN_PEER: mme\.test is "
                        r"allowed only from 10\.0\.0\.0/24, not from 127\.0\.0\.1")


def test_without_an_allowlist_the_start_up_warns(eir_server):
    server = eir_server()
    server.wait_for_log(r"WARNING .*no peer allowlist \(diameter\.peers is empty\)")
    with open_peer(server.address):
        pass


# -- one connection per Origin-Host (diameter.duplicate_peers, eir.diameter.identities) -----

def claiming_peer() -> PeerConnection:
    return PeerConnection(D, LOCAL, {APPLICATION_S13: S13Application(D, LOCAL, RULE_SET)},
                          now=0.0, local_addresses=("127.0.0.1",), claims_identity=True)


def ecr_request(hop_by_hop: int) -> bytes:
    return ecr_with_ids(hop_by_hop, hop_by_hop)


def test_a_cer_waits_for_its_claim_and_what_follows_it_waits_too():
    peer = claiming_peer()
    assert peer.receive(cer_from() + ecr_request(5), 0.0) == b""  # CER, and an ECR after it
    assert peer.claiming == "mme.test" and peer.state is PeerState.WAIT_CER
    assert not peer.reading  # the caller stops reading until it is decided
    out = peer.claim_decided(None, 0.1)
    cea, eca = out[:int.from_bytes(out[1:4], "big")], out[int.from_bytes(out[1:4], "big"):]
    assert one_message(cea).value("Result-Code") == SUCCESS
    assert one_message(eca).header.hop_by_hop == 5  # the ECR, answered once open
    assert peer.state is PeerState.OPEN and peer.claiming is None and peer.reading


def test_a_refused_claim_gets_cea_5012_and_closes():
    peer = claiming_peer()
    peer.receive(cer_from("MME.test"), 0.0)
    cea = one_message(peer.claim_decided("Origin-Host MME.test has an open connection "
                                         "already", 0.1))
    assert (cea.value("Result-Code"), cea.header.flags & FLAG_ERROR) == (5012, 0)
    assert cea.value("Error-Message") == "Origin-Host already connected"
    cea.validate()
    assert peer.closed
    assert "CER refused with 5012 DIAMETER_UNABLE_TO_COMPLY: Origin-Host MME.test has an " \
        "open connection already" in peer.closed_reason


def test_a_peer_that_sends_much_before_its_cea_is_closed():
    peer = claiming_peer()
    peer.receive(cer_from() + b"".join(ecr_request(n) for n in range(100)), 0.0)
    assert peer.closed and "messages sent before the CEA" in peer.closed_reason


def test_the_registry_refuses_or_allows_a_second_connection_and_counts_it():
    refusing = PeerIdentities("refuse")
    assert refusing.claim("mme.test") == (True, None)
    granted, why = refusing.claim("MME.TEST")  # DNS names: case does not matter
    assert not granted and "has an open connection already" in why
    refusing.release("mme.test")
    assert refusing.claim("mme.test") == (True, None)
    assert refusing.duplicates == {"refused": 1, "allowed": 0}
    allowing = PeerIdentities("allow")
    allowing.claim("mme.test")
    assert allowing.claim("mme.test") == (True, "Origin-Host mme.test now has 2 open "
                                          "connections (diameter.duplicate_peers: allow)")
    assert allowing.duplicates == {"refused": 0, "allowed": 1}


def test_a_repeated_cer_may_not_change_the_origin_host_of_an_open_connection():
    peer = peer_with(None)
    assert_opens(peer, cer_from("mme.test"))
    cea = one_message(peer.receive(cer_from("other.test"), 0.0))
    assert cea.value("Result-Code") == 5012
    assert peer.state is PeerState.OPEN and peer.peer_host == "mme.test"


# -- DiameterIdentity: an FQDN (RFC 6733 §4.3.1) ----------------------------------------------

IDENTITY_AVPS = sorted(name for name, avp in D.avps_by_name.items()
                       if avp.type == "DiameterIdentity")


NOT_FQDNS = ["mme.test\n2026-01-01 INFO forged", "mme\x1b[31m.test", "mme test", "",
             "mme..test", ".mme", "-mme.test", "a" * 64 + ".test", "b." * 128 + "c",
             "mmé.test"]
FQDNS = ["mme.test", "mme", "mme-1.epc.mnc001.mcc001.3gppnetwork.org", "MME_2.Example.COM",
         "xn--mnchen-3ya.de", "a" * 63 + ".b", "c." * 127 + "d"]


@pytest.mark.parametrize("name", IDENTITY_AVPS)
def test_every_diameter_identity_avp_takes_fqdns_and_refuses_anything_else(name):
    assert {"Origin-Host", "Origin-Realm", "Destination-Host", "Destination-Realm",
            "Route-Record", "Proxy-Host"} <= set(IDENTITY_AVPS)
    for bad in NOT_FQDNS:
        avp = D.encode(name, bad)
        with pytest.raises(AvpError) as refused:
            D.validate(decode(avp), Grammar(allows_any=True))
        assert refused.value.result_code == 5004, bad
        assert refused.value.failed_avp == avp
    for good in FQDNS:
        found = D.validate(decode(D.encode(name, good)), Grammar(allows_any=True))
        assert found[name][0].data == good.encode()


def decode(avp: bytes):
    return decode_avps(avp, 0, len(avp))


def test_a_cer_whose_origin_host_is_not_an_fqdn_gets_5004_and_closes():
    peer = peer_with(None)
    cea = one_message(peer.receive(cer_from("mme.test\r\nforged"), 0.0))
    assert cea.value("Result-Code") == 5004
    [failed] = cea.all("Failed-AVP")
    assert E("Origin-Host", "mme.test\r\nforged") in failed.data
    assert peer.closed


# -- another Diameter version: 5011 (RFC 6733 §7.1.5) ------------------------------------------

@pytest.mark.parametrize("split", [False, True])
def test_a_request_of_another_version_is_answered_5011_then_closed(split):
    peer = peer_with(None)
    assert_opens(peer, cer_from())
    message = bytearray(ecr_request(0x77))
    message[0] = 2
    if split:  # the header cut after its first word: answered once it is whole
        assert peer.receive(bytes(message[:4]), 0.0) == b"" and not peer.closed
        out = peer.receive(bytes(message[4:]), 0.0)
    else:
        out = peer.receive(bytes(message), 0.0)
    answer = one_message(out)
    assert (answer.value("Result-Code"), answer.header.hop_by_hop) == (5011, 0x77)
    assert answer.header.flags & FLAG_ERROR == 0  # a permanent failure, not a protocol error
    assert peer.closed and "unsupported Diameter version 2" in peer.closed_reason
    # An answer of another version is not answered: the connection just closes.
    peer = peer_with(None)
    assert_opens(peer, cer_from())
    message[4] = 0x40  # not a request
    assert peer.receive(bytes(message), 0.0) == b""
    assert peer.closed
