"""superd/cgroups.py: whether superd puts each handler in a cgroup, and why not.

The decision reads the machine (the cgroup v2 mount, superd's own cgroup, whether systemd
manages the tree and delegated superd's part of it); here each of those is given, and the
reason `superd status` would show is checked word for word.
"""

from __future__ import annotations

import os

import pytest

from superd import cgroups


def test_no_means_no():
    assert cgroups.decide("no", "/sys/fs/cgroup", "/", False) == \
        cgroups.Decision("", "off (settings: cgroups: no)")


@pytest.mark.parametrize("mode", ["auto", "yes"])
def test_without_cgroup_v2(mode):
    assert cgroups.decide(mode, "", "/", False).reason == \
        "off: no cgroup v2 hierarchy is mounted"
    assert cgroups.decide(mode, "/sys/fs/cgroup", "", False).reason == \
        "off: superd is in no cgroup v2 group"


def test_not_writable(tmp_path):
    """(A cgroup that is not there is not writable, even by root.)"""
    assert cgroups.decide("auto", str(tmp_path), "/gone", False).reason == \
        f"off: {tmp_path}/gone is not writable by uid {os.geteuid()}"


def test_systemd_must_delegate_unless_told_yes(tmp_path):
    """Under systemd, a cgroup not delegated (Delegate=yes) is systemd's to manage: auto
    leaves it alone; yes takes it anyway."""
    mount = tmp_path / "cg"
    (mount / "system.slice" / "superd.service").mkdir(parents=True)
    (mount / "system.slice" / "superd.service" / "cgroup.procs").write_text("")
    own = "/system.slice/superd.service"
    path = f"{mount}/system.slice/superd.service"
    if not os.access(path + "/cgroup.procs", os.W_OK):
        pytest.skip("needs a writable temporary directory")
    assert cgroups.decide("auto", str(mount), own, True) == cgroups.Decision(
        "", f"off: systemd manages {path} and has not delegated it to superd "
        "(Delegate=yes in its unit)")
    assert cgroups.decide("yes", str(mount), own, True) == \
        cgroups.Decision(path, f"on, in {path}")
    assert cgroups.decide("auto", str(mount), own, False) == \
        cgroups.Decision(path, f"on, in {path}")


def test_the_mount_and_own_path_are_read_from_proc(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    assert cgroups.mount_point(str(info)) == "/sys/fs/cgroup/unified"
    own = tmp_path / "cgroup"
    own.write_text("9:name=systemd:/\n0::/system.slice/superd.service\n")
    assert cgroups.own_path(str(own)) == "/system.slice/superd.service"
    own.write_text("9:name=systemd:/\n")
    assert cgroups.own_path(str(own)) is None


def _freed(pool: cgroups.Cgroups, path: str) -> bool:
    open(os.path.join(path, "cgroup.procs"), "w").close()
    return pool.give_back(path)


def test_the_pool_takes_back_only_empty_cgroups_and_forgets_gone_ones(tmp_path):
    """(Plain directories stand for cgroups: give_back reads only cgroup.procs.)"""
    pool = cgroups.Cgroups(str(tmp_path))
    a, b, c = pool.take(), pool.take(), pool.take()
    assert [os.path.basename(p) for p in (a, b, c)] == ["h1", "h2", "h3"]
    with open(os.path.join(a, "cgroup.procs"), "w") as f:
        f.write("4242\n")
    assert pool.give_back(a) is False  # still holds a process: the caller watches it
    assert _freed(pool, b) is True and pool.pool == [b]
    assert pool.give_back(c) is True and pool.pool == [b]  # no cgroup.procs: gone
    assert pool.take() == b  # unchecked: whoever enters it makes it again if it is gone
    assert pool.take() == os.path.join(str(tmp_path), "h4")
    assert cgroups.Cgroups(str(tmp_path)).serial == 4  # an upgrade goes on counting


def test_the_pool_keeps_what_a_burst_needed_and_lets_the_unused_go(tmp_path):
    """A burst's cgroups are reused while bursts come (no mkdir per handler beyond POOL);
    what no handler took for a whole survey round is removed, TRIM a round, oldest first,
    down to POOL."""
    pool = cgroups.Cgroups(str(tmp_path))
    burst = [pool.take() for _ in range(cgroups.POOL + 100)]
    assert all(_freed(pool, p) for p in burst)
    assert len(pool.pool) == cgroups.POOL + 100
    again = [pool.take() for _ in range(cgroups.POOL + 100)]
    assert set(again) == set(burst) and pool.serial == cgroups.POOL + 100
    assert all(_freed(pool, p) for p in again)
    pool.trim()  # the round saw the pool empty: all of it was needed
    assert len(pool.pool) == cgroups.POOL + 100
    pool.take()
    pool.trim()  # 99 beyond POOL stayed unused: TRIM of them go, the oldest freed first
    assert len(pool.pool) == cgroups.POOL + 99 - cgroups.TRIM
    assert pool.pool[-1] == again[-2] and again[-1] not in pool.pool
    for _ in range(10):
        pool.trim()
    assert len(pool.pool) == cgroups.POOL and pool.excess() == 0


def test_odd_names_in_superds_cgroup_are_not_its_own(tmp_path):
    for name in ("h1", "h\u00b2", "h99999999999", "hx", "superd-1"):
        os.mkdir(tmp_path / name)
    pool = cgroups.Cgroups(str(tmp_path))
    assert pool.serial == 1
    assert pool.known() == [os.path.join(str(tmp_path), "h1")]


def test_a_spawner_that_does_not_know_its_own_cgroup_never_leaves_it(monkeypatch):
    """A spawner learnt its home on its first move, from wherever it was then: failing to
    read it once, it learnt a handler's cgroup as home on the next, and stayed there."""
    from superd import spawner
    monkeypatch.setattr(cgroups, "current", lambda: "")
    place = spawner.Place()
    with pytest.raises(OSError, match="own cgroup is unknown"):
        place.enter("/sys/fs/cgroup/superd-1-1/h1")
    assert not place.away
    place.enter("")  # a handler without a cgroup is forked at home, as ever
    assert not place.away
