#!/usr/bin/env python3
"""bench/verify.py: verify and scrub of mars in one run (issue 18).

Two marsd (alpha primary, beta secondary) of this build on 127.0.0.1,
resource r0 of BENCH_SIZE (default 1G), filled with random data through NBD
(fio) and replicated:

  A. `marsadm verify r0 --restart` of the two equal copies, timed: with the
     disks in the page cache (warm) and, when this runs as root, after
     dropping the page cache (cold: both copies are read from the device).
     Target: at least 1.5 GB/s (1.5e9 bytes of the device per second).
  B. fio random 4 KiB writes (QD32, fsync every 32) to alpha for
     BENCH_RUNTIME seconds, with no scrub and with a scrub running on both
     nodes at the node's rate limit (scrub_rate_bytes, default 32 MiB/s),
     alternating which goes first, BENCH_REPEAT times. Target: IOPS with a
     scrub within 10 % of IOPS without.

The device's own speed (fio, O_DIRECT, 1 MiB, QD8) is measured in the same
run. Each row records how busy the machine's CPUs were and says whether it
was bound by CPU or by the device.

Environment: BENCH_NEW (dir with marsd and marsadm, default
$CARGO_TARGET_DIR/release or target/release), BENCH_DIR (work dir, default a
new one under /var/tmp), BENCH_SIZE (1G), BENCH_RUNTIME (20), BENCH_REPEAT
(2), BENCH_OUT (markdown, default bench/verify-results.md), BENCH_KEEP=1 (keep
the work directory).
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from link import MIB, Cluster, Meter, device_speed, run, say, size  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
NEW = os.environ.get("BENCH_NEW", os.path.join(TARGET, "release"))
SIZE = size(os.environ.get("BENCH_SIZE", "1G"))
RUNTIME = int(os.environ.get("BENCH_RUNTIME", "20"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "2"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "bench", "verify-results.md"))


def drop_caches():
    run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def verify_once(c):
    m = Meter(c.marsd_pids())
    t0 = time.time()
    out = c.adm("alpha", "verify", "r0", "--restart")
    secs = time.time() - t0
    r = m.stop()
    if "all copies agree" not in out:
        raise RuntimeError(f"verify of equal copies: {out}")
    # The verify's own time (the daemon's start to end), without marsadm's
    # start and its polling for the end.
    last = (c.resource("alpha", "r0") or {}).get("verify", {}).get("last") or {}
    own = max(last.get("finished_ms", 0) - last.get("started_ms", 0), 1) / 1000
    r.update(seconds=secs, gbs=SIZE / secs / 1e9, own_s=own, own_gbs=SIZE / own / 1e9)
    return r


def randwrite(c, scrub):
    port = c.nbd["alpha"].rsplit(":", 1)[1]
    if scrub:
        for n in ("alpha", "beta"):
            c.adm(n, "scrub", "r0")
    m = Meter(c.marsd_pids())
    out = f"{c.w}/fio-randwrite.json"
    run(["fio", "--name=rw", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/r0",
         "--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=32", "--time_based",
         f"--runtime={RUNTIME}", f"--size={SIZE}", "--randrepeat=0",
         "--output-format=json", f"--output={out}"])
    r = m.stop()
    with open(out) as f:
        text = f.read()
    # fio may print notes before the JSON object.
    j = json.loads(text[text.index("{"):])
    scrubbing = []
    for n in ("alpha", "beta"):
        mb = c.member(n, "r0", n) or {}
        scrubbing.append((mb.get("scrub") or {}).get("running") is not None)
    r.update(iops=j["jobs"][0]["write"]["iops"], scrub_running_at_end=scrubbing)
    if scrub:
        # Not measured: let the passes end before the next row.
        deadline = time.time() + 600
        while any((((c.member(n, "r0", n) or {}).get("scrub") or {}).get("running")) for n in ("alpha", "beta")):
            if time.time() > deadline:
                raise RuntimeError("scrub did not end within 600 s")
            time.sleep(0.5)
    c.adm("alpha", "wait-resource", "r0", "uptodate", "--timeout", "600")
    return r


def bound(r, key_busy="busy"):
    return "CPU" if r[key_busy] >= 0.85 else "device"


def main():
    w = os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="mars-vbench.", dir="/var/tmp")
    started = time.strftime("%F %T")
    dev = device_speed(w)
    say(f"device: write {dev['write']:.0f} MiB/s, read {dev['read']:.0f} MiB/s")
    c = Cluster(f"{w}/c", NEW, tls=True)
    try:
        c.start()
        a = c.disk("a.img", SIZE)
        b = c.disk("b.img", SIZE)
        c.adm("alpha", "create-resource", "r0", a)
        c.adm("alpha", "wait-resource", "r0", "primary", "--timeout", "30")
        deadline = time.time() + 60
        while c.resource("beta", "r0") is None and time.time() < deadline:
            time.sleep(0.1)
        c.adm("beta", "join-resource", "r0", b)
        c.fio_write("r0", SIZE, 0)
        c.adm("alpha", "wait-resource", "r0", "uptodate", "--timeout", "900")
        say("filled and replicated")
        warm = [verify_once(c) for _ in range(REPEAT)]
        cold = []
        for _ in range(REPEAT):
            if not drop_caches():
                break
            cold.append(verify_once(c))
        rows = {False: [], True: []}
        for i in range(REPEAT):
            for scrub in ((False, True) if i % 2 == 0 else (True, False)):
                say(f"random writes, scrub={scrub}")
                rows[scrub].append(randwrite(c, scrub))
    finally:
        c.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(w, ignore_errors=True)
    report(w, started, dev, warm, cold, rows)


def runs(rs, k, fmt):
    return ", ".join(format(r[k], fmt) for r in rs)


def report(w, started, dev, warm, cold, rows):
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    lines = [
        f"# bench/verify.py ({started}, {os.cpu_count()} CPUs, BENCH_SIZE={SIZE}, "
        f"BENCH_RUNTIME={RUNTIME}, BENCH_REPEAT={REPEAT})",
        "",
        f"Device (fio O_DIRECT 1 MiB QD8 on {w}): write {dev['write']:.0f} MiB/s, read {dev['read']:.0f} MiB/s.",
        "",
        "| row | result | target | machine busy | marsd CPU (cores) | bound by |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in (("verify, page cache warm", warm), ("verify, page cache dropped", cold)):
        if not rs:
            lines.append(f"| {name} | not run (needs root to drop caches) | | | | |")
            continue
        g = med(rs, "own_gbs")
        lines.append(
            f"| {name} | {g:.2f} GB/s ({med(rs, 'own_s'):.2f} s for {SIZE / MIB:.0f} MiB in marsd; "
            f"{med(rs, 'gbs'):.2f} GB/s as `marsadm verify` returns; runs: "
            f"{runs(rs, 'own_gbs', '.2f')}) | >= 1.5 GB/s: {'met' if g >= 1.5 else 'NOT met'} "
            f"| {med(rs, 'busy'):.0%} | {med(rs, 'marsd_cpu'):.2f} | {bound(rs[0])} |")
    off, on = rows[False], rows[True]
    if off and on:
        ratio = med(on, "iops") / med(off, "iops")
        lines.append(
            f"| random 4 KiB writes, no scrub | {med(off, 'iops'):.0f} IOPS ({runs(off, 'iops', '.0f')}) "
            f"| | {med(off, 'busy'):.0%} | {med(off, 'marsd_cpu'):.2f} | {bound(off[0])} |")
        lines.append(
            f"| random 4 KiB writes, scrub on both nodes | {med(on, 'iops'):.0f} IOPS ({runs(on, 'iops', '.0f')}); "
            f"{ratio:.0%} of no scrub | >= 90 %: {'met' if ratio >= 0.9 else 'NOT met'} "
            f"| {med(on, 'busy'):.0%} | {med(on, 'marsd_cpu'):.2f} | {bound(on[0])} |")
        lines.append("")
        lines.append(f"Scrub still running at the end of each scrub row (alpha, beta): "
                     f"{[r['scrub_running_at_end'] for r in on]}")
    text = "\n".join(lines) + "\n"
    with open(OUT, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
