"""Configured hooks (``hooks:``) around real tasks, through MQTT on two ``fake`` hosts: commands
with the task's data, policies, MQTT request/response on the destination, ``before-start`` /
``after-stop``, and the built-in ``reduce-memory`` balloon hook."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_migrate_fake import GIB, _dom, two_hosts
from test_userhooks_mqtt import reply, responder

from asyncmigfra.hypervisor.base import DomainState
from asyncmigfra.settings import HookSettings, settings_from_text

pytestmark = pytest.mark.broker


def hooks(yaml: str) -> tuple[HookSettings, ...]:
    """``hooks:`` parsed exactly as from an agent's configuration file."""
    return settings_from_text("hooks:\n" + textwrap.indent(yaml, "  "), hostname="h").hooks


def recorder(tmp_path: Path, name: str, *, exit_status: int = 0) -> str:
    """A hook script that appends its ASYNCMIGFRA_* environment as one JSON line."""
    script = tmp_path / f"{name}.sh"
    fail = 'echo "broken on purpose" >&2\n' if exit_status else ""
    script.write_text(
        "#!/bin/sh\n"
        f"env | grep '^ASYNCMIGFRA_' | sort > {tmp_path}/{name}.$$.env\n"
        f"{fail}exit {exit_status}\n"
    )
    script.chmod(0o755)
    return str(script)


def calls(tmp_path: Path, name: str) -> list[dict[str, str]]:
    out = []
    for f in sorted(tmp_path.glob(f"{name}.*.env"), key=lambda p: p.stat().st_mtime_ns):
        out.append(dict(line.split("=", 1) for line in f.read_text().splitlines()))
    return out


def _migrate(vm: str, dest: str, *, timed: bool = True) -> str:
    return (
        f"task: migrate vm\nvm-name: {vm}\ndestination: {dest}\n"
        f"time-measurement: {'true' if timed else 'false'}\nparameter:\n  migration-type: live\n"
    )


def _phases(sched: Any, task_id: str) -> list[str]:
    return [e["phase"] for e in sched.events_for(task_id, "phase")]


async def test_migrate_hooks_run_around_the_migration_with_the_task_data(mosquitto, tmp_path):
    config = hooks(
        f"- name: drain\n  when: [before-migrate]\n  command: [{recorder(tmp_path, 'drain')}]\n"
        f"- name: undrain\n  when: after-migrate\n  command: {recorder(tmp_path, 'undrain')}\n"
    )
    async with two_hosts(mosquitto.port, [_dom("h1")], hooks=config) as (_, sched, shared):
        src, dest = shared["names"]
        r = await sched.call(_migrate("h1", dest), timeout=20)
        assert (r["status"], r["destination"]) == ("success", dest), r
        assert {"hook-drain", "hook-undrain"} <= set(r["time-measurement"])
        phases = _phases(sched, r["id"])
        assert phases.index("pre-checks") < phases.index("hook:drain")
        assert phases.index("hook:drain") < phases.index("migrating")
        assert phases.index("migrating") < phases.index("hook:undrain")
    (before,) = calls(tmp_path, "drain")
    assert before == {
        "ASYNCMIGFRA_DESTINATION": dest,
        "ASYNCMIGFRA_HOOK": "drain",
        "ASYNCMIGFRA_HOST": src,
        "ASYNCMIGFRA_POINT": "before-migrate",
        "ASYNCMIGFRA_SOURCE": src,
        "ASYNCMIGFRA_TASK": "migrate vm",
        "ASYNCMIGFRA_TASK_ID": r["id"],
        "ASYNCMIGFRA_VM_NAME": "h1",
    }
    (after,) = calls(tmp_path, "undrain")
    assert (after["ASYNCMIGFRA_POINT"], after["ASYNCMIGFRA_OUTCOME"]) == (
        "after-migrate",
        "success",
    )


async def test_a_failing_before_hook_with_policy_fail_leaves_the_vm_untouched(mosquitto, tmp_path):
    config = hooks(
        "- name: gate\n  when: before-migrate\n"
        f"  command: {recorder(tmp_path, 'gate', exit_status=3)}\n"
        f"- name: ungate\n  when: after-migrate\n  command: {recorder(tmp_path, 'ungate')}\n"
    )
    async with two_hosts(mosquitto.port, [_dom("h2")], hooks=config) as (_, sched, shared):
        src, dest = shared["names"]
        r = await sched.call(_migrate("h2", dest), timeout=20)
        assert (r["status"], r["code"]) == ("error", "hook-failed"), r
        assert r["details"] == (
            "hook gate (before-migrate) failed: exit status 3: broken on purpose"
        )
        assert "migrating" not in _phases(sched, r["id"])
        (where,) = shared["fake-cluster"].locate("h2")
        assert where == src
    # The after-migrate hooks still run (a drain gets its undrain), told what went wrong.
    (after,) = calls(tmp_path, "ungate")
    assert after["ASYNCMIGFRA_OUTCOME"] == "error"
    assert after["ASYNCMIGFRA_DETAILS"] == r["details"]


async def test_a_warn_hook_failure_is_reported_in_details_of_a_success(mosquitto, tmp_path):
    config = hooks(
        f"- name: ping\n  when: [after-migrate]\n  policy: warn\n"
        f"  command: {recorder(tmp_path, 'ping', exit_status=1)}\n"
    )
    async with two_hosts(mosquitto.port, [_dom("h3")], hooks=config) as (_, sched, shared):
        _, dest = shared["names"]
        r = await sched.call(_migrate("h3", dest), timeout=20)
        assert (r["status"], r["destination"]) == ("success", dest), r
        assert r["details"] == "hook ping (after-migrate) failed: exit status 1: broken on purpose"


async def test_after_hooks_hear_about_a_failed_migration(mosquitto, tmp_path):
    config = hooks(
        f"- name: undrain\n  when: after-migrate\n  command: {recorder(tmp_path, 'u')}\n"
    )
    async with two_hosts(mosquitto.port, [_dom("h4")], hooks=config) as (agent, sched, shared):
        _, dest = shared["names"]
        agent.hypervisor.inject("migrate")  # type: ignore[attr-defined]
        r = await sched.call(_migrate("h4", dest), timeout=20)
        assert r["status"] == "error", r
    (after,) = calls(tmp_path, "u")
    assert after["ASYNCMIGFRA_OUTCOME"] == "error"
    assert after["ASYNCMIGFRA_DETAILS"] == r["details"]


async def test_mqtt_hook_on_the_destination_is_asked_and_answered(mosquitto, tmp_path):
    config = hooks(
        "- name: dcim\n  when: [before-migrate]\n  on: destination\n  timeout: 5\n"
        "  mqtt:\n    request-topic: dcim-t/<host>/<vm_name>/request\n"
        "    response-topic: dcim-t/<host>/response\n"
    )
    async with two_hosts(mosquitto.port, [_dom("h5")], hooks=config) as (_, sched, shared):
        src, dest = shared["names"]
        async with responder(
            mosquitto.port, f"dcim-t/{dest}/h5/request", f"dcim-t/{dest}/response", reply("success")
        ) as dcim:
            r = await sched.call(_migrate("h5", dest), timeout=20)
        assert r["status"] == "success", r
        ((topic, request),) = dcim.requests
        assert topic == f"dcim-t/{dest}/h5/request"
        assert (request["host"], request["source"], request["destination"]) == (dest, src, dest)
        assert request["point"] == "before-migrate"


async def test_start_and_stop_hooks(mosquitto, tmp_path):
    config = hooks(
        "- name: license\n  when: before-start\n"
        f"  command: {recorder(tmp_path, 'lic', exit_status=2)}\n"
        f"- name: cleanup\n  when: after-stop\n  command: {recorder(tmp_path, 'clean')}\n"
    )
    doms = [_dom("h6", state="shutoff"), _dom("h7")]
    async with two_hosts(mosquitto.port, doms, hooks=config) as (_, sched, shared):
        src, _ = shared["names"]
        r = await sched.call("task: start vm\nvm-configurations:\n  - vm-name: h6\n")
        (entry,) = r["list"]
        assert (entry["status"], entry["code"]) == ("error", "hook-failed"), r
        assert shared["fake-cluster"].domain(src, "h6").state is DomainState.SHUTOFF
        r = await sched.call("task: stop vm\nlist:\n  - vm-name: h7\n    force: true\n")
        assert r["list"][0]["status"] == "success", r
    (after,) = calls(tmp_path, "clean")
    assert (after["ASYNCMIGFRA_POINT"], after["ASYNCMIGFRA_VM_NAME"]) == ("after-stop", "h7")
    assert after["ASYNCMIGFRA_OUTCOME"] == "success"
    assert "ASYNCMIGFRA_DESTINATION" not in after


async def test_reduce_memory_balloons_down_for_the_copy_and_back_on_the_destination(mosquitto):
    config = hooks("- name: shrink\n  builtin: reduce-memory\n  memory: 25%\n")
    async with two_hosts(
        mosquitto.port,
        [_dom("h8", memory=4 * GIB)],
        hooks=config,
        agent={"progress_interval": 0.05},
    ) as (_, sched, shared):
        _, dest = shared["names"]
        r = await sched.call(_migrate("h8", dest), timeout=20)
        assert (r["status"], r["destination"]) == ("success", dest), r
        assert "hook-shrink" in r["time-measurement"]
        phases = _phases(sched, r["id"])
        first, last = (
            phases.index("hook:shrink"),
            len(phases) - 1 - phases[::-1].index("hook:shrink"),
        )
        assert first < phases.index("migrating") < last
        # The copy moved a quarter of the guest; the guest has all of it back on B.
        totals = {
            e["memory-total"] for e in sched.events_for(r["id"], "progress") if "memory-total" in e
        }
        assert totals == {GIB * 1024}, totals
        dom = shared["fake-cluster"].domain(dest, "h8")
        assert dom.balloon == 4 * GIB


async def test_a_destination_hook_runs_on_the_destination_by_its_own_agent(mosquitto, tmp_path):
    """``on: destination`` command hooks are run by the destination's agent, with the command
    from *its* configuration (here a different script than the source's): nothing but the
    hook's name and the task's data travels."""
    here = hooks(
        "- name: fence\n  when: [before-migrate]\n  on: destination\n  timeout: 5\n"
        f"  command: {recorder(tmp_path, 'source-copy')}\n"
    )
    there = hooks(
        "- name: fence\n  when: [before-migrate]\n  on: destination\n  timeout: 5\n"
        f"  command: {recorder(tmp_path, 'fence')}\n"
    )
    async with two_hosts(mosquitto.port, [_dom("h9")], hooks=here, b_sections={"hooks": there}) as (
        _,
        sched,
        shared,
    ):
        src, dest = shared["names"]
        # Garbage on the destination's hook topics is ignored; it keeps serving.
        for junk in (b"", b"not json", b"[1]", b'{"request-id": "x"}', b"{" * 5000):
            for topic in (f"{dest}/hook/{src}", f"{dest}/hook", f"{dest}/hook/{src}/x"):
                await sched.publish(junk, topic=f"fast/migfra/{topic}")
        r = await sched.call(_migrate("h9", dest), timeout=20)
        assert (r["status"], r["destination"]) == ("success", dest), r
        assert "hook-fence" in r["time-measurement"]
    assert calls(tmp_path, "source-copy") == []
    (ran,) = calls(tmp_path, "fence")
    assert ran["ASYNCMIGFRA_HOST"] == dest
    assert (ran["ASYNCMIGFRA_SOURCE"], ran["ASYNCMIGFRA_DESTINATION"]) == (src, dest)
    assert (ran["ASYNCMIGFRA_VM_NAME"], ran["ASYNCMIGFRA_POINT"]) == ("h9", "before-migrate")
    assert ran["ASYNCMIGFRA_TASK_ID"] == r["id"]


async def test_a_destination_without_that_hook_answers_an_error(mosquitto, tmp_path):
    here = hooks(
        "- name: fence\n  when: [before-migrate]\n  on: destination\n  timeout: 5\n"
        f"  command: {recorder(tmp_path, 'fence')}\n"
    )
    other = hooks(
        "- name: other\n  when: before-migrate\n  on: destination\n"
        f"  command: {recorder(tmp_path, 'o')}\n"
    )
    async with two_hosts(
        mosquitto.port, [_dom("h10")], hooks=here, b_sections={"hooks": other}
    ) as (_, sched, shared):
        src, dest = shared["names"]
        r = await sched.call(_migrate("h10", dest), timeout=20)
        assert (r["status"], r["code"]) == ("error", "hook-failed"), r
        assert r["details"] == (
            f"hook fence (before-migrate) failed: answered error: on {dest}: no command hook "
            "'fence' with on: destination for before-migrate"
        )
        (where,) = shared["fake-cluster"].locate("h10")
        assert where == src
    assert calls(tmp_path, "fence") == []


async def test_a_destination_agent_that_serves_no_hooks_is_a_timeout(mosquitto, tmp_path):
    here = hooks(
        "- name: fence\n  when: [before-migrate]\n  on: destination\n  timeout: 0.3\n"
        f"  command: {recorder(tmp_path, 'fence')}\n"
    )
    async with two_hosts(mosquitto.port, [_dom("h11")], hooks=here, b_sections={"hooks": ()}) as (
        _,
        sched,
        shared,
    ):
        _, dest = shared["names"]
        r = await sched.call(_migrate("h11", dest), timeout=20)
        assert (r["status"], r["code"]) == ("error", "hook-failed"), r
        assert r["details"] == "hook fence (before-migrate) failed: no answer within 2.3 s"


@pytest.mark.parametrize("policy", ["fail", "warn"])
async def test_reduce_memory_that_cannot_balloon_follows_its_policy(mosquitto, policy):
    config = hooks(f"- name: shrink\n  builtin: reduce-memory\n  policy: {policy}\n")
    async with two_hosts(mosquitto.port, [_dom("h12", memory=2 * GIB)], hooks=config) as (
        agent,
        sched,
        shared,
    ):
        src, dest = shared["names"]
        agent.hypervisor.inject("set-memory")  # type: ignore[attr-defined]
        r = await sched.call(_migrate("h12", dest), timeout=20)
        (where,) = shared["fake-cluster"].locate("h12")
        reason = "hook shrink (before-migrate) failed: injected failure"
        if policy == "fail":
            assert (r["status"], r["code"], r["details"]) == ("error", "hook-failed", reason), r
            assert where == src
        else:
            assert (r["status"], r["details"]) == ("success", reason), r
            assert where == dest
        assert shared["fake-cluster"].domain(where, "h12").balloon is None  # never shrunk
