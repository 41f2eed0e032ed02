//! The shared core of virt-helpers: everything `virtlogd` and `virtlockd` have in common.
//!
//! | module | job |
//! |---|---|
//! | [`xdr`], [`error`], [`protocol`], [`fdpass`], [`paths`], [`manual`] | re-exported from `vh-proto` (XDR, error struct, messages, fd passing and close-on-exec, socket paths, `--help` and man pages) |
//! | [`connection`] | reading and writing whole frames (and their fds) on a unix stream socket |
//! | [`server`] | listeners, clients, program dispatch, limits, peer-uid checks |
//! | [`config`] | libvirt's `virConf` file syntax and the typed keys both daemons share; each daemon's own keys are its crate's `config.rs` (`DaemonKeys`) |
//! | [`cli`] | the daemons' shared command line |
//! | [`pidfile`] | the fcntl-locked pid file |
//! | [`activation`] | systemd socket activation (LISTEN_FDS) and sd_notify |
//! | [`fdstore`] | systemd's fd store as a crash safety net: stored fds, state slots, resume |
//! | [`fdstore_keeper`] | keeping the store current while the daemon runs |
//! | [`stop_intent`] | on SIGTERM with the store on: is systemd restarting us, or stopping us for good? |
//! | [`logging`] | log_level / log_filters / log_outputs driving `tracing` |
//! | [`daemon`] | the daemon front-end: start-up, sockets, signals, `--timeout`, re-exec |
//! | [`next_image`] | before a re-exec: is the program argv[0] names our own image (its marker section)? Then exec that very open file |
//! | [`restart`] | the re-exec state file's shared part: framing, servers, clients, sockets, the located-error walker, file I/O (each daemon's `state.rs` has its own part) |
//! | [`inspect`] | the program shell of our operator-only "VHIP" program (both daemons) |
//! | [`admin`] | libvirt's admin program (0x06900690): servers, clients, limits, logging |
//! | [`libm_free`] | `pow(3)` defined here, so the daemons do not load glibc's libm |

pub mod activation;
pub mod admin;
pub mod cli;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod fdstore;
pub mod fdstore_keeper;
pub mod inspect;
pub mod libm_free;
pub mod logging;
pub mod next_image;
pub mod pidfile;
pub mod restart;
pub mod server;
pub mod stop_intent;

// The wire modules moved to `vh-proto` (so the client needs no server code); these
// paths stay so that `vh_common::xdr` and friends keep working.
pub use vh_proto::message as protocol;
pub use vh_proto::{error, fdpass, manual, paths, xdr};

pub use error::RpcError;
