"""The importers' spellings of issue 14's keys: inetd (tcpd, FreeBSD's per-IP rate) and
xinetd (libwrap, NOLIBWRAP, IDONLY, USERID, log_type, redirect, SENSOR and deny_time,
banners, access_times, max_load, groups, every rlimit). The imported tables load with
superd's own validator; one of them runs.
"""

from __future__ import annotations

import subprocess

import yaml
from superd_testlib import PY, REPO, free_port, tcp_exchange


def imported(kind: str, path) -> dict:
    r = subprocess.run([PY, "-m", "superd", "import", kind, str(path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_inetd_tcpd_and_freebsd_rate(tmp_path):
    conf = tmp_path / "inetd.conf"
    conf.write_text("2001 stream tcp nowait root /usr/sbin/tcpd /bin/cat\n"
                    "2002 stream tcp4 nowait/10/20/2 nobody /bin/cat cat\n")
    s = imported("inetd", conf)["services"]
    assert s["2001"]["tcp_wrappers"] is True and s["2001"]["exec"] == ["/bin/cat"]
    assert s["2002"]["per_source_rate"] == "20/min"
    assert (s["2002"]["instances"], s["2002"]["per_source"]) == (10, 2)


def test_xinetd_policy_attributes(tmp_path):
    (tmp_path / "banner").write_text("hello\n")
    conf = tmp_path / "xinetd.conf"
    conf.write_text(f"""\
service one
{{
	type = UNLISTED
	port = 3001
	socket_type = stream
	wait = no
	user = nobody
	server = /bin/cat
	libwrap = in.one
	flags = IDONLY
	log_on_success += USERID
	log_type = SYSLOG local4 notice
	banner = {tmp_path}/banner
	banner_success = {tmp_path}/banner
	banner_fail = {tmp_path}/banner
	access_times = 08:00-18:00
	max_load = 3
	groups = no
	rlimit_data = 64M
	rlimit_rss = 32M
	rlimit_stack = 8M
}}
service two
{{
	type = UNLISTED
	port = 3002
	socket_type = stream
	wait = no
	user = root
	redirect = ::1 3005
	flags = NOLIBWRAP
	log_type = FILE /var/log/two.log 10K 20K
}}
service three
{{
	type = UNLISTED
	port = 3003
	socket_type = stream
	wait = no
	user = root
	server = /bin/true
	flags = SENSOR
	deny_time = FOREVER
}}
""")
    s = imported("xinetd", conf)["services"]
    assert s["one"] == {
        "listen": "3001", "wait": False, "exec": ["cat"], "program": "/bin/cat",
        "user": "nobody", "rlimits": {"data": 64 << 20, "rss": 32 << 20, "stack": 8 << 20},
        "log_on_success": ["userid"],
        "tcp_wrappers": "in.one", "ident": "required", "syslog_facility": "local4",
        "syslog_level": "notice", "banner": f"{tmp_path}/banner",
        "banner_success": f"{tmp_path}/banner", "banner_fail": f"{tmp_path}/banner",
        "access_times": ["08:00-18:00"], "max_load": 3.0, "groups": [], "stderr": "socket"}
    assert s["two"] == {"listen": "3002", "wait": False, "redirect": "[::1]:3005",
                        "log_file": "/var/log/two.log", "log_file_limits": [10240, 20480]}
    assert s["three"] == {"listen": "3003", "wait": False, "sensor": True,
                          "deny_time": "forever"}


def test_an_imported_redirect_and_wrapped_service_run(superd, tmp_path):
    back, front = free_port(), free_port()
    conf = tmp_path / "xinetd.conf"
    conf.write_text(f"""\
service front
{{
	type = UNLISTED
	port = {front}
	bind = 127.0.0.1
	socket_type = stream
	wait = no
	user = root
	redirect = 127.0.0.1 {back}
	log_on_success = HOST TRAFFIC
}}
""")
    services = imported("xinetd", conf)["services"]
    assert services["front"]["tcp_wrappers"] == "front"
    services["front"].pop("tcp_wrappers")  # the host's own hosts.deny is not this test's
    services["back"] = {"listen": f"127.0.0.1:{back}", "internal": "echo"}
    d = superd(services)
    assert tcp_exchange("127.0.0.1", front, b"through\n") == b"through\n"
    d.wait_log(r"^EXIT: front status=0 pid=0 duration=\d+\(sec\) in=8\(bytes\) out=8\(bytes\)$")
