//! virtlockd: libvirt's lock daemon, as a library (the binary is `main.rs`).
//!
//! | module | job |
//! |---|---|
//! | [`protocol`] | program 0x0EA7BEEF: argument types of the eight procedures (`vh_proto::lock`) |
//! | [`lockspace`] | lockspaces, resources and their owners; byte-0 fcntl locks |
//! | [`table`] | the lock table; calls' filesystem work on the blocking pool |
//! | [`lease_lock`] | the lease lock: OFD on byte 0, adoption of inherited POSIX locks |
//! | [`daemon`] | virtlockd's part of the daemon front-end: the lockspaces behind the server, hand-off and restore |
//! | [`state`] | virtlockd's part of the re-exec state document (lockspaces, lock clients' private data) and the whole document |
//! | [`inspect`] | our operator program: what resources are held |
//! | [`program`] | RPC dispatch: owner registration, restriction, checks in 9.0's order |
//! | [`config`] | virtlockd's own keys of `virtlockd.conf` (lease renewal and fencing) |
//! | [`renewal`] | lease renewal across hosts and fencing of owners whose leases are lost |

pub mod config;
pub mod daemon;
pub mod inspect;
pub mod lease_lock;
pub mod lockspace;
pub mod program;
pub mod renewal;
pub mod state;
pub mod table;

// The program's wire types live in `vh-proto`, shared with the client; this path stays.
pub use vh_proto::lock as protocol;
