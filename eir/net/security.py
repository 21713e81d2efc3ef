"""Peer security: which peers may open a connection (the allowlist), and TLS per RFC 6733 §13.

The allowlist is data the sans-IO peer (`eir.diameter.peer.PeerConnection`) consults when a
CER arrives: Origin-Host, Origin-Realm and the connection's source address must match an
entry, else the CEA says 3010 DIAMETER_UNKNOWN_PEER and the connection closes. With TLS, the
names the peer's verified certificate vouches for are data too: the CER's Origin-Host must be
one of them, so that a certificate of one MME cannot open a link as another.

TLS is "TLS on connect" (RFC 6733 §13.1; port 5868): the handshake comes first, CER after it;
the legacy in-band negotiation (Inband-Security-Id, RFC 3588) is not offered.

A private key file that its group or others may read (or write) is warned about when it is
loaded, as ssh does ("permissions 0644 for 'eir.key' are too open"), for every TLS key the
server loads (diameter.tls, sbi.tls). It is a warning, not a refusal to start: Kubernetes
mounts Secret volumes 0644 unless `defaultMode` says otherwise, and Debian gives keys 0640
to the ssl-cert group on purpose; refusing would stop such deployments on an upgrade,
whereas the warning names the file and the fix.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from eir.core.config import ConfigError
from eir.core.untrusted import untrusted

log = logging.getLogger("eir.security")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SecurityError(ConfigError):
    """TLS material that cannot be used; the message names the file and why."""


def plain_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as the socket reports it, without zone id, IPv4-mapped IPv6 as IPv4."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class AllowedPeer:
    """One allowlist entry. DiameterIdentities are FQDNs: compared case-insensitively."""

    host: str
    realm: str | None = None  # None: any realm
    networks: tuple[IpNetwork, ...] = ()  # empty: any source address

    def describe_networks(self) -> str:
        return ", ".join(str(network) for network in self.networks)


class PeerAllowlist:
    """The peers that may open a connection, by Origin-Host; empty: any peer."""

    def __init__(self, peers: Iterable[AllowedPeer] = ()):
        self._by_host: dict[str, AllowedPeer] = {}
        for peer in peers:
            key = peer.host.lower()
            if key in self._by_host:
                raise ValueError(f"peer {peer.host} is listed twice")
            self._by_host[key] = peer

    def __len__(self) -> int:
        return len(self._by_host)

    def refusal(self, host: str, realm: str, address: str | None) -> str | None:
        """None when this peer may open a connection from `address`; else why not (for the
        log: it names what was expected, which the peer itself is not told)."""
        allowed = self._by_host.get(host.lower())
        if allowed is None:
            return f"Origin-Host {host} is not in the peer allowlist (diameter.peers)"
        if allowed.realm is not None and allowed.realm.lower() != realm.lower():
            return f"Origin-Realm {realm} is not {allowed.realm}, the realm listed for {host}"
        if allowed.networks:
            if address is None:
                return f"{host} is allowed only from {allowed.describe_networks()}, and the " \
                       "connection's source address is unknown"
            ip = plain_ip(address)
            if not any(ip in network for network in allowed.networks):
                return f"{host} is allowed only from {allowed.describe_networks()}, not " \
                       f"from {ip}"
        return None


def certificate_names(peercert: dict | None) -> tuple[str, ...] | None:
    """The DNS names a verified peer certificate vouches for, lower case: its
    subjectAltName DNS entries, else (no DNS SAN) its subject commonName, as RFC 6125 §6.4.4
    orders them. None when there is no verified certificate (plain TCP, or TLS without a
    client certificate): then nothing is checked against it."""
    if not peercert:
        return None
    names = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        names = [value for rdn in peercert.get("subject", ()) for key, value in rdn
                 if key == "commonName"]
    return tuple(name.lower() for name in names)


def server_tls_context(certificate: Path, key: Path, ca: Path | None,
                       require_client_cert: bool,
                       section: str = "diameter.tls") -> ssl.SSLContext:
    """The server side of TLS on connect: our certificate and key, TLS 1.2 or later (RFC 8996
    retired 1.0 and 1.1), and client certificates verified against `ca` (mutual TLS).
    `section`: the settings named in errors (sbi.tls for eir.interfaces.sbi)."""
    for name, path in (("certificate", certificate), ("key", key), ("ca", ca)):
        if path is not None and not Path(path).is_file():
            raise SecurityError(f"{path}: no such file ({section}.{name})")
    warn_if_key_is_open(Path(key), f"{section}.key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, key)
    except (ssl.SSLError, OSError) as exc:
        raise SecurityError(f"{certificate}, {key}: cannot use this certificate and key: "
                            f"{exc}") from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise SecurityError(f"{ca}: not a PEM CA certificate: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise SecurityError(f"{section}.require_client_cert needs {section}.ca, the CA "
                            "that signs the peers' certificates")
    return context


def warn_if_key_is_open(key: Path, setting: str) -> None:
    """A WARNING when the private key file `key` (of `setting`, for the log) has any
    permission for its group or others (the mode that ssh refuses: 0077)."""
    try:
        mode = stat.S_IMODE(os.stat(key).st_mode)  # a symlink's target: what is read
    except OSError:
        return  # loading it fails next, with the reason
    if mode & 0o077:
        log.warning("permissions %04o for '%s' are too open (%s): a private key should be "
                    "readable by its owner only (chmod 600 %s)", mode, key, setting, key)


class TlsAcceptor(asyncio.Protocol):
    """One accepted TCP connection on a TLS listener: admitted (connection limits) before
    any TLS work, then the handshake, then handed over to the Diameter protocol.

    The handshake goes through `loop.start_tls` rather than `create_server(ssl=...)` so that
    a refused handshake (no client certificate, a certificate from another CA, plain TCP on
    the TLS port) is logged with its reason, and so that connections still in their
    handshake count against the connection limits. Bytes the peer sends right after the
    handshake (its CER may travel with the last handshake flight) are held here until the
    Diameter protocol is attached.
    """

    def __init__(self, context: ssl.SSLContext, handshake_timeout: float,
                 admit: Callable[[str], str | None], release: Callable[[str], None],
                 protocol_factory: Callable[[str], asyncio.Protocol],
                 spawn: Callable[..., object]):
        self._context = context
        self._handshake_timeout = handshake_timeout
        self._admit = admit
        self._release = release
        self._protocol_factory = protocol_factory
        self._spawn = spawn
        self._early: list[bytes] = []
        self._lost: tuple[Exception | None] | None = None
        self._eof = False
        self._address = ""
        self._remote = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        self._address = peername[0] if peername else ""
        self._remote = format_address(peername)
        refusal = self._admit(self._address)
        if refusal is not None:
            log.warning("%s: connection refused: %s", self._remote, refusal,
                        extra={"peer": self._address})
            transport.abort()
            return
        transport.pause_reading()  # the handshake reads first, in start_tls
        self._spawn(self._handshake(transport))

    async def _handshake(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(
                transport, self, self._context, server_side=True,
                ssl_handshake_timeout=self._handshake_timeout)
        except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as exc:
            log.warning("%s: TLS handshake refused: %s", self._remote,
                        untrusted(_handshake_failure(exc)), extra={"peer": self._address})
            transport.abort()
            self._release(self._address)
            return
        except asyncio.CancelledError:  # shutting down mid-handshake
            transport.abort()
            self._release(self._address)
            raise
        if tls_transport is None:  # the connection was lost as the handshake completed
            log.info("%s: connection closed during the TLS handshake", self._remote,
                     extra={"peer": self._address})
            self._release(self._address)
            return
        inner = self._protocol_factory(self._address)  # counted already: admitted
        tls_transport.set_protocol(inner)
        inner.connection_made(tls_transport)
        for data in self._early:
            inner.data_received(data)
        self._early.clear()
        if self._eof:
            inner.eof_received()
        if self._lost is not None:
            inner.connection_lost(self._lost[0])

    # -- before the Diameter protocol is attached (the TLS transport's first protocol) ---

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool | None:
        self._eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        # Lost after the handshake, before attach: passed on once the protocol is there.
        # (After a failed handshake it may come here too; then nothing is ever attached.)
        self._lost = (exc,)


_HANDSHAKE_HINTS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate; mutual TLS needs one",
    "WRONG_VERSION_NUMBER": "not TLS: plain TCP on the TLS port?",
    "HTTP_REQUEST": "not TLS: an HTTP request",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions older than 1.2",
}


def _handshake_failure(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no complete handshake within the handshake timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.reason}: the client certificate: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        hint = _HANDSHAKE_HINTS.get(exc.reason)
        return f"{exc.reason}" + (f" ({hint})" if hint else "")
    if isinstance(exc, ConnectionResetError) and not str(exc):
        return "the peer closed the connection during the handshake"
    return str(exc) or type(exc).__name__


def format_address(address) -> str:
    """A socket address (host, port[, ...]) as host:port, [host]:port for IPv6; "?" if none."""
    if not address:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
