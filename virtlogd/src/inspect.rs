//! The "VHIP" inspect program (0x56484950, version 1): an operator-only view of what the
//! daemon holds, served on the admin socket (so only the daemon's own uid gets in).
//! libvirt's clients never see it. virtlogd answers LIST_LOGS, LOG_METRICS and
//! FOLLOW_LOG; virtlockd answers LIST_LOCKS and LOCK_METRICS with the same program
//! number (see `virtlockd::inspect`).

use crate::handler::{LogCounters, LogHandler};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use vh_common::error::{code, domain, RpcError};
use vh_common::protocol::STRING_MAX;
use vh_common::server::{CallContext, DispatchError, Program, Reply};
use vh_common::xdr::{Decoder, Encoder, XdrError};

pub const PROGRAM: u32 = 0x5648_4950;
pub const VERSION: u32 = 1;

pub mod proc_ {
    /// virtlogd: `LogEntry<>` of every open log file.
    pub const LIST_LOGS: i32 = 1;
    /// virtlockd: `LockEntry<>` of every held resource.
    pub const LIST_LOCKS: i32 = 2;
    /// virtlogd: `LogMetric<>` of every open log.
    pub const LOG_METRICS: i32 = 3;
    /// virtlockd: `LockMetrics`.
    pub const LOCK_METRICS: i32 = 4;
    /// virtlogd: `{path string}` → `{inode u64, offset u64}` and one fd, a
    /// SOCK_SEQPACKET socket that streams what is written from that position on
    /// (records: see [`crate::follow`]).
    pub const FOLLOW_LOG: i32 = 5;
}

/// Most entries a reply may carry (a bound for the decoder, not a daemon limit).
pub const LIST_MAX: usize = 1 << 20;

/// One open log: `{path string, driver string, domname string, domuuid opaque[16],
/// inode u64, offset u64}` in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub path: Vec<u8>,
    pub driver: String,
    pub domname: String,
    pub domuuid: [u8; 16],
    pub inode: u64,
    pub offset: u64,
}

fn lossy(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl LogEntry {
    pub fn encode(&self, e: &mut Encoder) {
        e.opaque(&self.path)
            .string(&self.driver)
            .string(&self.domname)
            .fixed_opaque(&self.domuuid)
            .u64(self.inode)
            .u64(self.offset);
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(LogEntry {
            path: d.string_lossless(STRING_MAX)?,
            driver: lossy(d.string_lossless(STRING_MAX)?),
            domname: lossy(d.string_lossless(STRING_MAX)?),
            domuuid: d.uuid()?,
            inode: d.u64()?,
            offset: d.u64()?,
        })
    }

    /// The whole LIST_LOGS reply.
    pub fn encode_list(list: &[LogEntry]) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u32(list.len() as u32);
        for l in list {
            l.encode(&mut e);
        }
        e.into_inner()
    }

    pub fn decode_list(buf: &[u8]) -> Result<Vec<LogEntry>, XdrError> {
        let mut d = Decoder::new(buf);
        // Smallest entry: 3 empty strings + uuid + 2 hypers = 12 + 16 + 16.
        let n = d.array_len(LIST_MAX, 44)?;
        (0..n).map(|_| LogEntry::decode(&mut d)).collect()
    }
}

/// One open log's counters: `{path string, written u64, dropped u64, rotations u64,
/// followers u32}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogMetric {
    pub path: Vec<u8>,
    pub counters: LogCounters,
    /// Streams following the log now (FOLLOW_LOG).
    pub followers: u32,
}

impl LogMetric {
    pub fn encode_list(list: &[LogMetric]) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u32(list.len() as u32);
        for m in list {
            e.opaque(&m.path)
                .u64(m.counters.written)
                .u64(m.counters.dropped)
                .u64(m.counters.rotations)
                .u32(m.followers);
        }
        e.into_inner()
    }

    pub fn decode_list(buf: &[u8]) -> Result<Vec<LogMetric>, XdrError> {
        let mut d = Decoder::new(buf);
        let n = d.array_len(LIST_MAX, 32)?;
        (0..n)
            .map(|_| {
                Ok(LogMetric {
                    path: d.string_lossless(STRING_MAX)?,
                    counters: LogCounters {
                        written: d.u64()?,
                        dropped: d.u64()?,
                        rotations: d.u64()?,
                    },
                    followers: d.u32()?,
                })
            })
            .collect()
    }
}

/// FOLLOW_LOG's argument.
pub fn encode_follow_args(path: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.opaque(path);
    e.into_inner()
}

/// FOLLOW_LOG's reply: where the stream starts.
pub fn decode_follow_reply(buf: &[u8]) -> Result<(u64, u64), XdrError> {
    let mut d = Decoder::new(buf);
    Ok((d.u64()?, d.u64()?))
}

fn follow(handler: &LogHandler, args: &[u8]) -> Result<Reply, RpcError> {
    let mut d = Decoder::new(args);
    let path = d
        .string_lossless(STRING_MAX)
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
    let mut e = Encoder::new();
    e.u64(inode).u64(offset);
    let mut reply = Reply::payload(e.into_inner());
    reply.fds.push(theirs);
    Ok(reply)
}

/// The open logs, sorted by path.
pub fn list_logs(handler: &LogHandler) -> Vec<LogEntry> {
    handler
        .list()
        .into_iter()
        .map(|f| LogEntry {
            path: f.path.as_os_str().as_bytes().to_vec(),
            driver: f.owner.driver,
            domname: f.owner.domname,
            domuuid: f.owner.domuuid,
            inode: f.inode,
            offset: f.offset,
        })
        .collect()
}

pub struct InspectProgram {
    handler: Arc<LogHandler>,
}

impl InspectProgram {
    pub fn new(handler: Arc<LogHandler>) -> Arc<Self> {
        Arc::new(InspectProgram { handler })
    }
}

impl Program for InspectProgram {
    fn program(&self) -> u32 {
        PROGRAM
    }

    fn version(&self) -> u32 {
        VERSION
    }

    fn dispatch(
        &self,
        _ctx: &mut CallContext<'_>,
        proc_: i32,
        args: &[u8],
    ) -> Result<Reply, DispatchError> {
        match proc_ {
            // Off the workers: a log's lock may be held by a write that hangs.
            proc_::LIST_LOGS => Ok(Reply::payload(LogEntry::encode_list(
                &crate::program::off_worker(|| list_logs(&self.handler)),
            ))),
            // Counters are atomics: no file lock, nothing that can block.
            proc_::LOG_METRICS => {
                let list: Vec<LogMetric> = self
                    .handler
                    .counters()
                    .into_iter()
                    .map(|(p, counters, followers)| LogMetric {
                        path: p.as_os_str().as_bytes().to_vec(),
                        counters,
                        followers: u32::try_from(followers).unwrap_or(u32::MAX),
                    })
                    .collect();
                Ok(Reply::payload(LogMetric::encode_list(&list)))
            }
            // Off the workers: it takes the log's lock (and may reopen its file).
            proc_::FOLLOW_LOG => Ok(crate::program::off_worker(|| follow(&self.handler, args))?),
            _ => Err(DispatchError::UnknownProcedure),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_roundtrip() {
        let list = vec![
            LogEntry {
                path: b"/var/log/libvirt/qemu/vm1.log".to_vec(),
                driver: "qemu".into(),
                domname: "vm1".into(),
                domuuid: [7; 16],
                inode: 123,
                offset: 456,
            },
            LogEntry {
                path: vec![0xff, b'x'],
                driver: String::new(),
                domname: String::new(),
                domuuid: [0; 16],
                inode: 0,
                offset: u64::MAX,
            },
        ];
        let bytes = LogEntry::encode_list(&list);
        assert_eq!(LogEntry::decode_list(&bytes).unwrap(), list);
        for cut in 0..bytes.len() {
            assert!(LogEntry::decode_list(&bytes[..cut]).is_err());
        }
        assert_eq!(LogEntry::decode_list(&[0, 0, 0, 0]).unwrap(), vec![]);
    }

    #[test]
    fn metrics_roundtrip() {
        let list = vec![LogMetric {
            path: vec![b'/', 0xfe],
            counters: LogCounters {
                written: u64::MAX,
                dropped: 1,
                rotations: 2,
            },
            followers: 3,
        }];
        let bytes = LogMetric::encode_list(&list);
        assert_eq!(LogMetric::decode_list(&bytes).unwrap(), list);
        for cut in 0..bytes.len() {
            assert!(LogMetric::decode_list(&bytes[..cut]).is_err());
        }
        assert_eq!(
            decode_follow_reply(&[0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9]).unwrap(),
            (7, 9)
        );
    }
}
