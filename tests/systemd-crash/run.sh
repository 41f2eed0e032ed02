#!/bin/bash
# Crash survival under a real systemd (issue 15): systemd 252 as PID 1 of a throw-away
# container (systemd-nspawn -D / --volatile=yes, as in the project's fd-store recipe),
# a Type=notify service with our fdstore.conf settings, SIGKILL and `systemctl restart`.
#
# Step 1 (this script today): the mechanism the daemons are built on, through
# `fdstore-probe` (tests/src/bin/fdstore-probe.rs: vh_common::fdstore +
# virtlockd::lease_lock, nothing else): N OFD leases in the store; after SIGKILL, while
# the service is down, another process's F_SETLK on every lease file is refused; the
# restarted service gets every lease fd back, still locked (OFD), from the newest state
# slot; the same after `systemctl restart`; `stop` empties the store on 252 and frees
# every lease.
# Needs: systemd-container (systemd-nspawn), util-linux (nsenter), python3, root.
# Baseline (KIND=posix): the same leases as POSIX locks, libvirt 9.0's kind, stored
# the same way: every one is free while the service is down.
# Usage: tests/systemd-crash/run.sh [N]   (default 1000 leases; runs both kinds)
set -u
N=${1:-1000}
if [ -z "${KIND:-}" ]; then
  KIND=posix "$0" "$N" || exit 1
  exec env KIND=ofd "$0" "$N"
fi
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PROBE=${PROBE:-$ROOT/target/debug/fdstore-probe}
command -v systemd-nspawn >/dev/null || { echo "FAIL systemd-nspawn missing (apt-get install systemd-container)"; exit 1; }
[ -x "$PROBE" ] || { echo "FAIL $PROBE missing (cargo build -p vh-tests --bin fdstore-probe)"; exit 1; }
W=$(mktemp -d /tmp/vh-sdcrash.XXXX); S=$W/shared
mkdir -p "$S/leases" "$W/units"
install -m 0755 "$PROBE" "$S/fdstore-probe"
FAILS=0
fail() { echo "FAIL $*"; FAILS=$((FAILS + 1)); }
cat > "$W/units/probe.target" <<U
[Unit]
Description=crash survival probe
Wants=vh-probe.service
U
cat > "$W/units/vh-probe.service" <<U
[Unit]
DefaultDependencies=no
StartLimitIntervalSec=0
[Service]
Type=notify
NotifyAccess=main
ExecStart=$S/fdstore-probe $S/leases $N $KIND
FileDescriptorStoreMax=8192
Environment=VH_FDSTORE=1
Restart=on-failure
RestartSec=2
LimitNOFILE=16384:524288
StandardOutput=append:$S/svc.out
StandardError=append:$S/svc.out
U
LOG=$S/leases/probe.log
waitlog() { # pattern count timeout_s
  local c; for _ in $(seq 1 $(( $3 * 10 ))); do c=$(grep -c "$1" "$LOG" 2>/dev/null); [ "${c:-0}" -ge "$2" ] && return 0; sleep 0.1; done
  return 1; }
# How many of the N lease files another process can F_SETLK (write, byte 0) right now.
lockable() { python3 - "$S/leases" "$N" <<'P'
import fcntl, os, struct, sys
d, n = sys.argv[1], int(sys.argv[2]); ok = 0
for i in range(n):
    fd = os.open(f"{d}/lease-{i}", os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 1, 0)); ok += 1
    except OSError:
        pass
    os.close(fd)
print(ok)
P
}
systemd-nspawn -D / --volatile=yes --register=no --keep-unit -M vhcrash$$ \
  --bind="$S" --bind-ro="$W/units":/etc/systemd/system \
  --console=read-only -b -- systemd.unit=probe.target > "$W/boot.out" 2>&1 < /dev/null &
OUTER=$!
waitlog "fresh leases=$N" 1 60 || { fail "no fresh start"; cat "$LOG" "$W/boot.out" 2>/dev/null | tail -20; }
LEADER=$(ps -o pid= --ppid $OUTER | tr -d ' ' | head -1)
SC() { nsenter -t "$LEADER" -m -p -- systemctl "$@"; }
show() { SC show vh-probe.service -p "$1" --value; }
sleep 0.5
echo "fresh: NFileDescriptorStore=$(show NFileDescriptorStore) (want $((N + 2)))"
[ "$(show NFileDescriptorStore)" = "$((N + 2))" ] || fail "store holds $(show NFileDescriptorStore) fds"
[ "$(lockable)" = 0 ] || fail "leases not held while running"

for round in 1 2 3; do
  PID=$(show MainPID)
  nsenter -t "$LEADER" -p -m -- kill -KILL "$PID" || fail "cannot SIGKILL pid $PID"
  sleep 0.5
  state=$(show SubState)
  n=$(lockable)
  echo "[$KIND] SIGKILL #$round: while down (SubState=$state) another process could lock $n of $N leases"
  if [ "$KIND" = posix ]; then
    [ "$n" = "$N" ] || fail "baseline: POSIX leases survived a SIGKILL?"
    # Take nothing: the next round needs the files free for the restarted probe.
    waitlog "resumed" "$round" 30 || { fail "no restart after SIGKILL #$round"; break; }
    continue
  fi
  [ "$n" = 0 ] || fail "SIGKILL #$round: $n leases free while the service was down"
  waitlog "resumed" "$round" 30 || { fail "no resume after SIGKILL #$round"; SC status vh-probe.service | head -12; break; }
  tail -1 "$LOG" | grep -q "leases=$N ofd=$N stale=0 missing=0" || fail "resume #$round: $(tail -1 "$LOG")"
  [ "$(lockable)" = 0 ] || fail "leases free after resume #$round"
done
if [ "$KIND" = posix ]; then
  SC poweroff 2>/dev/null
  for _ in $(seq 1 50); do kill -0 $OUTER 2>/dev/null || break; sleep 0.2; done
  kill -0 $OUTER 2>/dev/null && kill -KILL "$LEADER"
  wait $OUTER 2>/dev/null
  rm -rf "$W"
  [ $FAILS = 0 ] && echo "PASS (baseline): POSIX leases are all lost at each SIGKILL, store or not" && exit 0
  exit 1
fi
SC restart vh-probe.service
waitlog "resumed" 4 30 || fail "no resume after systemctl restart"
echo "systemctl restart: $(tail -1 "$LOG" | cut -d' ' -f2-); lockable now $(lockable)"
tail -1 "$LOG" | grep -q "leases=$N ofd=$N" || fail "restart lost leases"
SC stop vh-probe.service
n=$(lockable)
echo "systemctl stop (252 empties the store): $n of $N leases free"
[ "$n" = "$N" ] || fail "stop left $((N - n)) leases held"
SC start vh-probe.service
waitlog "fresh leases=$N" 2 30 || fail "start after stop was not fresh"
echo "--- probe log"; cat "$LOG"
grep -q error "$LOG" && fail "probe reported an error"
SC poweroff 2>/dev/null
for _ in $(seq 1 50); do kill -0 $OUTER 2>/dev/null || break; sleep 0.2; done
kill -0 $OUTER 2>/dev/null && kill -KILL "$LEADER"
wait $OUTER 2>/dev/null
rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn /run/systemd/nspawn-root 2>/dev/null
[ $FAILS = 0 ] && rm -rf "$W" || { echo "kept $W"; tail -20 "$S/svc.out" 2>/dev/null; }
[ $FAILS = 0 ] && echo "PASS fd-store crash survival, $N OFD leases" || { echo "$FAILS failure(s)"; exit 1; }
