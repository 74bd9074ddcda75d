"""The instance agent: ``python -m bigexec.agent --bootstrap /run/bigexec/agent.json``.

On a machine that a cloud system launched (an EC2 instance), the user-data writes the agent's
bootstrap document (``document.AgentDocument``: session, instance id, port, first lease, the
agent's leaf certificate and key and the CA's certificate, the poweroff command) and starts
the agent, which reads the document, deletes it, and serves the "Agent" service
(``runtime.AgentService``) with mutual TLS on bigexec's own RPC server: only clients whose
certificates the session's CA signed get in, so the driver talks to it with bigexec's
``Client``. Through it the driver starts worker processes (``workers.WorkerProcess``), learns
their addresses, reads their output, sees how they ended, and holds the agent's lease: when
the lease lapses (the driver is gone) the agent kills its workers and powers the instance off.

The agent uses the standard library and what bigexec already needs, nothing else.
"""

from __future__ import annotations

from .document import AgentDocument
from .runtime import Agent, AgentService, LeaseLapsed

__all__ = ["ANNOUNCE_PREFIX", "Agent", "AgentDocument", "AgentService", "LeaseLapsed"]

#: Starts the line in which the agent, on its stdout, says the address it serves at.
ANNOUNCE_PREFIX = "bigexec-agent-listening "
