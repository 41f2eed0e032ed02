//! The server side of our operator-only "VHIP" program (wire types in
//! [`vh_proto::inspect`]): one program shell for both daemons, served on the admin
//! socket. Each daemon says only how it answers the procedures it serves.

use crate::server::{CallContext, DispatchError, Program, Reply};
use std::sync::Arc;
pub use vh_proto::inspect::{proc_, PROGRAM, VERSION};

/// What one daemon answers on the inspect program.
pub trait Inspect: Send + Sync + 'static {
    /// Answers one call; [`DispatchError::UnknownProcedure`] for a procedure this daemon
    /// does not serve (virtlogd answers LIST_LOGS only, virtlockd LIST_LOCKS only).
    fn answer(
        &self,
        ctx: &mut CallContext<'_>,
        proc_: i32,
        args: &[u8],
    ) -> Result<Reply, DispatchError>;
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
        ctx: &mut CallContext<'_>,
        proc_: i32,
        args: &[u8],
    ) -> Result<Reply, DispatchError> {
        self.state.answer(ctx, proc_, args)
    }
}
