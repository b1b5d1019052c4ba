#!/usr/bin/env python3
"""Catch-up after pause-fetch, measured again on a kept replication cluster.

`BENCH_KEEP=1 bench/replication.sh` leaves its work directory (alpha, beta,
gamma node directories and disks). This script restarts the three marsd of
that directory, lets everyone catch up, pauses beta's fetch, writes BYTES
through alpha's NBD export with fio (1 MiB, QD8, end_fsync), waits until gamma
has replayed it, resumes beta's fetch and times until beta's own
`log.replayed` reaches alpha's `log.written`. Then it stops the daemons. Run
it several times, alternating binaries (A/B pairs): one run of a row decides
nothing on a shared VM.

Usage: bench/catchup-again.py WORKDIR
Environment:
  BYTES       bytes written while beta's fetch is paused (default 2G, fio syntax)
  FETCH_ONLY=1  pause beta's replay too and time until `log.fetched` arrives, then
              resume replay and time it alone
  PERF_OUT=FILE  `perf record -g -a` into FILE from the resume on, for PERF_SECS (default 3)
  MARS_BIN    directory with marsd and marsadm (default $CARGO_TARGET_DIR/release
              or target/release)
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("MARS_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
ADM = os.path.join(BIN, "marsadm")
NODES = ("alpha", "beta", "gamma")


def cpu_secs(pid):
    """User and system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    if len(sys.argv) != 2 or not all(os.path.isdir(os.path.join(sys.argv[1], n)) for n in NODES):
        sys.exit(__doc__)
    work = os.path.abspath(sys.argv[1])
    nbytes = os.environ.get("BYTES", "2G")
    fetch_only = os.environ.get("FETCH_ONLY") == "1"

    def own(n):
        out = subprocess.check_output([ADM, "--dir", f"{work}/{n}", "view", "r0", "--json"])
        return next(m for m in json.loads(out)["resources"][0]["members"] if m["node"] == n)

    def adm(n, *args):
        subprocess.run([ADM, "--dir", f"{work}/{n}", *args], check=True, capture_output=True)

    def wait(n, field, target, timeout=600):
        t0 = time.time()
        while own(n)["log"][field] < target:
            if time.time() - t0 > timeout:
                sys.exit(f"{n}: log.{field} did not reach {target} within {timeout} s")
            time.sleep(0.05)
        return time.time() - t0

    procs = []
    try:
        for n in NODES:
            log = open(f"{work}/marsd-{n}.log", "a")
            procs.append(subprocess.Popen([os.path.join(BIN, "marsd"), "--dir", f"{work}/{n}"],
                                          env=dict(os.environ, MARS_LOG=os.environ.get("MARS_LOG", "warn")),
                                          stdout=subprocess.DEVNULL, stderr=log))
        deadline = time.time() + 30
        for n in NODES:
            while not os.path.exists(f"{work}/{n}/marsd.sock"):
                if time.time() > deadline:
                    sys.exit(f"marsd of {n} did not start (see {work}/marsd-{n}.log)")
                time.sleep(0.1)
        while True:  # the daemons answer once their resources are attached
            try:
                written = own("alpha")["log"]["written"]
                break
            except (subprocess.CalledProcessError, StopIteration, KeyError, IndexError):
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        adm("beta", "resume-fetch", "r0")
        adm("beta", "resume-replay", "r0")
        wait("beta", "replayed", written)
        wait("gamma", "replayed", written)
        # Logfiles every member replayed go (as the bench's settle does), or runs pile up
        # a GiB each until the file system is full.
        adm("alpha", "log-rotate", "r0")
        time.sleep(2.5)  # replayed positions persisted and gossiped
        subprocess.run([ADM, "--dir", f"{work}/alpha", "log-delete", "r0"], capture_output=True)
        adm("beta", "pause-fetch", "r0")
        nbd = json.load(open(f"{work}/alpha/node.json"))["nbd"]
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri=nbd://{nbd}/r0", "--rw=write",
                        "--bs=1M", "--iodepth=8", "--size=1G", f"--io_size={nbytes}", "--end_fsync=1",
                        "--output=/dev/null"], check=True)
        written = own("alpha")["log"]["written"]
        start = own("beta")["log"]["fetched" if fetch_only else "replayed"]
        wait("gamma", "replayed", written)
        # As in bench/replication.sh: alpha's and gamma's disks written back before the
        # timed window, which then holds beta's work alone.
        os.sync()
        if fetch_only:
            adm("beta", "pause-replay", "r0")
        perf = None
        if os.environ.get("PERF_OUT"):
            perf = subprocess.Popen(["perf", "record", "-g", "-a", "-o", os.environ["PERF_OUT"], "--",
                                     "sleep", os.environ.get("PERF_SECS", "3")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0 = [cpu_secs(p.pid) for p in procs]
        adm("beta", "resume-fetch", "r0")
        secs = wait("beta", "fetched" if fetch_only else "replayed", written)
        cpu = [cpu_secs(p.pid) - c for p, c in zip(procs, cpu0)]
        what = "fetched" if fetch_only else "caught up"
        print(f"beta {what} {(written - start) / 2**20:.0f} MiB in {secs:.2f} s: "
              f"{(written - start) / secs / 1e6:.0f} MB/s; CPU seconds alpha / beta / gamma: "
              + " / ".join(f"{c:.2f}" for c in cpu))
        if fetch_only:
            # Then replay alone (the bench's pause-replay row): from what fetch left.
            adm("beta", "resume-replay", "r0")
            rsecs = wait("beta", "replayed", written)
            print(f"beta then replayed it in {rsecs:.2f} s: {(written - start) / rsecs / 1e6:.0f} MB/s")
        if perf:
            perf.wait()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
