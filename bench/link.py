#!/usr/bin/env python3
"""bench/link.py: peer-link benchmarks of mars in one run (issue 17).

Two marsd (alpha primary, beta secondary), resource r0, measured side by side:

  A. On 127.0.0.1, TLS (this build) against plaintext (BENCH_BASE: a build of
     the last commit before TLS, 46ca6c5), alternating build by build:
       - catch-up: pause-fetch on beta, fio writes BENCH_CATCHUP bytes of
         random data (1 MiB sequential, QD8) to alpha, resume-fetch; timed
         until beta's log.replayed reaches alpha's log.written;
       - full sync: r1 of BENCH_SYNC bytes, random data on alpha, zeros on
         beta (every block is sent); timed from join-resource until beta is
         uptodate.
  B. Over a link of BENCH_RATE (default 100mbit): alpha and beta in network
     namespaces joined by a veth pair with `tc qdisc ... tbf` on both ends;
     catch-up of BENCH_TC_CATCHUP bytes of compressible data
     (fio buffer_compress_percentage=BENCH_COMPRESS, default 70) and of
     random data, each with `set-compression r0 zstd` and `off`, alternating.

The device's own speed (fio, O_DIRECT, 1 MiB, QD8, on the work directory's
file system) is measured in the same run, before and after. Each row records
the CPU the machine was busy (of all cores) and the marsd processes' CPU, and
says whether it was bound by CPU, the device or the link.

Environment: BENCH_BASE (dir with marsd and marsadm of the plaintext build;
rows of part A are skipped without it), BENCH_NEW (default
$CARGO_TARGET_DIR/release or target/release), BENCH_DIR (work dir, default a
new one under /var/tmp), BENCH_REPEAT (default 2), BENCH_CATCHUP (512M),
BENCH_SYNC (512M), BENCH_TC_CATCHUP (192M), BENCH_RATE (100mbit),
BENCH_COMPRESS (70), BENCH_ONLY (loopback|tc), BENCH_PIN (1: alpha's marsd on
CPU 0, beta's on CPU 1, as on two hosts), BENCH_OUT (markdown, default
bench/link-results.md). Needs root for part B (ip netns, tc), fio with the nbd
engine.
"""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
NEW = os.environ.get("BENCH_NEW", os.path.join(TARGET, "release"))
BASE = os.environ.get("BENCH_BASE", "")
REPEAT = int(os.environ.get("BENCH_REPEAT", "2"))
RATE = os.environ.get("BENCH_RATE", "100mbit")
COMPRESS = int(os.environ.get("BENCH_COMPRESS", "70"))
ONLY = os.environ.get("BENCH_ONLY", "")
PIN = os.environ.get("BENCH_PIN", "") not in ("", "0")
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "bench", "link-results.md"))
MIB = 1 << 20


def size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


CATCHUP = size(os.environ.get("BENCH_CATCHUP", "512M"))
SYNC = size(os.environ.get("BENCH_SYNC", "512M"))
TC_CATCHUP = size(os.environ.get("BENCH_TC_CATCHUP", "192M"))


def say(*a):
    print(f"bench: {time.strftime('%T')}", *a, file=sys.stderr, flush=True)


def run(cmd, ns=None, check=True, **kw):
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def busy():
    """CPU seconds all cores were busy so far."""
    f = open("/proc/stat").readline().split()[1:]
    v = [int(x) for x in f]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Cluster:
    """alpha and beta of one build, on loopback or in two namespaces."""

    def __init__(self, w, bins, tls, net=None):
        self.w, self.bins, self.tls, self.net = w, bins, tls, net
        self.pids = {}
        self.ns = {"alpha": net["ns"][0], "beta": net["ns"][1]} if net else {"alpha": None, "beta": None}
        if net:
            self.addr = {"alpha": net["addr"][0], "beta": net["addr"][1]}
            self.peer = {n: f"{self.addr[n]}:7000" for n in self.addr}
            self.nbd = {n: "127.0.0.1:10809" for n in self.addr}
        else:
            self.peer = {n: f"127.0.0.1:{free_port()}" for n in ("alpha", "beta")}
            self.nbd = {n: f"127.0.0.1:{free_port()}" for n in ("alpha", "beta")}
        shutil.rmtree(w, ignore_errors=True)
        os.makedirs(w)

    def adm(self, n, *args, check=True):
        return run([f"{self.bins}/marsadm", "--dir", f"{self.w}/{n}", *args], ns=self.ns[n], check=check)

    def start_marsd(self, n):
        cmd = [f"{self.bins}/marsd", "--dir", f"{self.w}/{n}"]
        if PIN:
            # One core per node, as on two hosts: alpha on CPU 0, beta on CPU 1.
            cmd = ["taskset", "-c", "0" if n == "alpha" else "1"] + cmd
        if self.ns[n]:
            cmd = ["ip", "netns", "exec", self.ns[n]] + cmd
        log = open(f"{self.w}/marsd-{n}.log", "w")
        p = subprocess.Popen(cmd, stderr=log, stdout=log, env=dict(os.environ, MARS_LOG="warn"))
        self.pids[n] = p
        deadline = time.time() + 30
        while self.adm(n, "view", check=False) == "" and time.time() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"marsd {n} exited: {open(log.name).read()}")
            time.sleep(0.1)

    def start(self):
        self.adm("alpha", "create-cluster", "--node", "alpha", "--listen", self.peer["alpha"], "--nbd", self.nbd["alpha"])
        self.start_marsd("alpha")
        join = ["join-cluster", "--node", "beta", "--listen", self.peer["beta"], "--nbd", self.nbd["beta"]]
        if self.tls:
            token = self.adm("alpha", "invite").strip().split()[-1]
            join += ["--token", token]
        self.adm("beta", *join, self.peer["alpha"])
        self.start_marsd("beta")
        self.adm("alpha", "wait-cluster", "--timeout", "60")

    def stop(self):
        for p in self.pids.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.pids.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.pids = {}

    def marsd_pids(self):
        """The marsd processes themselves (ip netns exec execs them: same pid)."""
        return [p.pid for p in self.pids.values()]

    def view(self, n, res):
        return json.loads(self.adm(n, "view", res, "--json"))

    def member(self, n, res, node):
        for r in self.view(n, res)["resources"]:
            if r["name"] == res:
                for m in r["members"]:
                    if m["node"] == node:
                        return m
        return None

    def resource(self, n, res):
        for r in self.view(n, res)["resources"]:
            if r["name"] == res:
                return r
        return None

    def disk(self, name, nbytes, fill=None):
        p = f"{self.w}/{name}"
        run(["fallocate", "-l", str(nbytes), p])
        if fill == "random":
            run(["fio", "--name=fill", f"--filename={p}", "--rw=write", "--bs=1M", f"--size={nbytes}",
                 "--ioengine=psync", "--refill_buffers", "--randrepeat=0", "--end_fsync=1"])
        return p

    def fio_write(self, res, nbytes, compress):
        """Writes nbytes to alpha's export (in alpha's namespace): random data, or data
        that compresses by about `compress` percent."""
        port = self.nbd["alpha"].rsplit(":", 1)[1]
        args = ["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/{res}", "--rw=write",
                "--bs=1M", "--iodepth=8", f"--size={nbytes}", "--refill_buffers", "--randrepeat=0"]
        if compress:
            args += [f"--buffer_compress_percentage={compress}", "--buffer_compress_chunk=4096"]
        run(args, ns=self.ns["alpha"])

    def written_settled(self, res):
        last, since = None, time.time()
        while True:
            w = self.member("alpha", res, "alpha")["log"]["written"]
            if w != last:
                last, since = w, time.time()
            elif time.time() - since >= 1.0:
                return w
            time.sleep(0.1)


class Meter:
    def __init__(self, pids):
        self.pids = pids
        self.t0, self.b0 = time.time(), busy()
        self.c0 = sum(proc_cpu(p) for p in pids)

    def stop(self):
        wall = time.time() - self.t0
        return {"wall": wall, "busy": (busy() - self.b0) / wall / os.cpu_count(),
                "marsd_cpu": (sum(proc_cpu(p) for p in self.pids) - self.c0) / wall}


def catch_up(c, compress):
    """Seconds for beta to catch up on TC/loopback writes, and the meter."""
    c.adm("beta", "pause-fetch", "r0")
    nbytes = TC_CATCHUP if c.net else CATCHUP
    c.fio_write("r0", nbytes, compress)
    target = c.written_settled("r0")
    run(["sync"])
    sent0 = (c.resource("alpha", "r0") or {}).get("link_sent") or {}
    m = Meter(c.marsd_pids())
    t0 = time.time()
    c.adm("beta", "resume-fetch", "r0")
    deadline = t0 + 900
    while c.member("beta", "r0", "beta")["log"]["replayed"] < target:
        if time.time() > deadline:
            raise RuntimeError("catch-up did not end within 900 s")
        time.sleep(0.05)
    elapsed = time.time() - t0
    r = m.stop()
    sent1 = (c.resource("alpha", "r0") or {}).get("link_sent") or {}
    raw = sent1.get("raw_bytes", 0) - sent0.get("raw_bytes", 0)
    wire = sent1.get("wire_bytes", 0) - sent0.get("wire_bytes", 0)
    r.update(seconds=elapsed, bytes=nbytes, mibs=nbytes / MIB / elapsed, raw=raw, wire=wire)
    return r


def full_sync(c, i):
    """r{i} of SYNC bytes, random on alpha, zeros on beta: seconds until beta is uptodate."""
    res = f"s{i}"
    a = c.disk(f"{res}-a.img", SYNC, fill="random")
    b = c.disk(f"{res}-b.img", SYNC)
    c.adm("alpha", "create-resource", res, a)
    c.adm("alpha", "wait-resource", res, "primary", "--timeout", "30")
    deadline = time.time() + 60
    while c.resource("beta", res) is None and time.time() < deadline:
        time.sleep(0.1)
    run(["sync"])
    m = Meter(c.marsd_pids())
    t0 = time.time()
    c.adm("beta", "join-resource", res, b)
    while True:
        mb = c.member("beta", res, "beta")
        if mb and mb["disk"] == "uptodate" and mb["sync"] is None:
            break
        if time.time() > t0 + 900:
            raise RuntimeError("full sync did not end within 900 s")
        time.sleep(0.05)
    elapsed = time.time() - t0
    r = m.stop()
    r.update(seconds=elapsed, bytes=SYNC, mibs=SYNC / MIB / elapsed)
    c.adm("beta", "leave-resource", res, check=False)
    c.adm("alpha", "delete-resource", res, check=False)
    for f in (a, b):
        os.unlink(f)
    return r


def device_speed(w):
    p = f"{w}/devspeed.img"
    out = {}
    for rw in ("write", "read"):
        j = json.loads(run(["fio", "--name=dev", f"--filename={p}", f"--rw={rw}", "--bs=1M", "--iodepth=8",
                            "--ioengine=libaio", "--direct=1", "--size=1G", "--output-format=json"]))
        out[rw] = j["jobs"][0][rw]["bw_bytes"] / MIB
    os.unlink(p)
    return out


class Net:
    """Two namespaces joined by a veth pair, each end shaped by tbf to RATE."""

    def __init__(self):
        tag = f"ml{os.getpid()}"
        self.ns = [f"{tag}-a", f"{tag}-b"]
        self.addr = ["198.19.7.1", "198.19.7.2"]
        for n in self.ns:
            run(["ip", "netns", "add", n])
            run(["ip", "link", "set", "lo", "up"], ns=n)
        run(["ip", "link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b"])
        for i, n in enumerate(self.ns):
            dev = f"{tag}{'ab'[i]}"
            run(["ip", "link", "set", dev, "netns", n])
            run(["ip", "addr", "add", f"{self.addr[i]}/24", "dev", dev], ns=n)
            run(["ip", "link", "set", dev, "up"], ns=n)
            run(["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", RATE, "burst", "256kb",
                 "latency", "50ms"], ns=n)
        self.devs = [f"{tag}a", f"{tag}b"]

    def tx_bytes(self, i):
        return int(run(["cat", f"/sys/class/net/{self.devs[i]}/statistics/tx_bytes"], ns=self.ns[i]))

    def close(self):
        for n in self.ns:
            run(["ip", "netns", "del", n], check=False)


def bound(r, dev_write, link_mibs=None):
    if link_mibs and r.get("wire") and r["wire"] / MIB / r["seconds"] >= 0.8 * link_mibs:
        return "link"
    if r["busy"] >= 0.85:
        return "CPU"
    if r["mibs"] >= 0.7 * dev_write:
        return "device"
    return "neither (latency/pipeline)"


def med(rows, k):
    return statistics.median(r[k] for r in rows)


def main():
    w = os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="mars-link-", dir="/var/tmp")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = open("/proc/loadavg").read().split()[:3]
    say("device speed")
    dev0 = device_speed(w)
    results = {"loop": {"tls": {"catchup": [], "sync": []}, "plain": {"catchup": [], "sync": []}},
               "tc": {}}
    builds = [("tls", NEW, True)] + ([("plain", BASE, False)] if BASE else [])
    if ONLY in ("", "loopback"):
        clusters = {}
        for name, bins, tls in builds:
            c = Cluster(f"{w}/{name}", bins, tls)
            c.start()
            a = c.disk("r0-a.img", CATCHUP + 64 * MIB)
            b = c.disk("r0-b.img", CATCHUP + 64 * MIB)
            c.adm("alpha", "create-resource", "r0", a)
            deadline = time.time() + 60
            while c.resource("beta", "r0") is None and time.time() < deadline:
                time.sleep(0.1)
            c.adm("beta", "join-resource", "r0", b)
            c.adm("alpha", "wait-resource", "r0", "uptodate", "--timeout", "300")
            clusters[name] = c
        for i in range(REPEAT):
            order = builds if i % 2 == 0 else builds[::-1]
            for name, _, _ in order:
                c = clusters[name]
                say(f"loopback {name}: catch-up {i}")
                r = catch_up(c, 0)
                say(f"  {r['mibs']:.0f} MiB/s in {r['seconds']:.1f} s, busy {r['busy']:.0%}")
                results["loop"][name]["catchup"].append(r)
                c.adm("alpha", "log-rotate", "r0", check=False)
                c.adm("alpha", "log-delete", "r0", check=False)
            for name, _, _ in order:
                c = clusters[name]
                say(f"loopback {name}: full sync {i}")
                r = full_sync(c, i)
                say(f"  {r['mibs']:.0f} MiB/s in {r['seconds']:.1f} s, busy {r['busy']:.0%}")
                results["loop"][name]["sync"].append(r)
        for c in clusters.values():
            c.stop()
            shutil.rmtree(c.w, ignore_errors=True)
    if ONLY in ("", "tc"):
        net = Net()
        try:
            c = Cluster(f"{w}/tc", NEW, True, {"ns": net.ns, "addr": net.addr})
            c.start()
            a = c.disk("r0-a.img", TC_CATCHUP + 64 * MIB)
            b = c.disk("r0-b.img", TC_CATCHUP + 64 * MIB)
            c.adm("alpha", "create-resource", "r0", a)
            deadline = time.time() + 60
            while c.resource("beta", "r0") is None and time.time() < deadline:
                time.sleep(0.1)
            c.adm("beta", "join-resource", "r0", b)
            c.adm("alpha", "wait-resource", "r0", "uptodate", "--timeout", "600")
            rows = {}
            for i in range(REPEAT):
                for data, compress in (("compressible", COMPRESS), ("random", 0)):
                    modes = ("zstd", "off") if i % 2 == 0 else ("off", "zstd")
                    for mode in modes:
                        c.adm("alpha", "set-compression", "r0", mode)
                        deadline = time.time() + 30
                        want = "zstd:1" if mode == "zstd" else "off"
                        while (c.resource("beta", "r0") or {}).get("compression") != want:
                            if time.time() > deadline:
                                raise RuntimeError("beta did not learn the compression setting")
                            time.sleep(0.1)
                        say(f"tc {RATE}: {data} data, {mode}, run {i}")
                        tx0 = net.tx_bytes(0)
                        r = catch_up(c, compress)
                        r["tx"] = net.tx_bytes(0) - tx0
                        say(f"  {r['mibs']:.1f} MiB/s in {r['seconds']:.1f} s, wire {r['wire'] / MIB:.0f} MiB"
                            f" for {r['raw'] / MIB:.0f} MiB, busy {r['busy']:.0%}")
                        rows.setdefault((data, mode), []).append(r)
                        c.adm("alpha", "log-rotate", "r0", check=False)
                        c.adm("alpha", "log-delete", "r0", check=False)
            results["tc"] = {f"{k[0]}/{k[1]}": v for k, v in rows.items()}
            c.stop()
        finally:
            net.close()
    say("device speed again")
    dev1 = device_speed(w)
    load1 = open("/proc/loadavg").read().split()[:3]
    shutil.rmtree(w, ignore_errors=True)
    report(results, dev0, dev1, started, load0, load1, builds)


def report(results, dev0, dev1, started, load0, load1, builds):
    dev_write = min(dev0["write"], dev1["write"])
    link_mibs = size(RATE.replace("mbit", "")) * 1e6 / 8 / MIB if RATE.endswith("mbit") else None
    o = ["# mars peer-link benchmark (bench/link.py)", ""]
    o.append(f"Started {started}; commit {run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD']).strip()};"
             f" plaintext build: {BASE or 'none'}; {os.cpu_count()} CPUs; load average before {' '.join(load0)},"
             f" after {' '.join(load1)}.")
    o.append("")
    o.append(f"Command: `{'BENCH_PIN=1 ' if PIN else ''}{'BENCH_ONLY=' + ONLY + ' ' if ONLY else ''}BENCH_BASE={BASE} BENCH_REPEAT={REPEAT} BENCH_CATCHUP={CATCHUP // MIB}M"
             f" BENCH_SYNC={SYNC // MIB}M BENCH_TC_CATCHUP={TC_CATCHUP // MIB}M BENCH_RATE={RATE}"
             f" BENCH_COMPRESS={COMPRESS} bench/link.py`")
    o.append("")
    o.append(f"Device (the work directory's file system, fio O_DIRECT 1 MiB QD8, 1 GiB): write"
             f" {dev0['write']:.0f} / {dev1['write']:.0f} MiB/s, read {dev0['read']:.0f} / {dev1['read']:.0f}"
             f" MiB/s (before / after the rows).")
    o.append("")
    o.append("Medians of the runs; `busy` is the machine's CPU (all cores, anyone's) during the row,"
             " `marsd` both marsd processes' CPU in cores.")
    o.append("")
    if results["loop"]["tls"]["catchup"]:
        o.append("## TLS against plaintext on 127.0.0.1")
        o.append("")
        o.append("| row | build | MiB/s | runs (MiB/s) | busy | marsd | bound by | TLS / plain |")
        o.append("|---|---|---|---|---|---|---|---|")
        for row, label in (("catchup", f"catch-up of {CATCHUP // MIB} MiB"), ("sync", f"full sync of {SYNC // MIB} MiB")):
            for name, _, _ in builds:
                rs = results["loop"][name][row]
                if not rs:
                    continue
                ratio = ""
                if name == "tls" and results["loop"]["plain"][row]:
                    ratio = f"{med(rs, 'mibs') / med(results['loop']['plain'][row], 'mibs'):.0%}"
                o.append(f"| {label} | {name} | {med(rs, 'mibs'):.0f} | {', '.join('%.0f' % r['mibs'] for r in rs)}"
                         f" | {med(rs, 'busy'):.0%} | {med(rs, 'marsd_cpu'):.2f} |"
                         f" {bound({'busy': med(rs, 'busy'), 'mibs': med(rs, 'mibs')}, dev_write)} | {ratio} |")
        o.append("")
    if results["tc"]:
        o.append(f"## Catch-up over a link of {RATE} (tbf on a veth pair, network namespaces)")
        o.append("")
        o.append("| data | compression | MiB/s | runs (MiB/s) | on the wire / data | busy | marsd | bound by | zstd / off |")
        o.append("|---|---|---|---|---|---|---|---|---|")
        for data in ("compressible", "random"):
            for mode in ("zstd", "off"):
                rs = results["tc"].get(f"{data}/{mode}", [])
                if not rs:
                    continue
                ratio = ""
                off = results["tc"].get(f"{data}/off", [])
                if mode == "zstd" and off:
                    ratio = f"{med(rs, 'mibs') / med(off, 'mibs'):.2f}x"
                wire = statistics.median(r["wire"] / r["raw"] for r in rs if r["raw"]) if any(r["raw"] for r in rs) else float("nan")
                b = bound({"busy": med(rs, "busy"), "mibs": med(rs, "mibs"), "wire": med(rs, "wire"),
                           "seconds": med(rs, "seconds")}, dev_write, link_mibs)
                o.append(f"| {data} ({TC_CATCHUP // MIB} MiB) | {mode} | {med(rs, 'mibs'):.1f} |"
                         f" {', '.join('%.1f' % r['mibs'] for r in rs)} | {wire:.2f} | {med(rs, 'busy'):.0%} |"
                         f" {med(rs, 'marsd_cpu'):.2f} | {b} | {ratio} |")
        o.append("")
    text = "\n".join(o) + "\n"
    open(OUT, "w").write(text)
    json.dump(results, open(OUT.replace(".md", ".json"), "w"), indent=1)
    print(text)


if __name__ == "__main__":
    main()
