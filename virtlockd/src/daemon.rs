//! virtlockd's part of the daemon front-end: the lockspaces behind the main server, and
//! the `defaultLockspace` / `lockspaces` sections of the re-exec state.

use crate::config::LeaseConfig;
use crate::lockspace::{LockSpace, LockSpaces};
use crate::program::{LockHooks, LockProgram};
use crate::state::{LockdState, LockspaceState, ResourceState, StateDocument};
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
use vh_common::restart::{DaemonState, RestartError, RestoreError};
use vh_common::server::{ClientHooks, Program, RunState};

pub struct LockDaemonApp {
    pub daemon: Arc<LockTable>,
    run: watch::Receiver<RunState>,
}

fn lockspace_state(ls: &LockSpace, fds: &mut Vec<RawFd>) -> LockspaceState {
    let mut resources: Vec<ResourceState> = ls
        .resources()
        .map(|r| {
            // The lock lives as long as this fd does: it must survive the exec. The
            // front-end clears close-on-exec on every fd handed back (one fcntl each;
            // doing it here as well cost 10,000 more with 10,000 leases).
            fds.push(r.raw_fd());
            ResourceState {
                name: r.name().to_string(),
                path: r.path().to_string_lossy().into_owned(),
                fd: r.raw_fd(),
                lock_held: r.lock_held(),
                flags: r.flags(),
                owners: r.owners().iter().map(|&p| u64::from(p)).collect(),
            }
        })
        .collect();
    resources.sort_by(|a, b| a.name.cmp(&b.name));
    LockspaceState {
        directory: ls.directory().map(|d| d.to_string_lossy().into_owned()),
        resources,
    }
}

/// Rebuilds a lockspace from its state. Also returns the owners of every held lease
/// that could not be restored (its fd was lost, e.g. from the fd store, or another
/// process took the lock meanwhile): they must not run on without it.
fn restore_lockspace(st: &LockspaceState) -> (LockSpace, Vec<u32>) {
    let mut ls = LockSpace::restored(st.directory.as_ref().map(PathBuf::from));
    let mut orphaned = Vec::new();
    // One poll(2) checks every inherited fd; `restore_resource` makes each close-on-exec
    // again (adopting them one by one set that flag twice: 10,000 fcntls more with
    // 10,000 leases, inside the re-exec pause).
    let fds: Vec<RawFd> = st.resources.iter().map(|r| r.fd).collect();
    for (r, fd) in st.resources.iter().zip(adopt_inheritable_fds(&fds)) {
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
        if let Err(e) = ls.restore_resource(
            r.name.clone(),
            PathBuf::from(&r.path),
            fd,
            r.lock_held,
            r.flags,
            owners.clone(),
        ) {
            warn!(resource = %r.name, "cannot restore resource: {e}");
            if r.lock_held {
                orphaned.extend(&owners);
            }
        }
    }
    (ls, orphaned)
}

impl LockDaemonApp {
    /// The state document around the lockspaces, as `handoff` and `snapshot` write it.
    fn document(
        &self,
        daemon: DaemonState,
        default_lockspace: LockspaceState,
        lockspaces: Vec<LockspaceState>,
        magic: String,
    ) -> LockdState {
        // Our counters ride in a key of their own, which libvirt 9.0 ignores.
        let counters = serde_json::json!({ "leaseLosses": self.daemon.lease_losses() });
        LockdState {
            daemon,
            default_lockspace,
            lockspaces,
            magic,
            counters: Some(counters),
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
        let (default_lockspace, lockspaces) = match self.daemon.spaces() {
            Ok(s) => {
                let d = lockspace_state(s.default_lockspace(), &mut fds);
                let mut dirs: Vec<LockspaceState> = s
                    .directories()
                    .map(|(_, ls)| lockspace_state(ls, &mut fds))
                    .collect();
                // Fds parked on held files stay open across the exec (closing one would
                // drop its file's lock); the new process never learns of them.
                for fd in s.parked_fds() {
                    if let Err(e) = vh_proto::fdpass::clear_cloexec(fd) {
                        error!("cannot keep parked fd {fd} across exec: {e}");
                    }
                }
                dirs.sort_by(|a, b| a.directory.cmp(&b.directory));
                (d, dirs)
            }
            Err(e) => {
                error!("{e}");
                (
                    LockspaceState {
                        directory: None,
                        resources: Vec::new(),
                    },
                    Vec::new(),
                )
            }
        };
        let doc = self.document(daemon, default_lockspace, lockspaces, magic);
        (doc.to_json_string(), fds)
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
            // The exec failed: the lockspaces never left; just close their fds on exec
            // again.
            for (_, ls) in spaces.iter() {
                for r in ls.resources() {
                    let _ = r.set_inheritable(false);
                }
            }
            for fd in spaces.parked_fds() {
                let _ = nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
            }
            return Ok(doc.daemon);
        }
        let (ls, mut orphaned) = restore_lockspace(&doc.default_lockspace);
        spaces.insert(String::new(), ls);
        for st in &doc.lockspaces {
            if let Some(dir) = &st.directory {
                let (ls, o) = restore_lockspace(st);
                orphaned.extend(o);
                spaces.insert(dir.clone(), ls);
            }
        }
        drop(spaces);
        // An owner whose lease is gone must not keep writing to the disk (as when its
        // connection drops): killed, as 9.0 kills an owner that lost its leases.
        orphaned.sort_unstable();
        orphaned.dedup();
        // Never 0 or negative (a process group) nor ourselves: the document is input.
        orphaned.retain(|&p| p > 0 && p <= i32::MAX as u32 && p != std::process::id());
        for pid in orphaned {
            error!(
                pid,
                "a lease of this owner could not be restored; stopping it"
            );
            self.daemon.add_lease_losses(1);
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                self.daemon
                    .track_kill(h.spawn(crate::program::kill_owner(pid as i32)));
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
        let default_lockspace = lockspace_state(s.default_lockspace(), &mut fds);
        let mut lockspaces: Vec<LockspaceState> = s
            .directories()
            .map(|(_, ls)| lockspace_state(ls, &mut fds))
            .collect();
        lockspaces.sort_by(|a, b| a.directory.cmp(&b.directory));
        let doc = self.document(daemon, default_lockspace, lockspaces, magic);
        let kinds: Vec<(RawFd, FdKind)> = fds.into_iter().map(|fd| (fd, FdKind::Lease)).collect();
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
        owners.sort_unstable();
        owners.dedup();
        owners.retain(|&p| p > 0 && p <= i32::MAX as u32 && p != std::process::id());
        for pid in owners {
            warn!(
                pid,
                "forced stop: stopping lock owner before its leases are freed"
            );
            self.daemon
                .track_kill(tokio::spawn(crate::program::kill_owner(pid as i32)));
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
