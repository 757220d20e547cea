"""asyncmigfra: an asyncio agent that moves virtual machines on MQTT command.

It is a rebuild of RWTH Aachen's C++ migration framework (migfra) and speaks its wire protocol.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
