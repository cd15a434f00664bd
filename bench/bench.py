"""superd's benchmark: superd against xinetd, OpenBSD inetd, tcpserver and a C epoll server.

Run it through `bash bench/run` (which installs the peers and enters a private network
namespace first); this file is the part that runs inside. It builds the C programs, starts
every server on 127.0.0.1 once, drives each scenario with bench/client.c, measures the
listeners scenario and the 100,000-connection soak, stops everything it started, and writes
bench/RESULTS.md and bench/results.json.

Environment knobs: BENCH_SECONDS (measured seconds per run, default 2.5), BENCH_WARMUP
(default 0.3), BENCH_IDLE (idle window of the listeners scenario, default 5), BENCH_SOAK
(connections of the soak, default 100000), BENCH_OUT (folder for RESULTS.md and
results.json, default bench/).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redirect  # bench/redirect.py: the redirect scenario (run by main, written by report)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SUPERD = os.path.join(ROOT, ".venv", "bin", "superd")
VENV_PY = os.path.join(ROOT, ".venv", "bin", "python")
SECONDS = float(os.environ.get("BENCH_SECONDS", "2.5"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "0.3"))
IDLE = float(os.environ.get("BENCH_IDLE", "5"))
SOAK = int(os.environ.get("BENCH_SOAK", "100000"))
OUT = os.environ.get("BENCH_OUT", HERE)
OBSD_INETD = os.environ.get("OBSD_INETD", "")
CONCS = (1, 8, 64)
HOST = "127.0.0.1"
HOST6 = "::1"  # UDP runs on IPv6 loopback: OpenBSD inetd drops datagrams from 127/8 (dg_badinput)
SOURCES = 8  # TCP clients connect from 127.0.0.1..8 (bench/run names them in /etc/hosts)

# Ports: all below the ephemeral range that bench/run sets inside the namespace (10000-65535).
PORTS = {
    "superd": {"cat": 5000, "tiny": 5001, "echo": 5002, "py": 5003},
    "superd_nolog": {"cat": 5010, "tiny": 5011, "echo": 5012, "py": 5013},
    "xinetd": {"cat": 5020, "tiny": 5021, "echo": 5022, "py": 5023},
    "obsd": {"cat": 5030, "tiny": 5031, "echo": 7},  # inetd's internal services: their own port
    "tcpserver": {"cat": 5040, "tiny": 5041},
    "c_epoll": {"echo": 5050},
}
LISTENER_SETS = {1: 6000, 100: 6100, 1000: 7000}

LABEL = {"superd": "superd", "superd_nolog": "superd (log off)", "xinetd": "xinetd",
         "obsd": "OpenBSD inetd", "tcpserver": "tcpserver", "c_epoll": "C epoll (reference)"}

# (key, title, protocol, service, servers); a server is superd, a peer, or the C reference.
SCENARIOS = [
    ("exec_cat", "exec /bin/cat", "tcp", "cat",
     ["superd", "superd_nolog", "xinetd", "obsd", "tcpserver"]),
    ("exec_tiny", "exec a tiny compiled handler", "tcp", "tiny",
     ["superd", "superd_nolog", "xinetd", "obsd", "tcpserver"]),
    ("tcp_echo", "internal TCP echo", "tcp", "echo",
     ["superd", "superd_nolog", "xinetd", "obsd", "c_epoll"]),
    ("udp_echo", "internal UDP echo (datagrams/s)", "udp", "echo",
     ["superd", "xinetd", "obsd", "c_epoll"]),
    ("python", "python handler: superd forks it, xinetd execs it as a script", "tcp", "py",
     ["superd", "superd_nolog", "xinetd"]),
]
SUPERDS = ("superd", "superd_nolog")
CPU_TABLES = ("exec_cat", "exec_tiny")  # scenarios whose RESULTS.md section shows CPU per conn
CPU_CONCS = (8, 64)
REFERENCE = "c_epoll"
NOTES = {
    "udp_echo": "xinetd's numbers are mostly lost datagrams, not slowness: after answering one "
                "datagram it drains the socket (strace: a `recvfrom` loop until EAGAIN, the "
                "data dropped), so the client's next datagram, sent as soon as the reply "
                "arrives, is thrown away and the client waits out its 200 ms timeout.",
    "python": "xinetd runs `python handler.py` (the venv's interpreter, the same file) per "
              "connection; superd imports it once and calls `handle()` in a forked child.",
}

procs: list[subprocess.Popen] = []
tmp = tempfile.mkdtemp(prefix="superd-bench.")


def say(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


# -- processes --------------------------------------------------------------------------------

def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(os.path.join(tmp, f"{name}.log"), "wb")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         env=env, start_new_session=True, cwd=tmp)
    p.bench_name = name  # type: ignore[attr-defined]
    procs.append(p)
    return p


def stop(p: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)  # whatever is left of its group (handlers)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(2)
    except subprocess.TimeoutExpired:
        pass
    if p in procs:
        procs.remove(p)


def stop_all() -> None:
    for p in list(reversed(procs)):
        stop(p, 3.0)


def on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def log_tail(name: str, lines: int = 15) -> str:
    try:
        with open(os.path.join(tmp, f"{name}.log"), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def wait_tcp(port: int, p: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{p.bench_name} exited ({p.returncode}):\n"  # type: ignore
                               f"{log_tail(p.bench_name)}")  # type: ignore[attr-defined]
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{p.bench_name}: port {port} not up after {timeout}s")  # type: ignore


def proc_status(pid: int) -> dict[str, int]:
    """RSS (kB), fds, and context switches summed over the threads of `pid`."""
    out = {"rss_kb": 0, "fds": len(os.listdir(f"/proc/{pid}/fd")), "ctxt": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    out["ctxt"] += int(line.split()[1])
    return out


def proc_cpu(pid: int) -> tuple[float, float]:
    """(its own CPU seconds, CPU seconds of its reaped children) from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck, (int(fields[13]) + int(fields[14])) / tck


def helpers_of(pid: int) -> list[int]:
    """superd's spawner processes (its children running superd/spawner.py)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == pid and b"spawner.py" in cmd:
            out.append(int(entry))
    return out


def cpu_snapshot(main: int, helpers: list[int]) -> tuple[float, float, float, float, float]:
    """(server, helpers, handlers) CPU seconds so far, and the machine's busy/total jiffies."""
    own, kids = proc_cpu(main)
    helper_cpu = 0.0
    for pid in helpers:
        h_own, h_kids = proc_cpu(pid)
        helper_cpu += h_own
        kids += h_kids
    return (own, helper_cpu, kids, *cpu_busy())


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


# -- build ------------------------------------------------------------------------------------

def build() -> dict[str, str]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise SystemExit("bench: gcc is needed (apt-get install gcc)")
    bins = {}
    for name, flags in (("client", ["-pthread"]), ("echo_epoll", []), ("sink", []),
                        ("tiny_handler", ["-static"])):
        out = os.path.join(tmp, name)
        cmd = [gcc, "-O2", "-Wall", *flags, "-o", out, os.path.join(HERE, f"{name}.c")]
        if subprocess.run(cmd).returncode != 0:
            if "-static" in flags:  # no static libc: a dynamic tiny handler is still tiny
                cmd.remove("-static")
                subprocess.run(cmd, check=True)
            else:
                raise SystemExit(f"bench: cannot build {name}")
        bins[name] = out
    os.chmod(tmp, 0o755)  # the exec'd handlers live here; superd checks what it runs
    return bins


# -- configs ----------------------------------------------------------------------------------

def superd_table(name: str, sink: str, bins: dict[str, str], log: bool) -> str:
    ports = PORTS[name]
    lines = ["settings:",
             f"  syslog: {{address: {sink}, facility: daemon, ident: superd}}",
             f"  control_socket: {tmp}/{name}.sock",
             "  max_children: 1000"]
    if not log:
        lines += ["defaults:", "  log_on_success: []", "  log_on_failure: []"]
    lines += ["services:",
              f'  cat: {{listen: "{HOST}:{ports["cat"]}", exec: [/bin/cat]}}',
              f'  tiny: {{listen: "{HOST}:{ports["tiny"]}", exec: [{bins["tiny_handler"]}]}}',
              f'  echo: {{listen: "{HOST}:{ports["echo"]}", internal: echo}}',
              f'  echo-u: {{listen: "[{HOST6}]:{ports["echo"]}", protocol: udp, internal: echo}}',
              f'  py: {{listen: "{HOST}:{ports["py"]}", python: "{HERE}/handler.py:handle"}}']
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def xinetd_conf(bins: dict[str, str]) -> str:
    p = PORTS["xinetd"]
    common = ("    flags = NOLIBWRAP\n    user = root\n    bind = 127.0.0.1\n"
              "    instances = UNLIMITED\n    per_source = UNLIMITED\n    cps = 1000000 1\n")

    def service(name: str, body: str) -> str:
        return f"service {name}\n{{\n{common}{body}}}\n"

    text = ("defaults\n{\n    instances = UNLIMITED\n    per_source = UNLIMITED\n"
            "    cps = 1000000 1\n}\n")
    text += service("bench-cat", f"    type = UNLISTED\n    socket_type = stream\n"
                    f"    protocol = tcp\n    wait = no\n    port = {p['cat']}\n"
                    "    server = /bin/cat\n")
    text += service("bench-tiny", f"    type = UNLISTED\n    socket_type = stream\n"
                    f"    protocol = tcp\n    wait = no\n    port = {p['tiny']}\n"
                    f"    server = {bins['tiny_handler']}\n")
    text += service("bench-py", f"    type = UNLISTED\n    socket_type = stream\n"
                    f"    protocol = tcp\n    wait = no\n    port = {p['py']}\n"
                    f"    server = {VENV_PY}\n    server_args = {HERE}/handler.py\n")
    text += service("echo", f"    type = INTERNAL UNLISTED\n    id = echo-stream\n"
                    f"    socket_type = stream\n    protocol = tcp\n    wait = no\n"
                    f"    port = {p['echo']}\n")
    text += service("echo", f"    type = INTERNAL UNLISTED\n    id = echo-dgram\n"
                    f"    socket_type = dgram\n    protocol = udp\n    wait = yes\n"
                    f"    port = {p['echo']}\n").replace(
        "NOLIBWRAP\n", "NOLIBWRAP IPv6\n").replace("bind = 127.0.0.1", f"bind = {HOST6}")
    path = os.path.join(tmp, "xinetd.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def obsd_conf(bins: dict[str, str]) -> str:
    p = PORTS["obsd"]
    text = (f"127.0.0.1:{p['cat']} stream tcp nowait.100000000 root /bin/cat cat\n"
            f"127.0.0.1:{p['tiny']} stream tcp nowait.100000000 root {bins['tiny_handler']}"
            " tiny_handler\n"
            "127.0.0.1:echo stream tcp nowait.100000000 root internal\n"
            f"[{HOST6}]:echo dgram udp6 wait root internal\n")
    path = os.path.join(tmp, "inetd.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


# -- the client -------------------------------------------------------------------------------

def client(bins: dict[str, str], port: int, conc: int, udp: bool = False,
           seconds: float = SECONDS, count: int = 0, threads: int = 1,
           hard: float = 60.0, warmup: float = WARMUP) -> dict:
    argv = [bins["client"], "-h", HOST6 if udp else HOST, "-p", str(port), "-c", str(conc),
            "-t", str(threads), "-S", str(SOURCES), "-T", str(hard)]
    if udp:
        argv.append("-u")
    if count:
        argv += ["-n", str(count)]
    else:
        argv += ["-d", str(seconds), "-w", str(warmup)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=hard + 30)
    if r.returncode != 0:
        raise RuntimeError(f"client failed: {r.stderr}")
    return json.loads(r.stdout)


# -- phases -----------------------------------------------------------------------------------

def start_servers(bins: dict[str, str], sink: str) -> dict[str, subprocess.Popen]:
    servers = {}
    for name in SUPERDS:
        table = superd_table(name, sink, bins, log=(name == "superd"))
        servers[name] = start(name, [SUPERD, "run", "-c", table])
    servers["xinetd"] = start("xinetd", ["xinetd", "-dontfork", "-f", xinetd_conf(bins),
                                         "-pidfile", os.path.join(tmp, "xinetd.pid")])
    if OBSD_INETD and os.access(OBSD_INETD, os.X_OK):
        servers["obsd"] = start("obsd", [OBSD_INETD, "-i", "-R", "100000000", obsd_conf(bins)])
    else:
        say("bench: OpenBSD inetd binary not found (OBSD_INETD); its rows are skipped")
    tcpserver = shutil.which("tcpserver")
    if tcpserver:
        for svc, prog in (("cat", "/bin/cat"), ("tiny", bins["tiny_handler"])):
            servers[f"tcpserver_{svc}"] = start(
                f"tcpserver_{svc}", [tcpserver, "-c", "100000", "-b", "128", "-HRl0", HOST,
                                     str(PORTS["tcpserver"][svc]), prog])
    servers["c_epoll"] = start("c_epoll", [bins["echo_epoll"], str(PORTS["c_epoll"]["echo"]),
                                           str(PORTS["c_epoll"]["echo"])])
    for name, p in servers.items():
        base = name.split("_")[0] if name.startswith("tcpserver") else name
        port = (PORTS["tcpserver"][name.split("_")[1]] if base == "tcpserver"
                else next(iter(PORTS[name].values())))
        wait_tcp(port, p)
    return servers


def server_up(servers: dict[str, subprocess.Popen], name: str, service: str) -> bool:
    if name == "tcpserver":
        return f"tcpserver_{service}" in servers
    return name in servers and service in PORTS[name]


def run_scenarios(bins: dict[str, str], servers: dict[str, subprocess.Popen]) -> list[dict]:
    runs = []
    for key, _title, proto, service, names in SCENARIOS:
        for conc in CONCS:
            for name in names:
                if not server_up(servers, name, service):
                    continue
                port = PORTS[name][service]
                main = servers[f"tcpserver_{service}" if name == "tcpserver" else name].pid
                helpers = helpers_of(main) if name in SUPERDS else []
                before = cpu_snapshot(main, helpers)
                r = client(bins, port, conc, udp=(proto == "udp"))
                if r["completed"] < 25 and proto == "tcp":  # too slow for the window: longer
                    before = cpu_snapshot(main, helpers)
                    r = client(bins, port, conc, seconds=max(5.0, SECONDS), warmup=1.0)
                r["cpu"] = cpu_per_connection(before, cpu_snapshot(main, helpers), r)
                r.update(scenario=key, server=name)
                runs.append(r)
                say(f"  {key:10} c={conc:<3} {LABEL[name]:22} {r['rate']:>10.0f}/s  "
                    f"p50 {r['latency_us']['p50'] / 1000:7.2f} ms  "
                    f"p99 {r['latency_us']['p99'] / 1000:7.2f} ms  errors {r['error_count']}")
                time.sleep(0.1)
    return runs


def cpu_per_connection(before: tuple, after: tuple, r: dict) -> dict:
    """What one connection cost the server, its spawners and the handlers (us), and how busy
    the machine was. Counted over warm-up and run alike (the client's total), so the
    per-connection figures hold; handlers still running at the end are not in yet."""
    n = max(1, r.get("completed_all", r["completed"]))
    d = [b - a for a, b in zip(before, after, strict=True)]
    return {"server_us": round(1e6 * d[0] / n, 1), "helpers_us": round(1e6 * d[1] / n, 1),
            "handlers_us": round(1e6 * d[2] / n, 1),
            "machine_busy": round(d[3] / d[4], 3) if d[4] else None}


def loader_capacity(bins: dict[str, str]) -> dict:
    """The client against the C epoll server: what it can drive, and its CPU per operation."""
    out = {}
    port = PORTS["c_epoll"]["echo"]
    for proto in ("tcp", "udp"):
        best = None
        for conc in (8, 64):
            r = client(bins, port, conc, udp=(proto == "udp"))
            say(f"  loader {proto} c={conc}: {r['rate']:.0f}/s, client CPU "
                f"{r['client_cpu_per_op_us']:.1f} us/op")
            if best is None or r["rate"] > best["rate"]:
                best = r
        out[proto] = best
    return out


def listeners(bins: dict[str, str], sink: str) -> dict:
    """1, 100 and 1000 internal echo services: start-up, idle RSS and wake-ups, conn/s."""
    result: dict = {}
    live = {}
    for n, base in LISTENER_SETS.items():
        lines = ["settings:", f"  syslog: {{address: {sink}, facility: daemon, ident: superd}}",
                 f"  control_socket: {tmp}/listeners{n}.sock", "services:"]
        lines += [f'  e{i}: {{listen: "{HOST}:{base + i}", internal: echo}}' for i in range(n)]
        table = os.path.join(tmp, f"listeners{n}.yaml")
        with open(table, "w") as f:
            f.write("\n".join(lines) + "\n")
        notify_path = os.path.join(tmp, f"notify{n}.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        t0 = time.perf_counter()
        p = start(f"listeners{n}", [SUPERD, "run", "-c", table], env=env)
        ready = None
        try:
            while ready is None:
                msg = notify.recv(4096).decode()
                if "READY=1" in msg.split("\n"):
                    ready = time.perf_counter() - t0
        except TimeoutError:
            raise RuntimeError(f"superd with {n} listeners: no READY=1 in 30 s\n"
                               f"{log_tail(f'listeners{n}')}") from None
        notify.setblocking(False)
        live[n] = (p, notify)
        result[n] = {"startup_s": round(ready, 4)}
        say(f"  listeners {n:>4}: READY=1 after {ready:.3f} s")
    time.sleep(1.0)
    before = {n: proc_status(p.pid) for n, (p, _) in live.items()}
    busy0 = cpu_busy()
    time.sleep(IDLE)
    busy1 = cpu_busy()
    after = {n: proc_status(p.pid) for n, (p, _) in live.items()}
    idle_busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    for n in live:
        result[n].update(idle_rss_kb=after[n]["rss_kb"], fds=after[n]["fds"],
                         idle_wakeups=after[n]["ctxt"] - before[n]["ctxt"],
                         idle_wakeups_per_s=round((after[n]["ctxt"] - before[n]["ctxt"]) / IDLE,
                                                  2))
        say(f"  listeners {n:>4}: idle RSS {after[n]['rss_kb'] / 1024:.1f} MB, "
            f"{result[n]['idle_wakeups']} wake-ups in {IDLE:.0f} s")
    for conc in (8, 64):
        for n, base in LISTENER_SETS.items():
            r = client(bins, base, conc)
            result[n][f"c{conc}"] = r
            say(f"  listeners {n:>4}: c={conc} on one port {r['rate']:.0f}/s")
    for p, notify in live.values():
        stop(p)
        notify.close()
    return {"sets": result, "machine_busy_during_idle": round(idle_busy, 4)}


def soak(bins: dict[str, str], superd: subprocess.Popen) -> dict:
    """RSS and fds of the daemon before and after SOAK internal echo connections."""
    port = PORTS["superd"]["echo"]
    client(bins, port, 64, count=2000)  # warm: caches, allocator arenas, the selector map
    time.sleep(0.3)
    before = proc_status(superd.pid)
    r = client(bins, port, 64, count=SOAK, hard=150)
    time.sleep(0.5)
    after = proc_status(superd.pid)
    say(f"  soak: {r['completed']} connections at {r['rate']:.0f}/s; RSS "
        f"{before['rss_kb']} -> {after['rss_kb']} kB, fds {before['fds']} -> {after['fds']}")
    return {"connections": r["completed"], "errors": r["error_count"], "rate": r["rate"],
            "rss_kb_before": before["rss_kb"], "rss_kb_after": after["rss_kb"],
            "fds_before": before["fds"], "fds_after": after["fds"], "client": r}


# -- machine ----------------------------------------------------------------------------------

def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    py = subprocess.run([VENV_PY, "-c", "import sys; print(sys.version.split()[0])"],
                        capture_output=True, text=True).stdout.strip()
    versions = {}
    for pkg in ("xinetd", "ucspi-tcp"):
        v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                           text=True).stdout.strip()
        versions[pkg] = v or "not installed"
    versions["openbsd-inetd"] = os.environ.get("OBSD_INETD_VERSION", "")
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "superd"],
                           capture_output=True, text=True).stdout.strip()
    with open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": py, "memory_gb": round(int(mem) / 1024 / 1024, 1),
            "superd_commit": rev + ("+dirty" if dirty else ""), "peers": versions}


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# -- main -------------------------------------------------------------------------------------

def main() -> int:
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    data: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "machine": machine(), "load_before": loadavg(),
        "settings": {"seconds": SECONDS, "warmup": WARMUP, "idle": IDLE, "soak": SOAK,
                     "concurrency": CONCS}}
    try:
        say("bench: building the C programs")
        bins = build()
        sink_path = os.path.join(tmp, "syslog.sock")
        sink = start("sink", [bins["sink"], sink_path])
        for _ in range(100):
            if os.path.exists(sink_path):
                break
            time.sleep(0.02)
        say("bench: starting superd (log on, log off), xinetd, OpenBSD inetd, tcpserver, "
            "C epoll")
        servers = start_servers(bins, sink_path)
        data["superd_fds_at_start"] = proc_status(servers["superd"].pid)["fds"]
        say("bench: load generator capacity (client against the C epoll server)")
        data["loader"] = loader_capacity(bins)
        say("bench: scenarios")
        data["runs"] = run_scenarios(bins, servers)
        say("bench: listeners (1, 100, 1000)")
        data["listeners"] = listeners(bins, sink_path)
        say(f"bench: soak ({SOAK} connections)")
        data["soak"] = soak(bins, servers["superd"])
        say("bench: redirect (superd's relay, superd + socat, systemd-socket-proxyd)")
        data["redirect"] = redirect.run(bins, tmp, SUPERD, SECONDS, WARMUP, say)
        data["superd_fds_at_end"] = proc_status(servers["superd"].pid)["fds"]
        for p in list(procs):
            if p is not sink:
                stop(p)
        stop(sink)
        try:
            data["syslog_records"] = json.loads(open(os.path.join(tmp, "sink.log")).read())
        except (OSError, ValueError):
            pass
    finally:
        stop_all()
    data["load_after"] = loadavg()
    data["elapsed_s"] = round(time.monotonic() - started, 1)
    data["goals"] = goals(data)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(OUT, "RESULTS.md"), "w") as f:
        f.write(report(data))
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"bench: done in {data['elapsed_s']} s; wrote {OUT}/RESULTS.md and results.json")
    return 0


# -- analysis ---------------------------------------------------------------------------------

def pick(data: dict, scenario: str, server: str, conc: int) -> dict | None:
    for r in data["runs"]:
        if r["scenario"] == scenario and r["server"] == server and r["concurrency"] == conc:
            return r
    return None


def peers_of(scenario: str) -> list[str]:
    names = next(s[4] for s in SCENARIOS if s[0] == scenario)
    return [n for n in names if n not in SUPERDS and n != REFERENCE]


def best_peer(data: dict, scenario: str, conc: int) -> dict | None:
    rs = [pick(data, scenario, n, conc) for n in peers_of(scenario)]
    rs = [r for r in rs if r is not None]
    return max(rs, key=lambda r: r["rate"]) if rs else None


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b["rate"]:
        return None
    return a["rate"] / b["rate"]


def goals(data: dict) -> list[dict]:
    out = []

    def goal(text: str, value: float | None, target: float, unit: str = "x",
             at_most: bool = False) -> None:
        met = value is not None and (value <= target if at_most else value >= target)
        out.append({"goal": text, "value": value, "target": target, "unit": unit,
                    "at_most": at_most, "met": met})

    for scen, name in (("exec_cat", "exec /bin/cat"), ("exec_tiny", "exec tiny handler")):
        for conc in (8, 64):
            for sd in SUPERDS:
                goal(f"{name}, c={conc}: {LABEL[sd]} / best peer",
                     ratio(pick(data, scen, sd, conc), best_peer(data, scen, conc)), 1.0)
    for conc in (8, 64):
        for sd in SUPERDS:
            goal(f"internal TCP echo, c={conc}: {LABEL[sd]} / C epoll",
                 ratio(pick(data, "tcp_echo", sd, conc), pick(data, "tcp_echo", REFERENCE, conc)),
                 0.95)
    goal("internal UDP echo, c=8: superd / best peer",
         ratio(pick(data, "udp_echo", "superd", 8), best_peer(data, "udp_echo", 8)), 1.0)
    for conc in CONCS:
        goal(f"python handler, c={conc}: superd (forked) / xinetd (exec'd script)",
             ratio(pick(data, "python", "superd", conc), pick(data, "python", "xinetd", conc)),
             10.0)
    for scen, name in (("exec_cat", "exec /bin/cat"), ("exec_tiny", "exec tiny handler")):
        peers = [pick(data, scen, n, 64) for n in peers_of(scen)]
        peers = [r for r in peers if r]
        mine = pick(data, scen, "superd", 64)
        if peers and mine:
            best = min(r["latency_us"]["p99"] for r in peers)
            goal(f"{name}, c=64: superd p99 / best peer p99",
                 mine["latency_us"]["p99"] / best if best else None, 1.0, at_most=True)
    sets = data.get("listeners", {}).get("sets", {})
    if 1000 in sets:
        s = sets[1000]
        goal("1000 listeners: start-up to READY=1", s["startup_s"], 1.0, "s", at_most=True)
        goal("1000 listeners: idle RSS", s["idle_rss_kb"] / 1024, 40.0, "MB", at_most=True)
        idle = data["settings"]["idle"]
        goal(f"1000 listeners: wake-ups in {idle:.0f} s idle", s["idle_wakeups"], 0, "",
             at_most=True)
        for conc in (8, 64):
            goal(f"1000 listeners: conn/s on one port, c={conc}, vs 1 listener",
                 ratio(s[f"c{conc}"], sets[1][f"c{conc}"]), 0.95)
    soak_ = data.get("soak")
    if soak_:
        goal(f"{soak_['connections']} connections: fd growth", soak_["fds_after"] -
             soak_["fds_before"], 0, "fds", at_most=True)
        goal(f"{soak_['connections']} connections: RSS growth (<= 1 MB counts as none)",
             (soak_["rss_kb_after"] - soak_["rss_kb_before"]) / 1024, 1.0, "MB", at_most=True)
    loader = data.get("loader", {})
    for proto in ("tcp", "udp"):
        best = best_measured(data, proto)
        if proto in loader and best:
            goal(f"load generator ({proto}): its rate against C epoll / best superd or peer rate",
                 loader[proto]["rate"] / best["rate"], 2.0)
            goal(f"load generator ({proto}): what one client CPU drives (1 / its CPU per "
                 "operation) / best superd or peer rate",
                 capacity(loader[proto]) / best["rate"], 2.0)
    return out


def best_measured(data: dict, proto: str) -> dict | None:
    """The fastest run of superd or a peer (not the C reference) over `proto`."""
    scens = {s[0] for s in SCENARIOS if s[2] == proto}
    runs = [r for r in data.get("runs", []) if r["scenario"] in scens
            and r["server"] != REFERENCE]
    return max(runs, key=lambda r: r["rate"], default=None)


def capacity(r: dict) -> float:
    """Operations per second one CPU of the client can drive. Its CPU time includes the
    kernel's loopback work done in its context (part of it the server's side), so this is a
    lower bound."""
    return 1e6 / max(r["client_cpu_per_op_us"], 0.01)


def fmt_rate(r: dict | None) -> str:
    return "–" if r is None else f"{r['rate']:,.0f}"


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.2f}" if us < 100000 else f"{us / 1000:.0f}"


def fmt_x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def cpu_table(data: dict, key: str, names: list[str]) -> list[str]:
    """Where each connection's CPU went, per server (from /proc, around each run)."""
    out = ["CPU per connection in µs (from /proc: the server's own processes, superd's "
           "spawners, the handlers it reaped) and how busy the two CPUs were:", "",
           "| server | " + " | ".join(f"c={c} server | spawners | handlers | busy"
                                     for c in CPU_CONCS) + " |",
           "|---|" + "---:|" * (4 * len(CPU_CONCS))]
    for name in names:
        cells = []
        for c in CPU_CONCS:
            cpu = (pick(data, key, name, c) or {}).get("cpu")
            if not cpu:
                cells += ["–"] * 4
                continue
            busy = cpu["machine_busy"]
            cells += [f"{cpu['server_us']:.0f}",
                      f"{cpu['helpers_us']:.0f}" if name in SUPERDS else "–",
                      f"{cpu['handlers_us']:.0f}",
                      f"{100 * busy:.0f}%" if busy is not None else "–"]
        if any(x != "–" for x in cells):
            out.append(f"| {LABEL[name]} | " + " | ".join(cells) + " |")
    return out + [""]


def report(data: dict) -> str:
    m = data["machine"]
    st = data["settings"]
    busy_idle = data.get("listeners", {}).get("machine_busy_during_idle")
    # Judged by what other processes did while superd sat idle mid-run: the 1-minute load
    # average before the run still carries whatever ran in the minute before it.
    preliminary = busy_idle is None or busy_idle > 0.1
    out = ["# superd benchmark results", ""]
    if preliminary:
        out += ["**PRELIMINARY: the machine was busy during this run** (load average before: "
                f"{data['load_before'][0]:.2f}; other processes used "
                f"{100 * (busy_idle or 0):.0f}% of the CPUs during the idle window). "
                "Treat the numbers as rough; rerun `bash bench/run` on a quiet machine.", ""]
    out += [
        "Written by `bash bench/run` (see the top of bench/run for what it does). Raw numbers:",
        "`bench/results.json`.", "",
        f"- date: {data['date']}; run took {data['elapsed_s']} s",
        f"- machine: {m['nproc']} CPUs, {m['cpu']}, {m['memory_gb']} GB; kernel {m['kernel']}; "
        f"python {m['python']}",
        f"- superd commit {m['superd_commit']}; xinetd {m['peers']['xinetd']}, ucspi-tcp "
        f"(tcpserver) {m['peers']['ucspi-tcp']}, openbsd-inetd "
        f"{m['peers']['openbsd-inetd'] or '?'} (run from `dpkg -x`)",
        f"- load average before: {' '.join(map(str, data['load_before']))}; after: "
        f"{' '.join(map(str, data['load_after']))}"
        + (f"; machine CPU busy during the {st['idle']:.0f} s idle window: "
           f"{100 * busy_idle:.1f}%" if busy_idle is not None else ""),
        f"- each run: {st['warmup']} s warm-up, then {st['seconds']} s measured (a "
        "TCP run with fewer than 25 completions is redone with 1 s warm-up and 5 s measured); "
        "one client process (bench/client.c, one epoll thread); everything in a private "
        "network namespace (loopback only), ephemeral ports 10000-65535, tcp_tw_reuse=1 there",
        "- TCP: from 127.0.0.1..8 to 127.0.0.1 (the 8 sources are in a private /etc/hosts); per "
        "connection: connect, send 64 bytes (one line), shutdown(SHUT_WR), read to EOF, check "
        "the bytes, close. UDP: on [::1] (OpenBSD inetd ignores datagrams from 127/8), one "
        "64-byte datagram, wait for the reply (200 ms timeout = loss). Latency: from connect() "
        "to EOF, or from send to reply.",
        "- **superd** = the default per-connection logging (START/EXIT lines) sent to a real "
        "syslog socket, a unix datagram socket read and discarded by bench/sink.c "
        "(net.unix.max_dgram_qlen=512 in the namespace, systemd's usual setting); "
        "**superd (log off)** = `log_on_success: []`, `log_on_failure: []`. Peers log nothing "
        "per connection (xinetd has no log_type; inetd without -l; tcpserver without -v).",
        "- peers with their limits lifted: xinetd `instances`/`per_source = UNLIMITED`, "
        "`cps = 1000000 1`, NOLIBWRAP; OpenBSD inetd `-R 100000000` and `nowait.100000000`; "
        "tcpserver `-c 100000 -b 128 -HRl0`. busybox inetd is not in Debian's busybox build, "
        "so it is not measured.",
        "",
        "## Goals", "",
        "| goal | measured | target | |", "|---|---|---|---|"]
    for g in data["goals"]:
        v = g["value"]
        if v is None:
            val = "–"
        elif g["unit"] == "x":
            val = f"{v:.2f}x"
        else:
            val = f"{v:.3g} {g['unit']}".strip()
        tgt = ("<= " if g["at_most"] else ">= ") + (f"{g['target']}x" if g["unit"] == "x"
                                                     else f"{g['target']} {g['unit']}".strip())
        out.append(f"| {g['goal']} | {val} | {tgt} | {'met' if g['met'] else '**missed**'} |")
    out += ["", "## Scenarios", "",
            "conn/s (datagrams/s for UDP); p50 and p99 latency in ms; c = concurrency.", ""]
    for key, title, _proto, _service, names in SCENARIOS:
        out += [f"### {title}", "",
                "| server | " + " | ".join(f"c={c} rate | p50 | p99" for c in CONCS) + " |",
                "|---|" + "---:|" * (3 * len(CONCS))]
        for name in names:
            cells = []
            for c in CONCS:
                r = pick(data, key, name, c)
                if r is None:
                    cells += ["–", "–", "–"]
                    continue
                err = f" ({r['error_count']} err)" if r["error_count"] else ""
                cells += [fmt_rate(r) + err, fmt_ms(r["latency_us"]["p50"]),
                          fmt_ms(r["latency_us"]["p99"])]
            if any(x != "–" for x in cells):
                out.append(f"| {LABEL[name]} | " + " | ".join(cells) + " |")
        out += ["", "| ratio | " + " | ".join(f"c={c}" for c in CONCS) + " |",
                "|---|" + "---:|" * len(CONCS)]
        for sd in [n for n in names if n in SUPERDS]:
            out.append(f"| {LABEL[sd]} / best peer | " + " | ".join(
                fmt_x(ratio(pick(data, key, sd, c), best_peer(data, key, c))) for c in CONCS)
                + " |")
            if REFERENCE in names:
                out.append(f"| {LABEL[sd]} / C epoll | " + " | ".join(
                    fmt_x(ratio(pick(data, key, sd, c), pick(data, key, REFERENCE, c)))
                    for c in CONCS) + " |")
        bp = [best_peer(data, key, c) for c in CONCS]
        out += ["| best peer | " + " | ".join(LABEL[r["server"]] if r else "–" for r in bp)
                + " |", ""]
        if key in NOTES:
            out += [NOTES[key], ""]
        if key in CPU_TABLES:
            out += cpu_table(data, key, names)
    lst = data.get("listeners", {}).get("sets", {})
    if lst:
        out += ["## Listeners (internal echo services on consecutive ports)", "",
                "| listeners | start-up to READY=1 | idle RSS | fds | wake-ups in "
                f"{st['idle']:.0f} s idle | per s | conn/s one port c=8 | c=64 | p99 c=64 ms |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, s in lst.items():
            out.append(f"| {n} | {s['startup_s']:.3f} s | {s['idle_rss_kb'] / 1024:.1f} MB | "
                       f"{s['fds']} | {s['idle_wakeups']} | {s['idle_wakeups_per_s']} | "
                       f"{fmt_rate(s['c8'])} | "
                       f"{fmt_rate(s['c64'])} | {fmt_ms(s['c64']['latency_us']['p99'])} |")
        out.append("")
    s = data.get("soak")
    if s:
        out += [f"## {s['connections']:,} internal echo connections (c=64, superd with logging)",
                "", f"- {s['rate']:,.0f} conn/s, {s['errors']} errors",
                f"- RSS {s['rss_kb_before']} kB -> {s['rss_kb_after']} kB "
                f"({s['rss_kb_after'] - s['rss_kb_before']:+d} kB); fds {s['fds_before']} -> "
                f"{s['fds_after']}",
                f"- superd (log on) fds at the start of the whole run "
                f"{data.get('superd_fds_at_start')}, at the end {data.get('superd_fds_at_end')}",
                ""]
    ld = data.get("loader")
    if ld:
        out += ["## Load generator", "",
                "The same client, against the C epoll server (best of c=8 and c=64), and its "
                "own CPU cost per connection or datagram:", ""]
        for proto, r in ld.items():
            best = best_measured(data, proto)
            out.append(f"- {proto}: {r['rate']:,.0f}/s at c={r['concurrency']}; client CPU "
                       f"{r['client_cpu_per_op_us']:.1f} us per operation (= "
                       f"{capacity(r):,.0f}/s per client CPU)"
                       + (f"; best superd or peer rate: {best['rate']:,.0f}/s "
                          f"({LABEL[best['server']]}, {best['scenario']}, "
                          f"c={best['concurrency']})" if best else ""))
        out += ["", "Per scenario: what one client CPU drives over the fastest rate measured "
                "in it (below 2x, that scenario's rates are bounded by the client as much as by "
                "the servers, so superd's ratios there are lower bounds):", "",
                "| scenario | fastest rate measured | client capacity / it |", "|---|---:|---:|"]
        for key, title, proto, _service, _names in SCENARIOS:
            runs = [r for r in data.get("runs", []) if r["scenario"] == key
                    and r["server"] != REFERENCE]
            best = max(runs, key=lambda r: r["rate"], default=None)
            if best and proto in ld and best["rate"]:
                out.append(f"| {title} | {best['rate']:,.0f}/s ({LABEL[best['server']]}, "
                           f"c={best['concurrency']}) | "
                           f"{fmt_x(capacity(ld[proto]) / best['rate'])} |")
        out += ["", "Against the C server, client and server share the 2 CPUs, so the rate "
                "there is bounded by the server and the kernel as much as by the client; the "
                "CPU figure is what the client itself needs.", ""]
    if data.get("redirect"):
        out += redirect.report(data["redirect"])
    if data.get("syslog_records"):
        out += [f"syslog sink received {data['syslog_records']['records']:,} records during the "
                "run.", ""]
    analysis = os.path.join(HERE, "analysis.md")  # hand-written: misses and their profiles
    if os.path.exists(analysis):
        with open(analysis) as f:
            out += ["", f.read().rstrip()]
    return "\n".join(out)


def report_only(path: str) -> int:
    """Rewrite RESULTS.md (beside `path`) from a results.json, goals recomputed."""
    with open(path) as f:
        data = json.load(f)
    data["listeners"]["sets"] = {int(k): v for k, v in data["listeners"]["sets"].items()}
    data["goals"] = goals(data)
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), "RESULTS.md"), "w") as f:
        f.write(report(data))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:  # bench.py --report bench/results.json
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(report_only(sys.argv[2]))
    try:
        sys.exit(main())
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
