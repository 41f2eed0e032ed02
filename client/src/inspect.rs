//! Client of our daemons' operator-only "VHIP" program on the admin socket: what a
//! virtlogd holds open and what a virtlockd has locked. libvirt's C daemons do not serve
//! it ([`ClientError::is_unsupported`]).

use crate::connect::{self, Target};
use crate::error::{ClientError, Result};
use vh_proto::blocking::Client;
use vh_proto::inspect::{proc_, PROGRAM, VERSION};
pub use vh_proto::inspect::{LockEntry, LogEntry};
use vh_proto::paths::DaemonKind;

fn admin_client(kind: DaemonKind, target: &Target) -> Result<Client> {
    let s = connect::connect_admin(kind, target)?;
    Ok(Client::from_stream(s, PROGRAM, VERSION))
}

/// LIST_LOGS on virtlogd's admin socket (for [`Target::Socket`], that path).
pub fn list_logs(target: &Target) -> Result<Vec<LogEntry>> {
    let reply = admin_client(DaemonKind::Logd, target)?.call(proc_::LIST_LOGS, &[])?;
    LogEntry::decode_list(&reply.payload).map_err(ClientError::from)
}

/// LIST_LOCKS on virtlockd's admin socket (for [`Target::Socket`], that path).
pub fn list_locks(target: &Target) -> Result<Vec<LockEntry>> {
    let reply = admin_client(DaemonKind::Lockd, target)?.call(proc_::LIST_LOCKS, &[])?;
    LockEntry::decode_list(&reply.payload).map_err(ClientError::from)
}
