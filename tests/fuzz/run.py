"""Coverage-guided fuzzing of the codec and of the connection handler, with atheris (libFuzzer).

    .venv/bin/python tests/fuzz/run.py codec -runs=1000000
    .venv/bin/python tests/fuzz/run.py peer -max_total_time=60
    .venv/bin/python tests/fuzz/run.py h2 -max_total_time=60
    .venv/bin/python tests/fuzz/run.py peer --seed      # (re)write the seed inputs only

Targets and properties: tests/helpers_fuzz.py. Any libFuzzer option may follow the target;
the defaults below bound the time per input (-timeout, a hang beyond it is a failure) and
memory (-rss_limit_mb). New interesting inputs go to a scratch directory (--work, a fresh
temporary one by default), not to the committed corpus, which is read as seeds: copy the few
worth keeping into tests/fuzz/corpus/<target>/ by hand. A crash or a broken property leaves
its input in the scratch directory (crash-*, timeout-*) and exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import atheris

TESTS = Path(__file__).resolve().parent.parent
CORPUS = TESTS / "fuzz" / "corpus"
sys.path.insert(0, str(TESTS))

with atheris.instrument_imports(include=["eir", "h2", "hpack", "hyperframe"]):
    import helpers_fuzz

# -timeout: an input running longer is a hang (inputs take ~0.1 to 12 ms; 10 s leaves room for
# a loaded machine). -report_slow_units: inputs beyond 1 s are saved as slow-unit-* to look
# at, not failed. -max_len: 8 KiB holds every seed and ~1000 nested AVP headers.
DEFAULT_OPTIONS = ["-timeout=10", "-report_slow_units=1", "-rss_limit_mb=1024",
                   "-print_final_stats=1", "-max_len=8192"]


def timed(target):
    """The target, reporting each new slowest input on stderr (a hang is below -timeout)."""
    slowest = [0.0]

    def run(data: bytes) -> None:
        start = time.perf_counter()
        target(data)
        elapsed = time.perf_counter() - start
        if elapsed > slowest[0] * 2 and elapsed > 0.01:
            slowest[0] = elapsed
            print(f"#slowest input so far: {elapsed * 1000:.1f} ms ({len(data)} bytes)",
                  file=sys.stderr, flush=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(helpers_fuzz.TARGETS))
    parser.add_argument("--work", type=Path, help="scratch corpus and crash directory")
    parser.add_argument("--seed", action="store_true",
                        help="write the seed inputs into the committed corpus and stop")
    args, libfuzzer_options = parser.parse_known_args()
    corpus = CORPUS / args.target
    if args.seed:
        written = helpers_fuzz.write_seeds(args.target, corpus)
        print(f"{written} seed inputs written to {corpus}")
        return
    work = args.work or Path(tempfile.mkdtemp(prefix=f"eir-fuzz-{args.target}-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"scratch corpus and crashes: {work}", file=sys.stderr, flush=True)
    argv = [sys.argv[0], *DEFAULT_OPTIONS, f"-artifact_prefix={work}/", *libfuzzer_options,
            str(work), str(corpus)]
    atheris.Setup(argv, timed(helpers_fuzz.TARGETS[args.target]))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
