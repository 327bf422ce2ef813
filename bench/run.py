#!/usr/bin/env python3
"""Run dockrune's benchmarks against their peers and print the figures.

    python3 bench/run.py                 all five, the default number of runs
    python3 bench/run.py intake admin    only those
    python3 bench/run.py --quick         one run each (a smoke test, not figures)

bench/install.sh installs the public tools they need (Debian packages).  Each
bench measures dockrune and its peer in the same run, taking turns, and
prints medians and the ratio: on a shared machine the ratios are what to
compare, not the absolute figures.  Nothing here is a test: no figure fails
anything, a MISSED target is only reported.
"""

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import admin  # noqa: E402
import deploys  # noqa: E402
import footprint  # noqa: E402
import intake  # noqa: E402
from common import BenchError, say  # noqa: E402

BENCHES = ("intake", "burst", "overhead", "footprint", "admin")


def machine():
    """Return one line about this machine: cores, memory, load, versions."""
    with open("/proc/meminfo") as f:
        total_kb = int(f.readline().split()[1])
    load = os.getloadavg()
    return ("%d cores (%s), %.1f GB memory, load %.1f %.1f %.1f, Python %s, %s"
            % (os.cpu_count(), _cpu_model(), total_kb / 1024 / 1024, *load,
               platform.python_version(), "; ".join(_versions())))


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _versions():
    found = []
    for argv in (["webhook", "-version"], ["wrk", "-v"],
                 ["docker", "version", "--format", "docker {{.Server.Version}}"]):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            found.append("%s missing" % argv[0])
            continue
        out = (done.stdout + done.stderr).strip().splitlines()
        found.append(out[0][:40] if out else argv[0])
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benches", nargs="*", metavar="BENCH",
                        help="any of %s (default: all)" % ", ".join(BENCHES))
    parser.add_argument("--runs", type=int, default=3,
                        help="runs per peer for the medians (default 3)")
    parser.add_argument("--quick", action="store_true", help="one short run each")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.benches) - set(BENCHES))
    if unknown:
        parser.error("no bench %s: choose from %s" % (", ".join(unknown),
                                                       ", ".join(BENCHES)))
    try:
        import waitress  # noqa: F401
    except ImportError:
        parser.error("this Python has no waitress: run ./install.sh --test, then "
                     ".venv/bin/python bench/run.py")
    chosen = args.benches or list(BENCHES)
    runs = 1 if args.quick else max(1, args.runs)
    say("dockrune benchmarks, %s" % datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    given = sys.argv[1:] if argv is None else argv
    say("command: %s" % shlex.join(["python3", "bench/run.py"] + given))
    say("machine: %s" % machine())
    say()
    jobs = {
        "intake": lambda: intake.run(runs=runs, seconds=2 if args.quick else 5),
        "burst": lambda: deploys.run_burst(runs=runs, window=30 if args.quick
                                           else 90),
        "overhead": lambda: deploys.run_overhead(runs=runs if args.quick else
                                                 runs + 2),
        "footprint": lambda: footprint.run(runs=runs),
        "admin": lambda: admin.run(requests=5 if args.quick else 20),
    }
    failed = []
    for name in BENCHES:
        if name not in chosen:
            continue
        began = time.monotonic()
        try:
            jobs[name]()
        except BenchError as e:
            say("  %s: cannot run: %s" % (name, e))
            failed.append(name)
        except Exception:       # report and go on with the next bench
            say("  %s: failed:\n%s" % (name, traceback.format_exc().rstrip()))
            failed.append(name)
        say("  (%s took %.0f s)" % (name, time.monotonic() - began))
        say()
    if failed:
        say("did not run to the end: %s" % ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
