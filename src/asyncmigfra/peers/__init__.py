"""Role: peers. Talking to other agents and to the guests' processes over the message bus.

- :mod:`~asyncmigfra.peers.bus`: messages between agents and the :class:`MessageBus` they
  travel on;
- :mod:`~asyncmigfra.peers.lanes`: holding a VM's lane on another agent (a swap's
  coordination with the destination's agent);
- :mod:`~asyncmigfra.peers.pscom`: the pscom hook, MPI processes told to suspend and resume
  around a migration;
- :mod:`~asyncmigfra.peers.userhooks`: configured pre/post hooks (commands and MQTT requests).

The package re-exports nothing; import from the defining module.
"""
