#!/usr/bin/python3
"""A lock owner that drops its virtlockd connection while still alive, as a QEMU whose
inherited lock connection got closed would: virtlockd must then kill it.

    lockowner.py SOCKET LOCKSPACE RESOURCE UID

Connects (as root: the socket is 0600), registers itself (owner pid = own pid, which is
also the connection's peer pid), creates LOCKSPACE, acquires RESOURCE (autocreate),
restricts the connection, switches to UID (as QEMU runs as libvirt-qemu), closes the
connection, prints "closed" and sleeps. Exit 3 if a call fails."""
import os
import socket
import struct
import sys
import time

PROG, VERS = 0xEA7BEEF, 1
REGISTER, RESTRICT, ACQUIRE, CREATE_LOCKSPACE = 1, 2, 6, 8
AUTOCREATE = 2


def xstr(s):
    b = s.encode()
    return struct.pack(">I", len(b)) + b + b"\0" * (-len(b) % 4)


def call(sock, serial, proc, payload):
    body = struct.pack(">IIiIII", PROG, VERS, proc, 0, serial, 0) + payload
    sock.sendall(struct.pack(">I", len(body) + 4) + body)
    (length,) = struct.unpack(">I", recv_exact(sock, 4))
    reply = recv_exact(sock, length - 4)
    status = struct.unpack(">I", reply[20:24])[0]
    if status != 0:
        print("call %d failed: %r" % (proc, reply[24:]), flush=True)
        sys.exit(3)


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            print("connection closed by the daemon", flush=True)
            sys.exit(3)
        buf += chunk
    return buf


def main():
    path, lockspace, resource, uid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    call(s, 0, CREATE_LOCKSPACE, xstr(lockspace))
    owner = b"\x42" * 16 + xstr("lockowner") + struct.pack(">II", 1, os.getpid())
    call(s, 1, REGISTER, owner + struct.pack(">I", 0))
    call(s, 2, ACQUIRE, xstr(lockspace) + xstr(resource) + struct.pack(">I", AUTOCREATE))
    call(s, 3, RESTRICT, struct.pack(">I", 0))
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    # Announce first: virtlockd may kill us as soon as the connection is gone.
    print("closing", os.getpid(), flush=True)
    s.close()
    time.sleep(600)


main()
