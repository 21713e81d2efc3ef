import socket

from eir.diameter.codec import decode_avps, encode_message, parse_header
from eir.diameter.dictionary import Dictionary


def test_server_starts_answers_cer_and_stops_on_sigterm(eir_server):
    server = eir_server()
    d = Dictionary.load()
    e = d.encode
    cer = encode_message(0x80, 257, 0, 1, 1, e("Origin-Host", "mme.test") + e(
        "Origin-Realm", "test") + e("Host-IP-Address", "127.0.0.1") + e("Vendor-Id", 0) + e(
        "Product-Name", "x") + e("Auth-Application-Id", 16777252))
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(cer)
        data = sock.recv(65536)
        header = parse_header(data)
        assert header.code == 257
        codes = {a.code: a.data for a in decode_avps(data, 20, header.length)}
        assert codes[268] == (2001).to_bytes(4, "big")
    assert server.stop() == 0
