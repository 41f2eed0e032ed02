//! The `virtlogd` binary: a drop-in for libvirt 9.0's `/usr/sbin/virtlogd`.

fn main() {
    std::process::exit(vh_common::daemon::main::<virtlogd::daemon::LogDaemon>());
}
