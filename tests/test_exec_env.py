"""The execution environment of a handler (issue 14, item 11): every rlimit Linux has, soft
and hard; explicit supplementary groups or none; chroot; no_new_privileges; ambient
capabilities and the bounding set. Each is read back from the real handler: its
/proc/self/status and /proc/self/limits, its root as /proc/PID/root shows it.
"""

from __future__ import annotations

import errno
import grp
import os
import re
import shutil
import subprocess
import tempfile

from superd_testlib import free_port, status, tcp_exchange, wait_until

STATUS = ["/bin/sh", "-c", "cat /proc/self/status /proc/self/limits"]
LIMITS = {  # key: (soft, hard) and the row of /proc/self/limits
    "as": ((1 << 32, 1 << 33), "Max address space"), "core": ((0, 4096), "Max core file size"),
    "cpu": ((100, 200), "Max cpu time"), "data": ((1 << 31, 1 << 32), "Max data size"),
    "fsize": ((1 << 30, 1 << 31), "Max file size"), "locks": ((50, 60), "Max file locks"),
    "memlock": ((65536, 131072), "Max locked memory"),
    "msgqueue": ((81920, 163840), "Max msgqueue size"), "nice": ((0, 0), "Max nice priority"),
    "nofile": ((100, 200), "Max open files"), "nproc": ((3000, 4000), "Max processes"),
    "rss": ((1 << 30, 1 << 31), "Max resident set"),
    "rtprio": ((0, 0), "Max realtime priority"),  # (raising these two needs CAP_SYS_RESOURCE)
    "rttime": ((100000, 200000), "Max realtime timeout"),
    "sigpending": ((1000, 2000), "Max pending signals"),
    "stack": ((1 << 23, 1 << 24), "Max stack size"),
}


def status_of(port: int) -> str:
    return tcp_exchange("127.0.0.1", port, b"").decode()


def field(text: str, name: str) -> str:
    m = re.search(rf"^{name}:[ \t]*(.*)$", text, re.M)
    assert m, f"no {name} in {text[:2000]}"
    return m.group(1).strip()


def test_every_rlimit_soft_and_hard(superd):
    port = free_port()
    d = superd({"lim": {"listen": f"127.0.0.1:{port}", "exec": STATUS,
                        "rlimits": {k: list(v) for k, (v, _) in LIMITS.items()}}})
    text = status_of(port)
    assert text, "\n".join(d.lines())
    for key, ((soft, hard), row) in LIMITS.items():
        m = re.search(rf"^{row}\s+(\d+)\s+(\d+)", text, re.M)
        assert m, f"{row} not in /proc/self/limits:\n{text}"
        assert (int(m[1]), int(m[2])) == (soft, hard), f"{key}: {m[0]}"


def test_groups_none_or_explicit(superd):
    p1, p2, p3 = free_port(), free_port(), free_port()
    superd({"none": {"listen": f"127.0.0.1:{p1}", "exec": STATUS, "user": "nobody",
                     "groups": []},
            "some": {"listen": f"127.0.0.1:{p2}", "exec": STATUS, "user": "nobody",
                     "groups": ["daemon", "adm"]},
            "user": {"listen": f"127.0.0.1:{p3}", "exec": STATUS, "user": "nobody"}})
    assert field(status_of(p1), "Groups") == "", "groups: [] is xinetd's groups = no"
    wanted = sorted(grp.getgrnam(g).gr_gid for g in ("daemon", "adm"))
    assert sorted(int(g) for g in field(status_of(p2), "Groups").split()) == wanted
    nogroup = grp.getgrgid(int(field(status_of(p3), "Gid").split()[0])).gr_gid
    assert int(field(status_of(p3), "Groups").split()[0]) == nogroup, "user's own groups"


def test_no_new_privileges_and_capabilities(superd):
    p1, p2, p3 = free_port(), free_port(), free_port()
    superd({"nnp": {"listen": f"127.0.0.1:{p1}", "exec": STATUS, "no_new_privileges": True},
            "amb": {"listen": f"127.0.0.1:{p2}", "exec": STATUS, "user": "nobody",
                    "capabilities": ["cap_net_bind_service", "CAP_NET_RAW"]},
            "bnd": {"listen": f"127.0.0.1:{p3}", "exec": STATUS,
                    "capability_bounding_set": ["~cap_sys_admin", "~cap_net_raw"]}})
    assert field(status_of(p1), "NoNewPrivs") == "1"
    amb = status_of(p2)
    wanted = (1 << 10) | (1 << 13)
    assert int(field(amb, "CapAmb"), 16) == wanted, "ambient: net_bind_service and net_raw"
    assert int(field(amb, "CapEff"), 16) == wanted, "and effective, as user nobody"
    assert field(amb, "Uid").split()[0] == str(_uid("nobody"))
    bnd = int(field(status_of(p3), "CapBnd"), 16)
    assert not bnd & (1 << 21) and not bnd & (1 << 13), "sys_admin and net_raw dropped"
    assert bnd & (1 << 10) and bnd & 1, "the others kept"


def test_an_ambient_capability_lets_nobody_bind_a_low_port(superd):
    """The capability works, not only shows: as nobody, bind() of a port below 1024 succeeds
    with cap_net_bind_service and is refused (EACCES) without it."""
    low = _free_low_port()
    public = tempfile.mkdtemp(prefix="superd-caps-")
    os.chmod(public, 0o755)
    script = os.path.join(public, "bind.py")
    with open(script, "w") as f:
        f.write(f"#!/usr/bin/python3\nimport socket\ns = socket.socket()\ntry:\n"
                f"    s.bind(('127.0.0.1', {low}))\n    print('bound')\n"
                "except OSError as e:\n    print('refused', e.errno)\n")
    os.chmod(script, 0o755)
    try:
        p1, p2 = free_port(), free_port()
        superd({"cap": {"listen": f"127.0.0.1:{p1}", "exec": [script], "user": "nobody",
                        "capabilities": ["cap_net_bind_service"]},
                "nocap": {"listen": f"127.0.0.1:{p2}", "exec": [script], "user": "nobody"}})
        assert status_of(p1).strip() == "bound"
        assert status_of(p2).strip() == f"refused {errno.EACCES}"
    finally:
        shutil.rmtree(public)


def _free_low_port() -> int:
    import socket
    for port in range(900, 1023):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port below 1024")


def test_chroot_of_a_forked_and_an_exec_handler(superd, tmp_path):
    jail = tmp_path / "jail"
    (jail / "bin").mkdir(parents=True)
    (jail / "inside-the-jail").write_text("yes\n")
    cat = shutil.which("cat")
    shutil.copy(cat, jail / "bin" / "cat")
    for lib in _libraries(cat):
        (jail / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib, jail / lib.lstrip("/"))
    handler = tmp_path / "jailed.py"
    handler.write_text("import os\ndef handle(sock, env):\n"
                       "    sock.sendall(repr(sorted(os.listdir('/'))).encode())\n"
                       "    sock.recv(1)\n    return 0\n")
    p1, p2 = free_port(), free_port()
    d = superd({"py": {"listen": f"127.0.0.1:{p1}", "python": f"{handler}:handle",
                       "chroot": str(jail)},
                "cat": {"listen": f"127.0.0.1:{p2}", "exec": ["/bin/cat", "/inside-the-jail"],
                        "chroot": str(jail)}})
    import socket
    with socket.create_connection(("127.0.0.1", p1), timeout=5) as s:
        listing = s.recv(4096).decode()
        assert "inside-the-jail" in listing and "proc" not in listing, listing
        pid = int(d.wait_start("py")[0]["pid"])
        assert os.readlink(f"/proc/{pid}/root") == str(jail)
    assert tcp_exchange("127.0.0.1", p2, b"") == b"yes\n", "the jail's own file"
    wait_until(lambda: d.exits("cat"), 5, "cat's EXIT")


def test_cwd_is_inside_the_chroot(superd, tmp_path):
    """With chroot, cwd names a directory inside the new root: it is checked there at load
    (one that exists only outside it is missing) and the handler runs in it."""
    jail = tmp_path / "jail"
    (jail / "bin").mkdir(parents=True)
    (jail / "only-in-the-jail").mkdir()
    (jail / "only-in-the-jail" / "here").write_text("in the jail's cwd\n")
    cat = shutil.which("cat")
    shutil.copy(cat, jail / "bin" / "cat")
    for lib in _libraries(cat):
        (jail / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib, jail / lib.lstrip("/"))
    outside = tmp_path / "outside-only"
    outside.mkdir()
    p1, p2 = free_port(), free_port()
    d = superd({"cat": {"listen": f"127.0.0.1:{p1}", "exec": ["/bin/cat", "here"],
                        "chroot": str(jail), "cwd": "/only-in-the-jail"},
                "off": {"listen": f"127.0.0.1:{p2}", "exec": ["/bin/cat", "here"],
                        "chroot": str(jail), "cwd": str(outside)}})
    assert tcp_exchange("127.0.0.1", p1, b"") == b"in the jail's cwd\n"
    failed = status(d)["failed"]["off"]
    assert f"{jail}{outside}: no such directory" in failed["reason"], failed


def _libraries(program: str) -> list[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return re.findall(r"(/\S+) \(0x", out)


def _uid(name: str) -> int:
    import pwd
    return pwd.getpwnam(name).pw_uid
