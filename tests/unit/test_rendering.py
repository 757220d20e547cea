"""Tests of :mod:`asyncmigfra.wire.rendering`: result shape (spec 1.2, Appendix A) and scalars that
PyYAML ``safe_load``, ruamel.yaml and yaml-cpp ``YAML::Load`` all read identically (ext).

The yaml-cpp cross-check compiles a small C++ reader once per session (needs ``g++`` and
``libyaml-cpp-dev``); without them those tests are skipped with the reason.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from asyncmigfra.errors import TaskRejected
from asyncmigfra.model import ResultEntry, ResultMessage
from asyncmigfra.wire.rendering import parse_error_result, render_event, render_result

PROPS = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])

SPEC_1_2_MIGRATED = ResultMessage(
    result="vm migrated",
    flat=True,
    id="abc-123",
    entries=[
        ResultEntry(
            vm_name="vm1",
            status="success",
            time_measurement={"migrate": 0.020156, "overall": 0.020162},
        )
    ],
)
SPEC_1_2_STARTED = ResultMessage(
    result="vm started",
    id="42",
    entries=[
        ResultEntry(vm_name="vm1", status="success"),
        ResultEntry(
            vm_name="vm2",
            status="error",
            details="Domain not found: no domain with matching name 'vm2'",
            code="vm-not-found",
        ),
    ],
)


def pyyaml_load(data: bytes) -> Any:
    return yaml.safe_load(data)


def ruamel_load(data: bytes) -> Any:
    return YAML(typ="safe", pure=True).load(data)


# --------------------------------------------------------------------------------------------
# Exact bytes


def test_spec_1_2_vm_migrated_is_flat_byte_for_byte() -> None:
    """Spec 1.2's first verified output, with our framing (``...`` instead of a bare ``---``)."""
    assert render_result(SPEC_1_2_MIGRATED) == (
        b"---\n"
        b"result: vm migrated\n"
        b"vm-name: vm1\n"
        b"status: success\n"
        b"time-measurement:\n"
        b"  migrate: 0.020156\n"
        b"  overall: 0.020162\n"
        b"id: abc-123\n"
        b"...\n"
    )


def test_evacuation_top_level_time_measurement_has_six_decimals_like_the_entries() -> None:
    """An evacuation's own ``time-measurement`` (a header key) printed ``%f`` as the
    entries' are, not ``8.141100011016533e-05``."""
    msg = ResultMessage(
        result="node evacuated",
        entries=[ResultEntry(vm_name="v", status="success", time_measurement={"migrate": 1.5})],
        header={"time-measurement": {"overall": 8.141100011016533e-05, "placement": 2.0}},
        id="e",
    )
    assert render_result(msg) == (
        b"---\n"
        b"result: node evacuated\n"
        b"time-measurement:\n"
        b"  overall: 0.000081\n"
        b"  placement: 2.000000\n"
        b"list:\n"
        b"  - vm-name: v\n"
        b"    status: success\n"
        b"    time-measurement:\n"
        b"      migrate: 1.500000\n"
        b"id: e\n"
        b"...\n"
    )


def test_spec_1_2_vm_started_uses_list_byte_for_byte() -> None:
    """Spec 1.2's second verified output; ``id: "42"`` is quoted so PyYAML keeps a string,
    and the error entry carries the new ``code``."""
    assert render_result(SPEC_1_2_STARTED) == (
        b"---\n"
        b"result: vm started\n"
        b"list:\n"
        b"  - vm-name: vm1\n"
        b"    status: success\n"
        b"  - vm-name: vm2\n"
        b"    status: error\n"
        b"    details: \"Domain not found: no domain with matching name 'vm2'\"\n"
        b"    code: vm-not-found\n"
        b'id: "42"\n'
        b"...\n"
    )


def test_spec_5_parse_error_result_byte_for_byte() -> None:
    exc = TaskRejected(
        "invalid-message", "Parsed message not being a Task_container.", task_id="0012"
    )
    msg = parse_error_result(exc)
    assert (msg.result, msg.id, msg.flat) == ("unknown", "0012", False)
    assert render_result(msg) == (
        b"---\n"
        b"result: unknown\n"
        b"list:\n"
        b"  - vm-name: unknown\n"
        b"    status: error\n"
        b"    details: Parsed message not being a Task_container.\n"
        b"    code: invalid-message\n"
        b'id: "0012"\n'
        b"...\n"
    )


def test_spec_5_parse_error_result_without_id() -> None:
    msg = parse_error_result(TaskRejected("unknown-task", "Exception: Unknown type of Task."))
    assert msg.id is None
    assert pyyaml_load(render_result(msg)) == {
        "result": "unknown",
        "list": [
            {
                "vm-name": "unknown",
                "status": "error",
                "details": "Exception: Unknown type of Task.",
                "code": "unknown-task",
            }
        ],
    }


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        pytest.param(
            ResultMessage(result="node evacuated", entries=[]),
            b"---\nresult: node evacuated\nlist: []\n...\n",
            id="empty-list-no-id",
        ),
        pytest.param(
            ResultMessage(
                result="quit", id="", entries=[ResultEntry(vm_name="n/a", status="success")]
            ),
            b"---\nresult: quit\nlist:\n  - vm-name: n/a\n    status: success\n...\n",
            id="empty-id-omitted",
        ),
        pytest.param(
            ResultMessage(
                result="vm migrated",
                flat=True,
                entries=[
                    ResultEntry(
                        vm_name="vm1",
                        status="error",
                        details="",
                        code="migration-failed",
                        time_measurement={},
                        extra={"retries": 2, "destination": "node2", "status": "dup"},
                    )
                ],
            ),
            b"---\nresult: vm migrated\nvm-name: vm1\nstatus: error\ncode: migration-failed\n"
            b"retries: 2\ndestination: node2\n...\n",
            id="flat-extra-empty-details-duplicate-key",
        ),
        pytest.param(
            ResultMessage(
                result="vm migrated",
                flat=True,
                entries=[ResultEntry(vm_name="a", status="success")] * 2,
            ),
            b"---\nresult: vm migrated\nlist:\n  - vm-name: a\n    status: success\n"
            b"  - vm-name: a\n    status: success\n...\n",
            id="flat-needs-exactly-one-entry",
        ),
        pytest.param(
            ResultMessage(
                result="status",
                id="s",
                header={"host": "node1", "uptime": 12.5, "tasks": []},
                entries=[
                    ResultEntry(
                        vm_name="vm1",
                        status="success",
                        extra={"state": "running", "vcpus": 2, "memory": 1048576},
                    )
                ],
            ),
            b"---\nresult: status\nhost: node1\nuptime: 12.5\ntasks: []\nlist:\n"
            b"  - vm-name: vm1\n    status: success\n    state: running\n    vcpus: 2\n"
            b"    memory: 1048576\nid: s\n...\n",
            id="status-header",
        ),
    ],
)
def test_spec_1_2_result_shapes(msg: ResultMessage, expected: bytes) -> None:
    assert render_result(msg) == expected


def test_ext_event_nested_values_byte_for_byte() -> None:
    event = {
        "event": "progress",
        "id": "042",
        "percent": 12,
        "rate": 1e-05,
        "big": 1e16,
        "nan": math.nan,
        "ok": True,
        "none": None,
        "empty-map": {},
        "matrix": [[1, [2]], {"k": "v", "l": [True]}, []],
    }
    assert render_event(event) == (
        b"---\n"
        b"event: progress\n"
        b'id: "042"\n'
        b"percent: 12\n"
        b"rate: 1.0e-05\n"
        b"big: 1.0e+16\n"
        b"nan: .nan\n"
        b"ok: true\n"
        b"none: null\n"
        b"empty-map: {}\n"
        b"matrix:\n"
        b"  -\n"
        b"    - 1\n"
        b"    -\n"
        b"      - 2\n"
        b"  - k: v\n"
        b"    l:\n"
        b"      - true\n"
        b"  - []\n"
        b"...\n"
    )
    loaded = pyyaml_load(render_event(event))
    assert loaded["rate"] == 1e-05
    assert math.isnan(loaded["nan"])
    assert loaded["matrix"] == [[1, [2]], {"k": "v", "l": [True]}, []]


def test_ext_event_empty_map() -> None:
    assert render_event({}) == b"---\n{}\n...\n"
    assert pyyaml_load(render_event({})) == {}


def test_ext_unsupported_value_type_raises_type_error() -> None:
    with pytest.raises(TypeError, match="cannot render a bytes"):
        render_event({"x": b"raw"})


# --------------------------------------------------------------------------------------------
# Scalars read back as the same string everywhere

AMBIGUOUS = [
    "0012", "042", "42", "1e3", "1.5", ".5", "0x1F", "0o17", "0b101", "1_000", "12:30",
    "190:20:30", "2001-12-14", "yes", "Yes", "YES", "no", "on", "off", "y", "n", "Y", "N",
    "true", "False", "null", "Null", "NULL", "~", "", " ", " lead", "trail ", "a: b",
    "a #b", "#c", "-", "- x", "-1", "+1", "?", "? x", ":", "[x]", "{x}", "*a", "&a", "!t",
    "|", ">", "'q'", '"q"', "%x", "@x", "`x", "<<", "=", ".inf", ".NaN", "-.inf", "a\nb",
    "tab\there", "nul\x00", "bell\x07", "del\x7f", "nel\x85", "ls\u2028", "ps\u2029",
    "bom\ufeff", "back\\slash", "ünïcödé", "emoji \U0001f600", "---", "...", "a,b",
    # emitted plain: must still read back verbatim
    "a -", "a - b", "x (y)", "_", "/", "a.", "a..b", "(", "Y2", "nan", "inf", "e5", "NO-GO",
]  # fmt: skip


@pytest.mark.parametrize("value", [pytest.param(v, id=repr(v)) for v in AMBIGUOUS])
def test_ext_ambiguous_strings_stay_strings(value: str) -> None:
    data = render_event({"id": value, value: "key"})
    expected = {"id": value, value: "key"}
    assert pyyaml_load(data) == expected
    assert ruamel_load(data) == expected


@pytest.mark.parametrize("task_id", ["0012", "042", "yes", "1e3", "on", "null", "12:30"])
def test_spec_1_2_result_ids_survive_as_strings(task_id: str) -> None:
    """The original wrote ``id: 0012`` plain, which PyYAML reads as the int 12 (spec 1.1)."""
    data = render_result(ResultMessage(result="quit", id=task_id, entries=[]))
    assert data.endswith(f'id: "{task_id}"\n...\n'.encode())
    assert pyyaml_load(data)["id"] == task_id
    assert ruamel_load(data)["id"] == task_id


@pytest.mark.parametrize(
    ("value", "line"),
    [
        pytest.param("vm1", b"id: vm1", id="plain-name"),
        pytest.param("abc-123", b"id: abc-123", id="plain-dash"),
        pytest.param("/var/lib/x", b"id: /var/lib/x", id="plain-path"),
        pytest.param("vm started", b"id: vm started", id="plain-space"),
        pytest.param("0012", b'id: "0012"', id="quoted-leading-zero"),
        pytest.param("yes", b'id: "yes"', id="quoted-bool"),
        pytest.param("a: b", b'id: "a: b"', id="quoted-colon"),
        pytest.param('q"b\\', b'id: "q\\"b\\\\"', id="escaped-quote-backslash"),
        pytest.param("a\nb\tc", b'id: "a\\nb\\tc"', id="escaped-newline-tab"),
        pytest.param("\x00\x1b\u2028", b'id: "\\u0000\\u001b\\u2028"', id="escaped-uxxxx"),
        pytest.param("ünï", 'id: "ünï"'.encode(), id="utf8-kept-quoted"),
    ],
)
def test_ext_scalar_styles(value: str, line: bytes) -> None:
    assert render_event({"id": value}) == b"---\n" + line + b"\n...\n"


def test_ext_long_keys_use_explicit_entries() -> None:
    key = "k" * 1500
    data = render_event({key: {"a": 1}, "b": [key]})
    assert data.startswith(b"---\n? " + key.encode() + b"\n:\n  a: 1\n")
    assert pyyaml_load(data) == {key: {"a": 1}, "b": [key]}
    assert ruamel_load(data) == {key: {"a": 1}, "b": [key]}


@PROPS
@given(st.text())
def test_ext_any_text_round_trips_through_pyyaml_and_ruamel(value: str) -> None:
    data = render_event({"details": value, "list": [value, {value: value}]})
    expected = {"details": value, "list": [value, {value: value}]}
    assert pyyaml_load(data) == expected
    assert ruamel_load(data) == expected


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=25,
)


@PROPS
@given(st.dictionaries(st.text(max_size=10), json_like, max_size=5))
def test_ext_nested_events_round_trip_through_pyyaml_and_ruamel(event: dict[str, Any]) -> None:
    data = render_event(event)
    assert data.startswith(b"---\n")
    assert data.endswith(b"\n...\n")
    assert pyyaml_load(data) == event
    assert ruamel_load(data) == event


@PROPS
@given(st.floats(allow_nan=False) | st.integers() | st.booleans())
def test_ext_numbers_and_bools_round_trip(value: float | bool) -> None:
    data = render_event({"v": value})
    assert pyyaml_load(data) == {"v": value}
    assert ruamel_load(data) == {"v": value}


@PROPS
@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_spec_2_time_measurement_uses_six_decimals(seconds: float) -> None:
    msg = ResultMessage(
        result="vm stopped",
        entries=[ResultEntry(vm_name="v", status="success", time_measurement={"overall": seconds})],
    )
    data = render_result(msg)
    assert f"      overall: {seconds:f}\n".encode() in data
    assert pyyaml_load(data)["list"][0]["time-measurement"]["overall"] == float(f"{seconds:f}")


# --------------------------------------------------------------------------------------------
# yaml-cpp cross-check

YAMLCPP_READER = r"""
// Reads length-prefixed YAML documents from stdin ("<n>\n<n bytes>"), loads each with
// YAML::Load and prints every scalar with its path, then "END".
#include <yaml-cpp/yaml.h>
#include <iostream>
#include <string>

static std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') { out += '\\'; out += static_cast<char>(c); }
    else if (c < 0x20 || c == 0x7f) {
      char buf[8]; std::snprintf(buf, sizeof buf, "\\u%04x", c); out += buf;
    } else out += static_cast<char>(c);
  }
  return out + "\"";
}

static void walk(const YAML::Node& n, const std::string& path) {
  switch (n.Type()) {
    case YAML::NodeType::Null: std::cout << path << " = null\n"; break;
    case YAML::NodeType::Scalar: std::cout << path << " = " << quote(n.Scalar()) << "\n"; break;
    case YAML::NodeType::Sequence:
      if (n.size() == 0) std::cout << path << " = []\n";
      for (std::size_t i = 0; i < n.size(); ++i) walk(n[i], path + "[" + std::to_string(i) + "]");
      break;
    case YAML::NodeType::Map:
      if (n.size() == 0) std::cout << path << " = {}\n";
      for (auto it = n.begin(); it != n.end(); ++it)
        walk(it->second, path + "." + quote(it->first.Scalar()));
      break;
    default: std::cout << path << " = undefined\n";
  }
}

int main() {
  std::string header;
  while (std::getline(std::cin, header)) {
    std::string doc(std::stoul(header), '\0');
    std::cin.read(&doc[0], static_cast<std::streamsize>(doc.size()));
    try { walk(YAML::Load(doc), "$"); }
    catch (const YAML::Exception& e) { std::cout << "ERROR " << e.what() << "\n"; }
    std::cout << "END" << std::endl;
  }
}
"""


class YamlCpp:
    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def read(self, data: bytes) -> list[str]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(b"%d\n" % len(data) + data)
        self.proc.stdin.flush()
        lines: list[str] = []
        while (line := self.proc.stdout.readline()) != b"END\n":
            assert line, "the yaml-cpp reader exited"
            lines.append(line.decode("utf-8", "surrogatepass").rstrip("\n"))
        return lines

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


@pytest.fixture(scope="session")
def yamlcpp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[YamlCpp]:
    if not Path("/usr/include/yaml-cpp/yaml.h").exists():
        pytest.skip("yaml-cpp headers missing: apt-get install libyaml-cpp-dev")
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ missing: the yaml-cpp cross-check needs a C++ compiler")
    workdir = tmp_path_factory.mktemp("yamlcpp")
    source = workdir / "reader.cpp"
    source.write_text(YAMLCPP_READER)
    binary = workdir / "reader"
    subprocess.run(
        [compiler, "-std=c++17", "-O1", str(source), "-lyaml-cpp", "-o", str(binary)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    reader = YamlCpp(binary)
    yield reader
    reader.close()


def cpp_quote(text: str) -> str:
    """The C++ reader's ``quote()``: escapes ``"``, ``\\``, C0 controls and DEL only."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def cpp_scalar(value: object) -> str:
    """What yaml-cpp's ``Scalar()`` returns for a value we rendered."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return cpp_quote("true" if value else "false")
    if isinstance(value, int | str):
        return cpp_quote(str(value))
    raise AssertionError(f"unexpected value {value!r}")


def cpp_view(value: object, path: str = "$") -> list[str]:
    """The reader's lines for ``value`` (floats are checked separately, as text)."""
    if isinstance(value, Mapping):
        if not value:
            return [f"{path} = {{}}"]
        return [line for k, v in value.items() for line in cpp_view(v, f"{path}.{cpp_quote(k)}")]
    if isinstance(value, list | tuple):
        if not value:
            return [f"{path} = []"]
        return [line for i, v in enumerate(value) for line in cpp_view(v, f"{path}[{i}]")]
    return [f"{path} = {cpp_scalar(value)}"]


def test_ext_yamlcpp_reads_the_spec_results(yamlcpp: YamlCpp) -> None:
    assert yamlcpp.read(render_result(SPEC_1_2_MIGRATED)) == [
        '$."result" = "vm migrated"',
        '$."vm-name" = "vm1"',
        '$."status" = "success"',
        '$."time-measurement"."migrate" = "0.020156"',
        '$."time-measurement"."overall" = "0.020162"',
        '$."id" = "abc-123"',
    ]
    assert yamlcpp.read(render_result(SPEC_1_2_STARTED)) == cpp_view(
        pyyaml_load(render_result(SPEC_1_2_STARTED))
    )


@pytest.mark.parametrize("value", [pytest.param(v, id=repr(v)) for v in AMBIGUOUS])
def test_ext_yamlcpp_reads_ambiguous_strings(yamlcpp: YamlCpp, value: str) -> None:
    event = {"id": value, "list": [value, {"k": value}], "n": 12, "b": False, "z": None}
    assert yamlcpp.read(render_event(event)) == cpp_view(event)


@PROPS
@given(st.text())
def test_ext_yamlcpp_reads_any_text(yamlcpp: YamlCpp, value: str) -> None:
    result = ResultMessage(
        result="vm started",
        id=value,
        header={value: [value]},
        entries=[ResultEntry(vm_name=value, status="error", details=value, code="busy")],
    )
    expected: dict[str, object] = {"result": "vm started"}
    expected.setdefault(value, [value])  # the renderer skips repeated keys: first one wins
    entry = {"vm-name": value, "status": "error", "details": value, "code": "busy"}
    if not value:
        del entry["details"]  # empty details are omitted
    expected.setdefault("list", [entry])
    if value:
        expected.setdefault("id", value)
    assert yamlcpp.read(render_result(result)) == cpp_view(expected)


def test_ext_yamlcpp_reader_reports_errors(yamlcpp: YamlCpp) -> None:
    """Guard against a reader that accepts anything: broken YAML must be reported."""
    lines = yamlcpp.read(b"{a")
    assert lines[0].startswith("ERROR yaml-cpp: error at line 1")


def test_a_string_renders_the_same_the_second_time():
    """Short strings are remembered once rendered (speed): a second rendering is the same,
    also for those that must be quoted, and the memory stays bounded."""
    from asyncmigfra.wire import rendering  # noqa: PLC0415

    tricky = ["yes", "0012", 'a"b', "vm-1", "", " x", "ÿ\u2028", "on", "12:30"]
    first = [rendering._string(s) for s in tricky]
    assert [rendering._string(s) for s in tricky] == first
    assert first[:2] == ['"yes"', '"0012"']
    assert first[3] == "vm-1"
    for i in range(2 * rendering._RENDERED_MAX):
        rendering._string(f"name-{i}")
    assert len(rendering._RENDERED) <= rendering._RENDERED_MAX
    assert [rendering._string(s) for s in tricky] == first
