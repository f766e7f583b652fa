"""Children started with ``preexec_fn`` while gRPC runs must not die before exec.

gRPC's fork support (on by default in grpcio) restarts its poller in a forked child; a child that
closes its inherited descriptors before exec aborts now and then on ``epoll_wait: Bad file
descriptor`` (grpc/grpc#43055). The Triton launcher and the bench stack start children that way, and
a sidecar that "did not start (exit code -6)" was seen in a demo run. Importing the project turns
fork support off (smdp/__init__.py); this runs the pattern many times in a fresh interpreter.
"""

import os
import subprocess
import sys

SCRIPT = r"""
import sys
import {module}  # the project's process-wide gRPC defaults (or, for the control run, none)
import subprocess
from concurrent import futures

import grpc

server = grpc.server(futures.ThreadPoolExecutor(2))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
channel = grpc.insecure_channel(f"127.0.0.1:{{port}}")
try:
    grpc.channel_ready_future(channel).result(timeout=5)
except grpc.FutureTimeoutError:
    pass
died = sum(subprocess.run(["true"], preexec_fn=lambda: None, close_fds=True).returncode != 0 for _ in range({n}))
server.stop(0)
print(died)
"""


def _children_that_died(module: str, n: int) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(module=module, n=n)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_importing_the_project_keeps_preexec_children_alive():
    assert _children_that_died("plugin", 300) == 0
