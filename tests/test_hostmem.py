"""streamer.hostmem: the memory a process may take, from fake cgroup trees of either version."""

from pathlib import Path

import pytest

from streamer.hostmem import cgroup_limits, memory_room

GIB = 2**30


def write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text + "\n")


def test_v2_each_level_up_to_the_mount_binds_and_inactive_file_cache_is_room(tmp_path: Path):
    # A pod (limit 4 GiB) holding a container's cgroup (no limit of its own); /proc/self/cgroup
    # names it from the tree's root, mounted at tmp_path.
    mount = tmp_path / "cgroup"
    write(mount / "kubepods" / "pod1", memory_max=str(4 * GIB), memory_current=str(3 * GIB),
          memory_stat=f"anon 1\ninactive_file {2 * GIB}\nactive_file 5")
    write(mount / "kubepods" / "pod1" / "ctr", memory_max="max", memory_current=str(GIB), memory_stat="inactive_file 0")
    mountinfo = f"30 23 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw\n"
    limits = cgroup_limits("0::/kubepods/pod1/ctr\n", mountinfo)
    assert limits == [(4 * GIB, GIB)]  # 3 GiB in use, 2 of it inactive file cache the kernel reclaims first


def test_v2_under_a_cgroup_namespace_reads_the_mount_itself(tmp_path: Path):
    write(tmp_path, memory_max=str(GIB), memory_current=str(GIB // 4), memory_stat="inactive_file 0")
    assert cgroup_limits("0::/\n", f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n") == [(GIB, GIB // 4)]


def test_v1_nested_memory_cgroup_reports_its_hierarchical_limit_and_no_limit_is_none(tmp_path: Path):
    mount = tmp_path / "memory"
    write(mount / "process_api" / "abc", memory_usage_in_bytes=str(3 * GIB),
          memory_stat=f"cache 9\nhierarchical_memory_limit {8 * GIB}\ntotal_inactive_file {GIB}")
    proc = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n"
    mountinfo = (f"31 23 0:28 / {tmp_path} rw - tmpfs tmpfs rw\n"
                 f"35 31 0:32 / {mount} rw,relatime - cgroup cgroup rw,memory\n")
    assert cgroup_limits(proc, mountinfo) == [(8 * GIB, 2 * GIB)]
    write(mount / "process_api" / "abc", memory_stat="hierarchical_memory_limit 9223372036854771712")
    assert cgroup_limits(proc, mountinfo) == []  # v1's "no limit"
    # A container's own cgroup mounted as the tree (mount root /docker/x): the path is under it.
    write(mount, memory_usage_in_bytes="100", memory_stat="hierarchical_memory_limit 1000\ntotal_inactive_file 0")
    docker = f"35 31 0:32 /docker/x {mount} rw - cgroup cgroup rw,memory\n"
    assert cgroup_limits("4:memory:/docker/x\n", docker) == [(1000, 100)]


def test_no_cgroup_files_no_limits(tmp_path: Path):
    assert cgroup_limits("0::/a/b\n", f"30 23 0:26 / {tmp_path / 'none'} rw - cgroup2 cgroup2 rw\n") == []
    assert cgroup_limits("", "") == []


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux")
def test_memory_room_is_at_most_what_the_kernel_says_and_the_whole_at_least_that():
    room, whole = memory_room(), memory_room(total=True)
    assert room is not None and whole is not None and 0 < room <= whole
