"""Issue 17: the ``migration:`` defaults of the stream options and ``progress-timeout``: what
loads, and each refusal with its path and reason (the same rules as the parser's,
:mod:`asyncmigfra.streamoptions`)."""

from __future__ import annotations

import textwrap

import pytest

from asyncmigfra.errors import ConfigError
from asyncmigfra.settings import MigrationDefaults, settings_from_text


def migration(body: str) -> MigrationDefaults:
    return settings_from_text(textwrap.dedent(body), hostname="node1").migration


def refused(body: str) -> str:
    with pytest.raises(ConfigError) as info:
        migration(body)
    return str(info.value)


def test_defaults() -> None:
    d = MigrationDefaults()
    assert d.progress_timeout == 150.0
    assert d.compression == ()
    assert (d.compression_level, d.xbzrle_cache, d.zerocopy, d.postcopy_bandwidth) == (
        None,
        None,
        False,
        None,
    )
    assert (d.auto_converge_initial, d.auto_converge_increment) == (None, None)


def test_every_key_loads() -> None:
    d = migration(
        """
        migration:
          progress-timeout: 0
          compression: [zstd]
          compression-level: 5
          parallel-connections: 4
          postcopy-bandwidth: 300
          auto-converge: true
          auto-converge-initial: 30
          auto-converge-increment: 5
        """
    )
    assert d.progress_timeout == 0.0
    assert d.compression == ("zstd",)
    assert (d.compression_level, d.postcopy_bandwidth) == (5, 300)
    assert (d.auto_converge_initial, d.auto_converge_increment) == (30, 5)


def test_xbzrle_and_zerocopy_load() -> None:
    d = migration("migration: {compression: [XBZRLE], xbzrle-cache: 128}")
    assert (d.compression, d.xbzrle_cache) == (("xbzrle",), 128)
    d = migration("migration: {zerocopy: true, parallel-connections: 2}")
    assert d.zerocopy


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("migration: {progress-timeout: -1}", "migration.progress-timeout: must be at least 0"),
        (
            "migration: {compression: [lz4]}",
            "migration.compression[0]: expected one of 'xbzrle', 'zlib', 'zstd', got 'lz4'",
        ),
        (
            "migration: {compression: [zstd]}",
            "migration.compression: zstd needs parallel-connections >= 2",
        ),
        (
            "migration: {compression: [xbzrle, xbzrle]}",
            "migration.compression: names xbzrle twice",
        ),
        (
            "migration: {compression: [xbzrle], parallel-connections: 2}",
            "migration.compression: xbzrle does not work with parallel-connections >= 2",
        ),
        (
            "migration: {compression-level: 21}",
            "migration.compression-level: must be between 0 and 20, got 21",
        ),
        (
            "migration: {compression-level: 3}",
            "migration.compression-level: needs compression zlib or zstd",
        ),
        (
            "migration: {compression: [zlib], parallel-connections: 2, compression-level: 12}",
            "migration.compression-level: zlib takes levels 0 to 9",
        ),
        ("migration: {xbzrle-cache: 64}", "migration.xbzrle-cache: needs xbzrle in compression"),
        (
            "migration: {compression: [xbzrle], xbzrle-cache: 65}",
            "migration.xbzrle-cache: must be a power of two in MiB",
        ),
        ("migration: {zerocopy: true}", "migration.zerocopy: needs parallel-connections >= 2"),
        (
            "migration: {zerocopy: true, parallel-connections: 2, tls: true}",
            "migration.zerocopy: does not work with tls",
        ),
        (
            "migration: {zerocopy: true, parallel-connections: 2, compressed: true}",
            "migration.zerocopy: does not work with compression",
        ),
        (
            "migration: {auto-converge-initial: 20}",
            "migration.auto-converge-initial: needs auto-converge: true",
        ),
        (
            "migration: {auto-converge: true, auto-converge-increment: 100}",
            "migration.auto-converge-increment: must be between 1 and 99, got 100",
        ),
        ("migration: {postcopy-bandwidth: 0}", "migration.postcopy-bandwidth: must be at least 1"),
    ],
)
def test_refusals(body: str, message: str) -> None:
    assert message in refused(body)
