"""The libvirt back-end's post-copy recovery: the resume's flags and the operator's command."""

from __future__ import annotations

import libvirt
from asyncmigfra.hypervisor.base import MigrationRequest
from asyncmigfra.hypervisor.virt.migrationparams import (
    MigrationTarget,
    migration_flags,
    migration_params,
)
from asyncmigfra.hypervisor.virt.postcopy import virsh_resume_command


def test_the_command_a_failed_recovery_names_repeats_the_migration_with_resume() -> None:
    request = MigrationRequest(vm_name="vm3", destination="b", mode="post-copy", bandwidth=8)
    target = MigrationTarget(
        host="b", uri="qemu+tls://b/system", p2p_uri="qemu+tcp://10.0.0.2/system",
        migrate_uri="tcp://10.0.0.2",
    )  # fmt: skip
    flags = migration_flags(request, persistent=True)
    assert flags & libvirt.VIR_MIGRATE_POSTCOPY
    command = virsh_resume_command(
        "qemu:///system", "vm3", target, flags, migration_params(request, target)
    )
    assert command == (
        "virsh -c qemu:///system migrate --live --p2p --postcopy --persistent --undefinesource"
        " --postcopy-resume --migrateuri tcp://10.0.0.2 --bandwidth 8"
        " vm3 qemu+tcp://10.0.0.2/system"
    )
