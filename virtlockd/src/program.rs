//! RPC dispatch of program 0x0EA7BEEF: owner registration, restriction, and the
//! lockspace calls, with libvirt 9.0's checks in 9.0's order (flags, restricted,
//! registered, lockspace exists).
//!
//! Per-connection state is the registered owner. When the connection of the owner
//! itself goes away (peer pid == owner pid: the socket QEMU inherited), everything that
//! owner held is released and the owner is killed, as 9.0 does: a QEMU that lost its
//! lock connection must not keep writing to the disks. Unlike 9.0, the kill loop runs on
//! its own task and never stalls other clients.
//!
//! When the daemon itself quits (a signal, `virt-admin daemon-shutdown`, the idle
//! timeout) the owners are still alive, so the order is reversed: each owner is killed
//! first and its leases are released only once it is gone, and the daemon waits for
//! that before it exits. 9.0 and 11.3 release first and then kill, leaving a window
//! (up to 1.6 s before SIGKILL) in which a running QEMU writes to disks whose leases
//! are free.

use crate::protocol::{self as p, proc_};
use crate::state::{FromObj, LockClientPrivate};
use crate::table::LockTable;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;
use vh_common::error::{code, domain, RpcError};
use vh_common::server::{
    CallContext, ClientHooks, ClientInfo, DispatchError, Dispatched, Private, PrivateDataError,
    Program, Reply, RunState,
};
use vh_common::xdr::Decoder;

/// What a lock connection has registered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockClient {
    pub restricted: bool,
    pub owner_id: u32,
    pub owner_pid: u32,
    pub owner_name: Option<String>,
    pub owner_uuid: [u8; 16],
    /// The owner's start time at REGISTER (0: unknown); see [`kill_owner_started`].
    pub owner_start: u64,
}

pub struct LockProgram {
    table: Arc<LockTable>,
}

impl LockProgram {
    pub fn new(table: Arc<LockTable>) -> Arc<Self> {
        Arc::new(LockProgram { table })
    }
}

fn restricted_error() -> RpcError {
    RpcError::new(
        code::OPERATION_DENIED,
        domain::RPC,
        "lock manager connection has been restricted",
    )
}

fn unregistered_error() -> RpcError {
    RpcError::new(
        code::OPERATION_INVALID,
        domain::RPC,
        "lock owner details have not been registered",
    )
}

fn no_lockspace(path: &str) -> RpcError {
    RpcError::internal(
        domain::RPC,
        format!("Lockspace for path {path} does not exist"),
    )
}

/// A lockspace path or resource name from the wire. Names and paths are carried as they
/// are or refused, never converted: a lossy conversion would lock a different file. Only
/// UTF-8 can be carried: the re-exec state is JSON. (9.0 locks such a name, but its JSON
/// writer refuses it, so its next SIGUSR1 re-exec fails and the daemon exits, dropping
/// every lease.)
fn utf8(bytes: Vec<u8>) -> Result<String, Vec<u8>> {
    String::from_utf8(bytes).map_err(|e| e.into_bytes())
}

fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\\0")
}

fn not_utf8(what: &str, bytes: &[u8]) -> RpcError {
    RpcError::new(
        code::INVALID_ARG,
        domain::LOCKSPACE,
        format!("{what} '{}' is not valid: it is not UTF-8", shown(bytes)),
    )
}

fn check_flags(flags: u32, allowed: u32, function: &str) -> Result<(), RpcError> {
    RpcError::check_flags(domain::RPC, function, flags, allowed)
}

/// Restricted and registered checks, in that order.
fn check_client(c: &LockClient) -> Result<(), RpcError> {
    if c.restricted {
        return Err(restricted_error());
    }
    if c.owner_id == 0 {
        return Err(unregistered_error());
    }
    Ok(())
}

fn client_of<'a>(ctx: &'a mut CallContext<'_>) -> Result<&'a mut LockClient, RpcError> {
    ctx.private
        .downcast_mut::<LockClient>()
        .ok_or_else(|| RpcError::internal(domain::RPC, "lock client state missing"))
}

impl Program for LockProgram {
    fn program(&self) -> u32 {
        p::PROGRAM
    }

    fn version(&self) -> u32 {
        p::VERSION
    }

    fn dispatch(
        &self,
        ctx: &mut CallContext<'_>,
        proc_: i32,
        args: &[u8],
    ) -> Result<Reply, DispatchError> {
        match self.dispatch_deferred(ctx, proc_, args) {
            Dispatched::Now(r) => r,
            Dispatched::Later(_) => {
                Err(RpcError::internal(domain::RPC, "this call must run deferred").into())
            }
        }
    }

    fn dispatch_deferred(&self, ctx: &mut CallContext<'_>, proc_: i32, args: &[u8]) -> Dispatched {
        match self.begin(ctx, proc_, args) {
            Ok(Call::Now(reply)) => Dispatched::Now(Ok(reply)),
            Ok(Call::Later(work)) => Dispatched::Later(Box::pin(async move {
                work.await?;
                Ok(Reply::void())
            })),
            Err(e) => Dispatched::Now(Err(e)),
        }
    }
}

type Work = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RpcError>> + Send>>;

/// A call checked and decoded: its answer, or the table work that gives it.
enum Call {
    Now(Reply),
    Later(Work),
}

impl LockProgram {
    /// The checks in 9.0's order; the lockspace calls' table work comes back as a future.
    fn begin(
        &self,
        ctx: &mut CallContext<'_>,
        proc_: i32,
        args: &[u8],
    ) -> Result<Call, DispatchError> {
        let mut d = Decoder::new(args);
        match proc_ {
            proc_::REGISTER => {
                let a = p::RegisterArgs::decode(&mut d)?;
                let c = client_of(ctx)?;
                check_flags(a.flags, 0, "virLockSpaceProtocolDispatchRegister")?;
                if c.restricted {
                    return Err(restricted_error().into());
                }
                if a.owner.id == 0 {
                    return Err(unregistered_error().into());
                }
                // 9.0 lets a connection register again; it just overwrites the owner.
                crate::renewal::note_owner(a.owner.pid, &a.owner.name, a.owner.uuid);
                c.owner_name = Some(a.owner.name);
                c.owner_uuid = a.owner.uuid;
                c.owner_id = a.owner.id;
                c.owner_pid = a.owner.pid;
                c.owner_start = process_start_time(a.owner.pid).unwrap_or(0);
                Ok(Call::Now(Reply::void()))
            }
            proc_::RESTRICT => {
                let flags = d.u32()?;
                let c = client_of(ctx)?;
                check_flags(flags, 0, "virLockSpaceProtocolDispatchRestrict")?;
                check_client(c)?;
                c.restricted = true;
                Ok(Call::Now(Reply::void()))
            }
            proc_::NEW => {
                let path = d.string_lossless(p::STRING_MAX)?;
                let flags = d.u32()?;
                let c = client_of(ctx)?;
                check_flags(flags, 0, "virLockSpaceProtocolDispatchNew")?;
                check_client(c)?;
                if path.is_empty() {
                    return Err(RpcError::new(
                        code::OPERATION_INVALID,
                        domain::RPC,
                        "the default lockspace already exists",
                    )
                    .into());
                }
                let path = utf8(path).map_err(|b| not_utf8("Lockspace path", &b))?;
                // 9.0 ignores a failure to create the directory; we report it.
                let table = self.table.clone();
                Ok(Call::Later(Box::pin(async move {
                    table.create_lockspace(&path, true).await
                })))
            }
            proc_::CREATE_RESOURCE
            | proc_::DELETE_RESOURCE
            | proc_::ACQUIRE_RESOURCE
            | proc_::RELEASE_RESOURCE => {
                let path = d.string_lossless(p::STRING_MAX)?;
                let name = d.string_lossless(p::STRING_MAX)?;
                let flags = d.u32()?;
                let c = client_of(ctx)?.clone();
                let (allowed, function) = match proc_ {
                    proc_::CREATE_RESOURCE => (0, "virLockSpaceProtocolDispatchCreateResource"),
                    proc_::DELETE_RESOURCE => (0, "virLockSpaceProtocolDispatchDeleteResource"),
                    proc_::ACQUIRE_RESOURCE => (
                        p::ACQUIRE_SHARED | p::ACQUIRE_AUTOCREATE,
                        "virLockSpaceProtocolDispatchAcquireResource",
                    ),
                    _ => (0, "virLockSpaceProtocolDispatchReleaseResource"),
                };
                check_flags(flags, allowed, function)?;
                check_client(&c)?;
                // A lockspace is never created under a non-UTF-8 path, so none exists.
                let key = utf8(path).map_err(|b| no_lockspace(&shown(&b)))?;
                if !self.table.spaces()?.contains(&key) {
                    return Err(no_lockspace(&key).into());
                }
                let name = utf8(name).map_err(|b| not_utf8("Resource name", &b))?;
                let table = self.table.clone();
                let owner = c.owner_pid;
                // Every call goes through the table's checked path: one file is never
                // held under two names, whatever lockspace or spelling names it.
                Ok(Call::Later(Box::pin(async move {
                    match proc_ {
                        proc_::CREATE_RESOURCE => table.create_resource(&key, &name).await,
                        proc_::DELETE_RESOURCE => table.delete_resource(&key, &name).await,
                        proc_::ACQUIRE_RESOURCE => table.acquire(&key, &name, owner, flags).await,
                        _ => table.release(&key, &name, owner).await,
                    }
                })))
            }
            proc_::CREATE_LOCKSPACE => {
                let path = d.string_lossless(p::STRING_MAX)?;
                let c = client_of(ctx)?;
                if c.restricted {
                    return Err(restricted_error().into());
                }
                let path = utf8(path).map_err(|b| not_utf8("Lockspace path", &b))?;
                // An existing lockspace is success in 9.0 (and what older clients expect).
                let table = self.table.clone();
                Ok(Call::Later(Box::pin(async move {
                    table.create_lockspace(&path, false).await
                })))
            }
            _ => Err(DispatchError::UnknownProcedure),
        }
    }
}

/// Client life cycle of the lock server.
pub struct LockHooks {
    table: Arc<LockTable>,
    /// The daemon's run state: a close during a quit kills before it releases.
    run: Option<watch::Receiver<RunState>>,
}

impl LockHooks {
    pub fn new(table: Arc<LockTable>) -> Arc<Self> {
        Arc::new(LockHooks { table, run: None })
    }

    /// Hooks that know when the daemon quits (see the module docs).
    pub fn with_run_state(table: Arc<LockTable>, run: watch::Receiver<RunState>) -> Arc<Self> {
        Arc::new(LockHooks {
            table,
            run: Some(run),
        })
    }

    fn quitting(&self) -> bool {
        self.run
            .as_ref()
            .is_some_and(|r| *r.borrow() == RunState::Quit)
    }
}

impl ClientHooks for LockHooks {
    fn new_private(&self, _info: &ClientInfo) -> Private {
        Box::new(LockClient::default())
    }

    fn client_closed(&self, info: &ClientInfo, private: Private) {
        let Ok(c) = private.downcast::<LockClient>() else {
            return;
        };
        if c.owner_pid == 0 || info.pid <= 0 || info.pid as u32 != c.owner_pid {
            return;
        }
        if self.quitting() {
            if !self.table.owns_any(c.owner_pid) {
                return;
            }
            info!(
                pid = c.owner_pid,
                "daemon quitting: stopping lock owner before releasing its leases"
            );
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                let (pid, start) = (c.owner_pid, c.owner_start);
                let table = self.table.clone();
                self.table.track_kill(h.spawn(async move {
                    kill_owner_started(pid as i32, start).await;
                    table.release_owner(pid);
                }));
                return;
            }
        }
        // Leases lost because their owner went away while holding them (metrics).
        let lost = self.table.leases_owned_by(c.owner_pid);
        self.table.add_lease_losses(lost);
        let held = self.table.release_owner(c.owner_pid);
        if held {
            info!(
                pid = c.owner_pid,
                "lock owner connection closed; releasing its leases and stopping it"
            );
            let (pid, start) = (c.owner_pid as i32, c.owner_start);
            // Outside a runtime (unit tests), fall back to a thread.
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    self.table
                        .track_kill(h.spawn(kill_owner_started(pid, start)));
                }
                Err(_) => {
                    std::thread::spawn(move || {
                        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                            .enable_time()
                            .build()
                        {
                            rt.block_on(kill_owner_started(pid, start));
                        }
                    });
                }
            }
        }
    }

    fn save_private(&self, private: &Private) -> Result<serde_json::Value, PrivateDataError> {
        let c = private
            .downcast_ref::<LockClient>()
            .ok_or(PrivateDataError::Missing("lock"))?;
        // libvirt refuses to save an unregistered client; we save it with an empty name
        // rather than fail the whole re-exec.
        Ok(LockClientPrivate {
            restricted: c.restricted,
            owner_pid: c.owner_pid,
            owner_id: c.owner_id,
            owner_name: c.owner_name.clone().unwrap_or_default(),
            owner_uuid: Uuid::from_bytes(c.owner_uuid),
            owner_start: c.owner_start,
        }
        .to_value())
    }

    fn restore_private(&self, v: &serde_json::Value) -> Result<Private, PrivateDataError> {
        let p = LockClientPrivate::from_value(v)?;
        Ok(Box::new(LockClient {
            restricted: p.restricted,
            owner_id: p.owner_id,
            owner_pid: p.owner_pid,
            owner_name: if p.owner_id == 0 && p.owner_name.is_empty() {
                None
            } else {
                Some(p.owner_name)
            },
            owner_uuid: *p.owner_uuid.as_bytes(),
            owner_start: p.owner_start,
        }))
    }
}

/// A process's start time (`/proc/<pid>/stat` field 22, clock ticks since boot).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// [`kill_owner`], but only while `pid` is still the process that registered (its start
/// time is `start`; 0 = unknown, killed unchecked). An owner that exited while the
/// daemon was down (a resume from the fd store) may have its pid reused by another
/// process by the time its connection's hang-up is seen.
pub async fn kill_owner_started(pid: i32, start: u64) {
    if start != 0 && process_start_time(pid as u32) != Some(start) {
        info!(
            pid,
            "lock owner already gone (its pid is not the process that registered); not killing"
        );
        return;
    }
    kill_owner(pid).await
}

/// SIGTERM, then probe every 200 ms, SIGKILL on the 9th round, give up after 15: the
/// schedule 9.0 uses.
pub async fn kill_owner(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let target = Pid::from_raw(pid);
    for i in 0..15 {
        let sig = match i {
            0 => Some(Signal::SIGTERM),
            8 => Some(Signal::SIGKILL),
            _ => None,
        };
        match kill(target, sig) {
            Ok(()) => {}
            Err(nix::errno::Errno::ESRCH) => return,
            Err(e) => {
                warn!(pid, "Failed to kill off pid {pid}: {e}");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    warn!(pid, "Failed to kill off pid {pid}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding 9: a pid whose start time is not the registered one is not
    /// killed (the owner exited and its pid was reused while the daemon was down).
    #[test]
    fn a_reused_pid_is_not_killed() {
        let me = process_start_time(std::process::id()).unwrap();
        assert_eq!(process_start_time(std::process::id()), Some(me));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = process_start_time(pid).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(kill_owner_started(pid as i32, start + 1));
        assert!(child.try_wait().unwrap().is_none(), "another process's pid");
        rt.block_on(kill_owner_started(pid as i32, start));
        assert!(child.wait().unwrap().code().is_none(), "killed by a signal");
    }
}
