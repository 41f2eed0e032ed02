//! Our operator-only "VHIP" inspect program as served here: virtlogd answers LIST_LOGS, what logs are open.
//! The wire types are in `vh_proto::inspect`, the program shell in `vh_common::inspect`.

use crate::handler::LogHandler;
use std::os::unix::ffi::OsStrExt;
use vh_common::error::RpcError;
use vh_common::inspect::Inspect;

// The wire types moved to `vh-proto` (the client decodes them); these paths stay.
pub use vh_proto::inspect::{proc_, LogEntry, LIST_MAX, PROGRAM, VERSION};

/// The open logs, sorted by path.
pub fn list_logs(handler: &LogHandler) -> Vec<LogEntry> {
    handler
        .list()
        .into_iter()
        .map(|f| LogEntry {
            path: f.path.as_os_str().as_bytes().to_vec(),
            driver: f.owner.driver,
            domname: f.owner.domname,
            domuuid: f.owner.domuuid,
            inode: f.inode,
            offset: f.offset,
        })
        .collect()
}

/// The inspect program as virtlogd serves it.
pub type InspectProgram = vh_common::inspect::InspectProgram<LogHandler>;

impl Inspect for LogHandler {
    const PROC: i32 = proc_::LIST_LOGS;

    fn listing(&self) -> Result<Vec<u8>, RpcError> {
        // Off the workers: a log's lock may be held by a write that hangs.
        let logs = crate::program::off_worker(|| list_logs(self));
        Ok(LogEntry::encode_list(&logs))
    }
}
