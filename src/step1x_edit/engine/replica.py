"""Which replica ran a request: the `x-step1x-replica` response header.

Operators behind a load balancer (or Ray Serve) look at it to see how requests spread. A single-process server is
one replica: its id is the host name and process id, stable for the life of the process. Ray Serve replicas use
their Serve replica id instead (deploy/).
"""

from __future__ import annotations

import os
import re
import socket

HEADER = "x-step1x-replica"
_SAFE = re.compile(r"[^A-Za-z0-9._:#-]")


def header_value(replica_id: str) -> str:
    """The id as a header value (visible ASCII only, bounded)."""
    return _SAFE.sub("_", replica_id)[:128]


def process_replica_id() -> str:
    """`<host>-<pid>`: this process, as long as it runs."""
    return header_value(f"{socket.gethostname()}-{os.getpid()}")
