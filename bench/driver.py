"""superd's benchmark, the half that measures: superd against xinetd, OpenBSD inetd,
tcpserver and a C epoll server.

Run it through `bash bench/run` (which installs the peers and enters a private network
namespace first); this file is the part that runs inside. It builds the C programs, starts
every server on 127.0.0.1 once, drives each scenario of bench/plan.py with bench/client.c,
measures the listeners scenario and the 100,000-connection soak, stops everything it started,
and writes bench/results.json, then RESULTS.md through bench/report.py.

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

import redirect  # bench/redirect.py: the redirect scenario
import report
from plan import CONCS, HOST, HOST6, LABEL, LISTENER_SETS, PORTS, SCENARIOS, SOURCES, SUPERDS

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

def superd_table(name: str, sink: str, bins: dict[str, str], log: bool,
                 cgroups: bool = True) -> str:
    ports = PORTS[name]
    lines = ["settings:",
             f"  syslog: {{address: {sink}, facility: daemon, ident: superd}}",
             f"  control_socket: {tmp}/{name}.sock",
             "  max_children: 1000",
             f"  cgroups: {'auto' if cgroups else 'no'}"]
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
        table = superd_table(name, sink, bins, log=(name != "superd_nolog"),
                             cgroups=(name != "superd_nocg"))
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


def cgroups_state() -> str:
    """What `superd status` says of cgroups for the superd measured (on, or off and why)."""
    r = subprocess.run([SUPERD, "status", "--json", "-c", os.path.join(tmp, "superd.yaml")],
                       capture_output=True, text=True, timeout=30)
    try:
        return str(json.loads(r.stdout).get("cgroups", "unknown"))
    except ValueError:
        return f"unknown ({r.stderr.strip()[:200]})"


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
        say("bench: starting superd (log on, log off, cgroups off), xinetd, OpenBSD inetd, "
            "tcpserver, C epoll")
        servers = start_servers(bins, sink_path)
        data["superd_fds_at_start"] = proc_status(servers["superd"].pid)["fds"]
        data["cgroups"] = cgroups_state()
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
    data["goals"] = report.goals(data)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    report.write(data, os.path.join(OUT, "RESULTS.md"))
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"bench: done in {data['elapsed_s']} s; wrote {OUT}/RESULTS.md and results.json")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
