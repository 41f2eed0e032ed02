//! The server side of our operator-only "VHIP" program (wire types in
//! [`vh_proto::inspect`]): one program shell for both daemons, served on the admin
//! socket. Each daemon says only how it answers the procedures it serves.

use crate::error::RpcError;
use crate::server::{CallContext, DispatchError, Program, Reply};
use std::sync::Arc;
pub use vh_proto::inspect::{proc_, PROGRAM, VERSION};

/// What one daemon lists on the inspect program: one procedure, no arguments.
pub trait Inspect: Send + Sync + 'static {
    /// The procedure this daemon answers (`LIST_LOGS` for virtlogd, `LIST_LOCKS` for
    /// virtlockd); any other is an unknown procedure.
    const PROC: i32;

    /// The encoded reply.
    fn listing(&self) -> Result<Vec<u8>, RpcError>;
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
        _args: &[u8],
    ) -> Result<Reply, DispatchError> {
        if proc_ != T::PROC {
            return Err(DispatchError::UnknownProcedure);
        }
        Ok(Reply::payload(self.state.listing()?))
    }
}
