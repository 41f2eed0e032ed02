//! The wire side of virt-helpers, shared by the client library, both daemons and the
//! tests: what goes over virtlogd's and virtlockd's sockets and where those sockets are.
//! Blocking and std-only (no tokio, no server code), so a client pulls in nothing more.
//!
//! | module | job |
//! |---|---|
//! | [`xdr`] | XDR codec with bounded lengths |
//! | [`error`] | libvirt's 11-field error struct and its constructors |
//! | [`message`] | message header, frame layout, size limits, keepalive constants |
//! | [`fdpass`] | SCM_RIGHTS fd passing exactly as libvirt does it (one fd per 1-byte sendmsg) |
//! | [`blocking`] | a blocking client making one call at a time |
//! | [`paths`] | system vs session mode and the socket/pid/state paths of each daemon |
//! | [`log`] | program 0x87539319 (virtlogd): argument and reply types of the four procedures |
//! | [`lock`] | program 0x0EA7BEEF (virtlockd): argument types, lease flags, the owner |
//! | [`inspect`] | our operator program "VHIP" (0x56484950): its replies, follow-stream records |
//! | [`exit`] | the daemons' exit statuses (libvirt's `virDaemonErr`) |
//! | [`manual`] | the `--help` texts and man pages of the daemons and vhctl, as data, rendered both ways |

pub mod blocking;
pub mod error;
pub mod exit;
pub mod fdpass;
pub mod inspect;
pub mod lock;
pub mod log;
pub mod manual;
pub mod message;
pub mod paths;
pub mod xdr;

pub use error::RpcError;
