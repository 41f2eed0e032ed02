//! The lock table shared by all connections, and how calls run against it: a call
//! begins under the table lock, does its filesystem work on the blocking pool, and
//! finishes under the lock again, so that a file stuck on a dead NFS server (or any slow
//! open, fcntl, unlink or close) holds up only the call that touches it, never other
//! clients or the admin socket. A second call on a resource with a call in flight waits
//! for that call (see [`crate::lockspace`]). Jobs of a directory lockspace on a local
//! disk file system run inline ([`crate::lockspace::is_local_fs`]).

use crate::lockspace::{Begin, Job, LockSpace, LockSpaces};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use vh_common::error::{domain, RpcError};

pub struct LockTable {
    spaces: Mutex<LockSpaces>,
    /// Signalled whenever a job finishes (waiting calls look again).
    finished: Notify,
    /// Owner kills under way when the daemon quits; the quit waits for them.
    kills: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Leases released because their owner's connection closed while it held them
    /// (operator metrics; carried across re-exec).
    lease_losses: std::sync::atomic::AtomicU64,
}

impl LockTable {
    pub fn new(spaces: LockSpaces) -> Arc<Self> {
        Arc::new(LockTable {
            spaces: Mutex::new(spaces),
            finished: Notify::new(),
            kills: Mutex::new(Vec::new()),
            lease_losses: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Leases lost by owners whose connection closed while holding them.
    pub fn lease_losses(&self) -> u64 {
        self.lease_losses.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts lost leases (or adds the count carried across a re-exec).
    pub fn add_lease_losses(&self, n: u64) {
        self.lease_losses
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many resources `pid` owns across every lockspace (0 if the table is poisoned).
    pub fn leases_owned_by(&self, pid: u32) -> u64 {
        match self.spaces() {
            Ok(s) => s
                .iter()
                .map(|(_, ls)| ls.resources_owned_by(pid) as u64)
                .sum(),
            Err(_) => 0,
        }
    }

    /// Waits until every owner kill started so far has finished (quit).
    pub async fn kills_done(&self) {
        let pending: Vec<_> = match self.kills.lock() {
            Ok(mut k) => k.drain(..).collect(),
            Err(_) => return,
        };
        for k in pending {
            let _ = k.await;
        }
    }

    /// Remembers a kill started by a quitting daemon.
    pub fn track_kill(&self, h: tokio::task::JoinHandle<()>) {
        if let Ok(mut k) = self.kills.lock() {
            k.retain(|t| !t.is_finished());
            k.push(h);
        }
    }

    /// Whether `pid` owns anything in any lockspace (a poisoned table counts as yes, so
    /// a quit still kills before it releases).
    pub fn owns_any(&self, pid: u32) -> bool {
        match self.spaces() {
            Ok(s) => s.iter().any(|(_, ls)| ls.resources_owned_by(pid) > 0),
            Err(_) => true,
        }
    }

    /// The lockspaces, for re-exec and operator views. Never hold it across blocking work.
    pub fn spaces(&self) -> Result<MutexGuard<'_, LockSpaces>, RpcError> {
        self.spaces
            .lock()
            .map_err(|_| RpcError::internal(domain::LOCKSPACE, "lockspace table poisoned"))
    }

    /// The lockspaces if nobody holds them now (lease renewal never waits for the table).
    pub fn try_spaces(&self) -> Option<MutexGuard<'_, LockSpaces>> {
        self.spaces.try_lock().ok()
    }

    /// The lockspaces for a job that must record its outcome whatever happened before:
    /// a panic elsewhere cannot leave the slots half-updated (each update is one step).
    fn spaces_always(&self) -> MutexGuard<'_, LockSpaces> {
        self.spaces.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a call: `begin` under the table lock, then its job (if any) on the blocking
    /// pool; waits while another call on the same resource is in flight.
    async fn call(
        self: &Arc<Self>,
        begin: impl Fn(&mut LockSpaces) -> Result<Begin, RpcError>,
    ) -> Result<(), RpcError> {
        loop {
            let finished = self.finished.notified();
            let step = begin(&mut *self.spaces()?)?;
            match step {
                Begin::Done => {
                    // An owner added to or dropped from a held lease.
                    vh_common::fdstore_keeper::touch();
                    return Ok(());
                }
                Begin::Wait => finished.await,
                Begin::Work(job) if job.runs_inline() => return self.run(job),
                Begin::Work(job) => {
                    let me = self.clone();
                    return tokio::task::spawn_blocking(move || me.run(job))
                        .await
                        .map_err(|e| {
                            RpcError::internal(
                                domain::LOCKSPACE,
                                format!("lockspace job failed: {e}"),
                            )
                        })?;
                }
            }
        }
    }

    /// Runs `job` here and now (blocking) and records its outcome.
    fn run(&self, job: Job) -> Result<(), RpcError> {
        let resource = job.resource();
        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            job.run(&self.spaces)
        })) {
            Ok(done) => self.spaces_always().finish(done),
            Err(_) => {
                // A bug, not bad input: end the pending state, so that later calls on the
                // resource are not kept waiting forever.
                self.spaces_always().abandon(&resource);
                Err(RpcError::internal(
                    domain::LOCKSPACE,
                    format!("lockspace job on '{}' failed", resource.1),
                ))
            }
        };
        self.finished.notify_waiters();
        // Also after the closes of a hung-up owner, which no reply waits for.
        vh_common::fdstore_keeper::touch_soon();
        r
    }

    pub async fn acquire(
        self: &Arc<Self>,
        key: &str,
        name: &str,
        owner: u32,
        flags: u32,
    ) -> Result<(), RpcError> {
        self.call(|s| s.begin_acquire(key, name, owner, flags))
            .await
    }

    pub async fn release(
        self: &Arc<Self>,
        key: &str,
        name: &str,
        owner: u32,
    ) -> Result<(), RpcError> {
        self.call(|s| s.begin_release(key, name, owner)).await
    }

    pub async fn create_resource(self: &Arc<Self>, key: &str, name: &str) -> Result<(), RpcError> {
        self.call(|s| s.begin_create(key, name)).await
    }

    pub async fn delete_resource(self: &Arc<Self>, key: &str, name: &str) -> Result<(), RpcError> {
        self.call(|s| s.begin_delete(key, name)).await
    }

    /// NEW (`must_be_new`) or CREATE_LOCKSPACE: the directory is created on the blocking
    /// pool. An existing key is success for CREATE_LOCKSPACE and an error for NEW.
    pub async fn create_lockspace(&self, key: &str, must_be_new: bool) -> Result<(), RpcError> {
        let exists = || {
            if must_be_new {
                Err(RpcError::internal(
                    domain::RPC,
                    format!("Lockspace for path {key} already exists"),
                ))
            } else {
                Ok(())
            }
        };
        if self.spaces()?.contains(key) {
            return exists();
        }
        let dir = key.to_string();
        let ls = tokio::task::spawn_blocking(move || LockSpace::create_directory(dir))
            .await
            .map_err(|e| {
                RpcError::internal(domain::LOCKSPACE, format!("lockspace job failed: {e}"))
            })??;
        if self.spaces()?.add(key, ls) {
            vh_common::fdstore_keeper::touch();
            Ok(())
        } else {
            exists()
        }
    }

    /// Drops one ownership by `owner` everywhere (its connection closed); resources left
    /// without owners are closed on the blocking pool (inline outside a runtime). Returns
    /// whether `owner` held anything.
    pub fn release_owner(self: &Arc<Self>, owner: u32) -> bool {
        let (any, jobs) = self.spaces_always().release_owner(owner);
        // Shared leases it held lose an owner without a job: the snapshot must say so.
        vh_common::fdstore_keeper::touch_soon();
        // One task per resource: a close stuck on one file must not keep the others'.
        let rt = tokio::runtime::Handle::try_current();
        for job in jobs {
            if job.runs_inline() {
                let _ = self.run(job);
                continue;
            }
            let me = self.clone();
            let close = move || {
                let _ = me.run(job);
            };
            match &rt {
                Ok(h) => drop(h.spawn_blocking(close)),
                Err(_) => close(),
            }
        }
        any
    }

    /// After a re-exec: finds out, on the blocking pool, which directory lockspaces are on
    /// local file systems (a `statfs` may hang on a dead server; until it answers, that
    /// lockspace's jobs run on the pool).
    pub fn classify_lockspaces(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let dirs: Vec<(String, std::path::PathBuf)> = match self.spaces() {
            Ok(s) => s
                .directories()
                .filter_map(|(k, ls)| Some((k.to_string(), ls.directory()?.to_path_buf())))
                .collect(),
            Err(_) => return,
        };
        for (key, dir) in dirs {
            let me = self.clone();
            drop(rt.spawn_blocking(move || {
                let local = crate::lockspace::is_local_fs(&dir);
                me.spaces_always().set_local(&key, local);
            }));
        }
    }

    /// Synchronous calls for unit tests (the job runs inline).
    #[cfg(test)]
    pub fn call_now(
        &self,
        begin: impl FnOnce(&mut LockSpaces) -> Result<Begin, RpcError>,
    ) -> Result<(), RpcError> {
        let step = begin(&mut *self.spaces()?)?;
        match step {
            Begin::Done => Ok(()),
            Begin::Wait => panic!("a call is in flight"),
            Begin::Work(job) => self.run(job),
        }
    }
}
