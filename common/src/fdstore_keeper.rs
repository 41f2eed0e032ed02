//! Keeps systemd's fd store current while the daemon runs (the design is in
//! [`crate::fdstore`]): every fd the state document names is stored *before* the first
//! snapshot naming it (except in the very first snapshot, see `write`), a snapshot is written before a reply that changed state goes out,
//! and an fd that is gone is removed from the store only *after* a snapshot without it.
//!
//! Cost model: a snapshot is one serialisation of the whole document, one hash and
//! three `pwrite`s into a memfd, plus one `sendmsg` per fd new since the last one and
//! one per fd gone. Nothing is written when nothing changed: the daemons mark changes
//! with [`touch`], and a call that changed nothing costs one atomic load.
//!
//! Fd numbers are reused as soon as an fd is closed, so a number alone does not tell
//! whether the fd the store holds under a name is still the one the document names.
//! Code that closes an fd the document named calls [`closing`] first: the next snapshot
//! then stores whatever holds that number afresh. (A lease released and taken again on
//! the same file even has the same inode: only the close tells the two apart.)

use crate::fdstore::{names, snapshot_body, FdStore, StateSlots, PREFIX};
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tracing::{debug, error, warn};

/// Whether a keeper runs in this process (checked by the hooks, so they cost one load
/// when the store is off).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Bumped on every change the next snapshot must carry.
static CHANGES: AtomicU64 = AtomicU64::new(0);
/// Fd numbers closed (or about to be) since the last snapshot.
static CLOSED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());
/// What `vhctl status` shows: the store is on, fds held there, snapshots written.
static ENABLED: AtomicBool = AtomicBool::new(false);
static STORED: AtomicU64 = AtomicU64::new(0);
static SNAPSHOTS: AtomicU64 = AtomicU64::new(0);
/// Fds the store refused since start.
static STORE_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Wakes the background snapshot task (changes with no reply to wait for).
static SOON: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// The inspect program's FD_STORE answer.
pub fn info() -> vh_proto::inspect::FdStoreInfo {
    vh_proto::inspect::FdStoreInfo {
        enabled: ENABLED.load(Ordering::Relaxed),
        stored: STORED.load(Ordering::Relaxed),
        snapshots: SNAPSHOTS.load(Ordering::Relaxed),
    }
}

/// Whether the fd store is kept in this process.
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// The state changed: the next snapshot must be written.
pub fn touch() {
    if active() {
        CHANGES.fetch_add(1, Ordering::AcqRel);
    }
}

/// The state changed with no reply to wait for (a hang-up, a pipe's EOF): a snapshot
/// is written soon by the background task.
pub fn touch_soon() {
    if active() {
        CHANGES.fetch_add(1, Ordering::AcqRel);
        SOON.notify_one();
    }
}

/// `fd`, which a snapshot may name, is about to be closed (call before the close).
pub fn closing(fd: RawFd) {
    if active() {
        if let Ok(mut c) = CLOSED.lock() {
            c.push(fd);
        }
        CHANGES.fetch_add(1, Ordering::AcqRel);
    }
}

/// What an fd named in the state document is (its stored name derives from this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    /// A listening socket of the named server.
    Listener(String),
    /// A client connection: server name and client id.
    Client(String, u64),
    /// A log pipe's read end.
    Log,
    /// A lease fd (carries the OFD lock).
    Lease,
}

impl FdKind {
    /// Whether the stored `name` is for an fd of this kind (and, for a client, this one).
    fn matches(&self, name: &str) -> bool {
        match self {
            FdKind::Listener(s) => name
                .strip_prefix("vh-listen-")
                .and_then(|r| r.strip_prefix(s.as_str()))
                .is_some_and(|r| r.starts_with('-')),
            FdKind::Client(s, id) => name == names::client(s, *id),
            FdKind::Log => name.starts_with("vh-log-"),
            FdKind::Lease => name.starts_with("vh-lease-"),
        }
    }

    fn name(&self, serial: u64) -> String {
        match self {
            FdKind::Listener(s) => names::listener(s, serial as usize),
            FdKind::Client(s, id) => names::client(s, *id),
            FdKind::Log => names::log(serial),
            FdKind::Lease => names::lease(serial),
        }
    }

    /// Listeners may be polled by systemd (it drops one that errors); everything else
    /// must not be dropped on a hang-up or is not pollable (module docs of `fdstore`).
    fn poll(&self) -> bool {
        matches!(self, FdKind::Listener(_))
    }
}

/// Where an app hands its snapshot: its fds with their kinds, and the whole document.
pub type SnapshotSink<'a> = dyn FnMut(&[(RawFd, FdKind)], &str) + 'a;

/// What `vhctl status` shows of the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeeperStats {
    /// Fds the daemon holds in the store (state slots included).
    pub stored: u64,
    /// Snapshots written since start.
    pub snapshots: u64,
    /// Fds that could not be stored since start (each one an item a restart loses).
    pub store_failures: u64,
}

struct Inner {
    slots: StateSlots,
    /// Fd number → the name it is stored under.
    by_fd: HashMap<RawFd, String>,
    /// Names to remove after the next snapshot.
    gone: Vec<String>,
    /// Serial for the next name.
    serial: u64,
    /// Whether the state slots are in the store.
    slots_stored: bool,
    /// Fds that could not be stored (a restart loses those items).
    store_failures: u64,
    /// `CHANGES` as of the last snapshot written.
    written: u64,
    snapshots: u64,
    /// Set before a re-exec: nothing is stored any more.
    frozen: bool,
}

/// The running daemon's side of the store.
pub struct Keeper {
    store: FdStore,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper").finish_non_exhaustive()
    }
}

impl Keeper {
    /// Starts keeping. After a resume, `slots` and `table` (name → number) are what
    /// [`crate::fdstore::take_stored`] gave back and `stale` the stored names to drop;
    /// on a fresh start (or after a re-exec, which emptied the store) new slots are
    /// created and stored.
    pub fn start(
        store: FdStore,
        resumed: Option<(StateSlots, HashMap<String, RawFd>, Vec<String>)>,
    ) -> io::Result<Arc<Keeper>> {
        let (slots, by_fd, stale, slots_stored) = match resumed {
            Some((slots, table, stale)) => {
                let by_fd: HashMap<RawFd, String> =
                    table.into_iter().map(|(n, fd)| (fd, n)).collect();
                (slots, by_fd, stale, true)
            }
            // Stored just before the first snapshot is written (`write`): a start that
            // dies before that leaves no slot behind, and one that dies between the two
            // leaves slots without a whole document, which the next start treats as a
            // fresh one (`take_stored`).
            None => (StateSlots::create()?, HashMap::new(), Vec::new(), false),
        };
        // New names start above every name the store passed, the stale ones included:
        // a name reused while its stale twin is still stored would be removed with it.
        let serial = by_fd
            .values()
            .chain(stale.iter())
            .filter_map(|n: &String| n.rsplit('-').next()?.parse::<u64>().ok())
            .max()
            .map_or(1, |m| m + 1);
        // Stale names (stored, named by no document) go before anything is stored: a
        // removal sent after a store under the same name would remove both.
        for name in &stale {
            if let Err(e) = store.remove(name) {
                warn!("cannot remove stale {name} from the fd store: {e}");
            }
        }
        let gone = Vec::new();
        let keeper = Arc::new(Keeper {
            store,
            inner: Mutex::new(Inner {
                slots,
                by_fd,
                gone,
                serial,
                slots_stored,
                store_failures: 0,
                written: 0,
                snapshots: 0,
                // Until the daemon's state is whole (restore or set-up done): a
                // snapshot of half a restore would drop the rest from the store.
                frozen: true,
            }),
        });
        ACTIVE.store(true, Ordering::Release);
        ENABLED.store(true, Ordering::Relaxed);
        CHANGES.fetch_add(1, Ordering::AcqRel);
        Ok(keeper)
    }

    /// Starts writing snapshots, once the daemon's state is whole.
    pub fn go(&self) {
        if let Ok(mut i) = self.inner.lock() {
            i.frozen = false;
        }
        CHANGES.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a snapshot is due (something changed since the last one).
    pub fn due(&self) -> bool {
        let now = CHANGES.load(Ordering::Acquire);
        self.inner.lock().map(|i| i.written != now).unwrap_or(true)
    }

    /// Writes a snapshot of `doc`, whose fds are `fds`. The caller guarantees every fd
    /// in `fds` is open and is what `doc` says it is for the whole call (it holds the
    /// locks that keep them open). Returns the number of fds stored anew.
    pub fn write(&self, fds: &[(RawFd, FdKind)], doc: &str) -> io::Result<usize> {
        let seen_changes = CHANGES.load(Ordering::Acquire);
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("fd store keeper poisoned"))?;
        if inner.frozen {
            return Ok(0);
        }
        // The first snapshot (a fresh start, or the first after a re-exec, which left
        // the store empty) is written *before* its fds are stored: until they are, the
        // process alone holds them, and if it dies in between the next start finds a
        // document whose fds are missing, so it kills the owners of the leases it
        // cannot restore, rather than a store of fds no document names (which it must
        // drop, freeing leases under owners nobody knows of).
        let first = !inner.slots_stored;
        if first {
            inner.slots.store_in(&self.store)?;
            inner.slots_stored = true;
        }
        let mut unstored: Vec<(RawFd, String, bool)> = Vec::new();
        // Closes noted up to now: those numbers hold something new, if anything. Taken
        // after the caller listed its fds (under its locks), so a number closed and
        // reused meanwhile is seen as reused.
        let closed = CLOSED
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        for fd in closed {
            if let Some(name) = inner.by_fd.remove(&fd) {
                inner.gone.push(name);
            }
        }
        let mut listed = HashSet::with_capacity(fds.len());
        let mut fresh = 0;
        for (fd, kind) in fds {
            if !listed.insert(*fd) {
                warn!("fd {fd} is named twice in the state; stored once");
                continue;
            }
            if inner.by_fd.get(fd).is_some_and(|n| kind.matches(n)) {
                continue;
            }
            if let Some(old) = inner.by_fd.remove(fd) {
                inner.gone.push(old);
            }
            let serial = inner.serial;
            inner.serial += 1;
            let name = kind.name(serial);
            if first {
                unstored.push((*fd, name.clone(), kind.poll()));
                inner.by_fd.insert(*fd, name);
                continue;
            }
            // SAFETY: the caller keeps `fd` open for this whole call (see above).
            let b = unsafe { BorrowedFd::borrow_raw(*fd) };
            if let Err(e) = self.store.store(&name, b, kind.poll()) {
                // Left out of the table: a restart then misses this one item (its
                // number is held by a placeholder then, and a lease's owner killed).
                inner.store_failures += 1;
                STORE_FAILURES.fetch_add(1, Ordering::Relaxed);
                error!("cannot store fd {fd} as {name}: {e}; a restart loses this item");
                continue;
            }
            fresh += 1;
            inner.by_fd.insert(*fd, name);
        }
        // Stored fds the document no longer names.
        let mut dropped = Vec::new();
        inner.by_fd.retain(|fd, name| {
            let keep = listed.contains(fd);
            if !keep {
                dropped.push(std::mem::take(name));
            }
            keep
        });
        inner.gone.extend(dropped);
        if !unstored.is_empty() {
            let body = snapshot_body(inner.by_fd.iter().map(|(fd, n)| (*fd, n.as_str())), doc);
            inner.slots.write(&body)?;
            for (fd, name, poll) in unstored {
                // SAFETY: the caller keeps `fd` open for this whole call (see above).
                let b = unsafe { BorrowedFd::borrow_raw(fd) };
                if let Err(e) = self.store.store(&name, b, poll) {
                    inner.store_failures += 1;
                    STORE_FAILURES.fetch_add(1, Ordering::Relaxed);
                    error!("cannot store fd {fd} as {name}: {e}; a restart loses this item");
                    inner.by_fd.remove(&fd);
                    continue;
                }
                fresh += 1;
            }
        }
        // The table is exactly what is stored now and named by the document.
        let body = snapshot_body(inner.by_fd.iter().map(|(fd, n)| (*fd, n.as_str())), doc);
        inner.slots.write(&body)?;
        inner.written = seen_changes;
        inner.snapshots += 1;
        STORED.store(inner.by_fd.len() as u64 + 2, Ordering::Relaxed);
        SNAPSHOTS.store(inner.snapshots, Ordering::Relaxed);
        // Only now that no snapshot names them.
        for name in std::mem::take(&mut inner.gone) {
            if let Err(e) = self.store.remove(&name) {
                warn!("cannot remove {name} from the fd store: {e}");
            }
        }
        debug!(
            fds = inner.by_fd.len(),
            fresh,
            bytes = body.len(),
            "fd store snapshot"
        );
        Ok(fresh)
    }

    /// Before a SIGUSR1 exec: removes every fd from the store (the next image may be
    /// libvirt's C daemon, which releases a lease by closing its fd: a stored copy
    /// would keep the lock) and stops storing. `Err` names how many removals failed:
    /// those names are kept to be removed again (with the next snapshot, or the next
    /// clear), and the exec must not go ahead.
    pub fn clear(&self) -> Result<(), usize> {
        let Ok(mut inner) = self.inner.lock() else {
            return Err(1);
        };
        inner.frozen = true;
        let gone = std::mem::take(&mut inner.gone);
        let names: Vec<String> = inner
            .by_fd
            .drain()
            .map(|(_, n)| n)
            .chain(gone)
            .chain(crate::fdstore::STATE_SLOTS.iter().map(|s| s.to_string()))
            .collect();
        let mut failed = Vec::new();
        for name in names {
            if let Err(e) = self.store.remove(&name) {
                error!("cannot remove {name} from the fd store: {e}");
                failed.push(name);
            }
        }
        ACTIVE.store(false, Ordering::Release);
        STORED.store(0, Ordering::Relaxed);
        if failed.is_empty() {
            return Ok(());
        }
        let n = failed.len();
        inner.gone = failed
            .into_iter()
            .filter(|n| !crate::fdstore::STATE_SLOTS.contains(&n.as_str()))
            .collect();
        Err(n)
    }

    /// After a failed exec: stores the slots again and everything with the next
    /// snapshot.
    pub fn resume_after_failed_exec(&self) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if let Err(e) = inner.slots.store_in(&self.store) {
            warn!("cannot store the state slots again: {e}");
        }
        inner.frozen = false;
        ACTIVE.store(true, Ordering::Release);
        CHANGES.fetch_add(1, Ordering::AcqRel);
    }

    /// The newest whole snapshot body (tests, diagnostics).
    pub fn latest(&self) -> Option<(u64, Vec<u8>)> {
        self.inner.lock().ok()?.slots.latest()
    }

    pub fn stats(&self) -> KeeperStats {
        self.inner
            .lock()
            .map(|i| KeeperStats {
                stored: if i.frozen {
                    0
                } else {
                    i.by_fd.len() as u64 + 2
                },
                snapshots: i.snapshots,
                store_failures: i.store_failures,
            })
            .unwrap_or_default()
    }
}

/// Waits until a change without a reply asks for a snapshot ([`touch_soon`]).
pub async fn soon() {
    SOON.notified().await
}

/// Per server, the highest client id among `names` (stored names the document does
/// not use): new clients must get higher ids, or a new client's name would be a stale
/// one's.
pub fn stale_client_ids(names: &[String]) -> HashMap<String, u64> {
    let mut out: HashMap<String, u64> = HashMap::new();
    for n in names {
        let Some((server, id)) = n
            .strip_prefix("vh-client-")
            .and_then(|r| r.rsplit_once('-'))
            .and_then(|(s, id)| Some((s, id.parse::<u64>().ok()?)))
        else {
            continue;
        };
        let e = out.entry(server.to_string()).or_default();
        *e = (*e).max(id);
    }
    out
}

/// Names a stored fd of ours has (for tests and the stale check).
pub fn is_ours(name: &str) -> bool {
    name.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_match_their_names() {
        assert!(FdKind::Listener("virtlockd".into()).matches("vh-listen-virtlockd-3"));
        assert!(!FdKind::Listener("virtlock".into()).matches("vh-listen-virtlockd-3"));
        assert!(FdKind::Client("admin".into(), 7).matches("vh-client-admin-7"));
        assert!(!FdKind::Client("admin".into(), 7).matches("vh-client-admin-70"));
        assert!(FdKind::Lease.matches("vh-lease-12"));
        assert!(!FdKind::Lease.matches("vh-log-12"));
        assert!(FdKind::Log.poll() == FdKind::Lease.poll());
        assert!(FdKind::Listener(String::new()).poll());
    }
}
