"""TLS on connect (RFC 6733 §13.1): `eir serve` with a TLS listener and mutual TLS, tested with
real TLS clients: Python's ssl module, `openssl s_client`, and freeDiameterd (GnuTLS).

The CAs and certificates are made here with the `cryptography` package: ours (eir.test), an
MME's (mme.test), an MME certificate issued to another name, and a certificate from a CA the
server does not trust.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from scapy.all import raw
from scapy.contrib.diameter import AVP, DiamG

from helpers_process import run_eir
from helpers_wire import ConnectionClosed, cer, ecr, origin_avps, parse_answer, read_message

EIR_HOST = "eir.test"
SUCCESS, UNKNOWN_PEER = 2001, 3010
CER_CODE, DWR_CODE, DPR_CODE, ECR_CODE = 257, 280, 282, 324
TLS_LISTENING = r"listening on tls 127\.0\.0\.1:(\d+)$"


# -- certificates --------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    certificate: Path
    key: Path


class Authority:
    """A CA that writes PEM files: its own certificate, and the certificates it issues."""

    def __init__(self, directory: Path, name: str):
        self.directory = directory
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.path = directory / f"{name}.pem"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, file_name: str) -> Credentials:
        """A certificate for `common_name` (also its DNS subjectAltName; with the loopback
        address too), good for TLS server and client authentication."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(common_name),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        credentials = Credentials(self.directory / f"{file_name}.pem",
                                  self.directory / f"{file_name}.key")
        credentials.certificate.write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM))
        credentials.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return credentials


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Authority
    eir: Credentials
    mme: Credentials  # mme.test, from our CA
    mme_named_otherwise: Credentials  # mme2.test, from our CA
    stranger: Credentials  # mme.test, from a CA the server does not trust


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority(directory, "Test Operator CA")
    other = Authority(directory, "Other CA")
    return Pki(directory, ca, ca.issue(EIR_HOST, "eir"), ca.issue("mme.test", "mme"),
               ca.issue("mme2.test", "mme2"), other.issue("mme.test", "stranger"))


# -- the server ----------------------------------------------------------------------------

def tls_config(pki: Pki, extra: str = "") -> str:
    """A config file next to the certificates, naming them relative to itself."""
    path = pki.directory / "eir.yaml"
    path.write_text(
        "diameter:\n"
        f"  origin_host: {EIR_HOST}\n"
        "  tls:\n"
        "    listen: ['127.0.0.1:0']\n"
        "    certificate: eir.pem\n"
        "    key: eir.key\n"
        f"    ca: '{pki.ca.path.name}'\n" + extra)
    return str(path)


@pytest.fixture
def tls_server(eir_server, pki):
    """`eir serve` with a plain listener and a TLS listener; (server, TLS address)."""
    server = eir_server("--config", tls_config(pki))
    port = int(server.wait_for_log(TLS_LISTENING).group(1))
    return server, ("127.0.0.1", port)


def client_context(pki: Pki, credentials: Credentials | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca.path)
    if credentials is not None:
        context.load_cert_chain(credentials.certificate, credentials.key)
    return context


def tls_connect(address, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(address, timeout=5)
    return context.wrap_socket(sock, server_hostname=EIR_HOST)


def base_request(code: int, hop_by_hop: int, extra: list | None = None) -> bytes:
    return raw(DiamG(drFlags=0x80, drCode=code, drAppId=0, drHbHId=hop_by_hop,
                     drEtEId=hop_by_hop, avpList=origin_avps() + (extra or [])))


# -- over TLS: the whole exchange ----------------------------------------------------------

def test_cer_ecr_dwr_and_dpr_over_mutual_tls(tls_server, pki):
    server, address = tls_server
    with tls_connect(address, client_context(pki, pki.mme)) as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        sock.sendall(cer())
        cea = parse_answer(read_message(sock))
        assert (cea.code, cea.result_code) == (CER_CODE, SUCCESS)
        assert cea.all(299) == []  # no Inband-Security-Id: TLS on connect needs none
        sock.sendall(ecr(hop_by_hop=7, end_to_end=7))
        eca = parse_answer(read_message(sock))
        assert (eca.code, eca.hop_by_hop, eca.result_code, eca.equipment_status) == (
            ECR_CODE, 7, SUCCESS, 1)  # example.csv: blacklisted
        sock.sendall(base_request(DWR_CODE, 8))
        dwa = parse_answer(read_message(sock))
        assert (dwa.code, dwa.hop_by_hop, dwa.result_code) == (DWR_CODE, 8, SUCCESS)
        sock.sendall(base_request(DPR_CODE, 9, [AVP("Disconnect-Cause", val=2)]))
        dpa = parse_answer(read_message(sock))
        assert (dpa.code, dpa.result_code) == (DPR_CODE, SUCCESS)
    server.wait_for_log(r"peer mme\.test \(realm test\) is open")
    server.wait_for_log(r"mme\.test: peer sent DPR")


def test_tls_listener_alone_when_listen_is_empty(tmp_path, pki):
    from eir.core.config import load_settings
    path = tmp_path / "eir.yaml"
    path.write_text(f"diameter:\n  listen: []\n  tls:\n    certificate: {pki.eir.certificate}\n"
                    f"    key: {pki.eir.key}\n    ca: {pki.ca.path}\n")
    diameter = load_settings(path).diameter
    assert diameter.listen == [] and diameter.tls.listen == ["0.0.0.0:5868", "[::]:5868"]
    path.write_text("diameter:\n  listen: []\n")
    with pytest.raises(Exception, match=r"eir.yaml:2: diameter.listen: .*diameter.tls.listen"):
        load_settings(path)


# -- refused peers -------------------------------------------------------------------------

def assert_no_diameter_over(address, context: ssl.SSLContext) -> Exception:
    """The handshake fails, or the connection ends before any answer to our CER."""
    try:
        with tls_connect(address, context) as sock:
            sock.sendall(cer())
            answer = read_message(sock)
    except (ssl.SSLError, ConnectionError, ConnectionClosed) as exc:
        return exc
    raise AssertionError(f"got an answer over TLS: {parse_answer(answer)}")


@pytest.mark.parametrize("client, reason", [
    (None, r"PEER_DID_NOT_RETURN_A_CERTIFICATE|CERTIFICATE_REQUIRED"),
    ("stranger", r"CERTIFICATE_VERIFY_FAILED"),
], ids=["no client certificate", "certificate from another CA"])
def test_python_client_without_a_trusted_certificate_is_refused(tls_server, pki, client,
                                                                reason):
    server, address = tls_server
    credentials = getattr(pki, client) if client else None
    assert_no_diameter_over(address, client_context(pki, credentials))
    server.wait_for_log(rf"127\.0\.0\.1:\d+: TLS handshake refused: .*({reason})")
    assert "is open" not in server.log()


def s_client(address, pki: Pki, credentials: Credentials | None, messages: bytes):
    """`openssl s_client` sending `messages` once connected; what it printed on stdout (the
    server's answers, as bytes) and its exit code."""
    command = ["openssl", "s_client", "-connect", f"{address[0]}:{address[1]}",
               "-servername", EIR_HOST, "-CAfile", str(pki.ca.path), "-verify_return_error",
               "-quiet"]
    if credentials is not None:
        command += ["-cert", str(credentials.certificate), "-key", str(credentials.key)]
    result = subprocess.run(command, input=messages, capture_output=True, timeout=30)
    return result.stdout, result.returncode, result.stderr.decode(errors="replace")


def split_messages(data: bytes) -> list:
    answers = []
    while data:
        length = int.from_bytes(data[1:4], "big")
        answers.append(parse_answer(data[:length]))
        data = data[length:]
    return answers


def test_openssl_s_client_with_its_certificate_completes_cer_and_dpr(tls_server, pki):
    server, address = tls_server
    dpr = base_request(DPR_CODE, 5, [AVP("Disconnect-Cause", val=2)])
    out, _, err = s_client(address, pki, pki.mme, cer() + ecr(hop_by_hop=4) + dpr)
    answers = split_messages(out)
    assert [(a.code, a.result_code) for a in answers] == [
        (CER_CODE, SUCCESS), (ECR_CODE, SUCCESS), (DPR_CODE, SUCCESS)], err
    server.wait_for_log(r"mme\.test: peer sent DPR")


@pytest.mark.parametrize("client", [None, "stranger"],
                         ids=["no client certificate", "certificate from another CA"])
def test_openssl_s_client_without_a_trusted_certificate_is_refused(tls_server, pki, client):
    server, address = tls_server
    out, _, _ = s_client(address, pki, getattr(pki, client) if client else None, cer())
    assert out == b""
    server.wait_for_log(r"TLS handshake refused")
    assert "is open" not in server.log()


def test_origin_host_must_be_a_name_of_the_client_certificate(tls_server, pki):
    server, address = tls_server
    with tls_connect(address, client_context(pki, pki.mme_named_otherwise)) as sock:
        sock.sendall(cer())  # Origin-Host mme.test, certificate for mme2.test
        cea = parse_answer(read_message(sock))
        assert (cea.result_code, cea.error_bit) == (UNKNOWN_PEER, True)
        with pytest.raises((ConnectionClosed, ConnectionError, ssl.SSLError)):
            read_message(sock)
    server.wait_for_log(r"mme\.test: CER refused with 3010 DIAMETER_UNKNOWN_PEER: Origin-Host "
                        r"mme\.test is not a name its TLS certificate was issued to "
                        r"\(mme2\.test\)")


def test_plain_tcp_on_the_tls_port_is_refused_and_logged(tls_server):
    server, address = tls_server
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(cer())
        sock.settimeout(5)
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionError:
            pass
    assert not data.startswith(b"\x01")  # no Diameter message (version 1) came back
    server.wait_for_log(r"TLS handshake refused")


def test_unusable_tls_files_stop_the_start_with_the_file_named(tmp_path, pki):
    path = tmp_path / "eir.yaml"
    (tmp_path / "lists.csv").write_text("imei,status\n")  # without lists it would not start
    lists = "lists:\n  files: [lists.csv]\n"
    path.write_text(lists + "diameter:\n  listen: ['127.0.0.1:0']\n  tls:\n"
                    "    certificate: nowhere.pem\n"
                    f"    key: {pki.eir.key}\n    ca: {pki.ca.path}\n")
    result = run_eir("serve", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{tmp_path / 'nowhere.pem'}: no such file" in result.stderr
    path.write_text(lists + "diameter:\n  listen: ['127.0.0.1:0']\n  tls:\n"
                    f"    certificate: {pki.eir.certificate}\n    key: {pki.mme.key}\n"
                    f"    ca: {pki.ca.path}\n")  # a key that is not the certificate's
    result = run_eir("serve", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "cannot use this certificate and key" in result.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600], ids=lambda mode: f"{mode:04o}")
def test_a_private_key_others_may_read_is_warned_about(eir_server, pki, tmp_path, mode):
    """As ssh does: every TLS key the server loads (diameter.tls, sbi.tls), a WARNING naming
    the file and its mode when its group or others may read it; the server starts anyway."""
    key = tmp_path / "eir.key"
    key.write_bytes(pki.eir.key.read_bytes())
    key.chmod(mode)
    path = tmp_path / "eir.yaml"
    path.write_text(f"diameter:\n  tls:\n    listen: ['127.0.0.1:0']\n"
                    f"    certificate: {pki.eir.certificate}\n    key: {key}\n"
                    f"    ca: {pki.ca.path}\n"
                    f"sbi:\n  tls:\n    listen: 127.0.0.1:0\n"
                    f"    certificate: {pki.eir.certificate}\n    key: {key}\n")
    server = eir_server("--config", str(path), "--workers", "1")
    server.wait_for_log(TLS_LISTENING)
    server.wait_for_log(r"N5g-eir served on https://")
    for setting in ("diameter.tls.key", "sbi.tls.key"):
        warning = (rf"WARNING eir\.security: permissions {mode:04o} for '{key}' are too open "
                   rf"\({setting}\): a private key should be readable by its owner only")
        if mode & 0o077:
            server.wait_for_log(warning)
        else:
            assert "are too open" not in server.log()


# -- freeDiameterd as the MME, over TLS ----------------------------------------------------

@pytest.mark.peer
@pytest.mark.skipif(shutil.which("freeDiameterd") is None,
                    reason="freeDiameterd is not installed (Debian package freediameterd)")
def test_freediameter_opens_over_tls_and_answers_our_watchdog(eir_server, pki, tmp_path):
    from test_freediameter import FreeDiameter, free_port
    mme = pki.ca.issue("mme.localdomain", "mme-fd")
    server = eir_server("--config", tls_config(pki), "--watchdog", "1", "--log-level", "debug")
    port = int(server.wait_for_log(TLS_LISTENING).group(1))
    config = tmp_path / "freediameter.conf"
    config.write_text(
        'Identity = "mme.localdomain";\nRealm = "localdomain";\n'
        f"Port = {free_port()};\nSecPort = {free_port()};\nNo_SCTP;\nNo_IPv6;\n"
        "TcTimer = 30;\nTwTimer = 6;\n"
        f'TLS_Cred = "{mme.certificate}", "{mme.key}";\nTLS_CA = "{pki.ca.path}";\n'
        f'ConnectPeer = "{EIR_HOST}" {{ ConnectTo = "127.0.0.1"; Port = {port}; No_SCTP; }};\n')
    peer = FreeDiameter(str(config))
    try:
        peer.wait_for(rf"'STATE_WAITCEA'\t-> 'STATE_OPEN'\t'{EIR_HOST}'", timeout=30)
        server.wait_for_log(r"peer mme\.localdomain \(realm localdomain\) is open")
        peer.wait_for(rf"SENT to '{EIR_HOST}': 'Device-Watchdog-Answer'")
        server.wait_for_log(r"mme\.localdomain: DWA received")
    finally:
        peer.kill()
