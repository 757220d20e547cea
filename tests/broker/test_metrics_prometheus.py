"""A real Prometheus scrapes an agent (``fake`` back-end, real mosquitto) while migrations run.

Debian's ``prometheus`` (installed by ``./dev test``) is started with a 1 s scrape and rule
evaluation interval. PromQL through its HTTP API finds the migration's series with its
labels and a remaining-bytes value that falls; the shipped alert rules (their thresholds
shortened in a copy) fire ``AsyncmigfraMigrationStuck`` on a migration stalled by the fake
back-end's ``migrate-stall`` fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from asyncmigfra.app import Agent
from asyncmigfra.settings import HypervisorSettings
from harness import Scheduler, agent_settings, free_port, need, running_agent, scheduler

pytestmark = [pytest.mark.broker, pytest.mark.slow]

GIB = 1024 * 1024  # KiB
RULES = Path(__file__).resolve().parents[2] / "config" / "prometheus" / "asyncmigfra.rules.yml"


@dataclass
class Prometheus:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]


def quick_rules(text: str) -> str:
    """The shipped rules with the stuck threshold at 3 s and every ``for:`` at 1 s."""
    text, stuck = re.subn(r"> 120\)", "> 3)", text)
    text, waits = re.subn(r"for: \w+", "for: 1s", text)
    assert (stuck, waits) == (1, 3), "the shipped rules changed: update quick_rules"
    return text


@contextlib.contextmanager
def prometheus(tmp_path: Path, target_port: int) -> Iterator[Prometheus]:
    binary = need("prometheus", "the metrics test scrapes the agent with a real Prometheus")
    (tmp_path / "rules.yml").write_text(quick_rules(RULES.read_text()))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files: [rules.yml]\n"
        "scrape_configs:\n  - job_name: asyncmigfra\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(port, proc, log)
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def until(check: Any, what: str, timeout: float = 30.0) -> Any:
    """Poll ``check`` (in a thread: it does HTTP) until it returns something true; an HTTP
    error (503 while Prometheus starts) counts as not yet."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                found = await asyncio.to_thread(check)
            except OSError:
                found = None
            if found:
                return found
            await asyncio.sleep(0.5)
    raise AssertionError(what)  # pragma: no cover - the timeout raises first


@contextlib.asynccontextmanager
async def two_hosts(
    port: int, metrics_port: int
) -> AsyncIterator[tuple[Agent, Scheduler, str, str]]:
    """Agent ``t-*`` (metrics on, two VMs) and ``b-*`` sharing one fake cluster."""
    shared: dict[str, object] = {}
    sa = agent_settings(port, hv_type="fake", metrics={"listen": f"127.0.0.1:{metrics_port}"})
    name_a = sa.hostname
    name_b = name_a.replace("t-", "b-")
    spec = {"cpus": 64, "memory": 256 * GIB}
    # 300 MiB/s: 2 GiB take ~7 s, long enough for several scrapes.
    domains = [
        {"name": "flow", "vcpus": 1, "memory": 2 * GIB, "state": "running"},
        {"name": "stall", "vcpus": 1, "memory": 2 * GIB, "state": "running"},
    ]
    opts_a = {"host": name_a, "peers": {name_b: spec}, "domains": domains, "bandwidth": 300}
    sa = replace(sa, hypervisor=HypervisorSettings(type="fake", options=opts_a))
    opts_b = {"host": name_b, "peers": {name_a: spec}, "bandwidth": 300}
    sb = agent_settings(port, hostname=name_b, hv_type="fake", hv_options=opts_b)
    prefix = sa.mqtt.task_topic.rsplit("/", 1)[0]
    async with (
        scheduler(port, prefix) as sched,
        running_agent(sa, shared=shared) as agent_a,
        running_agent(sb, shared=shared),
    ):
        yield agent_a, sched, name_a, name_b


async def test_prometheus_scrapes_a_migration_and_fires_the_stuck_alert(mosquitto, tmp_path):
    metrics_port = free_port()
    with prometheus(tmp_path, metrics_port) as prom:
        async with two_hosts(mosquitto.port, metrics_port) as (agent, sched, a, b):
            await until(
                lambda: prom.api("query", query='up{job="asyncmigfra"} == 1')["result"],
                "Prometheus never scraped the agent",
            )
            agent.hypervisor.inject("migrate-stall")  # type: ignore[attr-defined]
            await sched.publish(
                f"id: m-stall\ntask: migrate vm\nvm-name: stall\ndestination: {b}\n"
                "parameter:\n  migration-type: live\n"
            )
            await sched.wait_for(lambda: sched.events_for("m-stall", "progress"), 10)
            await sched.publish(
                f"id: m-flow\ntask: migrate vm\nvm-name: flow\ndestination: {b}\n"
                "parameter:\n  migration-type: live\n"
            )

            # The stalled migration: the shipped rule (3 s threshold here) fires.
            def stuck() -> list[dict[str, Any]]:
                alerts = prom.api("alerts")["alerts"]
                return [
                    x
                    for x in alerts
                    if x["labels"]["alertname"] == "AsyncmigfraMigrationStuck"
                    and x["state"] == "firing"
                ]

            firing = await until(stuck, "the stuck-migration alert never fired")
            print("firing:", json.dumps(firing))
            assert [
                (x["labels"]["vm"], x["labels"]["source"], x["labels"]["destination"])
                for x in firing
            ] == [("stall", a, b)]

            result = await sched.result_for("m-flow", timeout=60)
            assert result["status"] == "success"
            # Two more scrapes, so the last figures are stored.
            await asyncio.sleep(2.5)
            query = 'asyncmigfra_migration_data_remaining_bytes{vm="flow"}'
            data = await asyncio.to_thread(
                prom.api,
                "query",
                query=f"{query}[60s]",
            )
            print(f"PromQL {query}[60s] ->", json.dumps(data))
            (series,) = data["result"]
            labels = series["metric"]
            assert (labels["vm"], labels["source"], labels["destination"]) == ("flow", a, b)
            assert labels["job"] == "asyncmigfra"
            values = [float(v) for _, v in series["values"]]
            assert len(set(values)) >= 3, values
            assert values == sorted(values, reverse=True), "remaining bytes must fall"
            assert values[0] > 0
            assert values[-1] == 0

            phase = await asyncio.to_thread(
                prom.api, "query", query='asyncmigfra_migration_phase{vm="flow"} == 1'
            )
            assert [r["metric"]["phase"] for r in phase["result"]] == ["succeeded"]
            done = await asyncio.to_thread(
                prom.api,
                "query",
                query='asyncmigfra_tasks_total{task="migrate vm",result="success"}',
            )
            assert [r["value"][1] for r in done["result"]] == ["1"]
            await sched.publish("id: c1\ntask: cancel\ntarget: m-stall\n")
            cancelled = await sched.result_for("m-stall", timeout=15)
            assert cancelled["code"] == "cancelled"


def test_shipped_rules_and_scrape_example_pass_promtool():
    promtool = need("promtool", "the shipped alert rules must load into Prometheus")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 3 rules found" in checked.stdout
    # Their unit tests: when each alert fires, with which labels and text, and when not.
    tested = subprocess.run(
        [promtool, "test", "rules", "asyncmigfra.rules.test.yml"],
        capture_output=True,
        text=True,
        check=False,
        cwd=RULES.parent,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    example = RULES.parent / "prometheus.example.yml"
    checked = subprocess.run(
        [promtool, "check", "config", str(example)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
