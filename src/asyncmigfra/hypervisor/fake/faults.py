"""Failure injection of the ``fake`` back-end: which operations can be made to fail.

``fail`` (options) and :meth:`~asyncmigfra.hypervisor.fake.FakeHypervisor.inject` take
these names; every injected failure carries :data:`INJECTED` as its message.
"""

from __future__ import annotations

#: Operations that ``fail``/:meth:`FakeHypervisor.inject` can make fail. ``migrate`` fails
#: ``begin_migration`` itself; ``migrate-midway`` lets the job start and fails it half-way
#: through the first memory pass with ``MigrationFailed`` (the guest stays on the source);
#: ``postcopy-break`` breaks the next migration half-way through its post-copy phase: the
#: guest is paused on the source until a resume succeeds, which it can once the back-end's
#: ``postcopy-break-for`` (simulated) seconds have passed.
#: ``migrate-stall`` lets it start and stops its stream half-way through the first memory
#: pass, as a cut network does: it moves no more data until it is aborted.
FAULT_OPS: tuple[str, ...] = (
    "start",
    "stop",
    "suspend",
    "resume",
    "repin",
    "set-memory",
    "migrate",
    "migrate-midway",
    "postcopy-break",
    "migrate-stall",
    "detach-device",
    "attach-device",
    "list-domains",
    "host-info",
    "dirty-rate",
)

INJECTED = "injected failure"
