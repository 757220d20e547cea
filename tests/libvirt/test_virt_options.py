"""The ``libvirt`` back-end without a connection: options, URIs, flags, stats, error table.

Every test is ``async`` even where nothing is awaited (see tests/unit/test_hypervisor_fake.py:
a sync test before the first async one can leak an event loop under the looptime plugin).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

if os.environ.get("CI"):
    import libvirt  # CI must run these: a missing binding fails the run
else:
    libvirt = pytest.importorskip("libvirt")

from asyncmigfra.errors import (
    ConfigError,
    ConnectionFailed,
    HypervisorError,
    NotSupported,
    TaskCancelled,
    TaskTimeout,
    VmNotFound,
    WrongState,
)
from asyncmigfra.hypervisor.base import MigrationRequest
from asyncmigfra.hypervisor.registry import load_factory
from asyncmigfra.hypervisor.virt import (
    ERROR_TABLE,
    HostAddress,
    LibvirtHypervisor,
    MigrationTarget,
    check_stream_support,
    create,
    job_stats,
    map_libvirt_errors,
    migration_flags,
    migration_params,
    parse_options,
    translate_error,
)

pytestmark = pytest.mark.libvirt


def fake_error(code: int, message: str, domain: int = 0) -> Any:
    """A ``libvirtError`` carrying ``code`` (for codes the test driver cannot produce)."""
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, 2, None, None, None, -1, -1)
    return exc


# --------------------------------------------------------------------------------------------
# options


async def test_entry_point_is_registered() -> None:
    assert load_factory("libvirt") is create


async def test_defaults() -> None:
    config = parse_options({})
    assert config.uri == "qemu:///system"
    assert (config.driver, config.transport) == ("qemu", "ssh")
    assert config.destination_uri is None
    assert (config.start_timeout, config.stop_timeout) == (60.0, 60.0)
    assert (config.keepalive_interval, config.keepalive_count) == (5, 3)
    assert config.max_threads == 16
    assert config.nodes == ()
    assert config.hosts == {}


async def test_lxctools_defaults() -> None:
    config = parse_options({"driver": "lxctools", "transport": "tcp"})
    assert config.uri == "lxctools:///"
    hv = LibvirtHypervisor(config, hostname="a")
    assert hv.remote_uri("b") == "lxctools+tcp://b/"


async def test_all_options() -> None:
    config = parse_options(
        {
            "uri": "qemu+unix:///system?socket=/tmp/rig/A/libvirt-sock",
            "driver": "qemu",
            "transport": "tcp",
            "destination-uri": "{driver}+{transport}://{host}:16509/system",
            "start-timeout": "5",
            "stop-timeout": 2.5,
            "nodes": ["a", "b"],
            "keepalive-interval": 0,
            "keepalive-count": "7",
            "max-threads": 4,
            "hosts": {
                "rig-b": {
                    "uri": "qemu+unix:///system?socket=/tmp/rig/B/libvirt-sock",
                    "p2p-uri": "qemu+tcp://10.200.0.2:16510/system",
                    "migrate-uri": "tcp://10.200.0.2",
                },
                "plain": None,
            },
        }
    )
    assert config.start_timeout == 5.0
    assert config.stop_timeout == 2.5
    assert config.nodes == ("a", "b")
    assert config.keepalive_interval == 0
    assert config.keepalive_count == 7
    assert config.hosts["rig-b"].p2p_uri == "qemu+tcp://10.200.0.2:16510/system"
    assert config.hosts["plain"] == HostAddress()


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"never-throw": True}, "hypervisor.never-throw"),
        ({"uri": ""}, "hypervisor.uri"),
        ({"driver": "qemu://x"}, "hypervisor.driver"),
        ({"transport": ""}, "hypervisor.transport"),
        ({"destination-uri": "qemu+ssh://{nope}/system"}, "hypervisor.destination-uri"),
        ({"destination-uri": "qemu+ssh://fixed/system"}, "hypervisor.destination-uri"),
        ({"start-timeout": 0}, "hypervisor.start-timeout"),
        ({"stop-timeout": "soon"}, "hypervisor.stop-timeout"),
        ({"nodes": "a,b"}, "hypervisor.nodes"),
        ({"nodes": ["a", ""]}, "hypervisor.nodes[1]"),
        ({"keepalive-interval": -1}, "hypervisor.keepalive-interval"),
        ({"keepalive-count": "x"}, "hypervisor.keepalive-count"),
        ({"max-threads": 1}, "hypervisor.max-threads"),
        ({"hosts": ["b"]}, "hypervisor.hosts"),
        ({"hosts": {"b": {"url": "x"}}}, "hypervisor.hosts.b.url"),
        ({"hosts": {"b": {"uri": 5.5j}}}, "hypervisor.hosts.b.uri"),
    ],
)
async def test_bad_options(options: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        create(options, hostname="a", shared={})
    assert info.value.path == path


# --------------------------------------------------------------------------------------------
# destinations, flags, params


async def test_destination_from_template_and_hosts_map() -> None:
    hv = LibvirtHypervisor(
        parse_options(
            {
                "hosts": {
                    "rig-b": {
                        "uri": "qemu+unix:///system?socket=/b.sock",
                        "p2p-uri": "qemu+tcp://10.200.0.2:16510/system",
                        "migrate-uri": "tcp://10.200.0.2",
                    },
                    "only-uri": {"uri": "qemu+tcp://1.2.3.4/system"},
                }
            }
        ),
        hostname="rig-a",
    )
    assert await hv.resolve_destination("node7") == MigrationTarget(
        host="node7", uri="qemu+ssh://node7/system", p2p_uri="qemu+ssh://node7/system"
    )
    assert (await hv.resolve_destination("node7", transport="tcp")).uri == (
        "qemu+tcp://node7/system"
    )
    assert await hv.resolve_destination("rig-b") == MigrationTarget(
        host="rig-b",
        uri="qemu+unix:///system?socket=/b.sock",
        p2p_uri="qemu+tcp://10.200.0.2:16510/system",
        migrate_uri="tcp://10.200.0.2",
    )
    only = await hv.resolve_destination("only-uri")
    assert only.p2p_uri == only.uri == "qemu+tcp://1.2.3.4/system"
    # rdma-migration: the original's <host>-ib convention wins over a migrate-uri
    assert (await hv.resolve_destination("rig-b", rdma=True)).migrate_uri == "rdma://rig-b-ib"


async def test_lxctools_migrate_uri_is_the_first_ipv4_address() -> None:
    hv = LibvirtHypervisor(parse_options({"driver": "lxctools"}), hostname="a")
    target = await hv.resolve_destination("localhost")
    assert target.migrate_uri == "127.0.0.1"
    assert target.uri == "lxctools+ssh://localhost/"


def request(**kw: Any) -> MigrationRequest:
    return MigrationRequest(vm_name="vm", destination="b", **kw)


@pytest.mark.parametrize(
    ("kw", "persistent", "expected"),
    [
        ({"mode": "live", "persist": False, "p2p": False}, True, ["LIVE"]),
        ({"mode": "warm", "persist": False, "p2p": False}, True, []),
        ({"mode": "offline", "persist": False, "p2p": False}, True, ["OFFLINE", "PERSIST_DEST"]),
        ({"mode": "post-copy", "persist": False, "p2p": False}, True, ["LIVE", "POSTCOPY"]),
        (
            {"mode": "live", "persist": True, "p2p": True},
            True,
            ["LIVE", "PERSIST_DEST", "UNDEFINE_SOURCE", "PEER2PEER"],
        ),
        ({"mode": "live", "persist": True, "p2p": False}, False, ["LIVE"]),  # transient
        (
            {
                "mode": "live",
                "persist": False,
                "p2p": False,
                "auto_converge": True,
                "compressed": True,
                "parallel_connections": 4,
                "tls": True,
                "paused": True,
            },
            True,
            ["LIVE", "AUTO_CONVERGE", "COMPRESSED", "PARALLEL", "TLS", "PAUSED"],
        ),
        # issue 16: storage copies
        ({"mode": "live", "persist": False, "p2p": False, "copy_storage": "none"}, True, ["LIVE"]),
        (
            {"mode": "live", "persist": False, "p2p": False, "copy_storage": "all"},
            True,
            ["LIVE", "NON_SHARED_DISK"],
        ),
        (
            {"mode": "live", "persist": False, "p2p": True, "copy_storage": "inc"},
            True,
            ["LIVE", "PEER2PEER", "NON_SHARED_INC"],
        ),
        (
            {
                "mode": "live",
                "persist": False,
                "p2p": False,
                "copy_storage": "all",
                "synchronous_writes": True,
            },
            True,
            ["LIVE", "NON_SHARED_DISK", "NON_SHARED_SYNCHRONOUS_WRITES"],
        ),
        (
            {
                "mode": "post-copy",
                "persist": False,
                "p2p": False,
                "copy_storage": "inc",
                "synchronous_writes": True,
            },
            True,
            ["LIVE", "POSTCOPY", "NON_SHARED_INC", "NON_SHARED_SYNCHRONOUS_WRITES"],
        ),
        # synchronous writes mean nothing without a storage copy: no flag
        (
            {"mode": "live", "persist": False, "p2p": False, "synchronous_writes": True},
            True,
            ["LIVE"],
        ),
    ],
)
async def test_migration_flags(kw: dict[str, Any], persistent: bool, expected: list[str]) -> None:
    want = 0
    for name in expected:
        want |= getattr(libvirt, f"VIR_MIGRATE_{name}")
    assert migration_flags(request(**kw), persistent=persistent) == want


async def test_migration_params() -> None:
    target = MigrationTarget(host="b", uri="u", p2p_uri="p", migrate_uri="tcp://10.0.0.2")
    assert migration_params(request(bandwidth=8, parallel_connections=3), target) == {
        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.0.0.2",
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 8,
        libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: 3,
    }
    bare = MigrationTarget(host="b", uri="u", p2p_uri="p")
    assert migration_params(request(), bare) == {}


async def test_migration_params_name_the_disks_to_copy() -> None:
    bare = MigrationTarget(host="b", uri="u", p2p_uri="p")
    disks = request(copy_storage="all", migrate_disks=("vda", "vdc"))
    assert migration_params(disks, bare) == {
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda", "vdc"]
    }
    assert libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS == "migrate_disks"
    # No list (every writable, non-shared disk: libvirt's default), or no storage copy.
    assert migration_params(request(copy_storage="inc"), bare) == {}
    assert migration_params(request(migrate_disks=("vda",)), bare) == {}


async def test_stream_options_map_to_flags_and_typed_parameters() -> None:
    """Issue 17: compression (a multi-value string), its xbzrle cache in bytes, zero-copy,
    the post-copy bandwidth, the auto-converge throttle and the TLS host name."""
    bare = MigrationTarget(host="b", uri="u", p2p_uri="p")
    xbzrle = request(compression=("xbzrle",), xbzrle_cache=128)
    assert migration_params(xbzrle, bare) == {
        libvirt.VIR_MIGRATE_PARAM_COMPRESSION: ["xbzrle"],
        libvirt.VIR_MIGRATE_PARAM_COMPRESSION_XBZRLE_CACHE: 128 << 20,
    }
    assert migration_flags(xbzrle, persistent=False) & libvirt.VIR_MIGRATE_COMPRESSED
    tuned = request(
        auto_converge=True,
        auto_converge_initial=30,
        auto_converge_increment=5,
        postcopy_bandwidth=200,
        tls=True,
        tls_destination="b.example.org",
    )
    assert migration_params(tuned, bare) == {
        libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL: 30,
        libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT: 5,
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY: 200,
        libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION: "b.example.org",
    }
    assert (
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY,
        libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION,
    ) == (
        "bandwidth.postcopy",
        "tls.destination",
    )
    zerocopy = request(zerocopy=True, parallel_connections=4)
    flags = migration_flags(zerocopy, persistent=False)
    assert flags & libvirt.VIR_MIGRATE_ZEROCOPY
    assert flags & libvirt.VIR_MIGRATE_PARALLEL
    assert not flags & libvirt.VIR_MIGRATE_COMPRESSED


async def test_multifd_compression_levels_use_libvirt_9_4_names() -> None:
    """zlib and zstd levels: libvirt 9.4's parameter names, also when this binding was built
    against older headers (which lack the constants)."""
    bare = MigrationTarget(host="b", uri="u", p2p_uri="p")
    zstd = request(compression=("zstd",), compression_level=7, parallel_connections=4)
    assert migration_params(zstd, bare) == {
        libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: 4,
        libvirt.VIR_MIGRATE_PARAM_COMPRESSION: ["zstd"],
        "compression.zstd.level": 7,
    }
    zlib = request(compression=("zlib",), compression_level=0, parallel_connections=2)
    assert migration_params(zlib, bare)["compression.zlib.level"] == 0
    # Without a level, QEMU's default stays.
    plain = request(compression=("zstd",), parallel_connections=2)
    assert "compression.zstd.level" not in migration_params(plain, bare)


async def test_the_legacy_compressed_flag_stays_as_it_was() -> None:
    bare = MigrationTarget(host="b", uri="u", p2p_uri="p")
    legacy = request(compressed=True)
    assert migration_flags(legacy, persistent=False) & libvirt.VIR_MIGRATE_COMPRESSED
    assert migration_params(legacy, bare) == {}


@pytest.mark.parametrize(
    ("methods", "version", "refused"),
    [
        (("zstd",), 9_000_000, True),
        (("zlib",), 9_003_000, True),
        (("zstd",), 9_004_000, False),
        (("xbzrle",), 9_000_000, False),
        ((), 8_000_000, False),
    ],
)
async def test_multifd_compression_needs_libvirt_9_4(
    methods: tuple[str, ...], version: int, refused: bool
) -> None:
    req = request(compression=methods, parallel_connections=2)
    if refused:
        with pytest.raises(
            NotSupported, match=r"needs libvirt 9\.4 or later.*runs libvirt 9\.\d\.0"
        ):
            check_stream_support(req, version)
    else:
        check_stream_support(req, version)


# --------------------------------------------------------------------------------------------
# job statistics

#: A jobStats() sample during a real migration (rig README section 4).
RUNNING_JOB: dict[str, Any] = {
    "type": 2,
    "operation": 5,
    "time_elapsed": 2905,
    "memory_total": 134610944,
    "memory_processed": 10564605,
    "memory_remaining": 120020992,
    "memory_iteration": 2,
    "memory_dirty_rate": 1000,
    "memory_page_size": 4096,
    "memory_bps": 255_000_000,
    "data_remaining": 120020992,
    "downtime": 92,
}


async def test_job_stats_mapping() -> None:
    stats = job_stats(RUNNING_JOB)
    assert stats is not None
    assert stats.phase == "migrating"
    assert stats.iteration == 2
    assert stats.elapsed == pytest.approx(2.905)
    assert stats.memory_total == 134610944
    assert stats.memory_processed == 10564605
    assert stats.memory_remaining == 120020992
    assert stats.data_remaining == 120020992
    assert stats.dirty_rate == 1000 * 4096  # pages/s -> bytes/s
    assert stats.transfer_rate == 255_000_000
    assert stats.expected_downtime == 92.0


#: jobStats() while a storage copy mirrors the disks (NBD), before QEMU migrates memory:
#: libvirt reports memory zeros and the mirror's figures as disk_* (and in data_*).
DISK_PHASE_JOB: dict[str, Any] = {
    "type": 2,
    "operation": 5,
    "time_elapsed": 4100,
    "data_total": 4 << 30,
    "data_processed": 1 << 30,
    "data_remaining": 3 << 30,
    "memory_total": 0,
    "memory_processed": 0,
    "memory_remaining": 0,
    "memory_dirty_rate": 0,
    "memory_iteration": 0,
    "disk_total": 4 << 30,
    "disk_processed": 1 << 30,
    "disk_remaining": 3 << 30,
}


async def test_job_stats_during_the_disk_phase() -> None:
    stats = job_stats(DISK_PHASE_JOB, phase="migrating")
    assert stats is not None, "a storage copy is progress too"
    assert (stats.phase, stats.iteration, stats.memory_total) == ("migrating", 0, 0)
    assert (stats.disk_total, stats.disk_processed, stats.disk_remaining) == (
        4 << 30,
        1 << 30,
        3 << 30,
    )
    assert stats.data_remaining == 3 << 30
    assert stats.transfer_rate == 0  # libvirt reports no memory_bps before memory moves
    later = job_stats({**RUNNING_JOB, "disk_total": 4 << 30, "disk_processed": 4 << 30})
    assert later is not None
    assert (later.iteration, later.disk_total, later.disk_remaining) == (2, 4 << 30, 0)
    assert job_stats(RUNNING_JOB) == job_stats({**RUNNING_JOB, "disk_total": 0})
    no_data = job_stats({"type": 2, "disk_total": 10, "disk_remaining": 6})
    assert no_data is not None
    assert no_data.data_remaining == 6


async def test_job_stats_none_before_memory_moves() -> None:
    assert job_stats({"type": 0}) is None
    assert job_stats({"type": 2, "time_elapsed": 120, "memory_total": 0}) is None
    assert job_stats({"type": 2, "memory_total": 0, "disk_total": 0}) is None
    minimal = job_stats({"type": 2, "memory_total": 10, "memory_remaining": 4})
    assert minimal is not None
    assert minimal.data_remaining == 4
    assert minimal.expected_downtime is None


# --------------------------------------------------------------------------------------------
# error table (codes the test driver cannot produce; real ones in test_virt_plumbing.py)


@pytest.mark.parametrize(
    ("code", "domain", "expected"),
    [
        ("VIR_ERR_NO_DOMAIN", 0, VmNotFound),
        ("VIR_ERR_OPERATION_INVALID", 0, WrongState),
        ("VIR_ERR_RPC", "VIR_FROM_RPC", ConnectionFailed),
        ("VIR_ERR_SYSTEM_ERROR", "VIR_FROM_RPC", ConnectionFailed),
        ("VIR_ERR_SYSTEM_ERROR", "VIR_FROM_REMOTE", ConnectionFailed),
        ("VIR_ERR_SYSTEM_ERROR", "VIR_FROM_QEMU", HypervisorError),  # a file, not a socket
        ("VIR_ERR_NO_CONNECT", 0, ConnectionFailed),
        ("VIR_ERR_INVALID_CONN", 0, ConnectionFailed),
        ("VIR_ERR_AUTH_FAILED", 0, ConnectionFailed),
        ("VIR_ERR_AUTH_CANCELLED", 0, ConnectionFailed),
        ("VIR_ERR_AUTH_UNAVAILABLE", 0, ConnectionFailed),
        ("VIR_ERR_NO_SUPPORT", 0, NotSupported),
        ("VIR_ERR_ARGUMENT_UNSUPPORTED", 0, NotSupported),
        ("VIR_ERR_OPERATION_UNSUPPORTED", 0, NotSupported),
        ("VIR_ERR_OPERATION_ABORTED", 0, TaskCancelled),
        ("VIR_ERR_OPERATION_TIMEOUT", 0, TaskTimeout),
        ("VIR_ERR_AGENT_UNRESPONSIVE", 0, TaskTimeout),
        ("VIR_ERR_INTERNAL_ERROR", 0, HypervisorError),
        ("VIR_ERR_OPERATION_FAILED", 0, HypervisorError),
    ],
)
async def test_error_table(code: str, domain: str | int, expected: type[Exception]) -> None:
    number = getattr(libvirt, code)  # the constant exists in the installed binding
    from_domain = getattr(libvirt, domain) if isinstance(domain, str) else domain
    exc = fake_error(number, "boom", from_domain)
    mapped = translate_error(exc, "Error suspending domain: ")
    assert type(mapped) is expected
    if expected is VmNotFound:
        assert str(mapped) == "boom"  # lookups keep libvirt's text bare, as the original
    else:
        assert str(mapped) == "Error suspending domain: boom"


async def test_table_is_keyed_by_the_binding_constants() -> None:
    assert ERROR_TABLE[libvirt.VIR_ERR_NO_DOMAIN] is VmNotFound
    assert all(isinstance(code, int) for code in ERROR_TABLE)


async def test_map_libvirt_errors_chains_the_cause() -> None:
    exc = fake_error(libvirt.VIR_ERR_OPERATION_ABORTED, "operation aborted: job canceled")
    with (
        pytest.raises(TaskCancelled, match=r"^Migration failed: operation aborted") as info,
        map_libvirt_errors("Migration failed: "),
    ):
        raise exc
    assert info.value.__cause__ is exc


async def test_the_pre_check_refuses_multifd_compression_on_an_older_libvirt(hv: Any) -> None:
    """Before anything is touched: the source's libvirt (the test driver's, here) is asked."""
    version = libvirt.getVersion()
    if version >= 9_004_000:
        pytest.skip(f"this libvirt ({version}) takes zstd")
    req = MigrationRequest(
        vm_name="vm1", destination="hostB", compression=("zstd",), parallel_connections=2
    )
    with pytest.raises(NotSupported, match=r"compression zstd needs libvirt 9\.4 or later"):
        await hv.check_migration(req)
