"""The project's command-line entry point and generated gRPC code (smdp.v1).

Importing any of the project's packages first sets one process-wide gRPC default, here, once:
gRPC's fork support is off unless the caller set ``GRPC_ENABLE_FORK_SUPPORT``. With it on, gRPC
restarts its poller thread in a forked child, and a child that closes its inherited descriptors
before exec (``subprocess.Popen`` with ``preexec_fn``, as the Triton launcher and the bench stack
use to tie children to their parent) can abort on ``epoll_wait: Bad file descriptor`` before it
execs (grpc/grpc#43055; seen here as a sidecar that "did not start", exit code -6). Nothing in the
project forks to use gRPC in the child, so nothing needs it. It must be set before gRPC's core
starts, hence the package imports below.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
