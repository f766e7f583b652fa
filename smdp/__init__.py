"""The project's command-line entry point and generated gRPC code (smdp.v1).

Importing any of the project's packages first sets one process-wide gRPC default, here, once:
gRPC's fork support is off unless the caller set ``GRPC_ENABLE_FORK_SUPPORT``. With it on, gRPC
restarts its poller thread in a forked child, and a child that closes its inherited descriptors
before exec (``subprocess.Popen`` with ``preexec_fn``, as the Triton launcher and the bench stack
use to tie children to their parent) can abort on ``epoll_wait: Bad file descriptor`` before it
execs (grpc/grpc#43055; seen here as a sidecar that "did not start", exit code -6). Nothing in the
project forks to use gRPC in the child, so nothing needs it. It must be set before gRPC's core
starts, hence the package imports below.

``GRPC_EXPERIMENTS`` is the gRPC core setting ``smdp serve`` runs with (set by ``smdp.cli.main``
before any sub-command's module is imported): gRPC core's EventEngine endpoints
read every socket on threads of their own and hand each event to the thread polling the completion
queue (grpc.aio's poller), which wakes the event loop: one thread hop more per message than the
older iomgr endpoints, where the poller reads the socket itself. On a small, shared machine that hop
cost 0.3-0.5 ms added latency and ~250 us CPU per request (RESULTS.md, section 3). gRPC reads it
once, when its core starts, which importing ``grpc`` does: setting it later does nothing.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints,-event_engine_callback_cq"
