"""``pscom-hook-procs: auto`` (spec 1.10): the process count comes from a command run in the
guest over SSH. Here the "guest" is a local OpenSSH server (``/usr/sbin/sshd``) on a free
loopback port, with a temporary host key and an authorized key made for the test."""

from __future__ import annotations

import getpass
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from test_migrate_fake import _cluster, _dom, two_hosts
from test_pscom_hook import _task, mpi_procs

from asyncmigfra.errors import HookFailed
from asyncmigfra.peers.pscom import count_processes
from asyncmigfra.settings import PscomSettings
from harness import free_port, wait_port

# Required in CI (the ``pscom`` extra is installed there), skipped locally without it.
asyncssh = __import__("asyncssh") if os.environ.get("CI") else pytest.importorskip("asyncssh")

pytestmark = pytest.mark.broker

SSHD = "/usr/sbin/sshd"


@dataclass
class Sshd:
    port: int
    user: str
    key_file: str
    known_hosts: str

    def settings(self, **kw: object) -> PscomSettings:
        base = PscomSettings(
            ssh_host="127.0.0.1",
            ssh_port=self.port,
            ssh_user=self.user,
            ssh_key_file=self.key_file,
            known_hosts=self.known_hosts,
            ssh_timeout=10.0,
        )
        return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not Path(SSHD).exists():
        why = "sshd (Debian openssh-server) is needed for pscom-hook-procs: auto"
        if os.environ.get("CI"):
            pytest.fail(f"{why}, but it is not installed")
        pytest.skip(why)
    binary = SSHD
    d = tmp_path_factory.mktemp("sshd")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key.write_private_key(str(d / "host_key"))
    (d / "host_key").chmod(0o600)
    user_key = asyncssh.generate_private_key("ssh-ed25519")
    user_key.write_private_key(str(d / "id"))
    (d / "id").chmod(0o600)
    user_key.write_public_key(str(d / "authorized_keys"))
    port = free_port()
    (d / "known_hosts").write_text(
        f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}\n"
    )
    conf = d / "sshd_config"
    conf.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile none\nUsePAM no\n"
        "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nLogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    with (d / "sshd.log").open("wb") as sshd_log:
        proc = subprocess.Popen(
            [binary, "-D", "-e", "-f", str(conf)], stdout=sshd_log, stderr=subprocess.STDOUT
        )
        try:
            wait_port(port)
            yield Sshd(port, getpass.getuser(), str(d / "id"), str(d / "known_hosts"))
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def test_spec_1_10_auto_reads_the_count_from_the_guest(sshd: Sshd) -> None:
    assert await count_processes(sshd.settings(auto_command="echo noise; echo 4"), "vm") == 4


async def test_spec_1_10_default_command_counts_zero_without_mpi(sshd: Sshd) -> None:
    # Neither psid nor Hydra runs on this machine: the original's pipeline counts 0.
    assert await count_processes(sshd.settings(), "vm") == 0


async def test_auto_fails_hook_failed_on_garbage_and_on_a_wrong_host_key(
    sshd: Sshd, tmp_path: Path
) -> None:
    with pytest.raises(HookFailed, match="no process count"):
        await count_processes(sshd.settings(auto_command="echo many"), "vm")
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    (tmp_path / "kh").write_text(f"[127.0.0.1]:{sshd.port} {other}")
    with pytest.raises(HookFailed, match=r"SSH to 127\.0\.0\.1 failed"):
        await count_processes(sshd.settings(known_hosts=str(tmp_path / "kh")), "vm")


async def test_auto_without_host_key_check_connects(sshd: Sshd) -> None:
    assert await count_processes(sshd.settings(known_hosts=None, auto_command="echo 1"), "v") == 1


async def test_auto_count_drives_the_hook_through_mqtt(sshd: Sshd, mosquitto) -> None:
    vm = f"mpi-{uuid.uuid4().hex[:6]}"
    pscom = {
        "ssh_host": "127.0.0.1",
        "ssh_port": sshd.port,
        "ssh_user": sshd.user,
        "ssh_key_file": sshd.key_file,
        "known_hosts": sshd.known_hosts,
        "auto_command": "echo 2",
        "timeout": 5.0,
    }
    async with (
        two_hosts(mosquitto.port, [_dom(vm)], pscom=pscom) as (_, sched, shared),
        mpi_procs(mosquitto.port, vm, {"suspend": 2, "resume": 2}) as mpi,
    ):
        _, dest = shared["names"]
        r = await sched.call(_task(vm, dest, procs="auto"), timeout=20)
        assert (r["status"], r["destination"]) == ("success", dest), r
        assert mpi.requests == [b"suspend", b"resume"]
        assert _cluster(shared).locate(vm) == dest
