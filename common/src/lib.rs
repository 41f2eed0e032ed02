//! The shared core of virt-helpers: everything `virtlogd` and `virtlockd` have in common.
//!
//! | module | job |
//! |---|---|
//! | [`xdr`] | XDR codec with bounded lengths |
//! | [`error`] | libvirt's 11-field error struct and its constructors |
//! | [`protocol`] | message header, frame layout, size limits, keepalive constants |
//! | [`fdpass`] | SCM_RIGHTS fd passing exactly as libvirt does it (one fd per 1-byte sendmsg) |
//! | [`connection`] | reading and writing whole frames (and their fds) on a unix stream socket |
//! | [`server`] | listeners, clients, program dispatch, limits, peer-uid checks |
//! | [`config`] | libvirt's `virConf` file syntax and typed daemon settings |
//! | [`cli`] | the daemons' shared command line |
//! | [`manual`] | the `--help` texts and man pages, as data, rendered both ways |
//! | [`paths`] | system vs session mode and the socket/pid/state paths of each |
//! | [`pidfile`] | the fcntl-locked pid file |
//! | [`activation`] | systemd socket activation (LISTEN_FDS) and sd_notify |
//! | [`fdstore`] | systemd's fd store as a crash safety net: stored fds, state slots, resume |
//! | [`logging`] | log_level / log_filters / log_outputs driving `tracing` |
//! | [`daemon`] | the daemon front-end: start-up, sockets, signals, `--timeout`, re-exec |
//! | [`restart`] | the re-exec state file (libvirt 9.0's JSON) and fd inheritance |
//! | [`admin`] | libvirt's admin program (0x06900690): servers, clients, limits, logging |

pub mod activation;
pub mod admin;
pub mod cli;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod error;
pub mod fdpass;
pub mod fdstore;
pub mod logging;
pub mod manual;
pub mod paths;
pub mod pidfile;
pub mod protocol;
pub mod restart;
pub mod server;
pub mod xdr;

pub use error::RpcError;
