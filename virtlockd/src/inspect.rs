//! Our operator-only "VHIP" inspect program as served here: virtlockd answers LIST_LOCKS
//! (what resources are held) and LOCK_METRICS (its figures). The wire types are in
//! `vh_proto::inspect`, the program shell in `vh_common::inspect`; virtlogd answers
//! LIST_LOGS, LOG_METRICS and FOLLOW_LOG.

use crate::table::LockTable;
use vh_common::error::RpcError;
use vh_common::inspect::{Inspect, Procedure};
use vh_common::server::Reply;

// The wire types moved to `vh-proto` (the client decodes them); these paths stay.
pub use vh_proto::inspect::{
    proc_, LockEntry, LockMetrics, LIST_MAX, OWNERS_MAX, PROGRAM, VERSION,
};

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

/// The inspect program as virtlockd serves it.
pub type InspectProgram = vh_common::inspect::InspectProgram<LockTable>;

impl Inspect for LockTable {
    const PROCEDURES: &'static [(i32, Procedure<Self>)] = &[
        (proc_::LIST_LOCKS, |table, _args| {
            Ok(Reply::payload(LockEntry::encode_list(&list_locks(table)?)))
        }),
        (proc_::LOCK_METRICS, |table, _args| {
            Ok(Reply::payload(lock_metrics(table)?.encode()))
        }),
    ];
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
