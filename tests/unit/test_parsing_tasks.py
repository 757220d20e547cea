"""Example-based tests of :func:`asyncmigfra.wire.parsing.parse_task`: start, stop,
suspend/resume, repin, quit, status, cancel and evacuate (spec 1.3-1.6, 1.8, 1.9).

Each test names the section of ``spec/migfra-original.md`` (or ``spec/extensions.md``,
"ext") whose rule it checks.
"""

from __future__ import annotations

import pytest
from parsing_support import BAD, parse, reject, start_item

from asyncmigfra.model import (
    CancelSpec,
    EvacuateSpec,
    Ivshmem,
    MigrationParams,
    PciAddress,
    PciId,
    QuitSpec,
    RepinSpec,
    ResumeSpec,
    StartSpec,
    StatusSpec,
    StopSpec,
    SuspendSpec,
    TaskKind,
)

# --------------------------------------------------------------------------------------------
# 1.3 start vm


def test_spec_1_3_start_all_fields() -> None:
    msg = parse(
        """\
task: start vm
id: s1
concurrent-execution: false
vm-configurations:
  - vm-name: vm1
    xml: "<domain><name>ignored</name></domain>"
    vcpus: 4
    memory: 0x100000
    transient: yes
    pci-ids:
      - vendor: 0x15b3
        device: 0x1004
      - {vendor: "4660", device: 017}
    devs:
      - pci-addr: "0000:82:00.1"
      - pci-addr: 3b:1f.7
      - pci-addr: "ABCD:ff:00.0"
    ivshmem:
      id: shm0
      size: 256
      path: /dev/shm/x
    probe-with-ssh: off
    probe-hostname: vm1.example.org
    vcpu-map: [[0, 1], [2]]
    memnode-map:
      - [0]
    time-measurement: true
    concurrent-execution: false
    driver: qemu
"""
    )
    assert msg.kind is TaskKind.START
    assert (msg.id, msg.concurrent_execution) == ("s1", False)
    assert msg.subtasks == (
        StartSpec(
            vm_name="vm1",
            xml="<domain><name>ignored</name></domain>",
            vcpus=4,
            memory=1048576,
            transient=True,
            pci_ids=(PciId(0x15B3, 0x1004), PciId(4660, 15)),
            devs=(
                PciAddress(0, 0x82, 0, 1),
                PciAddress(0, 0x3B, 0x1F, 7),
                PciAddress(0xABCD, 0xFF, 0, 0),
            ),
            ivshmem=Ivshmem("shm0", "256", "/dev/shm/x"),
            probe_with_ssh=False,
            probe_hostname="vm1.example.org",
            vcpu_map=((0, 1), (2,)),
            memnode_map=((0,),),
            time_measurement=True,
            concurrent_execution=False,
            driver="qemu",
        ),
    )


def test_spec_1_3_start_defaults() -> None:
    spec = start_item("vm-name: v")
    assert spec == StartSpec(vm_name="v")
    assert (spec.transient, spec.probe_with_ssh, spec.concurrent_execution) == (False, True, True)
    assert (spec.pci_ids, spec.devs, spec.ivshmem, spec.name_error) == ((), (), None, None)


@pytest.mark.parametrize(
    ("item", "name", "error"),
    [
        pytest.param("vm-name: given\nxml: '<name>other</name>'", "given", None, id="vm-name-wins"),
        pytest.param("xml: '<domain><name>vm7</name></domain>'", "vm7", None, id="from-xml"),
        pytest.param("xml: '<name>a</name><name>b</name>'", "a", None, id="first-name-non-greedy"),
        pytest.param("xml: '<name>  padded \t</name>'", "padded", None, id="stripped"),
        pytest.param(
            "xml: |\n  <domain>\n    <name>\n      ml\n    </name>\n  </domain>",
            "ml",
            None,
            id="multi-line",
        ),
        pytest.param("xml: '<name>a&amp;b</name>'", "a&b", None, id="entities-unescaped"),
        pytest.param("xml: '<domain/>'", "", "Could not find vm-name in xml.", id="no-name"),
        pytest.param("xml: '<name> </name>'", "", "Could not find vm-name in xml.", id="blank"),
        pytest.param("vcpus: 2", "", "vm-name is not valid.", id="neither"),
    ],
)
def test_spec_1_3_start_name_resolution(item: str, name: str, error: str | None) -> None:
    spec = start_item(item)
    assert (spec.vm_name, spec.name_error) == (name, error)


def test_spec_1_3_start_transient_without_xml_is_left_to_the_runner() -> None:
    spec = start_item("vm-name: v\ntransient: true")
    assert (spec.transient, spec.xml, spec.name_error) == (True, None, None)


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        pytest.param(
            "pci-ids:\n  - vendor: 0x10000\n    device: 1",
            "pci-ids[0].vendor: expected an integer from 0 to 0xffff, found '0x10000'",
            id="pci-id-range",
        ),
        pytest.param(
            "pci-ids:\n  - vendor: 1",
            "pci-ids[0].device: expected an integer from 0 to 0xffff, the key is missing",
            id="pci-id-missing-device",
        ),
        pytest.param(
            "pci-ids: [1]", "pci-ids[0]: expected a map, found '1'", id="pci-id-not-a-map"
        ),
        pytest.param(
            "devs:\n  - pci-addr: 0000:82:00:00.1",
            "devs[0].pci-addr: expected a PCI address [DDDD:]BB:SS.F, found '0000:82:00:00.1'",
            id="three-colons",
        ),
        pytest.param(
            "devs:\n  - pci-addr: 82:20.0",
            "devs[0].pci-addr: expected a PCI address [DDDD:]BB:SS.F, found '82:20.0'",
            id="slot-over-1f",
        ),
        pytest.param(
            "devs:\n  - pci-addr: 82:00.8",
            "devs[0].pci-addr: expected a PCI address [DDDD:]BB:SS.F, found '82:00.8'",
            id="function-over-7",
        ),
        pytest.param(
            "devs:\n  - {}",
            "devs[0].pci-addr: expected a PCI address [DDDD:]BB:SS.F, the key is missing",
            id="dev-without-addr",
        ),
        pytest.param(
            "ivshmem:\n  size: 1",
            "ivshmem.id: expected a string, the key is missing",
            id="ivshmem-id",
        ),
        pytest.param(
            "ivshmem:\n  id: x",
            "ivshmem.size: expected a string, the key is missing",
            id="ivshmem-size",
        ),
        pytest.param("ivshmem: shm", "ivshmem: expected a map, found 'shm'", id="ivshmem-scalar"),
        pytest.param(
            "memnode-map: [[-1]]",
            "memnode-map[0][0]: expected an unsigned integer up to 4294967295, found '-1'",
            id="memnode-map-negative",
        ),
        pytest.param("xml: [a]", "xml: expected a string, found a sequence", id="xml-not-a-string"),
        pytest.param("vm-name:", "vm-name: expected a string, found null", id="vm-name-null"),
    ],
)
def test_spec_1_3_start_bad_fields(item: str, problem: str) -> None:
    text = "task: start vm\nid: X\nvm-configurations:\n  - vcpus: 1\n    " + item.replace(
        "\n", "\n    "
    )
    exc = reject(text + "\n")
    assert exc.details == BAD.format(4, 5, "vm-configurations[0]." + problem)
    assert exc.task_id == "X"


# --------------------------------------------------------------------------------------------
# 1.4 stop vm, 1.5 suspend/resume


def test_spec_1_4_stop_fields_and_defaults() -> None:
    msg = parse(
        "task: stop vm\nlist:\n  - vm-name: a\n    force: true\n    undefine: yes\n"
        "    force-after-timeout: on\n  - regex: 'web-[0-9]+'\n  - {}\n"
    )
    assert msg.subtasks == (
        StopSpec(vm_name="a", force=True, undefine=True, force_after_timeout=True),
        StopSpec(regex="web-[0-9]+"),
        StopSpec(),
    )
    assert [s.result_name for s in msg.subtasks] == ["a", "web-[0-9]+", ""]


@pytest.mark.parametrize(
    ("task", "spec_type"),
    [
        pytest.param("suspend vm", SuspendSpec, id="suspend"),
        pytest.param("resume vm", ResumeSpec, id="resume"),
    ],
)
def test_spec_1_5_suspend_resume(task: str, spec_type: type[SuspendSpec | ResumeSpec]) -> None:
    msg = parse(f"task: {task}\nlist:\n  - vm-name: a\n  - vm-name: b\n    driver: lxctools\n")
    assert msg.subtasks == (spec_type(vm_name="a"), spec_type(vm_name="b", driver="lxctools"))


# --------------------------------------------------------------------------------------------
# 1.6 repin, 1.9 quit, ext status/cancel


def test_spec_1_6_repin() -> None:
    msg = parse("task: repin vm\nid: r\nvm-name: vm1\nvcpu-map: [[4], [5], [6, 0x7]]\n")
    assert msg.subtasks == (RepinSpec(vm_name="vm1", vcpu_map=((4,), (5,), (6, 7))),)


def test_spec_1_9_quit() -> None:
    msg = parse("task: quit\nid: q\ntime-measurement: true\n")
    assert msg.subtasks == (QuitSpec(time_measurement=True),)
    assert msg.vm_names == ()


def test_ext_status() -> None:
    msg = parse("task: status\nid: s\n")
    assert (msg.kind, msg.subtasks) == (TaskKind.STATUS, (StatusSpec(),))


def test_ext_cancel() -> None:
    msg = parse("task: cancel\nid: c\ntarget: 0012\n")
    assert (msg.kind, msg.subtasks) == (TaskKind.CANCEL, (CancelSpec(target="0012"),))
    exc = reject("task: cancel\nid: c\n")
    assert exc.details == BAD.format(1, 1, "target: expected a string, the key is missing")


# --------------------------------------------------------------------------------------------
# 1.8 evacuate node


def test_spec_1_8_evacuate() -> None:
    msg = parse(
        """\
task: evacuate node
id: e
time-measurement: true
destinations: [node2, "0012"]
parameter:
  mode: scatter
  overbooking: false
  max-parallel: 2
  migration-type: live
  retry-counter: 1
  swap-with: {vm-name: ignored}
  vcpu-map: [[1]]
"""
    )
    assert msg.subtasks == (
        EvacuateSpec(
            destinations=("node2", "0012"),
            mode="scatter",
            overbooking=False,
            max_parallel=2,
            parameter=MigrationParams(migration_type="live", retry_counter=1),
            time_measurement=True,
        ),
    )


def test_spec_1_8_evacuate_defaults() -> None:
    spec = parse("task: evacuate node\ndestinations: [a]\n").subtasks[0]
    assert spec == EvacuateSpec(destinations=("a",))
    assert isinstance(spec, EvacuateSpec)
    assert (spec.mode, spec.overbooking, spec.max_parallel) == ("auto", True, None)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        pytest.param("", "destinations: expected a sequence, the key is missing", id="missing"),
        pytest.param(
            "destinations: a", "destinations: expected a sequence, found 'a'", id="scalar"
        ),
        pytest.param(
            "destinations: [[a]]",
            "destinations[0]: expected a string, found a sequence",
            id="nested",
        ),
        pytest.param(
            "destinations: [a]\nparameter:\n  mode: spread",
            "parameter.mode: expected one of auto, compact, scatter, found 'spread'",
            id="mode",
        ),
        pytest.param(
            "destinations: [a]\nparameter:\n  max-parallel: 0",
            "parameter.max-parallel: expected an integer from 1 to 4294967295, found '0'",
            id="max-parallel",
        ),
    ],
)
def test_spec_1_8_evacuate_bad_fields(body: str, problem: str) -> None:
    exc = reject("task: evacuate node\nid: X\n" + body + "\n")
    assert exc.details == BAD.format(1, 1, problem)
