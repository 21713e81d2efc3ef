"""SIGHUP swaps in a new list snapshot while serving; a bad file leaves the old one in force."""

import signal

from helpers_wire import ecr, open_peer, parse_answer, read_message

WHITELISTED, BLACKLISTED = 0, 1
IMEI = "35404509123456"


def verdict(sock, hop_by_hop: int) -> tuple[int | None, int | None]:
    sock.sendall(ecr(imei=IMEI, hop_by_hop=hop_by_hop))
    answer = parse_answer(read_message(sock))
    assert answer.hop_by_hop == hop_by_hop
    return answer.result_code, answer.equipment_status


def test_sighup_reloads_lists_and_refuses_a_bad_file_whole(eir_server, tmp_path):
    lists = tmp_path / "lists.csv"
    lists.write_text(f"imei,status\n{IMEI},whitelist\n")
    server = eir_server(lists=[lists])
    with open_peer(server.address) as sock:
        assert verdict(sock, 10) == (2001, WHITELISTED)

        lists.write_text(f"imei,status,reason\n{IMEI},blacklist,reported stolen\n")
        mark = len(server.lines)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(r"lists reloaded: version \w+, 1 rules", start=mark)
        # Same connection, no reconnect: the new snapshot answers.
        assert verdict(sock, 11) == (2001, BLACKLISTED)

        # A file with one bad row is refused whole: the good row before it is not applied.
        lists.write_text(f"imei,status\n{IMEI},whitelist\n1234,blacklist\n")
        mark = len(server.lines)
        server.process.send_signal(signal.SIGHUP)
        refusal = server.wait_for_log(r"list reload refused", start=mark)
        assert refusal
        server.wait_for_log(rf"{lists}:3: imei: '1234' has 4 digits", start=mark)
        assert verdict(sock, 12) == (2001, BLACKLISTED)
    assert server.stop() == 0
