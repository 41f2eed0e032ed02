//! The `virtlockd` binary: a drop-in for libvirt 9.0's `/usr/sbin/virtlockd`.

fn main() {
    std::process::exit(vh_common::daemon::main::<virtlockd::daemon::LockDaemonApp>());
}
