"""The memory this process may take: the kernel's MemAvailable (or MemTotal) and the limits of
the cgroups it runs in (v2, or v1's memory controller: what a container or a systemd unit is
given), so that what would get the process killed is refused with one line instead
(engine.check_table_fits). Linux only: elsewhere nothing is known (None). Swap is not counted.

A cgroup's room is its limit less what it uses, its inactive file cache not counted (the
kernel reclaims that before it kills anything; the kubelet's working set leaves it out too). The
limits of every cgroup above this one bind it as well (v2: each level is read; v1: the
hierarchical limit it reports).
"""

from __future__ import annotations

from pathlib import Path

V1_NO_LIMIT = 2**60  # v1 writes "no limit" as a page-rounded 2^63 - 1


def memory_room(total: bool = False) -> int | None:
    """Bytes this process may still take, the least of MemAvailable and each cgroup's room;
    ``total``: may take at all, whatever is in use now (MemTotal, the cgroups' limits), for a
    check made beside a running service. None where nothing is readable."""
    found = []
    meminfo = _meminfo()
    key = "MemTotal" if total else "MemAvailable"
    if key in meminfo:
        found.append(meminfo[key])
    try:
        limits = cgroup_limits(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
    except OSError:
        limits = []
    found += [limit if total else max(0, limit - used) for limit, used in limits]
    return min(found) if found else None


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def cgroup_limits(proc_cgroup: str, mountinfo: str) -> list[tuple[int, int]]:
    """(limit, in use less inactive file cache) of each cgroup with a memory limit that holds
    this process, from the text of /proc/self/cgroup and /proc/self/mountinfo; in bytes."""
    v2_path = v1_path = None
    for line in proc_cgroup.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    v2_mount = v1_mount = None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, kind = left.split(), right.split()
        if len(fields) < 5 or len(kind) < 3:
            continue
        mount = (fields[3], fields[4])  # the mounted cgroup's own path, and where it is mounted
        if kind[0] == "cgroup2" and v2_mount is None:
            v2_mount = mount
        elif kind[0] == "cgroup" and "memory" in kind[2].split(",") and v1_mount is None:
            v1_mount = mount
    limits = []
    if v2_path is not None and v2_mount is not None:
        here = _cgroup_dir(v2_mount, v2_path)
        top = Path(v2_mount[1])
        while True:  # this cgroup, then each above it up to the mount (the root has no memory.max)
            limit = _number(here / "memory.max")
            if limit is not None:
                used = _number(here / "memory.current")
                if used is not None:
                    limits.append((limit, max(0, used - _stat(here, "inactive_file"))))
            if here == top or top not in here.parents:
                break
            here = here.parent
    if v1_path is not None and v1_mount is not None:
        here = _cgroup_dir(v1_mount, v1_path)
        limit, used = _stat(here, "hierarchical_memory_limit", None), _number(here / "memory.usage_in_bytes")
        if limit is not None and limit < V1_NO_LIMIT and used is not None:
            limits.append((limit, max(0, used - _stat(here, "total_inactive_file"))))
    return limits


def _cgroup_dir(mount: tuple[str, str], path: str) -> Path:
    """Where the cgroup ``path`` (as /proc/self/cgroup names it) is under a mount of the cgroup
    tree whose own path is mount[0]: a container's view is mounted from its own cgroup (or under a
    cgroup namespace, names it "/"); the mount itself where the path is not there."""
    root, point = mount
    relative = path[len(root):] if root != "/" and path.startswith(root) else path
    here = Path(point, *[part for part in relative.split("/") if part])
    return here if here.is_dir() else Path(point)


def _number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _stat(directory: Path, key: str, default: int | None = 0) -> int | None:
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return default

