#!/bin/bash
# Crash survival under a real systemd (issue 15): systemd 252 as PID 1 of a throw-away
# container (systemd-nspawn -D / --volatile=yes, as in the project's fd-store recipe)
# runs the real daemons from their units, with real clients (tests/src/bin/crash-peer.rs)
# over the real sockets:
#   * logs: N_LOGS writers stream numbered lines into logs opened over virtlogd's socket
#     (as libvirtd opens them for QEMU); virtlogd is SIGKILLed 3 times and restarted with
#     `systemctl restart`; every line must land exactly once and in order;
#   * leases: an owner holds N leases over one live connection (as QEMU holds its
#     inherited one); virtlockd is SIGKILLed 3 times (and restarted with `systemctl
#     restart`): while it is down another process's F_SETLK on every lease file must be
#     refused; once it is back the owner's connection must still work (a release
#     succeeds) and a conflicting acquire by another owner must be refused;
#   * store sizes as systemd reports them, and `vhctl status` showing the same;
#   * `systemctl reload` (SIGUSR1 re-exec) of each: the new image stores everything
#     again, and a SIGKILL after it still loses nothing; a reload into libvirt 9.0's C
#     daemon leaves nothing in the store, and C's release really frees the lease;
#   * `systemctl restart` keeps the owner process alive with its leases (SIGTERM during
#     a restart job leaves everything in the store);
#   * `systemctl stop` (a stop job: the daemon stops as without the store, and 252
#     empties the store): virtlockd kills the live owner (a real process registered
#     over a live connection, holding N leases) and every lease is free afterwards, as
#     9.0's stop does; virtlogd loses no line written before the stop (writers that
#     have written everything and keep their pipes open, as a running QEMU does);
#     a plain `kill -TERM` (no job) stops the same way and is not restarted.
# Then the baseline: libvirt 9.0's C daemons (/usr/sbin/virtlogd, /usr/sbin/virtlockd)
# from Debian's own units, same clients, same kills: it prints what they lose (BASELINE
# lines) and PASSes on having measured it; its stop must show the same owner kill.
# Needs: systemd-container (systemd-nspawn), util-linux (nsenter), python3, root, and
# target/debug/{virtlogd,virtlockd,crash-peer,vhctl} (cargo build --workspace).
# Usage: tests/systemd-crash/run.sh [N_LEASES [N_LOGS [LINES]]]   (1000 100 6000)
set -u
# The owner may be gone when we write to its fifo (9.0 kills it on stop): an EPIPE, not
# the end of this script.
trap '' PIPE
N=${1:-1000}
NLOGS=${2:-100}
LINES=${3:-6000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/target/debug}
FAILS=0
fail() { echo "FAIL $*"; FAILS=$((FAILS + 1)); }
pass() { echo "PASS $*"; }
command -v systemd-nspawn >/dev/null || { fail "systemd-nspawn missing (apt-get install systemd-container)"; exit 1; }
command -v nsenter >/dev/null || { fail "nsenter missing (util-linux)"; exit 1; }
command -v python3 >/dev/null || { fail "python3 missing"; exit 1; }
for b in virtlogd virtlockd crash-peer vhctl; do
  [ -x "$BIN/$b" ] || { fail "$BIN/$b missing (cargo build --workspace)"; exit 1; }
done
for b in /usr/sbin/virtlogd /usr/sbin/virtlockd /usr/lib/systemd/system/virtlockd.service; do
  [ -e "$b" ] || { fail "$b missing (the C baseline needs Debian's libvirt-daemon-system)"; exit 1; }
done
W=$(mktemp -d /tmp/h-crash-sd.XXXX)

# boot KIND: starts a container whose /etc/systemd/system is $W/KIND/units.
boot() {
  local kind=$1
  S=$W/$kind/shared
  systemd-nspawn -D / --volatile=yes --register=no --keep-unit -M "hcrash$kind$$" \
    --bind="$S" --bind-ro="$W/$kind/units":/etc/systemd/system \
    --console=read-only -b -- systemd.unit=crash.target systemd.firstboot=off > "$W/$kind/boot.out" 2>&1 < /dev/null &
  OUTER=$!
  LEADER=
  # A loaded 2-core machine has taken over 60 s to boot one (tests/systemd).
  for _ in $(seq 1 900); do
    LEADER=$(ps -o pid= --ppid $OUTER 2>/dev/null | tr -d ' ' | head -1)
    [ -n "$LEADER" ] && nsenter -t "$LEADER" -m -p -- systemctl is-active -q crash.target 2>/dev/null && return 0
    sleep 0.2
  done
  fail "[$kind] container did not boot"; tail -20 "$W/$kind/boot.out"
  [ -n "$LEADER" ] && halt
  return 1
}
halt() {
  SC poweroff 2>/dev/null
  for _ in $(seq 1 50); do kill -0 $OUTER 2>/dev/null || break; sleep 0.2; done
  kill -0 $OUTER 2>/dev/null && kill -KILL "$LEADER"
  wait $OUTER 2>/dev/null
}
# The host pid of the crash-peer owner reading CTL (not its nsenter or subshell).
peer_pid() { pgrep -f "^$S/crash-peer owner .* $1\$" | head -1; }
IN() { nsenter -t "$LEADER" -m -p -- "$@"; }
SC() { IN systemctl "$@"; }
show() { SC show "$1" -p "$2" --value; }
# wait_for FILE PATTERN TIMEOUT_S
wait_for() {
  for _ in $(seq 1 $(( $3 * 10 ))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
wait_active() { # unit: until it runs again (after a restart)
  for _ in $(seq 1 300); do [ "$(show "$1" SubState)" = running ] && return 0; sleep 0.1; done
  return 1
}
# How many of the N lease files another process can F_SETLK (write, byte 0) right now.
lockable() { python3 - "$S/leases" "$N" <<'P'
import fcntl, os, struct, sys
d, n = sys.argv[1], int(sys.argv[2]); ok = 0
for i in range(n):
    try:
        fd = os.open(f"{d}/lease-{i}", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        continue
    try:
        fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 1, 0)); ok += 1
    except OSError:
        pass
    os.close(fd)
print(ok)
P
}

# setup KIND: units and shared dir. ours: our units with fdstore.conf, binaries from
# $BIN; c: Debian's own units (from /usr/lib/systemd/system, which the container sees).
setup() {
  local kind=$1 u=$W/$1/units
  S=$W/$kind/shared
  mkdir -p "$S/leases" "$S/logs" "$u"
  install -m 0755 "$BIN/crash-peer" "$BIN/vhctl" "$S/"
  mkfifo "$S/ctl"
  # The empty volatile /etc would make systemd-firstboot wait for a keypress.
  ln -s /dev/null "$u/systemd-firstboot.service"
  if [ "$kind" = ours ]; then
    install -m 0755 "$BIN/virtlogd" "$BIN/virtlockd" "$S/"
    for d in virtlogd virtlockd; do
      sed "s#^ExecStart=/usr/sbin/$d#ExecStart=$S/$d#" "$ROOT/systemd/$d.service" > "$u/$d.service"
      cp "$ROOT/systemd/$d.socket" "$ROOT/systemd/$d-admin.socket" "$u/"
      mkdir -p "$u/$d.service.d"
      cp "$ROOT/systemd/$d.service.d/fdstore.conf" "$u/$d.service.d/"
      # Test only: a 2 s pause before the restart, so "while it is down" is observable.
      printf '[Service]\nRestartSec=2\n' > "$u/$d.service.d/zz-test.conf"
    done
  fi
  cat > "$u/crash.target" <<U
[Unit]
Description=crash survival bed
Wants=virtlogd.socket virtlogd-admin.socket virtlockd.socket virtlockd-admin.socket
Wants=virtlogd.service virtlockd.service
U
}

# --------------------------------------------------------------------------- logs
logs_run() {
  local kind=$1 tag="[$1]"
  local lsock=/run/libvirt/virtlogd-sock
  IN "$S/crash-peer" logs $lsock "$S/logs" "$NLOGS" "$LINES" > "$S/logs.out" 2>&1 &
  local writer=$!
  wait_for "$S/logs.out" "opened $NLOGS" 60 || { fail "$tag logs: could not open $NLOGS logs: $(head -3 "$S/logs.out")"; return; }
  if [ "$kind" = ours ]; then
    sleep 1
    local st; st=$(show virtlogd.service NFileDescriptorStore)
    # The pipes, 2 listeners, 2 state slots (libvirtd's connection is closed).
    [ "$st" = $((NLOGS + 4)) ] && pass "$tag virtlogd keeps $st fds in the store with $NLOGS logs open" \
      || fail "$tag virtlogd keeps $st fds in the store with $NLOGS logs open, want $((NLOGS + 4))"
  fi
  for round in 1 2 3; do
    sleep 2
    local pid; pid=$(show virtlogd.service MainPID)
    # MainPID 0: not running (the C daemon stays down until a client connects).
    if [ "${pid:-0}" -gt 0 ]; then IN kill -KILL "$pid" || fail "$tag cannot SIGKILL virtlogd $pid"; fi
    sleep 0.3
    echo "$tag virtlogd SIGKILL #$round (pid $pid): SubState=$(show virtlogd.service SubState)"
    if [ "$kind" = ours ]; then
      wait_active virtlogd.service || fail "$tag virtlogd not restarted after SIGKILL #$round"
      [ $round = 1 ] || continue
      # A re-exec while the lines flow: the store is emptied and filled again.
      local st0; st0=$(show virtlogd.service NFileDescriptorStore)
      SC reload virtlogd.service
      sleep 2
      local st1; st1=$(show virtlogd.service NFileDescriptorStore)
      echo "$tag systemctl reload virtlogd (re-exec): store $st0 -> $st1 fds"
      [ "$st1" = "$st0" ] && [ "$st0" -ge "$NLOGS" ] && pass "$tag virtlogd re-exec: the new image stores every pipe again" \
        || fail "$tag virtlogd re-exec: store $st0 -> $st1 fds"
    fi
  done
  sleep 2
  SC restart virtlogd.service
  echo "$tag systemctl restart virtlogd: $(show virtlogd.service SubState)"
  wait "$writer"
  local done; done=$(grep '^done' "$S/logs.out")
  local res; res=$(IN "$S/crash-peer" check "$S/logs" "$NLOGS" "$LINES")
  echo "$tag writers: $done; files: $res (of $((NLOGS * LINES)) lines)"
  if [ "$kind" = ours ]; then
    [ "$res" = "lines ok=$((NLOGS * LINES)) missing=0 duplicated=0 out_of_order=0" ] \
      && pass "$tag logs: 3 SIGKILLs, a reload and a restart of virtlogd, $NLOGS logs x $LINES lines: every line exactly once, in order" \
      || fail "$tag logs: $res; $done"
    [ "$done" = "done written=$((NLOGS * LINES)) epipe=0" ] || fail "$tag a writer's pipe broke: $done"
  else
    # Debian's unit has no Restart=: after the first SIGKILL the daemon stays down until
    # a client connects to its socket (the later kills find nothing to kill).
    echo "BASELINE 9.0 virtlogd (Debian units), SIGKILLs + restart: $res; writers: $done (epipe = writers whose pipe broke)"
    [ -n "$res" ] && pass "$tag baseline logs measured" || fail "$tag baseline logs: no result"
  fi
}

# --------------------------------------------------------------------------- leases
lease_run() {
  local kind=$1 tag="[$1]"
  local ksock=/run/libvirt/virtlockd-sock
  # The fifo stays open for writing (fd 7) while the owner reads commands from it.
  IN "$S/crash-peer" owner $ksock "$S/leases" "$N" "$S/ctl" > "$S/owner.out" 2>&1 &
  local owner=$!
  exec 7> "$S/ctl"
  wait_for "$S/owner.out" "held $N" 120 || { fail "$tag owner could not take $N leases: $(tail -3 "$S/owner.out")"; exec 7>&-; return; }
  if [ "$kind" = ours ]; then
    sleep 1
    local st; st=$(show virtlockd.service NFileDescriptorStore)
    # The leases, 2 listeners, the owner's connection, 2 state slots.
    [ "$st" = $((N + 5)) ] && pass "$tag virtlockd keeps $st fds in the store with $N leases" \
      || fail "$tag virtlockd keeps $st fds in the store with $N leases, want $((N + 5))"
    local vs; vs=$(IN "$S/vhctl" status --system --locks | grep 'fd store')
    echo "$tag vhctl status: $vs"
    # vhctl's own admin connections are clients too, stored while they last: +0..2.
    local vn; vn=$(echo "$vs" | sed -n 's/.*fd store: on, \([0-9]*\) fd(s) held there.*/\1/p')
    [ -n "$vn" ] && [ "$vn" -ge "$st" ] && [ "$vn" -le $((st + 2)) ] && pass "$tag vhctl status shows the store on with $vn fds (systemd: $st)" \
      || fail "$tag vhctl status: '$vs', want on with $st fds"
  fi
  local n; n=$(lockable)
  [ "$n" = 0 ] || fail "$tag $n of $N leases free while virtlockd runs"
  local rel=0
  # check_after WHAT: the owner's connection still works, a conflicting acquire is refused.
  check_after() {
    rel=$((rel + 1))
    echo "release $rel" >&7
    wait_for "$S/owner.out" "^release $rel " 30
    local r; r=$(grep "^release $rel " "$S/owner.out" || echo "release $rel: no answer (connection dead?)")
    local o; o=$(IN "$S/crash-peer" other $ksock "$S/leases" "lease-$((N - 1))")
    if [ "$kind" = ours ]; then
      [ "$r" = "release $rel ok" ] && pass "$tag $1: the owner's connection still works (release ok)" || fail "$tag $1: $r"
      [ "$o" = "acquire lease-$((N - 1)) refused" ] && pass "$tag $1: a conflicting acquire by another owner is refused" || fail "$tag $1: $o"
    else
      echo "BASELINE 9.0 virtlockd after $1: owner: $r; other owner: $o"
    fi
  }
  for round in 1 2 3; do
    local pid; pid=$(show virtlockd.service MainPID)
    if [ "${pid:-0}" -gt 0 ]; then IN kill -KILL "$pid" || fail "$tag cannot SIGKILL virtlockd $pid"; fi
    sleep 0.3
    local before; before=$(show virtlockd.service SubState)
    n=$(lockable)
    local after; after=$(show virtlockd.service SubState)
    echo "$tag virtlockd SIGKILL #$round: while down (SubState $before..$after) another process could lock $n of $N leases ($rel released)"
    if [ "$kind" = ours ]; then
      [ "$before" = auto-restart ] && [ "$after" = auto-restart ] || fail "$tag the check did not run while virtlockd was down ($before..$after)"
      # The ones the owner released before are free (and only those).
      [ "$n" = "$rel" ] && pass "$tag SIGKILL #$round: all $((N - rel)) held leases stay held while virtlockd is down" || fail "$tag SIGKILL #$round: $n of $N leases free while down ($rel released)"
      wait_active virtlockd.service || { fail "$tag virtlockd not restarted after SIGKILL #$round"; continue; }
    else
      echo "BASELINE 9.0 virtlockd SIGKILL #$round: $n of $N leases free while down (SubState $before)"
    fi
    check_after "SIGKILL #$round"
  done
  if [ "$kind" = ours ]; then
    # Review finding 1: SIGKILLs of virtlockd while it starts (each new process is
    # killed as soon as it appears, most often before READY: it is resuming 1,000
    # leases), then it must come back with nothing lost.
    local r0 y0 r1 y1
    # systemd's own lines (the daemon's info lines are below the default log level):
    # a start reaching READY logs "Started", an auto-restart "Scheduled restart job".
    r0=$(IN journalctl --no-pager -o cat -u virtlockd | grep -c 'Scheduled restart job')
    y0=$(IN journalctl --no-pager -o cat -u virtlockd | grep -c '^Started ')
    local k; k=$(IN sh -c 'old=$(systemctl show -p MainPID --value virtlockd.service); kill -KILL "$old"; n=0
      for i in $(seq 1 2000); do
        p=$(pgrep -x virtlockd | grep -vx "$old" | head -1)
        if [ -n "$p" ]; then kill -KILL "$p" 2>/dev/null && n=$((n + 1)); old=$p; [ $n -ge 3 ] && break; fi
        sleep 0.005
      done; echo $n')
    wait_active virtlockd.service
    r1=$(IN journalctl --no-pager -o cat -u virtlockd | grep -c 'Scheduled restart job')
    y1=$(IN journalctl --no-pager -o cat -u virtlockd | grep -c '^Started ')
    echo "$tag killed $k starting virtlockd processes: $((r1 - r0)) restarts, $((y1 - y0)) starts reached READY (the last one included)"
    [ "${k:-0}" -ge 1 ] || fail "$tag no starting virtlockd caught to kill"
    wait_active virtlockd.service && pass "$tag virtlockd comes back after $k SIGKILLs during start-up" \
      || fail "$tag virtlockd not back after $k SIGKILLs during start-up: $(show virtlockd.service SubState)"
    n=$(lockable)
    [ "$n" = "$rel" ] && pass "$tag SIGKILLs during start-up: every unreleased lease still held" \
      || fail "$tag SIGKILLs during start-up: $n lockable, $rel released"
    check_after "SIGKILLs during start-up"
  fi
  local cp; cp=$(peer_pid "$S/ctl")
  SC restart virtlockd.service
  n=$(lockable)
  echo "$tag after systemctl restart virtlockd: another process could lock $n of $N leases ($rel released)"
  local alive=dead
  [ -n "$cp" ] && kill -0 "$cp" 2>/dev/null && alive=alive
  if [ "$kind" = ours ]; then
    [ "$n" = "$rel" ] && pass "$tag systemctl restart: every unreleased lease still held" || fail "$tag systemctl restart: $n lockable, $rel released"
    [ "$alive" = alive ] && pass "$tag systemctl restart: the owner process is still alive" || fail "$tag systemctl restart: the owner process ($cp) is $alive"
    IN journalctl --no-pager -u virtlockd | grep -q 'SIGTERM for a restart' \
      && pass "$tag systemctl restart: the daemon logged that the SIGTERM was for a restart" \
      || fail "$tag systemctl restart: no 'SIGTERM for a restart' in the journal"
  else
    echo "BASELINE 9.0 virtlockd systemctl restart: $n of $N leases free after it; owner process $alive"
  fi
  check_after "systemctl restart"
  [ "$kind" = c ] && pass "$tag baseline leases measured"
  if [ "$kind" = ours ]; then
    # SIGUSR1 re-exec (systemctl reload): the old image empties the store before the
    # exec, the new one stores everything again before READY; a crash after it loses
    # nothing either.
    # Held leases, 2 listeners, the owner's connection, 2 state slots.
    local want=$((N - rel + 5))
    SC reload virtlockd.service
    sleep 2
    local after_reload; after_reload=$(show virtlockd.service NFileDescriptorStore)
    echo "$tag systemctl reload (re-exec ours -> ours): store holds $after_reload fds after it"
    [ "$after_reload" = "$want" ] && pass "$tag re-exec: the new image stores everything again ($want fds)" \
      || fail "$tag re-exec: store holds $after_reload fds, want $want"
    IN kill -KILL "$(show virtlockd.service MainPID)"
    sleep 0.3
    n=$(lockable)
    [ "$n" = "$rel" ] && pass "$tag SIGKILL after the re-exec: every unreleased lease held while down" \
      || fail "$tag SIGKILL after the re-exec: $n lockable, $rel released"
    wait_active virtlockd.service || fail "$tag virtlockd not restarted after the re-exec's SIGKILL"
    check_after "the re-exec and a SIGKILL"
    # Re-exec into libvirt 9.0's C daemon: nothing of ours may stay in the store (C
    # releases a lease by closing its fd; a stored copy would keep the OFD lock).
    install -m 0755 /usr/sbin/virtlockd "$S/virtlockd"
    SC reload virtlockd.service
    sleep 2
    local c_store; c_store=$(show virtlockd.service NFileDescriptorStore)
    [ "$c_store" = 0 ] && pass "$tag re-exec into the C daemon leaves nothing in the store" \
      || fail "$tag re-exec into the C daemon: the store still holds $c_store fds"
    check_after "the re-exec into the C daemon"
    n=$(lockable)
    [ "$n" = "$rel" ] && pass "$tag the C daemon's release really frees the lease; the rest stay held ($n free, $rel released)" \
      || fail "$tag after the C daemon's release: $n lockable, $rel released"
    # And back into ours (the C image execs the same path), which stores it all again.
    install -m 0755 "$BIN/virtlockd" "$S/virtlockd"
    want=$((N - rel + 5))
    SC reload virtlockd.service
    sleep 2
    local back; back=$(show virtlockd.service NFileDescriptorStore)
    [ "$back" = "$want" ] && pass "$tag re-exec from the C daemon back into ours stores everything again ($want fds)" \
      || fail "$tag re-exec back into ours: store holds $back fds, want $want"
    check_after "the re-exec back into ours"
  fi
  # 9.0's stop (or ours after the re-exec into 9.0) may have killed the owner already.
  echo exit >&7 2>/dev/null
  exec 7>&-
  wait "$owner" 2>/dev/null
}

# ---------------------------------------------------------------------- stops
# lease_stop_run KIND: a live owner (its own process, registered over a live connection)
# holds N leases; `systemctl stop` must kill it and free every lease (9.0's stop does).
lease_stop_run() {
  local kind=$1 tag="[$1]"
  local ksock=/run/libvirt/virtlockd-sock
  rm -f "$S/ctl2"; mkfifo "$S/ctl2"
  IN "$S/crash-peer" owner $ksock "$S/leases" "$N" "$S/ctl2" > "$S/owner2.out" 2>&1 &
  local owner=$!
  exec 8> "$S/ctl2"
  wait_for "$S/owner2.out" "held $N" 120 || { fail "$tag stop: owner could not take $N leases: $(tail -3 "$S/owner2.out")"; exec 8>&-; return; }
  local cp; cp=$(peer_pid "$S/ctl2")
  if [ "$kind" = ours ]; then
    sleep 1
    # The store is on (leases, 2 listeners, the owner's connection, 2 state slots):
    # the stop below is a stop with the store.
    local st; st=$(show virtlockd.service NFileDescriptorStore)
    [ "$st" = $((N + 5)) ] || fail "$tag stop: store holds $st fds before the stop, want $((N + 5))"
  fi
  local n; n=$(lockable)
  [ "$n" = 0 ] || fail "$tag stop: $n of $N leases free before the stop"
  [ -n "$cp" ] && kill -0 "$cp" 2>/dev/null || fail "$tag stop: owner process not running before the stop"
  SC stop virtlockd.service virtlockd.socket virtlockd-admin.socket
  # The daemon waits for its kills before it exits; allow the owner's reaping.
  local alive=alive
  for _ in $(seq 1 100); do kill -0 "$cp" 2>/dev/null || { alive=dead; break; }; sleep 0.1; done
  n=$(lockable)
  echo "$tag systemctl stop virtlockd with a live owner: owner process $alive, $n of $N leases free"
  if [ "$kind" = ours ]; then
    [ "$alive" = dead ] && pass "$tag systemctl stop kills the live owner, as 9.0's stop does" \
      || fail "$tag systemctl stop left the owner process ($cp) running"
    [ "$n" = "$N" ] && pass "$tag systemctl stop frees every lease (after the owner is dead)" \
      || fail "$tag systemctl stop left $((N - n)) leases held"
    IN journalctl --no-pager -u virtlockd | grep -q 'SIGTERM for a stop' \
      && pass "$tag systemctl stop: the daemon logged that the SIGTERM was for a stop" \
      || fail "$tag systemctl stop: no 'SIGTERM for a stop' in the journal"
    local left; left=$(show virtlockd.service NFileDescriptorStore)
    [ "$left" = 0 ] && pass "$tag systemctl stop leaves nothing in the store" || fail "$tag systemctl stop: store still holds $left fds"
  else
    echo "BASELINE 9.0 virtlockd systemctl stop with a live owner: owner process $alive, $n of $N leases free"
    [ "$alive" = dead ] && [ "$n" = "$N" ] && pass "$tag baseline: 9.0's stop kills the live owner and frees every lease" \
      || fail "$tag baseline: 9.0's stop: owner $alive, $n of $N leases free"
  fi
  echo exit >&8 2>/dev/null
  exec 8>&-
  wait "$owner" 2>/dev/null
  [ "$kind" = ours ] || return
  # A plain SIGTERM (no systemd job on the unit): also a stop, and its exit must not
  # make `Restart=on-failure` bring the daemon back.
  SC start virtlockd.socket virtlockd-admin.socket
  rm -f "$S/ctl3"; mkfifo "$S/ctl3"
  IN "$S/crash-peer" owner $ksock "$S/leases" "$N" "$S/ctl3" > "$S/owner3.out" 2>&1 &
  owner=$!
  exec 8> "$S/ctl3"
  wait_for "$S/owner3.out" "held $N" 120 || { fail "$tag kill -TERM: owner could not take $N leases: $(tail -3 "$S/owner3.out")"; exec 8>&-; return; }
  cp=$(peer_pid "$S/ctl3")
  local pid; pid=$(show virtlockd.service MainPID)
  IN kill -TERM "$pid"
  alive=alive
  for _ in $(seq 1 100); do kill -0 "$cp" 2>/dev/null || { alive=dead; break; }; sleep 0.1; done
  # Past RestartSec (2 s here): an auto-restart would have happened by now.
  sleep 3
  n=$(lockable)
  local sub; sub=$(show virtlockd.service SubState)
  echo "$tag kill -TERM virtlockd (no systemd job) with a live owner: owner process $alive, $n of $N leases free, unit $sub"
  [ "$alive" = dead ] && [ "$n" = "$N" ] && pass "$tag kill -TERM (no job: a stop) kills the live owner and frees every lease" \
    || fail "$tag kill -TERM: owner $alive, $n of $N leases free"
  [ "$sub" = dead ] && pass "$tag kill -TERM: the clean exit is not restarted (Restart=on-failure)" \
    || fail "$tag kill -TERM: unit is $sub, want dead"
  IN journalctl --no-pager -u virtlockd | grep -q 'SIGTERM for a stop (no systemd job' \
    && pass "$tag kill -TERM: the daemon logged a stop for want of a job" \
    || fail "$tag kill -TERM: no 'SIGTERM for a stop (no systemd job' in the journal"
  SC stop virtlockd.socket virtlockd-admin.socket
  echo exit >&8 2>/dev/null
  exec 8>&-
  wait "$owner" 2>/dev/null
}

# logs_stop_run KIND: writers write every line and keep their pipes open (as a running
# QEMU does); virtlogd is stopped at once: every line written must be in the files.
logs_stop_run() {
  local kind=$1 tag="[$1]"
  local lsock=/run/libvirt/virtlogd-sock
  local lines=2000
  rm -rf "$S/logs-stop"; mkdir -p "$S/logs-stop"
  rm -f "$S/hold"; mkfifo "$S/hold"
  # A C virtlogd may be down (socket-activated): the open starts it.
  IN "$S/crash-peer" logs $lsock "$S/logs-stop" "$NLOGS" "$lines" "$S/hold" > "$S/logs-stop.out" 2>&1 &
  local writer=$!
  exec 9> "$S/hold"
  wait_for "$S/logs-stop.out" "^done" 120 || { fail "$tag logs stop: writers did not finish: $(head -3 "$S/logs-stop.out")"; exec 9>&-; return; }
  SC stop virtlogd.service virtlogd.socket virtlogd-admin.socket
  local done; done=$(grep '^done' "$S/logs-stop.out")
  local res; res=$(IN "$S/crash-peer" check "$S/logs-stop" "$NLOGS" "$lines")
  echo exit >&9 2>/dev/null
  exec 9>&-
  wait "$writer" 2>/dev/null
  echo "$tag systemctl stop virtlogd right after $NLOGS writers wrote $lines lines each (pipes open): $res; writers: $done"
  if [ "$kind" = ours ]; then
    [ "$res" = "lines ok=$((NLOGS * lines)) missing=0 duplicated=0 out_of_order=0" ] && [ "$done" = "done written=$((NLOGS * lines)) epipe=0" ] \
      && pass "$tag systemctl stop virtlogd loses no line written before the stop ($((NLOGS * lines)) lines)" \
      || fail "$tag systemctl stop virtlogd: $res; $done"
    IN journalctl --no-pager -u virtlogd | grep -q 'SIGTERM for a stop' \
      && pass "$tag systemctl stop virtlogd: the daemon logged that the SIGTERM was for a stop" \
      || fail "$tag systemctl stop virtlogd: no 'SIGTERM for a stop' in the journal"
  else
    echo "BASELINE 9.0 virtlogd systemctl stop: $res"
    [ -n "$res" ] && pass "$tag baseline logs stop measured" || fail "$tag baseline logs stop: no result"
  fi
}

for kind in ours c; do
  setup "$kind"
  boot "$kind" || continue
  if [ "$kind" = ours ]; then
    for d in virtlogd virtlockd; do
      [ "$(show $d.service ExecMainStatus)" = 0 ] && [ "$(show $d.service SubState)" = running ] \
        || fail "[ours] $d.service did not start: $(show $d.service SubState)"
    done
  fi
  logs_run "$kind"
  lease_run "$kind"
  lease_stop_run "$kind"
  logs_stop_run "$kind"
  if [ "$kind" = ours ]; then
    IN journalctl --no-pager -u virtlockd -u virtlogd 2>/dev/null | grep -iE 'error|lost|missing' | head -5
  fi
  halt
done
rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn /run/systemd/nspawn-root 2>/dev/null
if [ $FAILS = 0 ]; then rm -rf "$W"; else echo "kept $W"; fi
[ $FAILS = 0 ] || { echo "$FAILS failure(s)"; exit 1; }
