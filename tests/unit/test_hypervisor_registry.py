"""Back-end lookup through entry points, and the shared option converters."""

from __future__ import annotations

from importlib import metadata

import pytest

from asyncmigfra.errors import ConfigError
from asyncmigfra.hypervisor import dummy, fake, registry
from asyncmigfra.hypervisor.registry import (
    available,
    check_keys,
    load_factory,
    opt_bool,
    opt_float,
    opt_int,
    opt_list,
    opt_map,
    opt_str,
)

GROUP = registry.ENTRY_POINT_GROUP


def _eps(**entries: str) -> list[metadata.EntryPoint]:
    return [metadata.EntryPoint(name=n, value=v, group=GROUP) for n, v in entries.items()]


def test_installed_back_ends_are_listed_sorted() -> None:
    names = available()
    assert {"dummy", "fake"} <= set(names)
    assert names == sorted(names)


def test_load_factory_returns_the_entry_points_callable() -> None:
    assert load_factory("dummy") is dummy.create
    assert load_factory("fake") is fake.create


def test_loaded_factory_builds_a_working_back_end() -> None:
    hv = load_factory("dummy")({"never-throw": True}, hostname="h", shared={})
    assert hv.kind == "dummy"


def test_unknown_type_names_the_available_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as err:
        load_factory("vmware")
    assert err.value.path == "hypervisor.type"
    assert "unknown hypervisor type 'vmware'" in str(err.value)
    assert "(available: dummy, fake" in str(err.value)

    monkeypatch.setattr(registry, "_entry_points", list)
    with pytest.raises(ConfigError, match=r"available: none installed"):
        load_factory("dummy")


def test_missing_libvirt_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        registry,
        "_entry_points",
        lambda: _eps(libvirt="asyncmigfra_no_such_module_for_test:create"),
    )
    with pytest.raises(ConfigError) as err:
        load_factory("libvirt")
    assert err.value.path == "hypervisor.type"
    assert "pip install 'asyncmigfra[libvirt]'" in str(err.value)
    assert "asyncmigfra_no_such_module_for_test" in str(err.value)
    assert isinstance(err.value.__cause__, ImportError)


def test_other_import_failure_names_the_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_entry_points", lambda: _eps(xen="no_such_xen_module:create"))
    with pytest.raises(ConfigError) as err:
        load_factory("xen")
    assert "no_such_xen_module:create" in str(err.value)
    assert "asyncmigfra[libvirt]" not in str(err.value)


def test_broken_entry_points_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        registry,
        "_entry_points",
        lambda: _eps(
            noattr="asyncmigfra.hypervisor.dummy:no_such_factory",
            notcallable="asyncmigfra.hypervisor.dummy:DUMMY_ERROR",
        ),
    )
    with pytest.raises(ConfigError, match=r"is broken: entry point"):
        load_factory("noattr")
    with pytest.raises(ConfigError, match=r"is not callable"):
        load_factory("notcallable")
    assert available() == ["noattr", "notcallable"]


def test_check_keys() -> None:
    check_keys({"a": 1, "driver": "qemu"}, {"a"}, ignored={"driver"})
    with pytest.raises(ConfigError) as err:
        check_keys({"a": 1, "b": 2}, {"a"}, path="hypervisor.peers.x")
    assert err.value.path == "hypervisor.peers.x.b"


def test_converters_accept_yaml_cpp_strings() -> None:
    assert opt_bool("Off", "p") is False
    assert opt_int("0x10", "p") == 16
    assert opt_int(" 7 ", "p") == 7
    assert opt_float("2.5", "p") == 2.5
    assert opt_float(3, "p") == 3.0
    assert opt_str(42, "p") == "42"
    assert opt_map({"k": 1}, "p") == {"k": 1}
    assert opt_list(("a", "b"), "p") == ["a", "b"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: opt_int(True, "x.y"), "expected an integer"),
        (lambda: opt_int("1.5", "x.y"), "expected an integer"),
        (lambda: opt_int(-1, "x.y"), "must be >= 0"),
        (lambda: opt_float("fast", "x.y"), "expected a number"),
        (lambda: opt_float(float("nan"), "x.y"), "expected a number"),
        (lambda: opt_float(0, "x.y", exclusive=True), "must be > 0"),
        (lambda: opt_float(-0.5, "x.y"), "must be >= 0"),
        (lambda: opt_str("", "x.y"), "non-empty string"),
        (lambda: opt_str(None, "x.y"), "non-empty string"),
        (lambda: opt_map([1], "x.y"), "expected a map"),
        (lambda: opt_map({1: 2}, "x.y"), "expected a map"),
        (lambda: opt_list("ab", "x.y"), "expected a list"),
        (lambda: opt_bool("2", "x.y"), "expected a boolean"),
    ],
)
def test_converters_reject_with_the_key_path(call: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        call()  # type: ignore[operator]
    assert err.value.path == "x.y"
    assert message in str(err.value)
