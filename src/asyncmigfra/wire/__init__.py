"""Role: wire. What travels on MQTT, as bytes: task payloads in, results and events out.

- :mod:`~asyncmigfra.wire.parsing`: task payload -> :class:`~asyncmigfra.model.TaskMessage`;
- :mod:`~asyncmigfra.wire.rendering`: results and events -> YAML bytes;
- :mod:`~asyncmigfra.wire.events`: the event records streamed while tasks run;
- :mod:`~asyncmigfra.wire.patterns`: name patterns from the wire, matched in linear time.

The package re-exports nothing; import from the defining module.
"""
