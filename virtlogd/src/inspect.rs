//! Our operator-only "VHIP" inspect program as served here: virtlogd answers LIST_LOGS
//! (what logs are open), LOG_METRICS (their counters) and FOLLOW_LOG (a stream of what
//! is written). The wire types are in `vh_proto::inspect`, the program shell in
//! `vh_common::inspect`; virtlockd answers LIST_LOCKS and LOCK_METRICS.

use crate::handler::LogHandler;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use std::os::unix::ffi::OsStrExt;
use vh_common::error::{code, domain, RpcError};
use vh_common::inspect::{Inspect, Procedure};
use vh_common::server::Reply;

// The wire types moved to `vh-proto` (the client decodes them); these paths stay.
pub use vh_proto::inspect::{
    decode_follow_reply, encode_follow_args, proc_, LogEntry, LogMetric, LIST_MAX, PROGRAM, VERSION,
};

/// The open logs, sorted by path.
pub fn list_logs(handler: &LogHandler) -> Result<Vec<LogEntry>, RpcError> {
    Ok(handler
        .list()?
        .into_iter()
        .map(|f| LogEntry {
            path: f.path.as_os_str().as_bytes().to_vec(),
            driver: f.owner.driver,
            domname: f.owner.domname,
            domuuid: f.owner.domuuid,
            inode: f.inode,
            offset: f.offset,
        })
        .collect())
}

/// Every open log's counters.
pub fn log_metrics(handler: &LogHandler) -> Result<Vec<LogMetric>, RpcError> {
    Ok(handler
        .counters()?
        .into_iter()
        .map(|(p, counters, followers)| LogMetric {
            path: p.as_os_str().as_bytes().to_vec(),
            counters,
            followers: u32::try_from(followers).unwrap_or(u32::MAX),
        })
        .collect())
}

fn follow(handler: &LogHandler, args: &[u8]) -> Result<Reply, RpcError> {
    let path = vh_proto::inspect::decode_follow_args(args)
        .map_err(|e| RpcError::new(code::INVALID_ARG, domain::LOGGING, e.to_string()))?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| RpcError::system(domain::LOGGING, e as i32, "Cannot create socket pair"))?;
    // Only the daemon writes; the client only reads.
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&theirs),
        nix::sys::socket::Shutdown::Write,
    );
    let (inode, offset) = handler.follow(&path, ours)?;
    let mut reply = Reply::payload(vh_proto::inspect::encode_follow_reply(inode, offset));
    reply.fds.push(theirs);
    Ok(reply)
}

/// The inspect program as virtlogd serves it.
pub type InspectProgram = vh_common::inspect::InspectProgram<LogHandler>;

impl Inspect for LogHandler {
    const PROCEDURES: &'static [(i32, Procedure<Self>)] = &[
        (proc_::LIST_LOGS, |handler, _args| {
            // Off the workers: a log's lock may be held by a write that hangs.
            let logs = crate::program::off_worker(|| list_logs(handler))?;
            Ok(Reply::payload(LogEntry::encode_list(&logs)))
        }),
        // Counters are atomics: no file lock, nothing that can block.
        (proc_::LOG_METRICS, |handler, _args| {
            Ok(Reply::payload(LogMetric::encode_list(&log_metrics(
                handler,
            )?)))
        }),
        // Off the workers: it takes the log's lock (and may reopen its file).
        (proc_::FOLLOW_LOG, |handler, args| {
            crate::program::off_worker(|| follow(handler, args))
        }),
    ];
}
