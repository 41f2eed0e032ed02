#!/bin/bash
# Do OFD and POSIX byte-0 locks exclude each other across two hosts sharing a network
# filesystem? (issue 15: our virtlockd takes OFD leases, libvirt's C daemon on another
# host POSIX ones.) GlusterFS 10.3: one brick in its own network namespace, two FUSE
# clients ("hosts" A and B) in two more; glusterd's state, logs and run dir bound from a
# scratch dir in a private mount namespace, so the host's /var/lib/glusterd is untouched.
# Needs: glusterfs-server glusterfs-client, /dev/fuse, python3, root. About 15 s.
set -u
W=$(mktemp -d /tmp/vh-ofdgl.XXXX)
NS=vhog$$
FAILS=0
cleanup() {
  for m in mA mB; do umount -l "$W/$m" 2>/dev/null; done
  for f in "$W"/mA.pid "$W"/mB.pid "$W"/glusterd.pid $(find "$W/run" -name '*.pid' 2>/dev/null); do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
  done
  sleep 1
  for n in s a b br; do ip netns del $NS$n 2>/dev/null; done
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W"/{state,log,run,brick,mA,mB}
cp -a /var/lib/glusterd/. "$W/state/"
ip netns add ${NS}br; ip -n ${NS}br link add br0 type bridge; ip -n ${NS}br link set br0 up
i=1; for n in s a b; do
  ip netns add $NS$n
  ip link add $NS$n type veth peer name $NS${n}p
  ip link set $NS$n netns $NS$n; ip link set $NS${n}p netns ${NS}br
  ip -n ${NS}br link set $NS${n}p master br0 up
  ip -n $NS$n link set lo up; ip -n $NS$n addr add 10.79.0.$i/24 dev $NS$n; ip -n $NS$n link set $NS$n up
  i=$((i+1))
done
ip netns exec ${NS}s unshare --mount --propagation private sh -c "
  mount --bind $W/state /var/lib/glusterd && mount --bind $W/log /var/log/glusterfs &&
  mount --bind $W/run /run/gluster && exec glusterd -N -p $W/glusterd.pid" > "$W/glusterd.out" 2>&1 &
for _ in $(seq 1 100); do [ -S "$W/run/glusterd.socket" ] && break; sleep 0.1; done
GDP=$(pgrep -f "^glusterd -N -p $W/glusterd.pid")
G() { nsenter -t "$GDP" -m -n gluster --mode=script "$@" >/dev/null; }
G volume create gv0 10.79.0.1:"$W/brick" force
G volume set gv0 performance.stat-prefetch off
G volume set gv0 performance.open-behind off
G volume start gv0
for c in A B; do
  n=$([ $c = A ] && echo a || echo b)
  nsenter --net=/run/netns/$NS$n glusterfs --volfile-server=10.79.0.1 --volfile-id=gv0 \
    --pid-file="$W/m$c.pid" --log-file="$W/log/m$c.log" "$W/m$c"
done
for _ in $(seq 1 50); do mountpoint -q "$W/mA" && mountpoint -q "$W/mB" && break; sleep 0.1; done
mountpoint -q "$W/mA" && mountpoint -q "$W/mB" || { echo "FAIL FUSE mounts did not come up"; exit 1; }
echo x > "$W/mA/lease"
# hold HOST KIND TYPE: a process on HOST holding a KIND (ofd|posix) TYPE (w|r) lock on byte 0.
hold() {
  python3 - "$W/m$1/lease" "$2" "$3" > "$W/hold.out" 2>&1 <<'P' &
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
cmd = 37 if sys.argv[2] == "ofd" else fcntl.F_SETLK     # F_OFD_SETLK
t = fcntl.F_WRLCK if sys.argv[3] == "w" else fcntl.F_RDLCK
fcntl.fcntl(fd, cmd, struct.pack("hhqqi", t, 0, 0, 1, 0))
print("held", flush=True); time.sleep(600)
P
  HP=$!
  for _ in $(seq 1 50); do grep -q held "$W/hold.out" && return 0; sleep 0.1; done
  echo "FAIL could not take the $2 $3 lock on host $1: $(cat "$W/hold.out")"; FAILS=$((FAILS + 1))
}
# try HOST KIND TYPE -> "ok" or "busy"
try() {
  python3 - "$W/m$1/lease" "$2" "$3" <<'P'
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
cmd = 37 if sys.argv[2] == "ofd" else fcntl.F_SETLK
t = fcntl.F_WRLCK if sys.argv[3] == "w" else fcntl.F_RDLCK
try:
    fcntl.fcntl(fd, cmd, struct.pack("hhqqi", t, 0, 0, 1, 0)); print("ok")
except OSError:
    print("busy")
P
}
check() { # holder-host holder-kind holder-type  trier-kind trier-type  expected
  hold A "$1" "$2"
  local got; got=$(try B "$3" "$4")
  printf '  host A holds %-5s %s, host B tries %-5s %s: %s\n' "$1" "$2" "$3" "$4" "$got"
  [ "$got" = "$5" ] || { echo "FAIL expected $5"; FAILS=$((FAILS + 1)); }
  kill -KILL $HP; wait $HP 2>/dev/null; sleep 0.3
}
echo "OFD vs POSIX byte-0 locks across two GlusterFS FUSE clients:"
check ofd w posix w busy
check ofd w posix r busy
check posix w ofd w busy
check posix w ofd r busy
check ofd r posix r ok
check ofd r posix w busy
check posix r ofd w busy
check ofd w ofd w busy
[ "$(try B posix w)" = ok ] || { echo "FAIL lock not freed after its holder died"; FAILS=$((FAILS + 1)); }
# The crash case: the taker dies while another process (systemd's fd store) keeps a copy
# of its fd. The OFD lock must stay; a POSIX one goes with its process.
survive() { # KIND expected-from-B
  python3 - "$W/mA/lease" "$1" > "$W/keep.out" 2>&1 <<'P' &
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
cmd = 37 if sys.argv[2] == "ofd" else fcntl.F_SETLK
fcntl.fcntl(fd, cmd, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 1, 0))
if os.fork() == 0:
    time.sleep(600); os._exit(0)     # the "store": keeps the fd, takes nothing
print("held", flush=True); time.sleep(600)
P
  local taker=$!
  for _ in $(seq 1 50); do grep -q held "$W/keep.out" && break; sleep 0.1; done
  local keeper; keeper=$(pgrep -P $taker)
  kill -KILL $taker; wait $taker 2>/dev/null; sleep 0.5
  local got; got=$(try B posix w)
  printf '  host A: %-5s lock taker SIGKILLed, a copy of its fd lives on: host B tries posix w: %s\n' "$1" "$got"
  [ "$got" = "$2" ] || { echo "FAIL expected $2"; FAILS=$((FAILS + 1)); }
  kill -KILL $keeper 2>/dev/null; sleep 0.5
  [ "$(try B posix w)" = ok ] || { echo "FAIL $1 lock not freed with the last copy"; FAILS=$((FAILS + 1)); }
}
survive ofd busy
survive posix ok
# What virtlockd relies on when it asks about a lease on a FUSE file system:
# * renewal's probe (virtlockd/src/renewal.rs) asks with F_GETLK from another lock owner
#   and must see an OFD lock's setter by pid (a kernel-local table says -1); F_OFD_GETLK
#   reports every holder with pid -1 here, so it cannot tell ours from another host's;
# * lease_lock::adopt tells our own POSIX lock (a C daemon's exclusive lease, inherited
#   across re-exec) from another owner's by re-asserting it with F_SETLK.
echo "What F_GETLK, F_OFD_GETLK and a POSIX re-assert report through GlusterFS:"
got=$(python3 - "$W/mA/lease" "$W/mB/lease" <<'P'
import fcntl, os, struct, sys
def fl(t): return struct.pack("hhqqi4x", t, 0, 0, 1, 0)
def pid_of(fd, cmd):
    t, _, _, _, p = struct.unpack("hhqqi4x", fcntl.fcntl(fd, cmd, fl(fcntl.F_WRLCK)))
    return p if t == fcntl.F_WRLCK else "unlocked"
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.fcntl(fd, 37, fl(fcntl.F_WRLCK))                    # F_OFD_SETLK
r, w = os.pipe()
if os.fork() == 0:                                        # another lock owner
    a = os.open(sys.argv[1], os.O_RDONLY); b = os.open(sys.argv[2], os.O_RDONLY)
    os.write(w, ("%s %s %s" % (pid_of(a, fcntl.F_GETLK) == os.getppid(),
                               pid_of(b, fcntl.F_GETLK) == os.getppid(),
                               pid_of(a, 36))).encode())  # F_OFD_GETLK
    os._exit(0)
os.wait(); print(os.read(r, 100).decode(), end=" ")
fcntl.fcntl(fd, 37, fl(fcntl.F_UNLCK))
fcntl.fcntl(fd, fcntl.F_SETLK, fl(fcntl.F_WRLCK))          # our own POSIX lock
try:
    fcntl.fcntl(fd, 37, fl(fcntl.F_WRLCK)); print("ofd-over-own-posix:ok", end=" ")
except OSError:
    print("ofd-over-own-posix:busy", end=" ")
print("ofd-getlk-own-posix:%s" % pid_of(fd, 36), end=" ")
fcntl.fcntl(fd, fcntl.F_SETLK, fl(fcntl.F_WRLCK)); print("posix-reassert:ok")
P
)
echo "  $got"
[ "$got" = "True True -1 ofd-over-own-posix:busy ofd-getlk-own-posix:-1 posix-reassert:ok" ] \
  && echo "PASS F_GETLK names an OFD lock's setter on both hosts; a POSIX re-assert finds our own lock" \
  || { echo "FAIL unexpected lock reports: $got"; FAILS=$((FAILS + 1)); }
[ $FAILS = 0 ] && echo "PASS OFD and POSIX locks exclude each other across hosts" || { echo "$FAILS failure(s)"; exit 1; }
