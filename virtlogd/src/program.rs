//! RPC dispatch of program 0x87539319 onto the log handler, with libvirt 9.0's checks
//! in libvirt 9.0's order.

use crate::handler::{LogHandler, LogOwner, READ_MAX};
use crate::protocol::{self as p, proc_};
use std::sync::Arc;
use vh_common::error::{domain, RpcError};
use vh_common::server::{CallContext, DispatchError, Program, Reply};
use vh_common::xdr::{Decoder, Encoder};

pub struct LogProgram {
    handler: Arc<LogHandler>,
}

impl LogProgram {
    pub fn new(handler: Arc<LogHandler>) -> Arc<Self> {
        Arc::new(LogProgram { handler })
    }
}

fn check_flags(flags: u32, function: &str) -> Result<(), RpcError> {
    RpcError::check_flags(domain::LOGGING, function, flags, 0)
}

/// Runs an RPC's file work so that it holds up only its own client. Every procedure
/// opens, reads, writes or renames files (or waits for a file lock the pump holds while
/// writing), and any of that can block for long: a file under a lease until the lease
/// holder lets go, a hung NFS server for ever. On the daemon's multi-threaded runtime
/// the calling worker hands its other tasks (every other client, the admin socket) to a
/// fresh worker first, and this client's task waits on its own thread; the client
/// does nothing else meanwhile anyway (one call at a time, as in libvirt). Outside such
/// a runtime (unit tests) the work simply runs here.
pub(crate) fn off_worker<R>(work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

fn position_reply(inode: u64, offset: u64) -> Vec<u8> {
    let mut e = Encoder::new();
    p::LogFilePosition { inode, offset }.encode(&mut e);
    e.into_inner()
}

impl Program for LogProgram {
    fn program(&self) -> u32 {
        p::PROGRAM
    }

    fn version(&self) -> u32 {
        p::VERSION
    }

    fn dispatch(
        &self,
        _ctx: &mut CallContext<'_>,
        proc_: i32,
        args: &[u8],
    ) -> Result<Reply, DispatchError> {
        let mut d = Decoder::new(args);
        match proc_ {
            proc_::DOMAIN_OPEN_LOG_FILE => {
                let a = p::OpenLogFileArgs::decode(&mut d)?;
                // Only TRUNCATE is looked at; other bits are ignored, as in 9.0.
                let owner = LogOwner {
                    driver: a.driver,
                    domname: a.dom.name,
                    domuuid: a.dom.uuid,
                };
                let truncate = a.flags & p::OPEN_TRUNCATE != 0;
                let (inode, offset, wr) =
                    off_worker(|| self.handler.open(owner, &a.path, truncate))?;
                Ok(Reply {
                    payload: position_reply(inode, offset),
                    fds: vec![wr],
                })
            }
            proc_::DOMAIN_GET_LOG_FILE_POSITION => {
                let a = p::GetLogFilePositionArgs::decode(&mut d)?;
                check_flags(a.flags, "virLogHandlerDomainGetLogFilePosition")?;
                let (inode, offset) = off_worker(|| self.handler.position(&a.path))?;
                Ok(Reply::payload(position_reply(inode, offset)))
            }
            proc_::DOMAIN_READ_LOG_FILE => {
                let a = p::ReadLogFileArgs::decode(&mut d)?;
                if a.maxlen > READ_MAX {
                    return Err(RpcError::internal(
                        domain::RPC,
                        format!(
                            "Requested data len {} is larger than maximum {READ_MAX}",
                            a.maxlen
                        ),
                    )
                    .into());
                }
                check_flags(a.flags, "virLogHandlerDomainReadLogFile")?;
                let data = off_worker(|| {
                    self.handler
                        .read(&a.path, a.pos.inode, a.pos.offset, a.maxlen)
                })?;
                let mut e = Encoder::new();
                e.opaque(&data);
                Ok(Reply::payload(e.into_inner()))
            }
            proc_::DOMAIN_APPEND_LOG_FILE => {
                let a = p::AppendLogFileArgs::decode(&mut d)?;
                check_flags(a.flags, "virLogHandlerDomainAppendLogFile")?;
                off_worker(|| self.handler.append(&a.path, &a.message))?;
                let mut e = Encoder::new();
                e.i32(0);
                Ok(Reply::payload(e.into_inner()))
            }
            _ => Err(DispatchError::UnknownProcedure),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work that blocks on the runtime's only worker does not stop other tasks: here
    /// it waits for a message that only another task sends, which would never run if
    /// the blocked call kept the worker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn blocking_work_leaves_the_worker_to_others() {
        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        // On the worker (not the test's own thread, which is no worker).
        let blocked = tokio::spawn(async move {
            let _ = started_tx.send(());
            off_worker(|| rx.recv())
        });
        let sender = tokio::spawn(async move {
            let _ = started.await;
            tx.send(7).is_ok()
        });
        assert_eq!(blocked.await.unwrap(), Ok(7));
        assert!(sender.await.unwrap());
    }

    /// Outside a multi-threaded runtime the work runs in place.
    #[test]
    fn without_a_runtime_the_work_runs_here() {
        assert_eq!(off_worker(|| 3), 3);
    }
}
