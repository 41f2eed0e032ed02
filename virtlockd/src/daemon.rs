//! virtlockd's part of the daemon front-end: the lockspaces behind the main server, and
//! the `defaultLockspace` / `lockspaces` sections of the re-exec state.

use crate::config::LeaseConfig;
use crate::lease_lock::LockKind;
use crate::lockspace::{Carried, FileId, LockSpace, LockSpaces, Resource};
use crate::program::{LockHooks, LockProgram};
use crate::state::{
    LeaseRow, LockdState, LockdStateRef, LockspaceRef, LockspaceState, ResourceRef, StateDocument,
};
use crate::table::LockTable;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{error, warn};
use vh_common::config::DaemonConfig;
use vh_common::daemon::{adopt_inheritable_fds, App, Daemon};
use vh_common::fdstore_keeper::{FdKind, SnapshotSink};
use vh_common::paths::{DaemonKind, Mode};
use vh_common::restart::{compact_doc, restart_magic, DaemonState, RestartError, RestoreError};
use vh_common::server::{ClientHooks, Program, RunState};

pub struct LockDaemonApp {
    pub daemon: Arc<LockTable>,
    run: watch::Receiver<RunState>,
}

/// One lockspace's part of the document, borrowed from the table, with our
/// [`LeaseRow`]s in the same order; every lease fd goes into `fds`, with whether it is
/// inheritable already.
fn lockspace_state<'a>(
    ls: &'a LockSpace,
    fds: &mut Vec<(RawFd, bool)>,
) -> (LockspaceRef<'a>, Vec<LeaseRow>) {
    // Sorted by name (names are unique in a lockspace).
    let mut held: Vec<&Resource> = ls.resources().collect();
    held.sort_unstable_by(|a, b| a.name().cmp(b.name()));
    let mut rows = Vec::with_capacity(held.len());
    let resources: Vec<ResourceRef<'a>> = held
        .into_iter()
        .map(|r| {
            // The lock lives as long as this fd does: it must survive the exec. A held
            // lease's fd is inheritable for life (see `Resource`), so this is mostly
            // not a syscall.
            fds.push((r.raw_fd(), r.is_inheritable()));
            if let Some(id) = r.file_id() {
                let ofd = r.lock_held() && r.lock_kind() == LockKind::Ofd;
                rows.push(LeaseRow(r.raw_fd(), id.dev(), id.ino(), ofd));
            }
            ResourceRef {
                name: r.name(),
                path: r.path().to_string_lossy(),
                fd: r.raw_fd(),
                lock_held: r.lock_held(),
                flags: r.flags(),
                owners: r.owners(),
            }
        })
        .collect();
    (
        LockspaceRef {
            directory: ls.directory().map(|d| d.to_string_lossy()),
            resources,
        },
        rows,
    )
}

/// The default lockspace and the directory ones (sorted by directory), with the rows of
/// all their leases in document order.
fn lockspaces_state<'a>(
    s: &'a LockSpaces,
    fds: &mut Vec<(RawFd, bool)>,
) -> (LockspaceRef<'a>, Vec<LockspaceRef<'a>>, Vec<LeaseRow>) {
    let (default_lockspace, mut rows) = lockspace_state(s.default_lockspace(), fds);
    let mut dirs: Vec<(LockspaceRef<'a>, Vec<LeaseRow>)> = s
        .directories()
        .map(|(_, ls)| lockspace_state(ls, fds))
        .collect();
    dirs.sort_by(|a, b| a.0.directory.cmp(&b.0.directory));
    let mut lockspaces = Vec::with_capacity(dirs.len());
    for (ls, r) in dirs {
        lockspaces.push(ls);
        rows.extend(r);
    }
    (default_lockspace, lockspaces, rows)
}

/// Our previous image's rows, taken in document order (see [`LeaseRow`]).
struct CarriedRows<'a> {
    rows: std::slice::Iter<'a, LeaseRow>,
    next: Option<&'a LeaseRow>,
    /// The document was written by this process (a re-exec): its OFD locks are ours
    /// as they stand. Not after a restart from the fd store.
    same_process: bool,
}

impl CarriedRows<'_> {
    /// What the rows say of the lease on `fd`, if the next row names it.
    fn take(&mut self, fd: RawFd) -> Option<Carried> {
        let row = self.next.filter(|r| r.0 == fd)?;
        self.next = self.rows.next();
        Some(Carried {
            id: FileId::new(row.1, row.2),
            ofd_kept: row.3 && self.same_process,
        })
    }
}

/// Rebuilds a lockspace from its state. Also returns the owners of every held lease
/// that could not be restored (its fd was lost, e.g. from the fd store, or another
/// process took the lock meanwhile): they must not run on without it.
fn restore_lockspace(st: LockspaceState, carried: &mut CarriedRows<'_>) -> (LockSpace, Vec<u32>) {
    let mut ls = LockSpace::restored(st.directory.map(PathBuf::from), st.resources.len());
    let mut orphaned = Vec::new();
    // One poll(2) checks every inherited fd, which stays inheritable (as every held
    // lease's fd is); with our previous image's rows, nothing else is asked of the
    // kernel per lease (an fstat and up to three fcntls each without them).
    let fds: Vec<RawFd> = st.resources.iter().map(|r| r.fd).collect();
    for (r, fd) in st.resources.into_iter().zip(adopt_inheritable_fds(&fds)) {
        let known = carried.take(r.fd);
        let owners: Vec<u32> = r
            .owners
            .iter()
            .filter_map(|&p| u32::try_from(p).ok())
            .collect();
        let fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                error!(resource = %r.name, "inherited lock fd {} is gone: {e}", r.fd);
                if r.lock_held {
                    orphaned.extend(&owners);
                }
                continue;
            }
        };
        // The document's strings move into the table (10,000 leases: 20,000 copies
        // and frees fewer inside the pause). The error names the resource or its path.
        let fd_number = r.fd;
        let lock_held = r.lock_held;
        if let Err(e) = ls.restore_resource(
            r.name,
            PathBuf::from(r.path),
            fd,
            r.lock_held,
            r.flags,
            owners,
            known,
        ) {
            warn!(fd = fd_number, "cannot restore resource: {e}");
            if lock_held {
                orphaned.extend(r.owners.iter().filter_map(|&p| u32::try_from(p).ok()));
            }
        }
    }
    (ls, orphaned)
}

/// Owner pids to kill, once each: never 0 or negative (a process group) nor ourselves,
/// since they come from documents and tables that are input.
fn killable(mut pids: Vec<u32>) -> Vec<i32> {
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .filter(|&p| p != std::process::id())
        .filter_map(|p| i32::try_from(p).ok())
        .filter(|&p| p > 0)
        .collect()
}
impl LockDaemonApp {
    /// The state document around the lockspaces, as `handoff` and `snapshot` write it.
    fn document<'a>(
        &self,
        daemon: DaemonState,
        default_lockspace: LockspaceRef<'a>,
        lockspaces: Vec<LockspaceRef<'a>>,
        leases: Vec<LeaseRow>,
        magic: String,
    ) -> LockdStateRef<'a> {
        // Our counters ride in a key of their own, which libvirt 9.0 ignores.
        let counters = serde_json::json!({ "leaseLosses": self.daemon.lease_losses() });
        LockdStateRef {
            daemon,
            default_lockspace,
            lockspaces,
            magic,
            counters: Some(counters),
            leases: Some(leases),
        }
    }
}

impl App for LockDaemonApp {
    const KIND: DaemonKind = DaemonKind::Lockd;
    const SINGLE_THREADED: bool = true;
    type Keys = LeaseConfig;

    fn new(
        config: &DaemonConfig<LeaseConfig>,
        _mode: Mode,
        run: watch::Receiver<RunState>,
    ) -> Self {
        let daemon = LockTable::new(LockSpaces::new());
        crate::renewal::start(daemon.clone(), config.own);
        LockDaemonApp { daemon, run }
    }

    fn hooks(&self) -> Arc<dyn ClientHooks> {
        LockHooks::with_run_state(self.daemon.clone(), self.run.clone())
    }

    fn programs(&self) -> Vec<Arc<dyn Program>> {
        vec![LockProgram::new(self.daemon.clone())]
    }

    fn admin_programs(&self, daemon: &Arc<Daemon>) -> Vec<Arc<dyn Program>> {
        // libvirt's admin program, plus our inspect program (what the daemon holds),
        // which libvirt's clients never call.
        vec![
            vh_common::admin::admin_program(Arc::downgrade(daemon)),
            crate::inspect::InspectProgram::new(self.daemon.clone()),
        ]
    }

    fn inhibits_shutdown(&self) -> bool {
        false
    }

    async fn handoff(&self, daemon: DaemonState, magic: String) -> (String, Vec<RawFd>) {
        let mut fds = Vec::new();
        let text = match self.daemon.spaces() {
            Ok(mut s) => {
                // No lease recorded from now on becomes inheritable (see
                // `LockSpaces::finish`): it would reach the next image unnamed.
                s.exec_started();
                // Fds parked on held files stay open across the exec (closing one would
                // drop its file's lock); the new process never learns of them.
                for fd in s.parked_fds() {
                    if let Err(e) = vh_proto::fdpass::clear_cloexec(fd) {
                        error!("cannot keep parked fd {fd} across exec: {e}");
                    }
                }
                let (default_lockspace, lockspaces, leases) = lockspaces_state(&s, &mut fds);
                compact_doc(&self.document(daemon, default_lockspace, lockspaces, leases, magic))
            }
            Err(e) => {
                error!("{e}");
                let none = LockspaceRef {
                    directory: None,
                    resources: Vec::new(),
                };
                compact_doc(&self.document(daemon, none, Vec::new(), Vec::new(), magic))
            }
        };
        // The front-end clears close-on-exec on these: only leases whose flag could not
        // be cleared when they were recorded.
        let fds = fds
            .into_iter()
            .filter(|&(_, inheritable)| !inheritable)
            .map(|(fd, _)| fd)
            .collect();
        (text, fds)
    }

    type State = LockdState;

    fn parse_state(text: &str) -> Result<LockdState, RestartError> {
        LockdState::parse(text)
    }

    fn state_magic(state: &LockdState) -> &str {
        &state.magic
    }

    fn restore(&self, doc: LockdState, in_place: bool) -> Result<DaemonState, RestoreError> {
        if !in_place {
            let carried = doc
                .counters
                .as_ref()
                .and_then(|c| c.get("leaseLosses"))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            self.daemon.add_lease_losses(carried);
        }
        let mut spaces = self.daemon.spaces()?;
        if in_place {
            // The exec failed: the lockspaces never left. Their leases' fds stay
            // inheritable; the parked ones close on exec again.
            spaces.exec_failed();
            for fd in spaces.parked_fds() {
                let _ = nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
            }
            return Ok(doc.daemon);
        }
        let rows = doc.leases.as_deref().unwrap_or_default();
        let mut rows = rows.iter();
        let mut carried = CarriedRows {
            next: rows.next(),
            rows,
            same_process: doc.magic == restart_magic(std::process::id()),
        };
        let (ls, mut orphaned) = restore_lockspace(doc.default_lockspace, &mut carried);
        spaces.insert(String::new(), ls);
        for st in doc.lockspaces {
            if let Some(dir) = st.directory.clone() {
                let (ls, o) = restore_lockspace(st, &mut carried);
                orphaned.extend(o);
                spaces.insert(dir, ls);
            }
        }
        drop(spaces);
        // An owner whose lease is gone must not keep writing to the disk (as when its
        // connection drops): killed, as 9.0 kills an owner that lost its leases.
        for pid in killable(orphaned) {
            error!(
                pid,
                "a lease of this owner could not be restored; stopping it"
            );
            self.daemon.add_lease_losses(1);
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                self.daemon
                    .track_kill(h.spawn(crate::program::kill_owner(pid)));
            }
        }
        self.daemon.classify_lockspaces();
        Ok(doc.daemon)
    }

    /// The document `handoff` writes, built and stored under the table lock, so no
    /// lease fd it names is closed meanwhile.
    fn snapshot(&self, daemon: DaemonState, magic: String, keep: &mut SnapshotSink<'_>) {
        let s = match self.daemon.spaces() {
            Ok(s) => s,
            Err(e) => {
                error!("{e}");
                return;
            }
        };
        let mut fds = Vec::new();
        let (default_lockspace, lockspaces, leases) = lockspaces_state(&s, &mut fds);
        let doc = self.document(daemon, default_lockspace, lockspaces, leases, magic);
        let kinds: Vec<(RawFd, FdKind)> =
            fds.into_iter().map(|(fd, _)| (fd, FdKind::Lease)).collect();
        // Compact, unlike the re-exec file (only our next image reads it): less to
        // write and hash per change.
        match serde_json::to_string(&doc) {
            Ok(text) => keep(&kinds, &text),
            Err(e) => error!("cannot serialise the fd store snapshot: {e}"),
        }
        drop(s);
    }

    /// Waits for the owner kills (each at most ~3 s, all at once): the leases of a live
    /// owner must outlive it, and the process exit would drop them.
    async fn shutdown(&self) {
        self.daemon.kills_done().await;
    }

    /// QEMU's owner connections stay: a hang-up would kill the guest. Everything else
    /// (libvirtd's calls, admin) is hung up.
    fn keep_after_crash(&self, server: &str, private: &serde_json::Value, peer_pid: i32) -> bool {
        is_owner_connection(server, private, peer_pid)
    }

    /// Clients did not drain (a call stuck on storage): their hang-ups never ran, so
    /// their owners were not killed. Every registered owner is killed now, as a quit
    /// does, before the exit drops the leases.
    async fn force_stop(&self) {
        let mut owners = Vec::new();
        // The table lock is never held across blocking work; still, do not wait on it
        // forever.
        for _ in 0..40 {
            if let Some(s) = self.daemon.try_spaces() {
                for (_, ls) in s.iter() {
                    for r in ls.resources() {
                        owners.extend_from_slice(r.owners());
                    }
                }
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        for pid in killable(owners) {
            warn!(
                pid,
                "forced stop: stopping lock owner before its leases are freed"
            );
            self.daemon
                .track_kill(tokio::spawn(crate::program::kill_owner(pid)));
        }
        self.daemon.kills_done().await;
    }
}

/// Whether a saved client is a QEMU owner connection, on the lock server: restricted
/// (as libvirt leaves it) or registered by its own peer (owner pid = peer pid, as QEMU
/// registers itself before it execs; hanging such a connection up kills its owner).
fn is_owner_connection(server: &str, private: &serde_json::Value, peer_pid: i32) -> bool {
    if server != DaemonKind::Lockd.name() {
        return false;
    }
    let restricted = private
        .get("restricted")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let owner = private
        .get("ownerPid")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    restricted || (owner != 0 && peer_pid > 0 && owner == peer_pid as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_restricted_lock_clients_survive_a_crash_resume() {
        let restricted = serde_json::json!({"restricted": true, "ownerPid": 42});
        let open = serde_json::json!({"restricted": false, "ownerPid": 42});
        assert!(is_owner_connection("virtlockd", &restricted, 7));
        assert!(
            !is_owner_connection("virtlockd", &open, 7),
            "libvirtd's call"
        );
        assert!(
            is_owner_connection("virtlockd", &open, 42),
            "the owner's own"
        );
        assert!(!is_owner_connection("admin", &restricted, 42));
        assert!(!is_owner_connection("virtlockd", &serde_json::json!({}), 0));
    }
}
