"""Resuming a post-copy migration whose connection broke after the switch (libvirt >= 8.5,
QEMU >= 7): :class:`LibvirtPostCopyRecovery` and :func:`find_broken_post_copy`.

What the rig measured (libvirt 9.0, QEMU 7.2, docs/operations.md "Post-copy recovery"):

* when the migration stream breaks in post-copy, the migrate call fails (``operation failed:
  job 'migration in' failed in post-copy phase``, or ``client socket is closed`` when
  libvirtd's own peer-to-peer connection timed out), the source domain stays **paused** with
  reason ``VIR_DOMAIN_PAUSED_POSTCOPY_FAILED`` and still shows its outgoing job in
  ``jobStats()``; the destination domain is **running** (``VIR_DOMAIN_RUNNING_POSTCOPY_FAILED``)
  with its vCPUs waiting for the pages still on the source;
* the same migrate call with ``VIR_MIGRATE_POSTCOPY_RESUME`` added (same URIs, flags and
  parameters) finishes the migration; while the link is down it fails at once;
* when libvirt gave up on the job but QEMU's stream was still alive (libvirtd's keepalive
  expired before TCP gave up), the resume is refused with ``QEMU reports migration is still
  running``: ``abortJobFlags(VIR_DOMAIN_ABORT_JOB_POSTCOPY)`` pauses QEMU's migration, after
  which the resume works.

Each attempt is a fresh :class:`LibvirtMigrationJob` whose flags carry the resume flag: the
same blocking call on a private connection, the same events, statistics and conclusion.
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

import libvirt
from asyncmigfra.errors import NotSupported, TaskError
from asyncmigfra.hypervisor.base import (
    JobStats,
    MigrationRequest,
    MigrationResult,
    PostCopySourceState,
)
from asyncmigfra.hypervisor.virt.domains import _PAUSED, _RUNNING
from asyncmigfra.hypervisor.virt.errors import _code, _message
from asyncmigfra.hypervisor.virt.guestlook import guest_look
from asyncmigfra.hypervisor.virt.migration import LibvirtMigrationJob
from asyncmigfra.hypervisor.virt.migrationparams import (
    MigrationTarget,
    migration_flags,
    migration_params,
)

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.virt.backend import LibvirtHypervisor

__all__ = ["LibvirtPostCopyRecovery", "find_broken_post_copy", "virsh_resume_command"]

log = structlog.stdlib.get_logger("asyncmigfra.hypervisor.virt")

#: libvirt's refusal when it gave up on the job but QEMU's migration still runs.
_STILL_RUNNING = "migration is still running"


def _broken(dom: Any) -> bool:
    state, reason = dom.state()
    return bool(state == _PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)


class LibvirtPostCopyRecovery:
    """A broken post-copy migration of ``request`` (see the module docstring); implements
    :class:`~asyncmigfra.hypervisor.base.PostCopyRecovery`."""

    def __init__(
        self,
        hypervisor: LibvirtHypervisor,
        *,
        uri: str,
        request: MigrationRequest,
        target: MigrationTarget,
        flags: int,
        params: dict[str, object],
    ) -> None:
        self._hv = hypervisor
        self._uri = uri
        # The downtime target is a pre-copy setting: nothing to set when resuming.
        self.request = replace(request, initial_downtime=None)
        self.target = target
        self.flags = flags
        self.params = params
        self._attempt: LibvirtMigrationJob | None = None
        self._last: JobStats | None = None

    def __repr__(self) -> str:
        return f"LibvirtPostCopyRecovery({self.request.vm_name!r} -> {self.target.host})"

    async def resume_post_copy(self) -> MigrationResult:
        job = LibvirtMigrationJob(
            self._hv,
            uri=self._uri,
            request=self.request,
            target=self.target,
            flags=self.flags | libvirt.VIR_MIGRATE_POSTCOPY_RESUME,
            params=self.params,
        )
        job._post_copy = True  # the switch happened before the break
        self._attempt = job
        try:
            await job._start()
            return await job.wait()
        except TaskError as exc:
            cause = exc.__cause__
            if isinstance(cause, libvirt.libvirtError):
                if _code(cause) in (libvirt.VIR_ERR_INVALID_ARG,) and "flags" in _message(cause):
                    raise NotSupported(f"{exc} (this libvirt cannot resume post-copy)") from cause
                if _STILL_RUNNING in _message(cause):
                    await self._pause_stream()
            raise
        finally:
            self._last = job._last or self._last
            self._attempt = None

    async def _pause_stream(self) -> None:
        """libvirt gave up on the job while QEMU's stream still runs (its keepalive expired
        first): pause QEMU's post-copy so that the next attempt can resume it."""

        def pause(conn: Any) -> None:
            dom = conn.lookupByName(self.request.vm_name)
            dom.abortJobFlags(libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY)

        try:
            await self._hv._call(self._uri, pause)
            log.info("migration.post_copy_paused_for_recovery", vm=self.request.vm_name)
        except (libvirt.libvirtError, TaskError) as exc:
            log.warning("migration.post_copy_pause_failed", error=str(exc))

    async def stats(self) -> JobStats | None:
        attempt = self._attempt
        if attempt is not None and not attempt.done:
            stats = await attempt.stats()
            if stats is not None:
                self._last = stats
        return self._last

    async def source_state(self) -> PostCopySourceState:
        def look(conn: Any) -> PostCopySourceState:
            try:
                dom = conn.lookupByName(self.request.vm_name)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    return "left"
                raise
            if not dom.isActive():
                return "left" if not self.request.persist else "other"
            return "broken" if _broken(dom) else "other"

        return await self._hv._call(self._uri, look)

    async def describe(self) -> str:
        source, destination = self._hv.hostname, self.target.host
        here = await self._state_text(self._uri)
        there = await self._state_text(self.target.uri)
        command = virsh_resume_command(
            self._hv.uri, self.request.vm_name, self.target, self.flags, self.params
        )
        return (
            f"the guest is {here} on {source} and {there} on {destination}, where its vCPUs "
            f"wait for the memory still on {source}; resume it by hand with `{command}` (on "
            f"{source}), or send the migrate task again: the agent resumes a broken post-copy "
            "it finds"
        )

    async def _state_text(self, uri: str) -> str:
        def look(conn: Any) -> str:
            try:
                dom = conn.lookupByName(self.request.vm_name)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    return "not defined"
                raise
            state, reason = dom.state()
            if state == _PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED:
                return "paused (post-copy failed)"
            if state == _RUNNING and reason == libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED:
                return "running (post-copy failed)"
            if state == _PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY:
                return "paused (post-copy)"
            if state == _RUNNING and reason == libvirt.VIR_DOMAIN_RUNNING_POSTCOPY:
                return "running (post-copy)"
            return {_PAUSED: "paused", _RUNNING: "running"}.get(int(state), f"in state {state}")

        try:
            return await self._hv._call(uri, look)
        except (libvirt.libvirtError, TaskError) as exc:
            return f"in an unknown state ({exc})"


#: libvirt flag -> virsh migrate option, for the command a failed recovery names.
_VIRSH_FLAGS = (
    (libvirt.VIR_MIGRATE_LIVE, "--live"),
    (libvirt.VIR_MIGRATE_PEER2PEER, "--p2p"),
    (libvirt.VIR_MIGRATE_POSTCOPY, "--postcopy"),
    (libvirt.VIR_MIGRATE_PERSIST_DEST, "--persistent"),
    (libvirt.VIR_MIGRATE_UNDEFINE_SOURCE, "--undefinesource"),
    (libvirt.VIR_MIGRATE_PAUSED, "--suspend"),
    (libvirt.VIR_MIGRATE_AUTO_CONVERGE, "--auto-converge"),
    (libvirt.VIR_MIGRATE_COMPRESSED, "--compressed"),
    (libvirt.VIR_MIGRATE_TLS, "--tls"),
    (libvirt.VIR_MIGRATE_PARALLEL, "--parallel"),
    (libvirt.VIR_MIGRATE_NON_SHARED_DISK, "--copy-storage-all"),
    (libvirt.VIR_MIGRATE_NON_SHARED_INC, "--copy-storage-inc"),
)


def virsh_resume_command(
    uri: str, vm_name: str, target: MigrationTarget, flags: int, params: dict[str, object]
) -> str:
    """The ``virsh migrate --postcopy-resume`` command line that resumes this migration."""
    words = ["virsh", "-c", uri, "migrate"]
    words += [option for flag, option in _VIRSH_FLAGS if flags & flag]
    words.append("--postcopy-resume")
    migrate_uri = params.get(libvirt.VIR_MIGRATE_PARAM_URI)
    if migrate_uri:
        words += ["--migrateuri", str(migrate_uri)]
    bandwidth = params.get(libvirt.VIR_MIGRATE_PARAM_BANDWIDTH)
    if bandwidth:
        words += ["--bandwidth", str(bandwidth)]
    connections = params.get(libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS)
    if connections:
        words += ["--parallel-connections", str(connections)]
    dest = target.p2p_uri if flags & libvirt.VIR_MIGRATE_PEER2PEER else target.uri
    words += [vm_name, dest]
    return shlex.join(words)


async def find_broken_post_copy(
    hv: LibvirtHypervisor, request: MigrationRequest
) -> LibvirtPostCopyRecovery | None:
    """A recovery handle when ``request``'s guest is paused on this host in the
    post-copy-failed state, else ``None``. The flags and parameters are rebuilt from the
    request as :meth:`LibvirtHypervisor.begin_migration` built them (libvirt wants the
    original ones with the resume flag)."""
    uri = hv._local_uri(request.driver)
    name = request.vm_name

    def look(conn: Any) -> tuple[bool, bool]:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return False, False
            raise
        return _broken(dom), bool(dom.isPersistent())

    try:
        guest = await guest_look(hv, uri, name)
        if guest is not None:
            failed = libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED
            broken = guest.state == _PAUSED and guest.reason == failed
            persistent = guest.persistent
        else:
            broken, persistent = await hv._call(uri, look)
    except (libvirt.libvirtError, TaskError) as exc:
        log.warning("migration.post_copy_state_unknown", vm=name, error=str(exc))
        return None
    if not broken:
        return None
    target = await hv.resolve_destination(
        request.destination, driver=request.driver, transport=request.transport, rdma=request.rdma
    )
    # A storage copy's disks were in sync before the switch: the resume copies memory only,
    # and the domain's storage record stays for the job's own conclusion.
    return LibvirtPostCopyRecovery(
        hv,
        uri=uri,
        request=request,
        target=target,
        flags=migration_flags(request, persistent=persistent),
        params=migration_params(request, target),
    )
