"""examples/client.py, run as a user would, against mosquitto and two agents on the fake
hypervisor in this process (one simulated cluster, so the VM really changes hosts)."""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import replace

import pytest
import yaml
from console_support import ROOT, env

from asyncmigfra.settings import HypervisorSettings
from harness import agent_settings, running_agent

pytestmark = pytest.mark.broker

GIB = 1024 * 1024  # KiB


async def test_client_example_prints_progress_until_the_result(mosquitto):
    shared: dict[str, object] = {}
    sa = agent_settings(mosquitto.port, hv_type="fake", agent={"progress_interval": 0.1})
    name_a = sa.hostname
    name_b = name_a.replace("t-", "b-")
    spec = {"cpus": 8, "memory": 64 * GIB}
    vm = {"name": "app", "vcpus": 1, "memory": GIB, "state": "running", "dirty-rate": 20}
    opts_a = {"host": name_a, "peers": {name_b: spec}, "domains": [vm], "bandwidth": 1000}
    opts_b = {"host": name_b, "peers": {name_a: spec}, "bandwidth": 1000}
    sa = replace(sa, hypervisor=HypervisorSettings(type="fake", options=opts_a))
    sb = agent_settings(
        mosquitto.port, hostname=name_b, hv_type="fake", hv_options=opts_b,
        agent={"progress_interval": 0.1},
    )  # fmt: skip
    async with running_agent(sa, shared=shared), running_agent(sb, shared=shared):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples/client.py"), "app",
            "--from", name_a, "--to", name_b, "--broker", f"127.0.0.1:{mosquitto.port}",
            "--timeout", "30",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env(),
        )  # fmt: skip
        out_b, err_b = await asyncio.wait_for(proc.communicate(), 40)
        cluster = shared["fake-cluster"]
        assert cluster.locate("app") == [name_b]  # type: ignore[attr-defined]
    out = out_b.decode()
    assert proc.returncode == 0, out + err_b.decode()
    lines = out.splitlines()
    assert re.fullmatch(rf"sent client-\w+: migrate app from {name_a} to {name_b}", lines[0])
    assert lines[1] == "accepted  migrate vm"
    assert "phase     migrating" in lines  # (agents may add phases before it)
    percents = [float(m.group(1)) for ln in lines if (m := re.match(r"progress +([\d.]+) %", ln))]
    assert len(set(percents)) >= 3, out
    assert percents == sorted(percents)
    assert percents[-1] == 100.0
    assert any(ln.startswith("done      success in ") for ln in lines)
    result = yaml.safe_load(out.split("result:\n", 1)[1])
    assert (result["result"], result["status"], result["destination"]) == (
        "vm migrated",
        "success",
        name_b,
    )
    assert result["id"] == lines[0].split()[1].rstrip(":")
