//! Client of our daemons' operator-only "VHIP" program on the admin socket: what a
//! virtlogd holds open and what a virtlockd has locked. libvirt's C daemons do not serve
//! it ([`ClientError::is_unsupported`]).

use crate::connect::{self, Target};
use crate::error::{ClientError, Result};
use std::os::fd::OwnedFd;
use std::path::Path;
use vh_proto::blocking::Client;
use vh_proto::inspect::{proc_, PROGRAM, VERSION};
pub use vh_proto::inspect::{FdStoreInfo, LockEntry, LockMetrics, LogEntry, LogMetric};
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

/// LOG_METRICS on virtlogd's admin socket: every open log's counters.
pub fn log_metrics(target: &Target) -> Result<Vec<LogMetric>> {
    let reply = admin_client(DaemonKind::Logd, target)?.call(proc_::LOG_METRICS, &[])?;
    LogMetric::decode_list(&reply.payload).map_err(ClientError::from)
}

/// FD_STORE on `kind`'s admin socket: whether it keeps systemd's fd store, and how
/// many fds it holds there.
pub fn fd_store(kind: DaemonKind, target: &Target) -> Result<FdStoreInfo> {
    let reply = admin_client(kind, target)?.call(proc_::FD_STORE, &[])?;
    FdStoreInfo::decode(&reply.payload).map_err(ClientError::from)
}

/// LOCK_METRICS on virtlockd's admin socket.
pub fn lock_metrics(target: &Target) -> Result<LockMetrics> {
    let reply = admin_client(DaemonKind::Lockd, target)?.call(proc_::LOCK_METRICS, &[])?;
    LockMetrics::decode(&reply.payload).map_err(ClientError::from)
}

/// FOLLOW_LOG on virtlogd's admin socket: the (inode, offset) the stream starts at and
/// the stream itself, a SOCK_SEQPACKET socket of records (see
/// [`vh_proto::inspect::RECORD_DATA`] and the kinds beside it). The log must be open
/// in the daemon.
pub fn follow_log(target: &Target, path: &Path) -> Result<(u64, u64, OwnedFd)> {
    use std::os::unix::ffi::OsStrExt;
    let args = vh_proto::inspect::encode_follow_args(path.as_os_str().as_bytes());
    let mut reply = admin_client(DaemonKind::Logd, target)?.call(proc_::FOLLOW_LOG, &args)?;
    let (inode, offset) =
        vh_proto::inspect::decode_follow_reply(&reply.payload).map_err(ClientError::from)?;
    let fd = reply
        .fds
        .pop()
        .ok_or_else(|| ClientError::Protocol("FOLLOW_LOG reply without its socket".into()))?;
    Ok((inode, offset, fd))
}

/// One record of a follow stream.
#[derive(Debug, PartialEq, Eq)]
pub enum FollowRecord {
    /// The next bytes of the log.
    Data(Vec<u8>),
    /// This many bytes were written but not sent (the reader was too slow).
    Missed(u64),
    /// The log rolled over into a new file with this inode.
    Rotated(u64),
    /// The stream ended: the log closed or the daemon re-executed.
    End,
}

/// Reads the next record of a follow stream (blocks until there is one).
pub fn next_record(stream: &OwnedFd) -> Result<FollowRecord> {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    use vh_proto::inspect::{DATA_MAX, RECORD_DATA, RECORD_MISSED, RECORD_ROTATED};
    let mut buf = vec![0u8; DATA_MAX + 1];
    let n = loop {
        match recv(stream.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ClientError::Io(e.into())),
        }
    };
    if n == 0 {
        return Ok(FollowRecord::End);
    }
    let body = &buf[1..n];
    let number = || {
        <[u8; 8]>::try_from(body)
            .map(u64::from_be_bytes)
            .map_err(|_| ClientError::Protocol(format!("follow record of {n} bytes")))
    };
    match buf[0] {
        RECORD_DATA => Ok(FollowRecord::Data(body.to_vec())),
        RECORD_MISSED => Ok(FollowRecord::Missed(number()?)),
        RECORD_ROTATED => Ok(FollowRecord::Rotated(number()?)),
        k => Err(ClientError::Protocol(format!(
            "unknown follow record kind {k}"
        ))),
    }
}
