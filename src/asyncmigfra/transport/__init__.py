"""Role: transport. The MQTT session and the queue of outgoing messages.

- :mod:`~asyncmigfra.transport.mqtt`: the MQTT transport, the only package that imports
  aiomqtt (and paho);
- :mod:`~asyncmigfra.transport.publishing`: outgoing messages, one queue handed to the MQTT
  session in order.

The package re-exports nothing; import from the defining module.
"""
