//! The test kit: what the end-to-end suites (`tests/`) and the bench (`bench/`) need to
//! run real daemons, ours or libvirt 9.0's C ones.
//!
//! | module | job |
//! |---|---|
//! | [`namespace`] | a private mount namespace per daemon, set up between fork and exec (no shell) |
//! | [`daemon`] | binary discovery (one way), [`Daemon::spawn`], readiness, the one stop policy |
//! | [`conn`] | raw libvirt RPC: frame builders, [`Conn`], reply checks, [`describe`] |
//! | [`notify`] | a stand-in for systemd's notify socket: [`recv_notify`] |
//! | [`peer`] | a child that connects itself to a daemon and sleeps: [`Sleeper`] |
//!
//! Our binaries are looked up in `$VH_BIN_DIR` if set, else in the cargo target profile
//! directory the running executable lives in (`target/debug/deps/x` → `target/debug`,
//! `target/release/vh-bench` → `target/release`). The C peers are `/usr/sbin/virtlogd`
//! and `/usr/sbin/virtlockd` (override with `$VH_C_VIRTLOGD` / `$VH_C_VIRTLOCKD`).
//!
//! A daemon is stopped one way, [`stop`]: SIGKILL and reap (see there why).

pub mod conn;
pub mod daemon;
pub mod namespace;
pub mod notify;
pub mod peer;

pub use conn::*;
pub use daemon::*;
pub use namespace::Launch;
pub use notify::recv_notify;
pub use peer::Sleeper;
