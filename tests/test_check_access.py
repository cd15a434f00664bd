"""Every key of issue 14 names its mistakes as `FILE:LINE: services.NAME.KEY: what is wrong`
(superd check, exit 1), all at once."""

from __future__ import annotations

import yaml
from access_lib import check

BAD = {  # service name: (key, value, what superd check must say)
    "a": ("tcp_wrappers", 3, "expected true or false, not 3"),
    "b": ("only_from", ["10.0.0.0/33x"], "'10.0.0.0/33x' is not an IP address, a CIDR, a host"),
    "c": ("lookup_timeout", 0, "expected a number of seconds greater than 0"),
    "d": ("env_file", "relative/file", "'relative/file': expected an absolute path"),
    "e": ("syslog_facility", "local9", "expected one of kern"),
    "f": ("syslog_level", "loud", "expected one of emerg"),
    "g": ("log_file_limits", ["1Q"], "expected a size in bytes"),
    "h": ("redirect", "nowhere", "expected HOST:PORT, [V6]:PORT or /unix/path"),
    "i": ("rules", [{"allow": ["10.0.0.0/8"], "deny": ["all"]}], "rule 1: expected allow"),
    "j": ("per_source_rate", "5/hour", "expected N/s or N/min"),
    "k": ("ident", "maybe", "expected true or false"),
    "l": ("banner", "/nonexistent/banner", "/nonexistent/banner: No such file or directory"),
    "m": ("access_times", ["25:00-26:00"], "is not a window HH:MM-HH:MM"),
    "n": ("deny_time", "sometimes", "expected a whole number"),
    "o": ("max_load", -1, "expected a load average greater than 0"),
    "p": ("groups", ["no-such-group-here"], "no such group 'no-such-group-here'"),
    "q": ("chroot", "/nonexistent/jail", "/nonexistent/jail: no such directory"),
    "r": ("capabilities", ["cap_fly"], "'cap_fly' is not a capability"),
    "s": ("capability_bounding_set", ["cap_chown", "~cap_kill"], "either list capabilities"),
    "t": ("rlimits", {"stack": [10, 5]}, "stack: the soft limit is above the hard one"),
    "u": ("no_new_privileges", "yes", "expected true or false"),
    "v": ("host_env", 1, "expected true or false"),
}


def test_bad_values_name_file_line_and_key(tmp_path):
    services = {name: {"listen": str(7000 + i), "exec": ["/bin/cat"], key: value}
                for i, (name, (key, value, _)) in enumerate(BAD.items())}
    services["w"] = {"listen": "7100", "protocol": "udp", "wait": True, "exec": ["/bin/cat"],
                     "banner": "/etc/hostname"}
    services["x"] = {"listen": "/tmp/superd-x.sock", "protocol": "unix",
                     "exec": ["/bin/cat"], "ident": True}
    table = tmp_path / "t.yaml"
    r = check(table, yaml.safe_dump({"services": services}, sort_keys=False))
    lines = table.read_text().splitlines()
    assert r.returncode == 1
    for name, (key, _, message) in BAD.items():
        start = next(i for i, text in enumerate(lines) if text.startswith(f"  {name}:"))
        line = next(i for i, text in enumerate(lines[start:], start + 1)
                    if text.startswith(f"    {key}:"))
        # a block list's value starts on the line after its key
        wants = [f"{table}:{n}: services.{name}.{key}: " for n in (line, line + 1)]
        assert any(out.startswith(w) and message in out for out in r.stdout.splitlines()
                   for w in wants), f"missing {wants[0]!r}...{message!r} in:\n{r.stdout}"
    assert "services.w.banner: banner applies to connections superd accepts itself" in r.stdout
    assert "services.x.ident: ident needs protocol tcp" in r.stdout
