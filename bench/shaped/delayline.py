#!/usr/bin/env python3
"""A delay line between two TUN devices: one in the current network namespace, one in a new
network namespace this process makes (it lives as long as the process: enter it with
`nsenter --net=/proc/PID/ns/net`). Every packet read from one side is written to the other DELAY_MS later, in
order (a fixed one-way delay, what netem's `delay` does; this machine's kernel has no netem).
The rate limit is the kernel's: an htb qdisc on each TUN device (see link.sh).

    delayline.py HOST_IF NS_IF DELAY_MS

Prints "ready" once both devices exist; runs until killed.
"""
import collections
import ctypes
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def main():
    host_if, ns_if, delay_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    delay = delay_ms / 1000.0
    a = open_tun(host_if)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        sys.exit(f"delayline: unshare(CLONE_NEWNET): errno {ctypes.get_errno()}")
    b = open_tun(ns_if)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    other = {a: b, b: a}
    queues = {a: collections.deque(), b: collections.deque()}  # packets read from fd
    while True:
        now = time.monotonic()
        timeout = None
        for fd, q in queues.items():
            while q and q[0][0] <= now:
                try:
                    os.write(other[fd], q.popleft()[1])
                except OSError:
                    pass  # the device's queue is full or it went down: the packet is lost
            if q:
                wait = q[0][0] - now
                timeout = wait if timeout is None else min(timeout, wait)
        ready, _, _ = select.select([a, b], [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            for _ in range(256):
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                queues[fd].append((now + delay, pkt))


if __name__ == "__main__":
    main()
