"""Hypervisor back-ends behind one async Protocol (see :mod:`asyncmigfra.hypervisor.base`).

This package never imports libvirt: the ``libvirt`` back-end lives in its own module and is
loaded through its entry point only when configured.
"""

from asyncmigfra.hypervisor.base import (
    DomainInfo,
    DomainState,
    HostInfo,
    HostLoad,
    Hypervisor,
    HypervisorFactory,
    JobStats,
    MigrationJob,
    MigrationRequest,
    MigrationResult,
    OpContext,
)

__all__ = [
    "DomainInfo",
    "DomainState",
    "HostInfo",
    "HostLoad",
    "Hypervisor",
    "HypervisorFactory",
    "JobStats",
    "MigrationJob",
    "MigrationRequest",
    "MigrationResult",
    "OpContext",
]
