"""Domain XML scans are linear (issue 13): the shapes that made ``re`` backtrack for seconds on
the event loop are read in milliseconds, and the scans find what the regexes found."""

from __future__ import annotations

import re
import time

from hypothesis import given
from hypothesis import strategies as st

from asyncmigfra.domxml import first_element, first_element_text, first_name_text
from asyncmigfra.wire.parsing import parse_task

#: What the scans replaced (spec 1.3's start name; the back-ends' domain name and elements).
_SPEC_NAME = re.compile(r"<name>(.*?)</name>", re.DOTALL)
_BACKEND_NAME = re.compile(r"<name>\s*([^<]+?)\s*</name>")

_PIECES = st.sampled_from(["<name>", "</name>", "<name a='1'>", "<", ">", " ", "\n", "x", "vm1"])
_XMLISH = st.lists(_PIECES, max_size=30).map("".join)


@given(_XMLISH)
def test_first_element_text_finds_what_the_lazy_regex_found(xml: str) -> None:
    match = _SPEC_NAME.search(xml)
    assert first_element_text(xml, "name") == (match.group(1) if match else None)


@given(_XMLISH)
def test_first_name_text_finds_what_the_backend_regex_found(xml: str) -> None:
    # The regex took a blank name (``<name> </name>``) as the name; the scan passes over it.
    names = (m.group(1).strip() for m in _BACKEND_NAME.finditer(xml))
    assert first_name_text(xml) == next((name for name in names if name), None)


def test_elements_with_attributes_and_longer_names() -> None:
    xml = "<namespace>n</namespace><memory unit='MiB'> 512 </memory><memoryBacking/>"
    assert first_element(xml, "memory") == (" unit='MiB'", "512")
    assert first_element(xml, "name") is None
    assert first_element("<vcpu>2</vcpu>", "vcpu") == ("", "2")
    assert first_element("<vcpu>2", "vcpu") is None


def _seconds(call: object, *args: object) -> float:
    start = time.perf_counter()
    call(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def test_hostile_shapes_are_read_in_linear_time() -> None:
    # ``re`` took 1.6 s on the first (48 KB) and 34 s on the second (4 KB); the scans take
    # well under a millisecond, so 50 ms leaves room for a loaded machine.
    lazy = "<name>" * 8000
    spaces = "<domain><name>" + " " * 4000 + "<a/></name></domain>"
    members = "<memory>" + " " * 100_000
    for xml in (lazy, spaces, members):
        assert _seconds(first_element_text, xml, "name") < 0.05
        assert _seconds(first_name_text, xml) < 0.05
        assert _seconds(first_element, xml, "memory") < 0.05


def test_a_start_task_with_a_hostile_xml_name_is_parsed_at_once() -> None:
    xml = "<name>" * 8000
    payload = f"task: start vm\nvm-configurations:\n  - xml: '{xml}'\n".encode()
    start = time.perf_counter()
    task = parse_task(payload)
    assert time.perf_counter() - start < 0.1
    assert task.subtasks  # parsed; the item itself carries "Could not find vm-name in xml."
