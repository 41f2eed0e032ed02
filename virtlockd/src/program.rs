//! RPC dispatch of program 0x0EA7BEEF: owner registration, restriction, and the
//! lockspace calls, with libvirt 9.0's checks in 9.0's order (flags, restricted,
//! registered, lockspace exists).
//!
//! Per-connection state is the registered owner. When the connection of the owner
//! itself goes away (peer pid == owner pid: the socket QEMU inherited), everything that
//! owner held is released and the owner is killed, as 9.0 does: a QEMU that lost its
//! lock connection must not keep writing to the disks. Unlike 9.0, the kill loop runs on
//! its own task and never stalls other clients.

use crate::lockspace::LockSpaces;
use crate::protocol::{self as p, proc_};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tracing::{info, warn};
use uuid::Uuid;
use vh_common::error::{code, domain, RpcError};
use vh_common::restart::LockClientPrivate;
use vh_common::server::{
    CallContext, ClientHooks, ClientInfo, DispatchError, Private, Program, Reply,
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
}

/// The lock daemon's state shared by all connections.
pub struct LockDaemon {
    spaces: Mutex<LockSpaces>,
    /// Leases released because their owner's connection closed while it held them
    /// (operator metrics; carried across re-exec).
    lease_losses: std::sync::atomic::AtomicU64,
}

impl LockDaemon {
    pub fn new(spaces: LockSpaces) -> Arc<Self> {
        Arc::new(LockDaemon {
            spaces: Mutex::new(spaces),
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

    /// The lockspaces, for calls, re-exec and operator views.
    pub fn spaces(&self) -> Result<MutexGuard<'_, LockSpaces>, RpcError> {
        self.spaces
            .lock()
            .map_err(|_| RpcError::internal(domain::LOCKSPACE, "lockspace table poisoned"))
    }
}

pub struct LockProgram {
    daemon: Arc<LockDaemon>,
}

impl LockProgram {
    pub fn new(daemon: Arc<LockDaemon>) -> Arc<Self> {
        Arc::new(LockProgram { daemon })
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

fn check_flags(flags: u32, allowed: u32, function: &str) -> Result<(), RpcError> {
    let bad = flags & !allowed;
    if bad != 0 {
        return Err(RpcError::unsupported_flags(
            domain::RPC,
            function,
            u64::from(bad),
        ));
    }
    Ok(())
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
                c.owner_name = Some(a.owner.name);
                c.owner_uuid = a.owner.uuid;
                c.owner_id = a.owner.id;
                c.owner_pid = a.owner.pid;
                Ok(Reply::void())
            }
            proc_::RESTRICT => {
                let flags = d.u32()?;
                let c = client_of(ctx)?;
                check_flags(flags, 0, "virLockSpaceProtocolDispatchRestrict")?;
                check_client(c)?;
                c.restricted = true;
                Ok(Reply::void())
            }
            proc_::NEW => {
                let a = p::NewArgs::decode(&mut d)?;
                let c = client_of(ctx)?;
                check_flags(a.flags, 0, "virLockSpaceProtocolDispatchNew")?;
                check_client(c)?;
                if a.path.is_empty() {
                    return Err(RpcError::new(
                        code::OPERATION_INVALID,
                        domain::RPC,
                        "the default lockspace already exists",
                    )
                    .into());
                }
                let mut spaces = self.daemon.spaces()?;
                if spaces.contains(&a.path) {
                    return Err(RpcError::internal(
                        domain::RPC,
                        format!("Lockspace for path {} already exists", a.path),
                    )
                    .into());
                }
                // 9.0 ignores a failure here; we report it.
                spaces.create(&a.path)?;
                Ok(Reply::void())
            }
            proc_::CREATE_RESOURCE
            | proc_::DELETE_RESOURCE
            | proc_::ACQUIRE_RESOURCE
            | proc_::RELEASE_RESOURCE => {
                let a = p::ResourceArgs::decode(&mut d)?;
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
                check_flags(a.flags, allowed, function)?;
                check_client(&c)?;
                let mut spaces = self.daemon.spaces()?;
                let ls = spaces
                    .get_mut(&a.path)
                    .ok_or_else(|| no_lockspace(&a.path))?;
                match proc_ {
                    proc_::CREATE_RESOURCE => ls.create_resource(&a.name)?,
                    proc_::DELETE_RESOURCE => ls.delete_resource(&a.name)?,
                    proc_::ACQUIRE_RESOURCE => ls.acquire(&a.name, c.owner_pid, a.flags)?,
                    _ => ls.release(&a.name, c.owner_pid)?,
                }
                Ok(Reply::void())
            }
            proc_::CREATE_LOCKSPACE => {
                let path = p::lossy(d.string_lossless(p::STRING_MAX)?);
                let c = client_of(ctx)?;
                if c.restricted {
                    return Err(restricted_error().into());
                }
                // An existing lockspace is success in 9.0 (and what older clients expect).
                self.daemon.spaces()?.create(&path)?;
                Ok(Reply::void())
            }
            _ => Err(DispatchError::UnknownProcedure),
        }
    }
}

/// Client life cycle of the lock server.
pub struct LockHooks {
    daemon: Arc<LockDaemon>,
}

impl LockHooks {
    pub fn new(daemon: Arc<LockDaemon>) -> Arc<Self> {
        Arc::new(LockHooks { daemon })
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
        let held = match self.daemon.spaces() {
            Ok(mut s) => {
                let lost: usize = s
                    .iter()
                    .map(|(_, ls)| ls.resources_owned_by(c.owner_pid))
                    .sum();
                self.daemon.add_lease_losses(lost as u64);
                s.release_owner(c.owner_pid)
            }
            Err(_) => true,
        };
        if held {
            info!(
                pid = c.owner_pid,
                "lock owner connection closed; releasing its leases and stopping it"
            );
            let pid = c.owner_pid as i32;
            // Outside a runtime (unit tests), fall back to a thread.
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(kill_owner(pid));
                }
                Err(_) => {
                    std::thread::spawn(move || {
                        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                            .enable_time()
                            .build()
                        {
                            rt.block_on(kill_owner(pid));
                        }
                    });
                }
            }
        }
    }

    fn save_private(&self, private: &Private) -> Result<serde_json::Value, String> {
        let c = private
            .downcast_ref::<LockClient>()
            .ok_or("lock client state missing")?;
        // libvirt refuses to save an unregistered client; we save it with an empty name
        // rather than fail the whole re-exec.
        Ok(LockClientPrivate {
            restricted: c.restricted,
            owner_pid: c.owner_pid,
            owner_id: c.owner_id,
            owner_name: c.owner_name.clone().unwrap_or_default(),
            owner_uuid: Uuid::from_bytes(c.owner_uuid),
        }
        .to_value())
    }

    fn restore_private(&self, v: &serde_json::Value) -> Result<Private, String> {
        let p = LockClientPrivate::from_value(v).map_err(|e| e.to_string())?;
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
        }))
    }
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
