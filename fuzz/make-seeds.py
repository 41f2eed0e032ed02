#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets from libvirt 9.0 fixtures.

Usage: fuzz/make-seeds.py FIXTURES_DIR [OUT_DIR]

FIXTURES_DIR holds virtlogd-9.0-transcripts.json, virtlockd-9.0-transcripts.json and
the *-restart-exec.json state files (the repository's fixtures/ directory). OUT_DIR
defaults to fuzz/corpus/; its subdirectories are named after the targets. Run by hand
when the fixtures change; the targets never read the fixtures themselves.
"""
import hashlib
import json
import os
import struct
import sys

fix = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

LOG, LOCK, ADMIN = 0x87539319, 0x0EA7BEEF, 0x06900690


def write(target, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frames(conn):
    """The client's messages of one connection, each a whole frame (length word first)."""
    buf = b"".join(bytes.fromhex(e["hex"]) for e in conn["events"]
                   if e["dir"] == "client->daemon" and not e.get("scm_rights_fds"))
    res = []
    while len(buf) >= 4:
        n = struct.unpack(">I", buf[:4])[0]
        res.append(buf[:n])
        buf = buf[n:]
    return res


def qemu_pid(body):
    """REGISTER of a connection that also RESTRICTs: QEMU's own; pid 1 = the harness."""
    h = struct.unpack(">IIiiIi", body[:24])
    if h[0] != LOCK or h[2] != 1:
        return body
    p = bytearray(body)
    namelen = struct.unpack(">I", p[24 + 16:24 + 20])[0]
    off = 24 + 16 + 4 + ((namelen + 3) & ~3) + 4
    p[off:off + 4] = struct.pack(">I", 1)
    return bytes(p)


def seq_connection(kind, fs, qemu=False):
    s = bytes([0, kind])
    for f in fs:
        body = f[4:]
        if qemu:
            body = qemu_pid(body)
        s += bytes([2, 0]) + struct.pack(">H", len(body)) + body
        prog, proc_ = struct.unpack(">Ii", body[:4] + body[8:12])
        if prog == LOG and proc_ == 1:
            # Something for the new log's pipe.
            line = b"2023-01-01 00:00:00.000+0000: starting up\n"
            s += bytes([4, 0xff]) + struct.pack(">H", len(line)) + line
    return s


for daemon in ("virtlogd", "virtlockd"):
    conns = json.load(open(os.path.join(fix, f"{daemon}-9.0-transcripts.json")))
    combined = bytes([1, 3])
    for c in conns:
        fs = frames(c)
        if not fs:
            continue
        for f in fs:
            write("rpc_decode", f)
        prog = struct.unpack(">I", fs[0][4:8])[0]
        kind = {LOG: 0, LOCK: 1, ADMIN: 2}.get(prog, 1)
        procs = [struct.unpack(">i", f[12:16])[0] for f in fs]
        qemu = prog == LOCK and 2 in procs
        one = seq_connection(kind, fs, qemu)
        write("server_sequence", bytes([1, 3]) + one)
        combined += one
        if qemu:
            combined += bytes([1, 0xff])  # QEMU's connection goes: its leases are released
    write("server_sequence", combined + bytes([6, 7]))

for name in sorted(os.listdir(fix)):
    if name.endswith("-restart-exec.json"):
        write("restart_state", open(os.path.join(fix, name), "rb").read())

confs = [
    b"",
    b"log_level = 1\nlog_filters = \"1:util 3:rpc\"\nlog_outputs = \"3:syslog:virtlogd 1:file:/var/log/x.log\"\n",
    b"# virtlogd.conf\nmax_clients = 1024\nadmin_max_clients = 5000\nmax_size = 2097152\nmax_backups = 3\n",
    b"max_size = -1; max_backups = 99999999999999999999\nlog_level = 4\n",
    b"x = [ 'a', \"b\", ]\ny = \"\"\"multi\nline\"\"\"\nz = 'q'\nlog_outputs = [ 1 ]\n",
    b"log_filters=\"\"\nlog_outputs=\"1:journald 2:stderr\"\nmax_clients=0\n",
]
for c in confs:
    write("config_parse", c)
