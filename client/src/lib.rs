//! Client side of virtlogd and virtlockd: what libvirt's QEMU driver (`log_manager.c`) and
//! its `lockd` lock plugin do, as a Rust library, so that a management daemon or a
//! non-libvirt VMM can use these daemons (ours or libvirt 9.0's C ones) the same way.
//!
//! | item | job |
//! |---|---|
//! | [`Target`] | where to connect: system / session socket (session auto-spawns) or a path |
//! | [`LogManager`] | OpenLogFile (pipe fd), GetLogFilePosition, ReadLogFile, AppendLogFile |
//! | [`LockManager`] | REGISTER, RESTRICT, CREATE_LOCKSPACE, ACQUIRE/RELEASE, fd hand-over |
//! | [`lease_name_for_path`] | the lockd plugin's indirect lease name (SHA-256 of the path) |
//! | [`ClientError`] | transport, libvirt error (code/domain/message) or protocol errors |
//! | [`inspect`] | the operator-only "VHIP" program on our daemons' admin sockets |
//!
//! | module | job |
//! |---|---|
//! | [`connect`] | the socket path, session-mode auto-spawn and the connect retries |
//! | [`log`] | the log manager client (`log_manager.c`) |
//! | [`lock`] | the lock manager client (the `lockd` plugin) and its lease names |
//! | [`error`] | the client's error type |
//! | [`inspect`] | the operator program's calls |

pub mod connect;
pub mod error;
pub mod inspect;
pub mod lock;
pub mod log;

pub use connect::Target;
pub use error::{ClientError, Result};
pub use lock::{lease_name_for_path, LockManager, Owner};
pub use log::{LogManager, LogPosition};
