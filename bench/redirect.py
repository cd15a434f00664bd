"""The redirect scenario: superd's in-loop relay against the ways to forward TCP without it.

Three forwarders, measured in one run, in front of two servers: the C echo server
(bench/echo_epoll.c) for the connection rate, and for the throughput a source that writes
BENCH_REDIRECT_MB MiB to each connection and closes (this file run as `--source PORT`):

- `superd redirect`: `redirect: 127.0.0.1:PORT`, bytes moved with splice() in the loop;
- `superd + socat`: `exec: [/usr/bin/socat, "-", "TCP:127.0.0.1:PORT"]`, a socat exec'd per
  connection (the workaround before redirect existed);
- `systemd-socket-proxyd`, handed its listening socket by systemd-socket-activate.

Both superds run with logging off (log_on_success/log_on_failure: []), as the other two log
nothing per connection. Measured: throughput of one large transfer (MB/s of payload from the
source through the forwarder to the client, to EOF), and connections per second at
concurrency 1, 8 and 64 with bench/client.c -k (connect, send one line, read it back,
close: systemd-socket-proxyd ends a connection at the client's half-close, before the answer
comes back, so the half-close of the other scenarios would fail every one of its exchanges).
The same transfer and rates straight to the servers show what the client and the machine
allow.

The bench driver calls `run(bins, tmp, superd, seconds, warmup, say)` and puts the result
under "redirect" in results.json; `report(result)` gives RESULTS.md's section. Run alone
(`python3 bench/redirect.py`, as root, briefly: it builds the two C programs) it prints the
result as JSON; BENCH_REDIRECT_PORT moves its ports (default 8100-8107).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = "127.0.0.1"
BASE = int(os.environ.get("BENCH_REDIRECT_PORT", "8100"))
PORTS = {"echo": BASE, "superd": BASE + 1, "socat": BASE + 2, "proxyd": BASE + 3,
         "source": BASE + 4, "superd_bulk": BASE + 5, "socat_bulk": BASE + 6,
         "proxyd_bulk": BASE + 7}
LABEL = {"direct": "no forwarder (the servers themselves)", "superd": "superd redirect",
         "socat": "superd + socat per connection", "proxyd": "systemd-socket-proxyd"}
FORWARDERS = ("superd", "socat", "proxyd")
CONCS = (1, 8, 64)
MEGS = int(os.environ.get("BENCH_REDIRECT_MB", "1024"))
CHUNK = 1 << 20
PROXYD = next((p for p in ("/lib/systemd/systemd-socket-proxyd",
                           "/usr/lib/systemd/systemd-socket-proxyd") if os.path.exists(p)), "")
Say = Callable[..., None]


def table(tmp: str) -> str:
    path = os.path.join(tmp, "redirect.yaml")
    echo, source = f"{HOST}:{PORTS['echo']}", f"{HOST}:{PORTS['source']}"
    with open(path, "w") as f:
        f.write(f"""settings:
  control_socket: {tmp}/redirect.sock
  max_children: 1000
defaults:
  log_on_success: []
  log_on_failure: []
services:
  relay: {{listen: "{HOST}:{PORTS['superd']}", redirect: "{echo}"}}
  socat: {{listen: "{HOST}:{PORTS['socat']}", exec: [/usr/bin/socat, "-", "TCP:{echo}"]}}
  relay-bulk: {{listen: "{HOST}:{PORTS['superd_bulk']}", redirect: "{source}"}}
  socat-bulk: {{listen: "{HOST}:{PORTS['socat_bulk']}",
               exec: [/usr/bin/socat, "-", "TCP:{source}"]}}
""")
    return path


def start(argv: list[str], tmp: str, name: str) -> subprocess.Popen:
    log = open(os.path.join(tmp, f"redirect-{name}.log"), "wb")
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp)


def stop(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_port(port: int, p: subprocess.Popen, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if p.poll() is not None:
            raise RuntimeError(f"exited ({p.returncode}) before port {port} was up")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not up after {timeout}s")


def transfer(port: int, megs: int = MEGS, timeout: float = 120.0) -> dict:
    """Read one connection to EOF (the source's `megs` MiB); MB/s of payload."""
    started = time.monotonic()
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    buf = bytearray(4 * CHUNK)
    got = 0
    for _ in range(megs * 1024 + 1_000_000):  # bounded: far more reads than it takes
        n = sock.recv_into(buf)
        if not n:
            break
        got += n
    elapsed = time.monotonic() - started
    sock.close()
    if got != megs * CHUNK:
        raise RuntimeError(f"transfer on {port}: {got} of {megs * CHUNK} bytes")
    return {"bytes": got, "seconds": round(elapsed, 3), "mb_s": round(got / elapsed / 1e6, 1)}


def source(port: int, megs: int) -> None:
    """The throughput scenario's server: `megs` MiB to each connection, then close."""
    block = memoryview(bytes(range(256)) * (4 * CHUNK // 256))
    listener = socket.create_server((HOST, port), backlog=16)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        try:
            for _ in range(megs // 4):
                conn.sendall(block)
            conn.sendall(block[:megs % 4 * CHUNK])
        except OSError:
            pass
        conn.close()


def rate(bins: dict[str, str], port: int, conc: int, seconds: float, warmup: float) -> dict:
    """bench/client.c with -k: the line back, then close (no half-close: proxyd ends a
    connection at the client's end-of-file, before the answer can come back)."""
    argv = [bins["client"], "-h", HOST, "-p", str(port), "-c", str(conc), "-S", "8",
            "-d", str(seconds), "-w", str(warmup), "-T", "60", "-k"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"client failed: {r.stderr}")
    return json.loads(r.stdout)


def run(bins: dict[str, str], tmp: str, superd: str, seconds: float = 2.5,
        warmup: float = 0.3, say: Say = print) -> dict:
    """Start the echo server and the forwarders, measure, stop them; the result."""
    procs = {"echo": start([bins["echo_epoll"], str(PORTS["echo"])], tmp, "echo"),
             "source": start([sys.executable, os.path.abspath(__file__), "--source",
                              str(PORTS["source"]), str(MEGS)], tmp, "source"),
             "superd": start([superd, "run", "-c", table(tmp)], tmp, "superd")}
    if PROXYD and shutil.which("systemd-socket-activate"):
        for name, back in (("proxyd", "echo"), ("proxyd_bulk", "source")):
            procs[name] = start(["systemd-socket-activate", "-l", f"{HOST}:{PORTS[name]}",
                                 PROXYD, f"{HOST}:{PORTS[back]}"], tmp, name)
    result: dict = {"megabytes": MEGS, "throughput": {}, "rate": {}, "labels": LABEL}
    try:
        for name in ("echo", "source", "superd", "proxyd", "proxyd_bulk"):
            if name in procs:
                wait_port(PORTS[name], procs[name])
        if "proxyd" not in procs:
            say("bench: systemd-socket-proxyd not found; its rows are skipped")
        names = ["direct", *(n for n in FORWARDERS if n in procs or n == "socat")]
        for name in names:
            port = PORTS["source" if name == "direct" else f"{name}_bulk"]
            result["throughput"][name] = r = transfer(port)
            say(f"  redirect   {LABEL[name]:32} {r['mb_s']:>9.1f} MB/s ({MEGS} MiB)")
        for conc in CONCS:
            for name in names:
                port = PORTS["echo" if name == "direct" else name]
                r = rate(bins, port, conc, seconds, warmup)
                result["rate"].setdefault(name, {})[str(conc)] = r
                say(f"  redirect   c={conc:<3} {LABEL[name]:32} {r['rate']:>9.0f}/s  "
                    f"p99 {r['latency_us']['p99'] / 1000:7.2f} ms  errors {r['error_count']}")
    finally:
        for p in procs.values():
            stop(p)
    result["ratios"] = ratios(result)
    return result


def ratios(result: dict) -> dict:
    """superd redirect / the best of the other two, for throughput and each concurrency."""
    out: dict = {}
    peers = [n for n in ("socat", "proxyd") if n in result["throughput"]]
    if "superd" in result["throughput"] and peers:
        best = max(result["throughput"][n]["mb_s"] for n in peers)
        out["throughput"] = round(result["throughput"]["superd"]["mb_s"] / best, 2)
    for conc in map(str, CONCS):
        rates = [result["rate"][n][conc]["rate"] for n in peers
                 if conc in result["rate"].get(n, {})]
        mine = result["rate"].get("superd", {}).get(conc)
        if rates and mine and max(rates):
            out[f"rate_c{conc}"] = round(mine["rate"] / max(rates), 2)
    return out


def report(result: dict) -> list[str]:
    """RESULTS.md's redirect section, as lines."""
    lines = ["## redirect: superd's relay against socat and systemd-socket-proxyd", "",
             f"One transfer of {result['megabytes']} MiB from a source server through the "
             "forwarder, and connections per second to a C echo server through it (one line "
             "each, as in the other scenarios). Goal: superd at least 1.0x the best of the "
             "other two.", "",
             "| forwarder | MB/s | " + " | ".join(f"conn/s c={c}" for c in CONCS) + " |",
             "|---|---|" + "---|" * len(CONCS)]
    for name, label in result["labels"].items():
        if name not in result["throughput"]:
            continue
        rates = [result["rate"].get(name, {}).get(str(c), {}).get("rate") for c in CONCS]
        lines.append(f"| {label} | {result['throughput'][name]['mb_s']:.0f} | "
                     + " | ".join("-" if r is None else f"{r:.0f}" for r in rates) + " |")
    lines += ["", "superd / best of the others: " + ", ".join(
        f"{k.replace('_', ' ')} {v:.2f}x" for k, v in result["ratios"].items()), ""]
    return lines


def _build(tmp: str) -> dict[str, str]:
    gcc = shutil.which("gcc") or "cc"
    bins = {}
    for name, flags in (("client", ["-pthread"]), ("echo_epoll", [])):
        out = os.path.join(tmp, name)
        subprocess.run([gcc, "-O2", "-Wall", *flags, "-o", out, os.path.join(HERE, f"{name}.c")],
                       check=True)
        bins[name] = out
    return bins


if __name__ == "__main__" and sys.argv[1:2] == ["--source"]:
    source(int(sys.argv[2]), int(sys.argv[3]))
elif __name__ == "__main__":
    work = tempfile.mkdtemp(prefix="superd-redirect-")
    try:
        exe = os.path.join(os.path.dirname(HERE), ".venv", "bin", "superd")
        out = run(_build(work), work, exe, float(os.environ.get("BENCH_SECONDS", "2.5")),
                  float(os.environ.get("BENCH_WARMUP", "0.3")),
                  lambda *a: print(*a, file=sys.stderr, flush=True))
        print(json.dumps(out, indent=1))
        print("\n".join(report(out)), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
