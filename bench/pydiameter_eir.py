"""A minimal S13 EIR built on python-diameter, for comparison with `eir serve` in e2e.py.

asyncio server: frames messages off the stream, decodes each with Message.from_bytes, answers
CER, DWR, DPR and ECR via to_answer(), and encodes with as_bytes(). The verdict is a dict
lookup: exact 14-digit IMEI, else its 8-digit TAC, else Experimental-Result 5422. It reads the
same native CSV list (IMEI ranges and IMSI pairings are ignored: a dict cannot hold them).
No grammar validation, no watchdog, no error answers: it is a lower bound on the work.

    python3 bench/pydiameter_eir.py --listen 127.0.0.1:0 --list FILE
    → stderr: "listening on tcp 127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import signal
import sys
from pathlib import Path

from diameter.message import Message
from diameter.message.avp.grouped import ExperimentalResult, VendorSpecificApplicationId

# tests/ is not a package: the CEA capabilities come from its python-diameter helpers (shared
# with the tests and hotpath.py), imported as a top-level module from there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers_pydiameter import S13, TGPP, set_s13_capabilities  # noqa: E402

ORIGIN_HOST, ORIGIN_REALM = b"eir-pd.localdomain", b"localdomain"
STATUS = {"whitelist": 0, "blacklist": 1, "greylist": 2}
SEVERITY = {0: 0, 2: 1, 1: 2}  # a duplicate errs on blocking, as eir does


def load_table(path: str) -> dict[str, int]:
    """IMEI (14 digits) or TAC (8 digits) → Equipment-Status, from a native CSV list."""
    table: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(line for line in handle if not line.startswith("#")):
            key, status, imsi = row["imei"], row["status"], row.get("imsi") or ""
            if "-" in key or imsi:
                continue
            key = key if len(key) == 8 else key[:14]
            table[key] = max(table.get(key, 0), STATUS[status], key=SEVERITY.__getitem__)
    return table


def lookup(table: dict[str, int], imei: str) -> int | None:
    status = table.get(imei[:14])
    return status if status is not None else table.get(imei[:8])


class PyDiameterProtocol(asyncio.Protocol):
    def __init__(self, table: dict[str, int]):
        self.table = table
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        out = []
        pos = 0
        while len(buffer) - pos >= 20:
            length = int.from_bytes(buffer[pos + 1:pos + 4], "big")
            if length < 20 or len(buffer) - pos < length:
                break
            answer = self.answer(Message.from_bytes(buffer[pos:pos + length]))
            if answer is not None:
                out.append(answer.as_bytes())
            pos += length
        self.buffer = buffer[pos:]
        if out:
            self.transport.write(b"".join(out))

    def answer(self, request: Message):
        header = request.header
        if not header.is_request:
            return None
        answer = request.to_answer()
        answer.origin_host, answer.origin_realm = ORIGIN_HOST, ORIGIN_REALM
        code = header.command_code
        if code == 324:
            answer.session_id = request.session_id
            answer.vendor_specific_application_id = VendorSpecificApplicationId(
                vendor_id=TGPP, auth_application_id=S13)
            answer.auth_session_state = 1
            status = lookup(self.table, request.terminal_information.imei)
            if status is None:
                answer.experimental_result = ExperimentalResult(
                    vendor_id=TGPP, experimental_result_code=5422)
            else:
                answer.result_code = 2001
                answer.equipment_status = status
        elif code == 257:
            answer.result_code = 2001
            set_s13_capabilities(answer, "pydiameter-eir")
        elif code in (280, 282):
            answer.result_code = 2001
        else:
            answer.result_code = 3001
            answer.header.is_error = True
        return answer


async def serve(host: str, port: int, table: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: PyDiameterProtocol(table), host, port)
    bound = server.sockets[0].getsockname()
    print(f"pydiameter_eir: {len(table):,} entries; listening on tcp {bound[0]}:{bound[1]}",
          file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    parser.add_argument("--list", required=True, metavar="FILE")
    args = parser.parse_args()
    logging.getLogger("diameter").setLevel(logging.ERROR)
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host, int(port), load_table(args.list)))


if __name__ == "__main__":
    main()
