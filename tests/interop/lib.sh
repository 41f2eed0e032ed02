# shellcheck shell=bash
# Helper library for the virtlogd/virtlockd interop harness (sourced by run.sh).
#
# Everything here assumes it runs INSIDE the private namespaces set up by
# run.sh (private mount namespace with a tmpfs on /run and private bind mounts
# over /etc/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt).

# ---------------------------------------------------------------- reporting
IT_PASS=0
IT_FAIL=0
IT_FAILED_NAMES=()

_ts() { date -u +%H:%M:%S; }
log()  { printf '[%s] %s\n' "$(_ts)" "$*" >&2; }
die()  { printf '[%s] FATAL: %s\n' "$(_ts)" "$*" >&2; exit 2; }

pass() { IT_PASS=$((IT_PASS + 1)); printf 'PASS %s\n' "$*"; }
fail() {
    IT_FAIL=$((IT_FAIL + 1)); IT_FAILED_NAMES+=("$1")
    printf 'FAIL %s\n' "$*"
}
# check NAME CMD...: PASS if CMD succeeds, FAIL otherwise.
check() {
    local name=$1; shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}

# ---------------------------------------------------------------- waiting
# wait_until TIMEOUT_SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s.
wait_until() {
    local timeout=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + timeout ))
    while :; do
        if "$@"; then return 0; fi
        if (( $(date +%s) >= deadline )); then
            log "timed out after ${timeout}s waiting for: $what"
            return 1
        fi
        sleep 0.2
    done
}

pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

# kill_wait PID [TIMEOUT]: SIGTERM, wait, then SIGKILL. Only for pids we own.
kill_wait() {
    local pid=$1 timeout=${2:-10} i
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 5; i++)); do
        pid_alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
        # reap if it is our child and became a zombie
        if [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]]; then
            wait "$pid" 2>/dev/null || true; return 0
        fi
        sleep 0.2
    done
    log "pid $pid did not exit on SIGTERM within ${timeout}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- virsh
VIRSH_URI=qemu:///system
virsh_() { timeout 60 virsh -q -c "$VIRSH_URI" "$@"; }

dom_state() { virsh_ domstate "$1" 2>/dev/null | head -n1; }
dom_is() { [[ $(dom_state "$1") == "$2" ]]; }

# ---------------------------------------------------------------- locks
# Device of FILE formatted the way /proc/locks prints it (MAJ:MIN in hex,
# %02x each), followed by ':' and the inode number.
proc_locks_id() {
    local f=$1 maj min ino
    read -r maj min ino < <(stat -c '%Hd %Ld %i' "$f") || return 1
    printf '%02x:%02x:%s' "$maj" "$min" "$ino"
}

# lock_lines FILE: the /proc/locks lines that refer to FILE's inode.
lock_lines() {
    local f=$1 id
    [[ -e $f ]] || return 0
    id=$(proc_locks_id "$f") || return 0
    awk -v id="$id" '{ for (i = 1; i <= NF; i++) if ($i == id) { print; next } }' /proc/locks
}

# ofd_lock_lines PID FILE: the lock lines of PID's open files (/proc/PID/fdinfo)
# that refer to FILE's inode. Our virtlockd holds leases as open-file-description
# locks, which /proc/locks shows with pid -1; fdinfo ties them to the holder's fd.
ofd_lock_lines() {
    local pid=$1 f=$2 id
    [[ -e $f ]] || return 0
    id=$(proc_locks_id "$f") || return 0
    cat /proc/"$pid"/fdinfo/* 2>/dev/null |
        awk -v id="$id" '/^lock:/ && / OFDLCK / { for (i = 1; i <= NF; i++) if ($i == id) { print; next } }'
}

# has_byte0_write_lock FILE PID: a WRITE lock on bytes [0,0] of FILE held by PID,
# either a POSIX lock (libvirt's daemon) or an OFD lock on one of PID's fds (ours).
has_byte0_write_lock() {
    local f=$1 pid=$2
    lock_lines "$f" | awk -v pid="$pid" '
        { # "N: POSIX  ADVISORY  WRITE PID MAJ:MIN:INO START END" (blocked waiters have "->")
          if ($2 == "->") next
          if ($2 == "POSIX" && $4 == "WRITE" && $5 == pid && $7 == "0" && $8 == "0") found = 1 }
        END { exit !found }' && return 0
    ofd_lock_lines "$pid" "$f" | awk '
        { # "lock: N: OFDLCK ADVISORY WRITE -1 MAJ:MIN:INO START END"
          if ($3 == "OFDLCK" && $5 == "WRITE" && $8 == "0" && $9 == "0") found = 1 }
        END { exit !found }'
}

# no_lock_by FILE PID: FILE is gone, or no lock on it is held by PID (POSIX or OFD).
no_lock_by() {
    local f=$1 pid=$2
    [[ -e $f ]] || return 0
    ! lock_lines "$f" | awk -v pid="$pid" '$5 == pid { f = 1 } END { exit !f }' &&
        [[ -z $(ofd_lock_lines "$pid" "$f") ]]
}

# holds_any_lock PID: PID holds some lock (a POSIX lock in its name, or an OFD lock on
# one of its fds).
holds_any_lock() {
    local pid=$1
    grep -q " $pid " /proc/locks && return 0
    cat /proc/"$pid"/fdinfo/* 2>/dev/null | grep -q '^lock:.* OFDLCK '
}

# ---------------------------------------------------------------- guest image
# make_boot_disk PATH: a qcow2 image whose MBR writes a marker line to COM1
# (port 0x3f8) and then halts forever.  Gives deterministic serial output.
#
#   31 C0        xor  ax,ax
#   8E D8        mov  ds,ax
#   BE 15 7C     mov  si,0x7c15        ; message
#   BA F8 03     mov  dx,0x3f8         ; COM1
#   AC           lodsb                 ; loop:
#   84 C0        test al,al
#   74 03        jz   done
#   EE           out  dx,al
#   EB F8        jmp  loop
#   F4           hlt                   ; done:
#   EB FD        jmp  done
#   <message>\0 ... 55 AA
SERIAL_MARKER="INTEROP-SERIAL-HELLO"
make_boot_disk() {
    local path=$1 raw=$1.raw
    truncate -s 0 "$raw"
    truncate -s 1M "$raw"
    printf '\x31\xc0\x8e\xd8\xbe\x15\x7c\xba\xf8\x03\xac\x84\xc0\x74\x03\xee\xeb\xf8\xf4\xeb\xfd' |
        dd of="$raw" conv=notrunc status=none
    printf '%s\r\n\0' "$SERIAL_MARKER" | dd of="$raw" bs=1 seek=21 conv=notrunc status=none
    printf '\x55\xaa' | dd of="$raw" bs=1 seek=510 conv=notrunc status=none
    qemu-img convert -q -f raw -O qcow2 "$raw" "$path"
    rm -f "$raw"
}

# domain_xml NAME UUID DISK
domain_xml() {
    local name=$1 uuid=$2 disk=$3
    cat <<EOF
<domain type='qemu'>
  <name>$name</name>
  <uuid>$uuid</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$QEMU_BIN</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/$name-serial.log' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}
