//! virtlogd: libvirt's log daemon, as a library (the binary is `main.rs`).
//!
//! | module | job |
//! |---|---|
//! | [`protocol`] | program 0x87539319: argument and reply types of the four procedures (`vh_proto::log`) |
//! | [`rotating_file`] | size-capped log file with `.0..N` backups, and the reader across them |
//! | [`log_file`] | one open log: its pipe, its file, its limits, owner and counters |
//! | [`handler`] | the open log files keyed by path, and the RPC operations on them |
//! | [`pump`] | the thread that moves pipe data into the files, coalescing wake-ups; reports closed logs to the handler through a callback |
//! | [`program`] | RPC dispatch of the four procedures onto the handler |
//! | [`inspect`] | our operator program: what logs are open, their counters, following one |
//! | [`config`] | virtlogd's own keys of `virtlogd.conf` (`max_size`, `max_backups`, the cleaner's `max_age_days`, `log_root`) |
//! | [`cleaner`] | 11.3's daily deletion of log chains older than `max_age_days` |
//! | [`follow`] | the sockets that receive a log's bytes as they are written |
//! | [`daemon`] | virtlogd's part of the daemon front-end: the handler behind the server, hand-off and restore |
//! | [`state`] | virtlogd's part of the re-exec state document (`handler`) and the whole document |

pub mod cleaner;
pub mod config;
pub mod daemon;
pub mod follow;
pub mod handler;
pub mod inspect;
pub mod log_file;
pub mod program;
pub mod pump;
pub mod rotating_file;
pub mod state;

// The program's wire types live in `vh-proto`, shared with the client; this path stays.
pub use vh_proto::log as protocol;
