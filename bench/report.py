"""The benchmark's report: results.json in, RESULTS.md out, the goals judged on the way.

    .venv/bin/python bench/report.py bench/results.json [RESULTS.md]

rewrites RESULTS.md (by default beside the results file) from the raw numbers, without running
anything; bench/driver.py calls `write()` at the end of a run. Goals are recomputed every time,
so a changed target applies to old runs too. bench/analysis.md (hand-written) is appended.
"""

from __future__ import annotations

import json
import os
import sys

import redirect  # bench/redirect.py: its section of RESULTS.md
from plan import CONCS, LABEL, REFERENCE, SCENARIOS, SUPERDS

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_TABLES = ("exec_cat", "exec_tiny")  # scenarios whose RESULTS.md section shows CPU per conn
CPU_CONCS = (8, 64)
NOTES = {
    "udp_echo": "xinetd's numbers are mostly lost datagrams, not slowness: after answering one "
                "datagram it drains the socket (strace: a `recvfrom` loop until EAGAIN, the "
                "data dropped), so the client's next datagram, sent as soon as the reply "
                "arrives, is thrown away and the client waits out its 200 ms timeout.",
    "python": "xinetd runs `python handler.py` (the venv's interpreter, the same file) per "
              "connection; superd imports it once and calls `handle()` in a forked child.",
}



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
        for sd in ("superd", "superd_nolog"):
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
    """RESULTS.md for one run, section by section."""
    out = header(data) + goals_table(data)
    out += ["", "## Scenarios", "",
            "conn/s (datagrams/s for UDP); p50 and p99 latency in ms; c = concurrency.", ""]
    for key, title, _proto, _service, names in SCENARIOS:
        out += scenario_section(data, key, title, names)
    out += listeners_section(data) + soak_section(data) + loader_section(data)
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


def header(data: dict) -> list[str]:
    """The title, a warning when the machine was busy, and how the run was made."""
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
    return out + [
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
        "- **superd (cgroups off)** = superd with `cgroups: no` (logging on): the row "
        "\"superd / superd (cgroups off)\" is what a cgroup per handler costs. For superd, "
        f"`superd status` said: cgroups {data.get('cgroups', 'unknown')}.",
        ""]


def goals_table(data: dict) -> list[str]:
    out = ["## Goals", "", "| goal | measured | target | |", "|---|---|---|---|"]
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
    return out


def scenario_section(data: dict, key: str, title: str, names: list[str]) -> list[str]:
    """One scenario: rate and latency per server and concurrency, then the ratios."""
    out = [f"### {title}", "",
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
    if "superd_nocg" in names:
        out.append("| superd / superd (cgroups off) | " + " | ".join(
            fmt_x(ratio(pick(data, key, "superd", c), pick(data, key, "superd_nocg", c)))
            for c in CONCS) + " |")
    bp = [best_peer(data, key, c) for c in CONCS]
    out += ["| best peer | " + " | ".join(LABEL[r["server"]] if r else "–" for r in bp)
            + " |", ""]
    if key in NOTES:
        out += [NOTES[key], ""]
    if key in CPU_TABLES:
        out += cpu_table(data, key, names)
    return out


def listeners_section(data: dict) -> list[str]:
    lst = data.get("listeners", {}).get("sets", {})
    if not lst:
        return []
    out = ["## Listeners (internal echo services on consecutive ports)", "",
           "| listeners | start-up to READY=1 | idle RSS | fds | wake-ups in "
           f"{data['settings']['idle']:.0f} s idle | per s | conn/s one port c=8 | c=64 | "
           "p99 c=64 ms |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, s in lst.items():
        out.append(f"| {n} | {s['startup_s']:.3f} s | {s['idle_rss_kb'] / 1024:.1f} MB | "
                   f"{s['fds']} | {s['idle_wakeups']} | {s['idle_wakeups_per_s']} | "
                   f"{fmt_rate(s['c8'])} | "
                   f"{fmt_rate(s['c64'])} | {fmt_ms(s['c64']['latency_us']['p99'])} |")
    return out + [""]


def soak_section(data: dict) -> list[str]:
    s = data.get("soak")
    if not s:
        return []
    return [f"## {s['connections']:,} internal echo connections (c=64, superd with logging)",
            "", f"- {s['rate']:,.0f} conn/s, {s['errors']} errors",
            f"- RSS {s['rss_kb_before']} kB -> {s['rss_kb_after']} kB "
            f"({s['rss_kb_after'] - s['rss_kb_before']:+d} kB); fds {s['fds_before']} -> "
            f"{s['fds_after']}",
            f"- superd (log on) fds at the start of the whole run "
            f"{data.get('superd_fds_at_start')}, at the end {data.get('superd_fds_at_end')}",
            ""]


def loader_section(data: dict) -> list[str]:
    """The load generator's own limits, and where they bound a scenario's numbers."""
    ld = data.get("loader")
    if not ld:
        return []
    out = ["## Load generator", "",
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
    return out + ["", "Against the C server, client and server share the 2 CPUs, so the rate "
                  "there is bounded by the server and the kernel as much as by the client; the "
                  "CPU figure is what the client itself needs.", ""]


# -- reading and writing ------------------------------------------------------------------------

def load(path: str) -> dict:
    """A results.json, as the driver had it in memory (listener counts are ints again)."""
    with open(path) as f:
        data = json.load(f)
    sets = data.get("listeners", {}).get("sets")
    if sets:
        data["listeners"]["sets"] = {int(k): v for k, v in sets.items()}
    return data


def write(data: dict, path: str) -> None:
    """Write RESULTS.md for `data` (its goals judged already: `data["goals"] = goals(data)`)."""
    with open(path, "w") as f:
        f.write(report(data))


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: report.py RESULTS.json [RESULTS.md]", file=sys.stderr)
        return 2
    out = argv[1] if len(argv) == 2 else os.path.join(
        os.path.dirname(os.path.abspath(argv[0])), "RESULTS.md")
    data = load(argv[0])
    data["goals"] = goals(data)
    write(data, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
