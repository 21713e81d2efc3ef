"""Scale benchmark: a national-size DIRBS blacklist through `eir sync`, `eir serve` and the
in-process lookup, with the figures extrapolated to 1.2 billion IMEIs.

    python3 bench/scale.py                      # 100,000,000 IMEIs (about 10 minutes here)
    python3 bench/scale.py --quick              # 1,000,000 IMEIs, about 30 s (CI)
    python3 bench/scale.py --entries 10000000 --keep --workdir /tmp/scale10m
    python3 bench/scale.py --target --keep --workdir /tmp/scale-1200m
                                                # 1,200,000,000 IMEIs, zipped; ~30 GB of
                                                # disk and hours on a shared 2-core VM
                                                # (bench/RESULTS.md, "1.2 billion IMEIs")

Steps (a work directory under /tmp, removed at the end unless --keep):

1. Generate `<date>_blacklist.csv` (imei,block_date,reasons): N distinct IMEIs over about
   20,000 TACs with Zipf popularity (a TAC holds at most --tac-fill of its 1,000,000 serial
   numbers, the excess goes to the next TACs), in random order; 15 digits, Luhn check digit
   or a spare 0; 36 block dates and 7 reason combinations (the rows of each 2,000,000-row
   chunk grouped by them). numpy, chunked writes; with --zip-level (--target: 1) the lists
   are `<date>_blacklist.zip` etc., one deflated CSV each, as DIRBS publishes them. And the
   exceptions (pairing) list `<date>_exceptions_<op>.csv` (imei,imsi,msisdn) beside it:
   --exceptions x N pairs (5%), IMEIs from the same TAC popularity, a fifth of them taken
   from the blacklist (a blocked IMEI its owner's SIM may still use), 3% with a second IMSI;
   IMSIs of one MCC/MNC. `eir sync` compiles both into one snapshot.
2. `python -m eir sync --source DIR --store STORE` as a subprocess (import time counts):
   rows/s, its peak RSS (VmHWM and RssAnon polled) and peak disk (the store directory's
   allocated blocks, and the filesystem's growth; the sync is killed if less than 4 GiB stay
   free). Then the same steps called in-process, each timed, for
   the split (checksum, parse, compile, publish) with the peak RSS of each step.
3. Bytes per IMEI: snapshot file size / N.
4. Start-up: wall time from Popen of `python -m eir serve --store STORE --listen
   127.0.0.1:0` to its "listening on" line, and to the ECA of an ECR sent right after it
   (CER/CEA first; requests by python-diameter). Twice: first with the snapshot's pages
   dropped from the page cache (cold-ish), then warm. Also at 1,000,000 IMEIs when N is larger.
5. Lookup in-process: RuleSet(Snapshot.open(path)).decide() timed per call, without and with
   an IMSI: 40% listed IMEIs, 40% absent ones, 20% IMEIs of exception pairs (with the IMSI:
   half of those carry their paired IMSI, half another one).
6. The serving process's resident memory after its first answer, against the snapshot size.
7. ECRs served from the snapshot: `eir serve --store --workers 1` and `eir replay` flat out
   on one connection for --serve-seconds (listed IMEIs, IMEI+IMSI pairs and absent IMEIs),
   with the server's CPU per ECR (`--serve-rate-of DIR`: only this, on a kept run).
8. The figures extrapolated to 1.2 billion IMEIs, with the reasoning.

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT / "tests"), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from helpers_process import LISTENING, RunningServer  # noqa: E402  (tests/)
from helpers_pydiameter import build_cer, build_ecr  # noqa: E402
from helpers_wire import read_message  # noqa: E402
from diameter.message import Message  # noqa: E402

from eir.core.decision import EquipmentStatus, Match, RuleSet, UnknownPolicy  # noqa: E402
from eir.lists.snapshot import SNR_DIGITS, Snapshot  # noqa: E402

FULL_ENTRIES = 100_000_000
QUICK_ENTRIES = 1_000_000
SMALL_ENTRIES = 1_000_000  # the start-up size-independence comparison
TARGET_ENTRIES = 1_200_000_000  # Indonesia's CEIR
WORLD_TACS = 200_000  # order of magnitude of TACs ever allocated: the TAC directory at 1.2e9
TARGETS = {"bytes_per_imei": 5.0, "build_rows_per_s": 1_000_000, "start_to_serving_s": 2.0,
           "lookup_p99_us": 2.0}
CHUNK_ROWS = 2_000_000
SERIAL_BITS = 20  # a generated IMEI's code: TAC index << SERIAL_BITS | serial (< 2**20)
SERIAL_MASK = (1 << SERIAL_BITS) - 1
MAX_PLAIN_ENTRIES = 200_000_000  # above: the lists must be zipped to fit the disk
MIN_FREE_DISK = 4 << 30  # bytes left free on the disk while eir sync runs, or it is killed
REASONS = (  # DIRBS condition names, `|`-joined when several apply
    ("gsma_not_found", 0.30), ("local_stolen", 0.25), ("duplicate_mk1", 0.15),
    ("not_on_registration_list", 0.15), ("malformed_imei", 0.03),
    ("local_stolen|duplicate_mk1", 0.07), ("gsma_not_found|not_on_registration_list", 0.05))
TAC_PREFIXES = (35, 86, 1, 99, 49, 33, 30)  # reporting bodies; 35 and 86 dominate
IMSI_PREFIX = 510_10  # MCC 510 (Indonesia), MNC 10
EXCEPTIONS_OPERATOR = "telkomsel"
EXCEPTIONS_FROM_BLACKLIST = 0.2  # share of exception IMEIs that are on the blacklist too
EXCEPTIONS_SECOND_IMSI = 0.03  # share of exception IMEIs paired with a second IMSI
PAIR_QUERY_SHARE = 0.2  # share of the lookup queries that are IMEIs of exception pairs


def log(text: str = "") -> None:
    print(text, flush=True)


def mb(n_bytes: float) -> float:
    return n_bytes / 1e6


# -- 1. the synthetic registry list --------------------------------------------------------


def tac_counts(n: int, tacs: int, zipf: float, cap: int) -> np.ndarray:
    """IMEIs per TAC: Zipf shares of n, none above cap (the excess spread over the others,
    in proportion), integers summing to n, largest first."""
    if n > tacs * cap:
        raise SystemExit(f"{n:,} IMEIs do not fit in {tacs:,} TACs of at most {cap:,}")
    weight = 1.0 / np.arange(1, tacs + 1, dtype=np.float64) ** zipf
    counts = np.zeros(tacs)
    free = np.ones(tacs, bool)
    remaining = float(n)
    while True:
        share = np.where(free, remaining * weight / weight[free].sum(), 0.0)
        over = free & (share > cap)
        if not over.any():
            counts[free] = share[free]
            break
        counts[over] = cap
        free &= ~over
        remaining -= cap * int(over.sum())
    whole = np.floor(counts).astype(np.int64)
    short = n - int(whole.sum())
    whole[np.argsort(whole - counts)[:short]] += 1  # largest remainders
    return whole


@dataclass
class Dataset:
    csv: Path
    entries: int
    tacs: np.ndarray  # TACs with entries, by popularity
    counts: np.ndarray  # IMEIs per TAC
    sample: np.ndarray  # random present IMEIs (14-digit keys)
    exceptions: Path | None = None
    pairs: int = 0  # rows of the exceptions list
    pair_sample: np.ndarray | None = None  # random (imei, imsi) rows of it, shape (k, 2)
    csv_bytes: int = 0  # both files, as written (zipped or not)
    text_bytes: int = 0  # both files' CSV, uncompressed
    seconds: float = 0.0


def generate(directory: Path, n: int, tac_count: int, zipf: float, fill: float,
             spare_fraction: float, seed: int, sample_size: int,
             exceptions_fraction: float = 0.0, zip_level: int = 0) -> Dataset:
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    counts = tac_counts(n, tac_count, zipf, int(fill * SNR_DIGITS))
    counts = counts[counts > 0]
    # distinct TACs, popularity unrelated to their value
    candidates = (rng.choice(TAC_PREFIXES, 3 * len(counts), p=(.40, .30, .10, .05, .05, .05, .05))
                  .astype(np.int64) * 1_000_000 + rng.integers(0, 1_000_000, 3 * len(counts)))
    tacs = rng.permutation(np.unique(candidates))[:len(counts)]
    # Each IMEI as (index of its TAC in `tacs`) << SERIAL_BITS | serial: its digits and
    # Luhn sum then come from small tables (digit_table), not from 14 divisions a row.
    codes = np.empty(n, np.uint64)
    position = 0
    for index, count in enumerate(counts.tolist()):
        serials = rng.choice(SNR_DIGITS, size=count, replace=False)
        codes[position:position + count] = serials
        codes[position:position + count] |= np.uint64(index << SERIAL_BITS)
        position += count
    rng.shuffle(codes)  # a registry export is in no useful order: the build must sort

    def keys_of(some_codes: np.ndarray) -> np.ndarray:  # 14-digit keys
        return (tacs[(some_codes >> np.uint64(SERIAL_BITS)).astype(np.intp)].astype(np.uint64)
                * np.uint64(SNR_DIGITS) + (some_codes & np.uint64(SERIAL_MASK)))

    sample = keys_of(codes[:sample_size])

    dates = [(datetime.date(2021, 1, 15) + datetime.timedelta(days=30 * i)).strftime("%Y%m%d")
             for i in range(36)]
    date_p = np.linspace(1.0, 3.0, len(dates))  # recent dates hold more
    date_p /= date_p.sum()
    reason_p = np.array([p for _, p in REASONS])
    reason_p /= reason_p.sum()
    tails = [np.frombuffer(f",{d},{r}\n".encode(), np.uint8) for d in dates for r, _ in REASONS]
    tail_cdf = np.cumsum(np.outer(date_p, reason_p).ravel())
    tac_digits, tac_luhn = digit_table(tacs, 8)
    serial_digits, serial_luhn = digit_table(np.arange(SNR_DIGITS), 6)

    path = directory / f"{datetime.date.today():%Y%m%d}_blacklist{'.zip' if zip_level else '.csv'}"
    with ListFile(path, zip_level) as out:
        out.write(b"imei,block_date,reasons\n")
        for start in range(0, n, CHUNK_ROWS):
            m = min(CHUNK_ROWS, n - start)
            # The rows of a chunk are written grouped by their block_date and reasons
            # (fixed-width blocks, no per-byte packing); the IMEIs stay in random order.
            tail = np.minimum(np.searchsorted(tail_cdf, rng.random(m)), len(tails) - 1)
            order = np.argsort(tail.astype(np.uint8), kind="stable")
            chunk = codes[start:start + m][order]
            tac_index = (chunk >> np.uint64(SERIAL_BITS)).astype(np.intp)
            serial = (chunk & np.uint64(SERIAL_MASK)).astype(np.intp)
            imei = np.empty((m, 15), np.uint8)
            imei[:, :8] = tac_digits[tac_index]
            imei[:, 8:14] = serial_digits[serial]
            total = tac_luhn[tac_index] + serial_luhn[serial]
            check = ((10 - total % 10) % 10).astype(np.uint8)
            check[rng.random(m) < spare_fraction] = 0  # "spare digit" 0 instead of Luhn
            imei[:, 14] = check + 48
            counts_per_tail = np.bincount(tail, minlength=len(tails))
            text = np.empty(int(counts_per_tail @ np.array([15 + len(t) for t in tails])),
                            np.uint8)
            row = at = 0
            for tail_bytes, count in zip(tails, counts_per_tail.tolist()):
                if not count:
                    continue
                width = 15 + len(tail_bytes)
                block = text[at:at + count * width].reshape(count, width)
                block[:, :15] = imei[row:row + count]
                block[:, 15:] = tail_bytes
                row += count
                at += count * width
            out.write(text)
    data = Dataset(path, n, tacs, counts, sample)
    data.text_bytes = out.text_bytes
    pairs = round(exceptions_fraction * n)
    if pairs:
        data.exceptions = directory / (f"{datetime.date.today():%Y%m%d}_exceptions_"
                                       f"{EXCEPTIONS_OPERATOR}{'.zip' if zip_level else '.csv'}")
        data.pairs, data.pair_sample, pair_text = generate_exceptions(
            data.exceptions, rng, pairs, keys_of(codes[sample_size:sample_size + pairs]),
            tacs, counts, sample_size, zip_level)
        data.text_bytes += pair_text
    del codes
    data.csv_bytes = sum(p.stat().st_size for p in (path, data.exceptions) if p is not None)
    data.seconds = time.perf_counter() - started
    return data


def digit_table(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(ASCII digits of each value, zero-padded to `width`; each value's Luhn sum, its
    odd positions doubled): an IMEI's TAC is 8 digits and its serial 6, both even, so the
    IMEI's Luhn sum is its TAC's plus its serial's."""
    digits = np.empty((len(values), width), np.uint8)
    rest = values.astype(np.uint64)
    for j in range(width - 1, -1, -1):
        digits[:, j] = rest % 10
        rest //= 10
    doubled = digits[:, 1::2] * 2
    luhn = digits[:, 0::2].sum(1, dtype=np.int64) + (doubled // 10 + doubled % 10).sum(1)
    return digits + 48, luhn.astype(np.uint16)


def generate_exceptions(path: Path, rng, pairs: int, blacklisted: np.ndarray,
                        tacs: np.ndarray, counts: np.ndarray, sample_size: int,
                        zip_level: int = 0):
    """Write a DIRBS exceptions list of `pairs` rows (imei,imsi,msisdn; IMEIs normalised to
    14 digits as DIRBS writes them); returns (rows, a random sample of (imei, imsi) rows).

    IMEIs: EXCEPTIONS_FROM_BLACKLIST of them from the blacklist (`blacklisted`, in random
    order), the rest drawn with the blacklist's TAC popularity (so some of those are listed
    too), EXCEPTIONS_SECOND_IMSI of them repeated with a second IMSI. IMSIs: MCC/MNC
    IMSI_PREFIX and 10 random digits; MSISDNs: +62 8xx, 12 digits."""
    second = round(pairs * EXCEPTIONS_SECOND_IMSI / (1 + EXCEPTIONS_SECOND_IMSI))
    distinct = pairs - second
    from_blacklist = min(round(distinct * EXCEPTIONS_FROM_BLACKLIST), len(blacklisted))
    drawn = distinct - from_blacklist
    imei = np.empty(pairs, np.uint64)
    imei[:from_blacklist] = blacklisted[:from_blacklist]
    imei[from_blacklist:distinct] = (
        rng.choice(tacs, drawn, p=counts / counts.sum()).astype(np.uint64) * SNR_DIGITS
        + rng.integers(0, SNR_DIGITS, drawn).astype(np.uint64))
    imei[distinct:] = imei[rng.choice(distinct, second, replace=False)]
    imsi = np.uint64(IMSI_PREFIX * 10**10) + rng.integers(0, 10**10, pairs).astype(np.uint64)
    msisdn = 628_000_000_000 + rng.integers(0, 10**9, pairs)
    order = rng.permutation(pairs)
    imei, imsi, msisdn = imei[order], imsi[order], msisdn[order]
    with ListFile(path, zip_level) as out:
        out.write(b"imei,imsi,msisdn\n")
        for start in range(0, pairs, CHUNK_ROWS):
            end = start + CHUNK_ROWS
            out.write("".join(f"{i:014d},{s},{m}\n" for i, s, m in zip(
                imei[start:end].tolist(), imsi[start:end].tolist(),
                msisdn[start:end].tolist())).encode())
    picked = rng.choice(pairs, min(sample_size, pairs), replace=False)
    return pairs, np.stack([imei[picked], imsi[picked]], axis=1), out.text_bytes


class ListFile:
    """Where a generated list goes: a plain CSV, or (zip_level > 0) a zip archive holding
    it as one deflated member named like the archive (`x.zip` holds `x.csv`), as DIRBS
    publishes its lists. Deflating runs in a thread (zlib releases the GIL) so that it
    overlaps the generation of the next chunk; zip64 lets the member exceed 4 GiB."""

    def __init__(self, path: Path, zip_level: int = 0):
        self.path = path
        self.zip_level = zip_level
        self.text_bytes = 0  # of CSV, before compression

    def __enter__(self) -> "ListFile":
        if not self.zip_level:
            self._file = open(self.path, "wb")
            self._write = self._file.write
            return self
        self._archive = zipfile.ZipFile(self.path, "w", zipfile.ZIP_DEFLATED,
                                        compresslevel=self.zip_level)
        self._file = self._archive.open(self.path.with_suffix(".csv").name, "w",
                                        force_zip64=True)
        self._queue: queue.Queue = queue.Queue(maxsize=3)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        self._write = self._queue.put
        return self

    def _drain(self) -> None:
        while (chunk := self._queue.get()) is not None:
            try:
                self._file.write(chunk)
            except BaseException as exc:  # reported by close
                self._failure = exc

    def write(self, chunk: bytes) -> None:
        self.text_bytes += len(chunk)
        self._write(chunk)

    def __exit__(self, *exc) -> None:
        if self.zip_level:
            self._queue.put(None)
            self._thread.join()
            self._file.close()
            self._archive.close()
            if self._failure is not None:
                raise self._failure
        else:
            self._file.close()


def first_row(path: Path) -> str:
    """The first data row of a generated list (CSV or zipped)."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive, archive.open(archive.namelist()[0]) as member:
            member.readline()
            return member.readline().decode().strip()
    with path.open() as handle:
        handle.readline()
        return handle.readline().strip()


def luhn_ok(imei15: str) -> bool:
    total = 0
    for i, ch in enumerate(imei15[:14]):
        d = int(ch) * (2 if i % 2 else 1)
        total += d // 10 + d % 10
    return (total + int(imei15[14])) % 10 == 0


# -- 2. build -----------------------------------------------------------------------------


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("EIR_CONFIG", None)  # built-in defaults: run in a directory without config/
    return env


@dataclass
class Build:
    seconds: float
    peak_rss: int  # bytes (VmHWM: includes mapped list files, which are page cache)
    output: str
    peak_anon: int = 0  # bytes: the peak of RssAnon, the memory the build really needs
    peak_store: int = 0  # bytes: the store directory's peak allocated size (PeakDisk)
    peak_filesystem: int = 0  # bytes: the peak growth of the filesystem's used space


def run_sync(source: Path, store: Path, cwd: Path) -> Build:
    command = [sys.executable, "-m", "eir", "sync", "--source", str(source), "--store",
               str(store)]
    with tempfile.TemporaryFile("w+") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=output,
                                   stderr=subprocess.STDOUT)
        disk = PeakDisk(store, process)
        peak = PeakRss(process.pid)
        process.wait()
        seconds = time.perf_counter() - started
        peak.stop()
        disk.stop()
        output.seek(0)
        text = output.read()
    if process.returncode != 0:
        raise SystemExit(f"eir sync failed (exit {process.returncode}):\n{text}")
    return Build(seconds, peak.bytes, text.strip(), peak.anon, disk.store, disk.filesystem)


class PeakDisk:
    """The peak disk space a sync takes, polled every half second: the store directory's
    allocated blocks (sort runs, tables, states, the snapshot; holes punched in a file do
    not count), and the growth of the filesystem's used space since the start (also counts
    unlinked files still open, such as spilled sections, and whatever else runs on the
    machine). On a shared machine the sync is killed if the filesystem's free space falls
    below MIN_FREE_DISK, so that a benchmark does not fill the disk under other work."""

    def __init__(self, store: Path, process: subprocess.Popen):
        self.root = store
        self.process = process
        self.killed = False
        self.store = 0
        self.filesystem = 0
        self._start = self._used()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _used(self) -> int:
        usage = shutil.disk_usage(self.root.parent)
        if usage.free < MIN_FREE_DISK and self.process.poll() is None:
            self.killed = True
            self.process.kill()
            log(f"eir sync KILLED: {mb(usage.free):,.0f} MB left on the filesystem of "
                f"{self.root}")
        return usage.total - usage.free

    def _poll(self) -> None:
        while True:
            self.store = max(self.store, _allocated(self.root))
            self.filesystem = max(self.filesystem, self._used() - self._start)
            if self._done.wait(0.5):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)


def _allocated(root: Path) -> int:
    """Bytes allocated on disk to the files under root (st_blocks: sparse holes excluded)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                pass  # removed meanwhile
    return total


class PeakRss:
    """The peak RSS (VmHWM) of a running process, read from /proc every 20 ms until it
    exits. Not getrusage(RUSAGE_CHILDREN) nor wait4: the child's ru_maxrss counts the
    parent's pages it shared between fork and exec, which is this benchmark's own RSS."""

    def __init__(self, pid: int):
        self.pid = pid
        self.bytes = 0
        self.anon = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(0.02):
            try:
                self.bytes = max(self.bytes, _status_kb(self.pid, "VmHWM") * 1024)
                self.anon = max(self.anon, _status_kb(self.pid, "RssAnon") * 1024)
            except (OSError, ValueError):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)


def _status_kb(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def split_in_process(csv: Path, scratch: Path, exceptions: Path | None = None
                     ) -> list[tuple[str, float, int]]:
    """(step, seconds, peak RSS bytes during it) for what `eir sync` does, step by step."""
    from eir.lists.formats import parse_path
    from eir.lists.snapshot import compile_snapshot
    from eir.lists.store import Store
    from eir.lists.sync import _read_once

    steps = []
    resets = _reset_peak_rss()

    def step(name, function):
        if resets:
            _reset_peak_rss()
        started = time.perf_counter()
        result = function()
        steps.append((name, time.perf_counter() - started,
                      _status_kb("self", "VmHWM") * 1024 if resets else 0))
        return result

    # As `eir sync` does: each file read once, hashed while copied into the store's scratch,
    # and the copy parsed.
    copies = scratch / "tmp" / "input"
    copies.mkdir(parents=True, exist_ok=True)
    digest = step("sha256 of the CSV, copied into the scratch",
                  lambda: _read_once(csv, copies / csv.name))
    parsed = step("parse (pyarrow CSV, IMEI keys, attributes)",
                  lambda: parse_path(copies / csv.name, display_name=csv.name))
    sources = [{"name": csv.name, "sha256": digest, "kind": "list", "rows": parsed.rows}]
    lists = [parsed]
    if exceptions is not None:
        paired_digest = _read_once(exceptions, copies / exceptions.name)
        paired = step("parse the exceptions list (IMEI, IMSI)",
                      lambda: parse_path(copies / exceptions.name,
                                         display_name=exceptions.name))
        sources.append({"name": exceptions.name, "sha256": paired_digest, "kind": "list",
                        "rows": paired.rows})
        lists.append(paired)
    data = step("compile_snapshot (sort, merge, sections, bytes)",
                lambda: compile_snapshot(lists, "000001", {}, sources))
    lists.clear()  # free the parsed lists before publishing
    del parsed
    store = Store(scratch)

    def publish():
        with store.locked():
            store.publish(data, "000001")

    step("publish (check, write, fsync, rename)", publish)
    del data
    shutil.rmtree(scratch, ignore_errors=True)
    return steps


# -- 4 and 6. start-up and memory of `eir serve` --------------------------------------------


def drop_from_page_cache(path: Path) -> None:
    """Evict a (clean, fsynced) file's pages from the page cache: no root needed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@dataclass
class Startup:
    to_listening: float
    to_first_answer: float
    vm_rss: int  # bytes, right after the first answer
    rss_file: int
    rss_anon: int
    snapshot_rss: int  # resident pages of the snapshot's own mapping
    status: str


def time_startup(store: Path, cwd: Path, imei: str, imsi: str, expected: int,
                 cold: bool, snapshot: Path) -> Startup:
    if cold:
        drop_from_page_cache(snapshot)
    cer = build_cer()
    ecr = build_ecr(imei, imsi, "mme.localdomain;1;1", 2).as_bytes()
    command = [sys.executable, "-m", "eir", "serve", "--store", str(store), "--listen",
               "127.0.0.1:0"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True, errors="replace")
    server = RunningServer(process, process.stderr, "eir serve")
    try:
        _, match = server.wait_for_line(LISTENING.pattern, timeout=120)
        to_listening = time.perf_counter() - started
        with socket.create_connection((match.group(2).strip("[]"), int(match.group(3))),
                                      timeout=30) as sock:
            sock.sendall(cer)
            read_message(sock, 30)
            sock.sendall(ecr)
            answer = read_message(sock, 30)
            to_answer = time.perf_counter() - started
            rss = {key: _status_kb(process.pid, key) * 1024
                   for key in ("VmRSS", "RssFile", "RssAnon")}
            rss["snapshot"] = _mapping_rss(process.pid, snapshot)
        eca = Message.from_bytes(answer)
        status = eca.equipment_status
        if status != expected:
            raise SystemExit(f"first ECA: Equipment-Status {status}, expected {expected}:\n"
                             f"{eca}\n{server.log()}")
        server.stop()
    except BaseException:
        server.kill()
        raise
    return Startup(to_listening, to_answer, rss["VmRSS"], rss["RssFile"], rss["RssAnon"],
                   rss["snapshot"], EquipmentStatus(status).name)


def _mapping_rss(pid: int, path: Path) -> int:
    """Resident bytes of every mapping of `path` in process `pid` (/proc/PID/smaps)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


def format_served(served: dict) -> str:
    return (f"{served['rate']:,.0f} ECR/s, p50 {served['p50_ms']:.2f} / p99 "
            f"{served['p99_ms']:.2f} ms, server CPU {served['server_cpu_us_per_ecr']:.1f} "
            f"µs/ECR, errors {served['errors']}")


# -- 8. ECRs served from the snapshot --------------------------------------------------------


def serve_rate(store: Path, cwd: Path, seconds: float, seed: int, count: int = 20_000
               ) -> dict:
    """`eir serve --store STORE --workers 1` loaded by `eir replay` flat out on one
    connection (window 128) for `seconds`: ECR/s, latency and the server's CPU per ECR (its
    process tree, from /proc). The mix: `count` listed IMEIs drawn from the snapshot with a
    random IMSI, its IMEI+IMSI pairs with their own IMSI, and as many IMEIs absent from
    the list (random serials in its TACs), shuffled."""
    from load_table import replay  # bench/: eir replay's JSON report, trimmed
    from helpers_process import start_eir

    rng = random.Random(seed)
    snapshot = Snapshot.open(sorted((store / "snapshots").glob("*.eirsnap"))[-1])
    subjects = [(imei, imsi or str(IMSI_PREFIX * 10**10 + rng.randrange(10**10)))
                for imei, imsi in snapshot.sample_subjects(rng, count // 2)]
    tacs = snapshot._tac
    subjects += [(f"{tacs[rng.randrange(len(tacs))] * SNR_DIGITS + rng.randrange(SNR_DIGITS):014d}",
                  str(IMSI_PREFIX * 10**10 + rng.randrange(10**10))) for _ in range(count // 2)]
    rng.shuffle(subjects)
    del snapshot, tacs
    mix = cwd / "serve-mix.csv"
    mix.write_text("imei,imsi\n" + "".join(f"{imei},{imsi}\n" for imei, imsi in subjects))
    server = start_eir("--store", str(store), "--workers", "1", lists=[], cwd=cwd,
                       timeout=120)
    try:
        before = _tree_cpu(server.process.pid)
        report = replay(server.port, mix, seconds, None, [])
        cpu = _tree_cpu(server.process.pid) - before
    finally:
        server.stop()
    report["server_cpu_us_per_ecr"] = cpu * 1e6 / max(1, report["sent"])
    report["mix"] = len(subjects)
    return report


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants, from /proc."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # exited meanwhile
    return total


# -- 5. lookup -----------------------------------------------------------------------------


def percentile(sorted_values, q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _timed(function, queries, day) -> list[int]:
    clock = time.perf_counter_ns
    out = [0] * len(queries)
    for i, (imei, imsi) in enumerate(queries):
        started = clock()
        function(imei, imsi, day)
        out[i] = clock() - started
    return out


def _empty(imei, imsi=None, day=None):
    return None


@dataclass
class Lookup:
    label: str
    p50: float
    p99: float
    p999: float
    first_touch_p99: float


def lookup_shares(count: int, data: Dataset) -> tuple[int, int, int]:
    """(present, absent, paired) query counts: PAIR_QUERY_SHARE of IMEIs of exception pairs
    (none without an exceptions list), the rest half present, half absent."""
    paired = min(round(count * PAIR_QUERY_SHARE), data.pairs and len(data.pair_sample))
    present = (count - paired) // 2
    return present, count - paired - present, paired


def measure_lookups(snapshot_path: Path, data: Dataset, count: int, seed: int
                    ) -> tuple[list[Lookup], float, float, int]:
    """Per-call decide() latencies (µs, empty-call overhead subtracted); also that overhead
    (ns) and the time to open the snapshot (s).

    Queries: listed IMEIs, absent IMEIs in listed TACs and IMEIs of exception pairs
    (lookup_shares). "IMEI + IMSI" gives the listed and absent ones a random IMSI of the
    operator, and half the paired IMEIs their own IMSI (WHITELISTED by the pair), the other
    half another one (falls through to the IMEI's other entries)."""
    rng = np.random.default_rng(seed + 1)
    started = time.perf_counter()
    rule_set = RuleSet(Snapshot.open(snapshot_path), UnknownPolicy.UNKNOWN)
    open_seconds = time.perf_counter() - started
    day = int(f"{datetime.date.today():%Y%m%d}")
    present_count, half, paired_count = lookup_shares(count, data)
    present = [f"{k:014d}" for k in data.sample[:present_count].tolist()]
    absent: list[str] = []
    weights = data.counts / data.counts.sum()
    while len(absent) < half:  # absent IMEIs in listed TACs, as popular: a full bisection
        tacs = rng.choice(data.tacs, 4 * half, p=weights)
        keys = tacs * SNR_DIGITS + rng.integers(0, SNR_DIGITS, len(tacs))
        for key in keys.tolist():
            imei = f"{key:014d}"
            if rule_set.snapshot.lookup(imei, None, day) is None:
                absent.append(imei)
                if len(absent) == half:
                    break
    random_imsis = [str(IMSI_PREFIX * 10**10 + int(x))
                    for x in rng.integers(0, 10**10, present_count + half + paired_count)]
    own = paired_count // 2  # paired IMEIs queried with their own IMSI
    pairs = data.pair_sample[:paired_count].tolist() if paired_count else []
    paired = [f"{imei:014d}" for imei, _ in pairs]
    paired_imsis = [str(imsi) for _, imsi in pairs[:own]] + random_imsis[own:paired_count]
    for imei in present[:1000]:
        verdict = rule_set.decide(imei, None, day)
        if verdict.status is not EquipmentStatus.BLACKLISTED or verdict.match is not Match.IMEI:
            raise SystemExit(f"{imei}: expected BLACKLISTED by IMEI, got {verdict}")
    for i, (imei, imsi) in enumerate(zip(paired[:2000], paired_imsis[:2000])):
        verdict = rule_set.decide(imei, imsi, day)
        if i < own:
            if verdict.status is not EquipmentStatus.WHITELISTED or \
                    verdict.match is not Match.IMEI_IMSI:
                raise SystemExit(f"{imei} with its IMSI {imsi}: expected WHITELISTED by the "
                                 f"IMEI+IMSI pair, got {verdict}")
        else:  # another IMSI: the pair does not apply, the IMEI alone decides
            alone = rule_set.decide(imei, None, day)
            if verdict != alone or verdict.match is Match.IMEI_IMSI:
                raise SystemExit(f"{imei} with another IMSI {imsi}: expected {alone}, got "
                                 f"{verdict}")
    queries = list(zip(present + absent, random_imsis[paired_count:])) + \
        list(zip(paired, paired_imsis))
    random.Random(seed).shuffle(queries)
    imeis = [imei for imei, _ in queries]
    imsis = [imsi for _, imsi in queries]
    gc.collect()
    gc.freeze()  # as eir serve does after loading
    overhead = sorted(_timed(_empty, list(zip(imeis, imsis)), day))[len(imeis) // 2]
    results = []
    for label, queries in (("IMEI only", [(i, None) for i in imeis]),
                           ("IMEI + IMSI", list(zip(imeis, imsis)))):
        first = sorted(_timed(rule_set.decide, queries, day))  # first touch of the pages
        warm = sorted(_timed(rule_set.decide, queries, day))
        us = [max(0, t - overhead) / 1000 for t in warm]
        results.append(Lookup(label, percentile(us, .5), percentile(us, .99),
                              percentile(us, .999),
                              max(0, percentile(first, .99) - overhead) / 1000))
    gc.unfreeze()
    # the TAC directory's size (the pure-Python search's dict is built on first use only)
    return results, overhead, open_seconds, len(rule_set.snapshot._tac)


# -- the run -------------------------------------------------------------------------------


def build_and_measure(work: Path, name: str, n: int, args):
    directory = work / name
    source, store = directory / "source", directory / "store"
    source.mkdir(parents=True)
    data = generate(source, n, args.tacs, args.zipf, args.tac_fill, args.spare_fraction,
                    args.seed, max(args.lookups, 1000), args.exceptions, args.zip_level)
    log(f"[{name}] generated {data.csv.name}: {n:,} IMEIs in {len(data.tacs):,} TACs "
        f"(largest {data.counts.max():,}, median {int(np.median(data.counts)):,})"
        + (f", and {data.exceptions.name}: {data.pairs:,} IMEI+IMSI pairs"
           if data.exceptions else "") +
        f", {mb(data.csv_bytes):,.0f} MB"
        + (f" (deflate level {args.zip_level}; {mb(data.text_bytes):,.0f} MB of CSV)"
           if args.zip_level else "") + f", in {data.seconds:.1f} s")
    first = first_row(data.csv)
    log(f"[{name}] first row: {first}  (Luhn {'ok' if luhn_ok(first[:15]) else 'spare 0'})")
    build = run_sync(source, store, directory)
    log(f"[{name}] eir sync: {build.seconds:.1f} s, {(n + data.pairs) / build.seconds:,.0f} "
        "rows/s, "
        f"peak RSS {mb(build.peak_rss):,.0f} MB (anonymous {mb(build.peak_anon):,.0f} MB), "
        f"peak disk: store {mb(build.peak_store):,.0f} MB, filesystem +"
        f"{mb(build.peak_filesystem):,.0f} MB -- {build.output.splitlines()[-1]}")
    snapshot = sorted((store / "snapshots").glob("*.eirsnap"))[-1]
    probe = f"{int(data.sample[0]):014d}"
    runs = []
    for cold in (True, False):
        runs.append(time_startup(store, directory, probe, "510101234567890",
                                 int(EquipmentStatus.BLACKLISTED), cold, snapshot))
        log(f"[{name}] eir serve ({'cold-ish' if cold else 'warm'}): listening after "
            f"{runs[-1].to_listening:.3f} s, first ECA after {runs[-1].to_first_answer:.3f} s, "
            f"VmRSS {mb(runs[-1].vm_rss):,.1f} MB, of which the snapshot's mapping "
            f"{mb(runs[-1].snapshot_rss):,.2f} MB (snapshot file {mb(snapshot.stat().st_size):,.1f} "
            f"MB)")
    return data, build, snapshot, runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=FULL_ENTRIES)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ENTRIES:,} IMEIs (CI)")
    parser.add_argument("--workdir", type=Path, help="default: a new directory under /tmp")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--tacs", type=int, default=20_000)
    parser.add_argument("--zipf", type=float, default=1.0, help="TAC popularity exponent")
    parser.add_argument("--tac-fill", type=float, default=0.9,
                        help="most of a TAC's 1,000,000 serial numbers one list holds")
    parser.add_argument("--spare-fraction", type=float, default=0.1,
                        help="IMEIs written with a spare 0 instead of the Luhn digit")
    parser.add_argument("--exceptions", type=float, default=0.05,
                        help="exceptions (IMEI+IMSI pairing) list rows, as a share of the "
                        "blacklist's (0: none)")
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--split", choices=("auto", "yes", "no"), default="auto",
                        help="time sync's steps in-process too (auto: when memory allows)")
    parser.add_argument("--seed", type=int, default=20_200_915)
    parser.add_argument("--zip-level", type=int, default=0, choices=range(10),
                        help="write the lists zipped, as DIRBS publishes them, with this "
                        "deflate level (0: plain CSV)")
    parser.add_argument("--serve-seconds", type=float, default=10,
                        help="seconds of eir replay against eir serve --store (0: none)")
    parser.add_argument("--serve-rate-of", type=Path, metavar="DIR",
                        help="only that: the ECRs served from DIR/store, the main/ directory "
                        "of a --keep run")
    parser.add_argument("--target", action="store_true",
                        help=f"Indonesia's {TARGET_ENTRIES:,} IMEIs: --entries "
                        f"{TARGET_ENTRIES} --zip-level 1 --split no (about an hour and "
                        "~45 GB of disk here; see bench/RESULTS.md)")
    args = parser.parse_args()
    if args.target:
        args.entries, args.split = TARGET_ENTRIES, "no"
        args.zip_level = args.zip_level or 1
    if args.serve_rate_of:
        work = args.serve_rate_of
        log(f"eir replay flat out on one connection for {args.serve_seconds:g} s against "
            f"eir serve --store {work / 'store'} --workers 1 ...")
        served = serve_rate(work / "store", work, args.serve_seconds, args.seed)
        log(format_served(served))
        log(json.dumps(served))
        return 0
    n = QUICK_ENTRIES if args.quick else args.entries
    if n > MAX_PLAIN_ENTRIES and not args.zip_level:
        raise SystemExit(f"{n:,} IMEIs as plain CSV (~43 B a row) would take "
                         f"{n * 43 * 2 / 1e9:,.0f} GB of disk with the sync's copy: give "
                         "--zip-level (or --target)")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=False)
        work = args.workdir
    else:
        work = Path(tempfile.mkdtemp(prefix="eir-scale-", dir="/tmp"))
    log(f"scale benchmark: {n:,} IMEIs, work directory {work}"
        f"{' (kept)' if args.keep else ''}; {os.cpu_count()} CPUs, "
        f"{_status_kb_meminfo('MemTotal') / 2**30:.1f} GiB RAM, Python "
        f"{sys.version.split()[0]}, numpy {np.__version__}")
    try:
        return run(work, n, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _status_kb_meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run(work: Path, n: int, args) -> int:
    data, build, snapshot, runs = build_and_measure(work, "main", n, args)
    snapshot_bytes = snapshot.stat().st_size
    header = _read_header(snapshot)
    sections = header["sections"]
    # the exceptions list's sections (20 B per pair) are not the blacklist's cost per IMEI
    pair_bytes = sum(sections[s][1] for s in ("pair_imei", "pair_imsi", "pair_set"))
    bytes_per_imei = (snapshot_bytes - pair_bytes) / n
    rows_per_s = (n + data.pairs) / build.seconds  # both lists' rows

    split = []
    available = _status_kb_meminfo("MemAvailable")
    if args.split == "yes" or (args.split == "auto" and build.peak_rss * 1.3 < available):
        log("[main] the same build in-process, step by step ...")
        split = split_in_process(data.csv, work / "main" / "split-store", data.exceptions)
        for step, seconds, peak in split:
            log(f"[main]   {step:<48} {seconds:7.1f} s  peak RSS {mb(peak):8,.0f} MB")
    elif args.split == "auto":
        log(f"[main] split skipped: sync peaked at {mb(build.peak_rss):,.0f} MB, "
            f"{mb(available):,.0f} MB available")

    if n > SMALL_ENTRIES:
        _, small_build, _, small_runs = build_and_measure(work, "small", SMALL_ENTRIES, args)
        # peak memory per row from the slope between the two sizes (the fixed part --
        # interpreter, pyarrow, numpy -- cancels out)
        peak_per_row = (build.peak_anon - small_build.peak_anon) / (n - SMALL_ENTRIES)
    else:
        small_runs = runs
        peak_per_row = build.peak_anon / n  # fixed costs included: an overestimate

    present, absent, paired = lookup_shares(args.lookups, data)
    log(f"[main] lookups: {args.lookups:,} decide() calls: {present:,} listed IMEIs, "
        f"{absent:,} absent (in listed TACs), {paired:,} IMEIs of exception pairs (with the "
        "IMSI: half their own, half another) ...")
    lookups, overhead, open_seconds, tac_count = measure_lookups(snapshot, data, args.lookups,
                                                                 args.seed)
    with_imsi = max(lookups, key=lambda item: item.p99)
    served = None
    if args.serve_seconds:
        log(f"[main] eir replay flat out on one connection for {args.serve_seconds:g} s "
            "against eir serve --store --workers 1 ...")
        served = serve_rate(work / "main" / "store", work / "main", args.serve_seconds,
                            args.seed)
        log(f"[main]   {format_served(served)}")

    # -- 7. extrapolation
    tac_directory = sum(sections[s][1] for s in ("tac", "tac_start"))
    per_imei = sum(sections[s][1] for s in ("imei_key", "imei_fence", "imei_set_hi")
                   if s in sections) / n
    fixed = snapshot_bytes - tac_directory - per_imei * n - pair_bytes
    # an exceptions list of the same share of the list: 20 B per pair
    extrapolated_pair_bytes = pair_bytes * TARGET_ENTRIES / n
    extrapolated_bytes = per_imei * TARGET_ENTRIES + 12 * (WORLD_TACS + 1) + fixed + \
        extrapolated_pair_bytes
    # both lists grow with the blacklist: 1.2e9 IMEIs and the same share of pairs
    extrapolated_build_s = TARGET_ENTRIES * (n + data.pairs) / n / rows_per_s
    # The build sorts in spilled runs and merges block by block (eir/lists/table.py): its
    # anonymous memory is bounded by the run size, so the slope is ~0, not a cost per row,
    # once the list fills a few runs; below that the slope measures the runs filling up
    # and says nothing of larger lists (measured: 2.3 GB at 1.2e9, bench/RESULTS.md).
    from eir.lists.table import RUN_ROWS
    extrapolated_peak = build.peak_anon + max(0.0, peak_per_row) * (TARGET_ENTRIES - n) \
        if n >= 2 * RUN_ROWS else None
    peak_text = (f"{mb(build.peak_anon):,.0f} MB + {peak_per_row:.1f} B per extra row = "
                 f"{extrapolated_peak / 1e9:.1f} GB at 1.2e9" if extrapolated_peak else
                 f"not extrapolated from fewer than two runs of {RUN_ROWS:,} rows")
    largest_tac = int(data.counts.max())
    probes = int(np.ceil(np.log2(largest_tac + 1)))

    cold, warm = runs
    small_cold, small_warm = small_runs
    rss_ratio = warm.vm_rss / snapshot_bytes
    met = {
        "bytes_per_imei": bytes_per_imei <= TARGETS["bytes_per_imei"],
        "build_rows_per_s": rows_per_s >= TARGETS["build_rows_per_s"],
        "start_to_serving_s": warm.to_first_answer <= TARGETS["start_to_serving_s"],
        "lookup_p99_us": with_imsi.p99 <= TARGETS["lookup_p99_us"],
    }

    def mark(key):
        return "met" if met[key] else "NOT met"

    log()
    log(f"summary: {n:,} IMEIs, {len(data.tacs):,} TACs (Zipf {args.zipf}, at most "
        f"{args.tac_fill:.0%} of a TAC's serials), CSV {mb(data.csv_bytes):,.0f} MB "
        f"generated in {data.seconds:.0f} s (not a target)")
    rows = [
        ("bytes per IMEI ((snapshot - pairs) / N)", f"{bytes_per_imei:.3f}",
         f"<= {TARGETS['bytes_per_imei']:g}", mark("bytes_per_imei")),
        ("snapshot file", f"{mb(snapshot_bytes):,.1f} MB", "", ""),
        ("  of which exception pairs", f"{header['counts']['pairs']:,} pairs, "
         f"{mb(pair_bytes):,.1f} MB", "", ""),
        ("build: eir sync from CSV (subprocess)",
         f"{rows_per_s:,.0f} rows/s ({build.seconds:.1f} s)", ">= 1,000,000 rows/s",
         mark("build_rows_per_s")),
        ("build: peak memory of eir sync", f"{mb(build.peak_anon):,.0f} MB anonymous "
         f"({peak_per_row:.1f} B per extra row); VmHWM {mb(build.peak_rss):,.0f} MB with "
         "mapped list files (page cache)", "", ""),
    ]
    for step, seconds, peak in split:
        rows.append((f"  in-process: {step.split(' (')[0]}",
                     f"{seconds:.1f} s, peak {mb(peak):,.0f} MB", "", ""))
    rows += [
        ("start -> listening (warm)", f"{warm.to_listening:.3f} s", "", ""),
        ("start -> first ECA (warm)", f"{warm.to_first_answer:.3f} s", "<= 2 s",
         mark("start_to_serving_s")),
        ("start -> first ECA (cold-ish, 1st run)", f"{cold.to_first_answer:.3f} s", "", ""),
        (f"start -> first ECA at {SMALL_ENTRIES:,} (warm)",
         f"{small_warm.to_first_answer:.3f} s", "size-independent", ""),
        (f"start -> first ECA at {SMALL_ENTRIES:,} (cold-ish)",
         f"{small_cold.to_first_answer:.3f} s", "", ""),
        ("Snapshot.open in-process", f"{open_seconds * 1000:.1f} ms "
         f"({tac_count:,} TACs)", "", ""),
    ]
    for item in lookups:
        rows.append((f"lookup decide(), {item.label}",
                     f"p50 {item.p50:.2f} / p99 {item.p99:.2f} / p99.9 {item.p999:.2f} µs",
                     "p99 <= 2 µs" if item is with_imsi else "",
                     mark("lookup_p99_us") if item is with_imsi else ""))
    rows += [
        ("ECRs served (eir replay, 1 connection)",
         format_served(served) if served else "not measured", "", ""),
        ("VmRSS of eir serve after 1st answer (warm)",
         f"{mb(warm.vm_rss):,.1f} MB (anon {mb(warm.rss_anon):,.1f}, file {mb(warm.rss_file):,.1f})",
         f"snapshot {mb(snapshot_bytes):,.1f} MB", f"{rss_ratio:.3f}x"),
        ("  of which the snapshot's mapping", f"{mb(warm.snapshot_rss):,.2f} MB", "",
         f"{warm.snapshot_rss / snapshot_bytes:.4%}"),
        (f"VmRSS of eir serve at {SMALL_ENTRIES:,}", f"{mb(small_warm.vm_rss):,.1f} MB", "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, target, verdict in rows:
        log(f"  {name:<{width}}  {value:<44} {target:<22} {verdict}".rstrip())
    log(f"  (lookup: warm second pass over the same {args.lookups:,} queries; the empty-call "
        f"overhead, {overhead} ns median, is subtracted; first-touch pass p99 "
        f"{lookups[0].first_touch_p99:.2f} / {lookups[1].first_touch_p99:.2f} µs; "
        "day given explicitly; gc frozen as in eir serve)")
    log("  (cold-ish: the snapshot file's pages were dropped from the page cache with "
        "posix_fadvise(DONTNEED) before the first start; Python and its modules stay cached)")

    log()
    log(f"extrapolated to {TARGET_ENTRIES / 1e9:.1f} billion IMEIs:")
    log(f"  snapshot: {per_imei:.3f} B/IMEI x 1.2e9 = {per_imei * TARGET_ENTRIES / 1e9:.2f} GB, "
        f"+ TAC directory 12 B x ~{WORLD_TACS:,} TACs = {12 * WORLD_TACS / 1e6:.1f} MB, "
        f"+ exception pairs ({args.exceptions:.0%} of the list, 20 B each) "
        f"{extrapolated_pair_bytes / 1e9:.2f} GB, "
        f"+ header/other sections {fixed / 1e3:,.0f} kB "
        f"=> {extrapolated_bytes / 1e9:.2f} GB ({extrapolated_bytes / 2**30:.2f} GiB). "
        f"{'4 B/IMEI while the list has <= 4,096 distinct meanings (date x reasons); 5 B above.' if 'imei_set_hi' not in sections else '5 B/IMEI: more than 4,096 distinct meanings.'}")
    log(f"  build: 1.2e9 x {(n + data.pairs) / n:.2f} rows / {rows_per_s:,.0f} rows/s = "
        f"{extrapolated_build_s / 60:.1f} min "
        f"(linear: parse and checksum are; the two sorts are n log n, a few % more). Peak "
        f"anonymous memory is bounded by the sort runs: {peak_text} "
        f"(measured at 1.2e9: 2.3 GB); the sync's scratch disk is ~24 B per row at its peak "
        f"(sync measured +{mb(build.peak_filesystem):,.0f} MB on the filesystem here).")
    log(f"  start-up: independent of the IMEI count. Opening maps the file and parses only "
        f"the header JSON (attributes: {len(header['attributes'])}, O(meanings)) and checks "
        f"the TAC directory (O(TACs): {tac_count:,} here, ~{WORLD_TACS:,} at most worldwide); "
        f"no IMEI or pair page is read until a lookup touches it. Measured "
        f"{warm.to_first_answer:.2f} s at {n:,} vs {small_warm.to_first_answer:.2f} s at "
        f"{SMALL_ENTRIES:,} (warm).")
    log(f"  lookup: binary search of the TAC, then of the fence (every 64th key) inside that "
        f"TAC's entries, which are at most 1,000,000 (6-digit serial), then one 64-key block: "
        f"<= 20 probes whatever the list size. Here the largest TAC holds {largest_tac:,} "
        f"({probes} probes), so 1.2e9 adds at most {max(0, 20 - probes)} probe(s). With an "
        f"IMSI, the pair search (a fence of every 64th pair IMEI, filled by the lookups, then "
        f"one 64-IMEI block) grows by one probe per doubling of the pairs. The cost that grows "
        f"is cache/TLB misses over a {extrapolated_bytes / 2**30:.1f} GiB mapping, which must "
        "stay in RAM (page cache) or a miss becomes a disk read.")
    log()
    log(json.dumps({
        "entries": n,
        "bytes_per_imei": round(bytes_per_imei, 4),
        "build_rows_per_s": round(rows_per_s),
        "build_seconds": round(build.seconds, 2),
        "build_peak_rss_mb": round(mb(build.peak_rss)),
        "build_peak_anon_mb": round(mb(build.peak_anon)),
        "start_to_serving_s": round(warm.to_first_answer, 3),
        "start_to_serving_s_cold": round(cold.to_first_answer, 3),
        "start_to_listening_s": round(warm.to_listening, 3),
        "start_to_serving_s_small": round(small_warm.to_first_answer, 3),
        "lookup_p99_us": round(with_imsi.p99, 3),
        "lookup_p99_us_imei_only": round(lookups[0].p99, 3),
        "lookup_p50_us": round(with_imsi.p50, 3),
        "lookup_p50_us_imei_only": round(lookups[0].p50, 3),
        "pairs": data.pairs,
        "rss_mb_after_first_answer": round(mb(warm.vm_rss), 1),
        "snapshot_rss_mb_after_first_answer": round(mb(warm.snapshot_rss), 2),
        "snapshot_mb": round(mb(snapshot_bytes), 1),
        "extrapolated_1_2e9_snapshot_gb": round(extrapolated_bytes / 1e9, 2),
        "extrapolated_1_2e9_build_minutes": round(extrapolated_build_s / 60, 1),
        "extrapolated_1_2e9_build_peak_gb": round(extrapolated_peak / 1e9, 1)
        if extrapolated_peak else None,
        "extrapolated_1_2e9_pairs_gb": round(extrapolated_pair_bytes / 1e9, 2),
        "ecr_per_s": round(served["rate"]) if served else None,
        "ecr_server_cpu_us": round(served["server_cpu_us_per_ecr"], 1) if served else None,
        "targets_met": met,
    }))
    return 0


def _read_header(path: Path) -> dict:
    with path.open("rb") as handle:
        start = handle.read(16)
        return json.loads(handle.read(int.from_bytes(start[8:12], "little")))


if __name__ == "__main__":
    sys.exit(main())
