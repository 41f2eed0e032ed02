//! The "VHIP" inspect program (0x56484950, version 1): an operator-only view of what a
//! daemon holds, served on its admin socket (so only the daemon's own uid gets in).
//! libvirt's clients never see it. virtlogd answers LIST_LOGS, LOG_METRICS and
//! FOLLOW_LOG; virtlockd answers LIST_LOCKS and LOCK_METRICS, under the same program
//! number. These are its wire types (and the records of a follow stream); the daemons
//! fill them.

use crate::lock;
use crate::message::STRING_MAX;
use crate::xdr::{lossy, Decoder, Encoder, XdrError};

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
    /// (records: `RECORD_*` below).
    pub const FOLLOW_LOG: i32 = 5;
    /// Both daemons: `FdStoreInfo`, whether the daemon keeps systemd's fd store and how
    /// many fds it holds there.
    pub const FD_STORE: i32 = 6;
}

/// FD_STORE's reply: `{enabled bool, stored u64, snapshots u64}`. `stored` counts the
/// fds the daemon keeps in systemd's store (its two state slots included);
/// `snapshots` the state snapshots written since start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FdStoreInfo {
    pub enabled: bool,
    pub stored: u64,
    pub snapshots: u64,
}

impl FdStoreInfo {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.bool(self.enabled).u64(self.stored).u64(self.snapshots);
        e.into_inner()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, XdrError> {
        let mut d = Decoder::new(buf);
        Ok(FdStoreInfo {
            enabled: d.bool()?,
            stored: d.u64()?,
            snapshots: d.u64()?,
        })
    }
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
        encode_list(list, LogEntry::encode)
    }

    pub fn decode_list(buf: &[u8]) -> Result<Vec<LogEntry>, XdrError> {
        // Smallest entry: 3 empty strings + uuid + 2 hypers = 12 + 16 + 16.
        decode_list(buf, 44, LogEntry::decode)
    }
}

/// Most owners per entry the decoder accepts.
pub const OWNERS_MAX: usize = 1 << 16;

/// One held resource: `{lockspace string, name string, path string, shared bool,
/// owners u32<>}` in wire order. `lockspace` is `""` for the default lockspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockEntry {
    pub lockspace: String,
    pub name: String,
    pub path: String,
    pub shared: bool,
    pub owners: Vec<u32>,
}

impl LockEntry {
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.lockspace)
            .string(&self.name)
            .string(&self.path)
            .bool(self.shared)
            .u32(self.owners.len() as u32);
        for &o in &self.owners {
            e.u32(o);
        }
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        let lockspace = lossy(d.string_lossless(lock::STRING_MAX)?);
        let name = lossy(d.string_lossless(lock::STRING_MAX)?);
        let path = lossy(d.string_lossless(lock::STRING_MAX)?);
        let shared = d.bool()?;
        let n = d.array_len(OWNERS_MAX, 4)?;
        let owners = (0..n).map(|_| d.u32()).collect::<Result<_, _>>()?;
        Ok(LockEntry {
            lockspace,
            name,
            path,
            shared,
            owners,
        })
    }

    /// The whole LIST_LOCKS reply.
    pub fn encode_list(list: &[LockEntry]) -> Vec<u8> {
        encode_list(list, LockEntry::encode)
    }

    pub fn decode_list(buf: &[u8]) -> Result<Vec<LockEntry>, XdrError> {
        // Smallest entry: 3 empty strings + bool + empty array.
        decode_list(buf, 20, LockEntry::decode)
    }
}

/// A log's operator counters (the metrics), kept across re-exec.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogCounters {
    /// Bytes written into the log's files.
    pub written: u64,
    /// Bytes of output that could not be written (and were dropped).
    pub dropped: u64,
    /// Completed rollovers.
    pub rotations: u64,
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
    pub fn encode(&self, e: &mut Encoder) {
        e.opaque(&self.path)
            .u64(self.counters.written)
            .u64(self.counters.dropped)
            .u64(self.counters.rotations)
            .u32(self.followers);
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(LogMetric {
            path: d.string_lossless(STRING_MAX)?,
            counters: LogCounters {
                written: d.u64()?,
                dropped: d.u64()?,
                rotations: d.u64()?,
            },
            followers: d.u32()?,
        })
    }

    /// The whole LOG_METRICS reply.
    pub fn encode_list(list: &[LogMetric]) -> Vec<u8> {
        encode_list(list, LogMetric::encode)
    }

    pub fn decode_list(buf: &[u8]) -> Result<Vec<LogMetric>, XdrError> {
        // Smallest entry: empty string + 3 hypers + u32.
        decode_list(buf, 32, LogMetric::decode)
    }
}

/// virtlockd's figures: `{leases {lockspace string, held u64}<>, owners u64,
/// lease_losses u64}`. `leases` has every lockspace, the default one as `""`, with the
/// leases held in it (a shared resource held by three owners counts three); `owners` is
/// the number of distinct owner pids holding a lease; `lease_losses` counts the leases
/// released because their owner's connection closed while holding them (the owner is
/// then killed), since start-up and across re-exec, plus the losses lease renewal
/// found (a lockspace past `lease_renew_timeout`, or a lock found gone; since start-up).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LockMetrics {
    pub leases: Vec<(String, u64)>,
    pub owners: u64,
    pub lease_losses: u64,
}

impl LockMetrics {
    /// The whole LOCK_METRICS reply.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u32(self.leases.len() as u32);
        for (ls, n) in &self.leases {
            e.string(ls).u64(*n);
        }
        e.u64(self.owners).u64(self.lease_losses);
        e.into_inner()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, XdrError> {
        let mut d = Decoder::new(buf);
        // Smallest lease: empty string + hyper.
        let n = d.array_len(LIST_MAX, 12)?;
        let leases = (0..n)
            .map(|_| Ok((lossy(d.string_lossless(lock::STRING_MAX)?), d.u64()?)))
            .collect::<Result<_, XdrError>>()?;
        Ok(LockMetrics {
            leases,
            owners: d.u64()?,
            lease_losses: d.u64()?,
        })
    }
}

/// FOLLOW_LOG's argument: `{path string}`.
pub fn encode_follow_args(path: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.opaque(path);
    e.into_inner()
}

pub fn decode_follow_args(buf: &[u8]) -> Result<Vec<u8>, XdrError> {
    Decoder::new(buf).string_lossless(STRING_MAX)
}

/// FOLLOW_LOG's reply: where the stream starts, `{inode u64, offset u64}`.
pub fn encode_follow_reply(inode: u64, offset: u64) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u64(inode).u64(offset);
    e.into_inner()
}

pub fn decode_follow_reply(buf: &[u8]) -> Result<(u64, u64), XdrError> {
    let mut d = Decoder::new(buf);
    Ok((d.u64()?, d.u64()?))
}

// A follow stream's records; the first byte is the kind:
// * RECORD_DATA + bytes: the next bytes of the log (at most DATA_MAX);
// * RECORD_MISSED + u64 (big-endian): that many bytes were written but not sent to
//   this follower;
// * RECORD_ROTATED + u64 (big-endian): the log rolled over; what follows goes into the
//   new file with that inode, from offset 0.
// The stream ends (EOF) when the log closes or the daemon re-executes.
pub const RECORD_DATA: u8 = 0;
pub const RECORD_MISSED: u8 = 1;
pub const RECORD_ROTATED: u8 = 2;
/// Most log bytes one data record carries.
pub const DATA_MAX: usize = 32 * 1024;

/// A list reply: `entry<LIST_MAX>`.
fn encode_list<T>(list: &[T], encode: impl Fn(&T, &mut Encoder)) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u32(list.len() as u32);
    for l in list {
        encode(l, &mut e);
    }
    e.into_inner()
}

fn decode_list<T>(
    buf: &[u8],
    min_entry: usize,
    decode: impl Fn(&mut Decoder<'_>) -> Result<T, XdrError>,
) -> Result<Vec<T>, XdrError> {
    let mut d = Decoder::new(buf);
    let n = d.array_len(LIST_MAX, min_entry)?;
    (0..n).map(|_| decode(&mut d)).collect()
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
