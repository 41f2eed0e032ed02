//! The "VHIP" inspect program (0x56484950, version 1): an operator-only view of what the
//! daemon holds, served on the admin socket (so only the daemon's own uid gets in).
//! libvirt's clients never see it. virtlockd answers LIST_LOCKS and LOCK_METRICS;
//! virtlogd answers LIST_LOGS, LOG_METRICS and FOLLOW_LOG with the same program number
//! (see `virtlogd::inspect`).

use crate::protocol::STRING_MAX;
use crate::table::LockTable;
use std::sync::Arc;
use vh_common::error::RpcError;
use vh_common::server::{CallContext, DispatchError, Program, Reply};
use vh_common::xdr::{Decoder, Encoder, XdrError};

pub const PROGRAM: u32 = 0x5648_4950;
pub const VERSION: u32 = 1;

pub mod proc_ {
    /// virtlogd: every open log file.
    pub const LIST_LOGS: i32 = 1;
    /// virtlockd: `LockEntry<>` of every held resource.
    pub const LIST_LOCKS: i32 = 2;
    /// virtlogd: every open log's counters.
    pub const LOG_METRICS: i32 = 3;
    /// virtlockd: [`LockMetrics`].
    pub const LOCK_METRICS: i32 = 4;
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
        let n = d.array_len(LIST_MAX, 12)?;
        let leases = (0..n)
            .map(|_| Ok((lossy(d.string_lossless(STRING_MAX)?), d.u64()?)))
            .collect::<Result<_, XdrError>>()?;
        Ok(LockMetrics {
            leases,
            owners: d.u64()?,
            lease_losses: d.u64()?,
        })
    }
}

/// The daemon's current figures.
pub fn lock_metrics(daemon: &LockTable) -> Result<LockMetrics, RpcError> {
    let spaces = daemon.spaces()?;
    let mut owners = std::collections::HashSet::new();
    let mut leases: Vec<(String, u64)> = spaces
        .iter()
        .map(|(key, ls)| {
            let mut held = 0u64;
            for r in ls.resources() {
                held += r.owners().len() as u64;
                owners.extend(r.owners().iter().copied());
            }
            (key.to_string(), held)
        })
        .collect();
    leases.sort();
    Ok(LockMetrics {
        leases,
        owners: owners.len() as u64,
        lease_losses: daemon.lease_losses()
            + crate::renewal::stats()
                .losses
                .load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// Most entries a reply may carry (a bound for the decoder, not a daemon limit).
pub const LIST_MAX: usize = 1 << 20;
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

fn lossy(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
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
        let lockspace = lossy(d.string_lossless(STRING_MAX)?);
        let name = lossy(d.string_lossless(STRING_MAX)?);
        let path = lossy(d.string_lossless(STRING_MAX)?);
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
        let mut e = Encoder::new();
        e.u32(list.len() as u32);
        for l in list {
            l.encode(&mut e);
        }
        e.into_inner()
    }

    pub fn decode_list(buf: &[u8]) -> Result<Vec<LockEntry>, XdrError> {
        let mut d = Decoder::new(buf);
        // Smallest entry: 3 empty strings + bool + empty array.
        let n = d.array_len(LIST_MAX, 20)?;
        (0..n).map(|_| LockEntry::decode(&mut d)).collect()
    }
}

/// Every held resource, sorted by (lockspace, name).
pub fn list_locks(daemon: &LockTable) -> Result<Vec<LockEntry>, RpcError> {
    let spaces = daemon.spaces()?;
    let mut out: Vec<LockEntry> = spaces
        .iter()
        .flat_map(|(key, ls)| {
            ls.resources().map(move |r| LockEntry {
                lockspace: key.to_string(),
                name: r.name().to_string(),
                path: r.path().to_string_lossy().into_owned(),
                shared: r.is_shared(),
                owners: r.owners().to_vec(),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.lockspace, &a.name).cmp(&(&b.lockspace, &b.name)));
    Ok(out)
}

pub struct InspectProgram {
    daemon: Arc<LockTable>,
}

impl InspectProgram {
    pub fn new(daemon: Arc<LockTable>) -> Arc<Self> {
        Arc::new(InspectProgram { daemon })
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
        _args: &[u8],
    ) -> Result<Reply, DispatchError> {
        match proc_ {
            proc_::LIST_LOCKS => Ok(Reply::payload(LockEntry::encode_list(&list_locks(
                &self.daemon,
            )?))),
            proc_::LOCK_METRICS => Ok(Reply::payload(lock_metrics(&self.daemon)?.encode())),
            _ => Err(DispatchError::UnknownProcedure),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockspace::{LockSpace, LockSpaces};
    use crate::protocol::{ACQUIRE_AUTOCREATE, ACQUIRE_SHARED};

    #[test]
    fn lists_held_resources() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ls").to_string_lossy().into_owned();
        let d = LockTable::new(LockSpaces::new());
        d.spaces()
            .unwrap()
            .add(&key, LockSpace::create_directory(&key).unwrap());
        for (name, owner, flags) in [
            ("b", 10, ACQUIRE_AUTOCREATE | ACQUIRE_SHARED),
            ("b", 11, ACQUIRE_AUTOCREATE | ACQUIRE_SHARED),
            ("a", 12, ACQUIRE_AUTOCREATE),
        ] {
            d.call_now(|s| s.begin_acquire(&key, name, owner, flags))
                .unwrap();
        }
        let m = lock_metrics(&d).unwrap();
        assert_eq!(m.leases, vec![(String::new(), 0), (key.clone(), 3)]);
        assert_eq!(m.owners, 3);
        assert_eq!(LockMetrics::decode(&m.encode()).unwrap(), m);
        let list = list_locks(&d).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name, "a");
        assert!(!list[0].shared);
        assert_eq!(list[0].owners, vec![12]);
        assert_eq!(list[1].owners, vec![10, 11]);
        assert!(list[1].shared);
        assert_eq!(list[1].path, format!("{key}/b"));
        let bytes = LockEntry::encode_list(&list);
        assert_eq!(LockEntry::decode_list(&bytes).unwrap(), list);
        for cut in 0..bytes.len() {
            assert!(LockEntry::decode_list(&bytes[..cut]).is_err());
        }
    }
}
