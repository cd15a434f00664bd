"""What the benchmark measures, shared by its two halves: the servers, their ports, the
scenarios and the names RESULTS.md gives them.

bench/driver.py runs these scenarios against these servers and writes results.json;
bench/report.py turns results.json into RESULTS.md. Both read this file, so a new scenario or
server is added here once.
"""

from __future__ import annotations

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
    "superd_nocg": {"cat": 5060, "tiny": 5061, "echo": 5062, "py": 5063},
}
LISTENER_SETS = {1: 6000, 100: 6100, 1000: 7000}

LABEL = {"superd": "superd", "superd_nolog": "superd (log off)", "xinetd": "xinetd",
         "obsd": "OpenBSD inetd", "tcpserver": "tcpserver", "c_epoll": "C epoll (reference)",
         "superd_nocg": "superd (cgroups off)"}

# (key, title, protocol, service, servers); a server is superd, a peer, or the C reference.
SCENARIOS = [
    ("exec_cat", "exec /bin/cat", "tcp", "cat",
     ["superd", "superd_nolog", "superd_nocg", "xinetd", "obsd", "tcpserver"]),
    ("exec_tiny", "exec a tiny compiled handler", "tcp", "tiny",
     ["superd", "superd_nolog", "superd_nocg", "xinetd", "obsd", "tcpserver"]),
    ("tcp_echo", "internal TCP echo", "tcp", "echo",
     ["superd", "superd_nolog", "xinetd", "obsd", "c_epoll"]),
    ("udp_echo", "internal UDP echo (datagrams/s)", "udp", "echo",
     ["superd", "xinetd", "obsd", "c_epoll"]),
    ("python", "python handler: superd forks it, xinetd execs it as a script", "tcp", "py",
     ["superd", "superd_nolog", "xinetd"]),
]
# superd_nocg is superd with `cgroups: no` (logging on, as superd): what a cgroup per handler
# costs, measured beside it in the same run (where the machine lets superd use cgroups).
SUPERDS = ("superd", "superd_nolog", "superd_nocg")
REFERENCE = "c_epoll"
