"""modelpool's control plane: the etcd store, the key layout, the planner and the `ctl` CLI."""

import os

# gRPC's fork handlers restart its poller thread in a forked child; when that child is a
# subprocess about to exec (an agent starting an engine, `ctl dev` starting its daemons, a test
# spawning a gateway), Popen's close_fds closes the poller's epoll fd first and the child aborts
# with "epoll_wait error: Bad file descriptor" before it execs (grpc/grpc#43055, grpcio >= 1.81;
# seen once in our CI-like full run). No modelpool process uses gRPC in a forked child without
# exec (gateway workers are forked by a supervisor that never opens a channel), so the handlers
# only do harm. Must be set before grpc is first imported; an explicit setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
