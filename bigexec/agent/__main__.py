"""``python -m bigexec.agent --bootstrap PATH [--host HOST]``: run an instance's agent."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from .. import tls
from ..rpc.server import Server
from ..service import ServiceRegistry
from . import ANNOUNCE_PREFIX, imds
from .document import DEFAULT_PATH, AgentDocument
from .runtime import Agent, AgentService

#: Next to the environment the user-data installs (a directory of bigexec's own).
DEFAULT_BUNDLES = "/opt/bigexec/bundles"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bigexec.agent",
                                     description="Serve an instance's bigexec agent.")
    parser.add_argument("--bootstrap", default=DEFAULT_PATH,
                        help="the bootstrap document (deleted once read; default %(default)s)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="the address to serve on (default %(default)s)")
    parser.add_argument("--bundles", default=DEFAULT_BUNDLES,
                        help="where the driver's code bundles are kept (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("BIGEXEC_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        doc = AgentDocument.read_and_delete(args.bootstrap)
    except (OSError, ValueError) as exc:
        print(f"bigexec agent: cannot use the bootstrap document {args.bootstrap}: {exc}",
              file=sys.stderr, flush=True)
        return 2
    notices = None
    instance_id = doc.instance_id
    if instance_id is None:  # on an instance: its metadata service says, and gives notices
        metadata = imds.Metadata()
        try:
            instance_id = metadata.instance_id()
        except (OSError, ValueError) as exc:  # not on an instance, or its metadata is off
            print(f"bigexec agent: the document names no instance and the instance metadata "
                  f"service did not say: {exc}", file=sys.stderr, flush=True)
            return 2
        notices = metadata.spot_notice
    agent = Agent(session=doc.session, instance_id=instance_id, lease=doc.lease,
                  poweroff=doc.poweroff, notices=notices, bundles=args.bundles)
    registry = ServiceRegistry()
    registry.add("Agent", AgentService(agent))
    server = Server(registry, ssl_context=tls.server_context(doc.credentials), host=args.host,
                    port=doc.port)
    def serve_with(creds: tls.Credentials) -> None:
        server.ssl_context = tls.server_context(creds)

    agent.on_credentials = serve_with
    agent.start_watchdog()
    print(f"{ANNOUNCE_PREFIX}{server.start()}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(3600):
        pass
    server.close()
    agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
