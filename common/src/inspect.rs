//! The server side of our operator-only "VHIP" program (wire types in
//! [`vh_proto::inspect`]): one program shell for both daemons, served on the admin
//! socket. Each daemon says only which procedures it serves and how it answers them.

use crate::error::RpcError;
use crate::server::{CallContext, DispatchError, Program, Reply};
use std::sync::Arc;
pub use vh_proto::inspect::{proc_, PROGRAM, VERSION};

/// How a daemon answers one inspect procedure: its arguments in, the reply out.
pub type Procedure<T> = fn(&T, &[u8]) -> Result<Reply, RpcError>;

/// What one daemon serves on the inspect program (besides FD_STORE, which the shell
/// answers for both).
pub trait Inspect: Send + Sync + 'static {
    /// The procedures this daemon answers, each with how (virtlogd: LIST_LOGS,
    /// LOG_METRICS, FOLLOW_LOG; virtlockd: LIST_LOCKS, LOCK_METRICS); any other is an
    /// unknown procedure.
    const PROCEDURES: &'static [(i32, Procedure<Self>)];
}

/// The inspect program over a daemon's state `T`.
pub struct InspectProgram<T> {
    state: Arc<T>,
}

impl<T: Inspect> InspectProgram<T> {
    pub fn new(state: Arc<T>) -> Arc<Self> {
        Arc::new(InspectProgram { state })
    }
}

impl<T: Inspect> Program for InspectProgram<T> {
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
        args: &[u8],
    ) -> Result<Reply, DispatchError> {
        // Both daemons answer this one the same way, from the fd store's keeper.
        if proc_ == proc_::FD_STORE {
            return Ok(Reply::payload(crate::fdstore_keeper::info().encode()));
        }
        let (_, answer) = T::PROCEDURES
            .iter()
            .find(|(p, _)| *p == proc_)
            .ok_or(DispatchError::UnknownProcedure)?;
        Ok(answer(&self.state, args)?)
    }
}
