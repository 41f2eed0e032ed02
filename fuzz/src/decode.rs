//! One message as the server sees it: length word, header, fd count, then the
//! arguments of whichever procedure of the log (0x87539319), lock (0x0EA7BEEF) or admin
//! (0x06900690) program it names.
//!
//! Log and lock arguments are decoded with the programs' own decoders and must survive
//! a re-encode unchanged. Admin arguments have no public decoders: the call is
//! dispatched on [`AdminProgram`] against a stand-in daemon with two idle servers,
//! which decodes them exactly as the daemon does and touches nothing outside.

use crate::admin_target::FakeDaemon;
use std::sync::Arc;
use tokio::sync::watch;
use vh_common::admin::{AdminProgram, AdminTarget, ADMIN_PROGRAM, ADMIN_PROTOCOL_VERSION};
use vh_common::protocol::{self, LEN_WORD};
use vh_common::server::{
    CallContext, ClientInfo, ClientLimits, NoHooks, Private, Program, RunState, Server,
};
use vh_common::xdr::{Decoder, Encoder};
use virtlockd::protocol as lockp;
use virtlogd::protocol as logp;

/// Decodes `T`, and if that works, checks that encoding and decoding again gives the
/// same value (the decoders are lossy only on invalid UTF-8, which the first decode
/// already replaced).
macro_rules! roundtrip {
    ($ty:ty, $payload:expr) => {{
        if let Ok(v) = <$ty>::decode(&mut Decoder::new($payload)) {
            let mut e = Encoder::new();
            v.encode(&mut e);
            let again = <$ty>::decode(&mut Decoder::new(e.as_bytes()));
            assert_eq!(again.as_ref().ok(), Some(&v), "re-encoded arguments differ");
        }
    }};
}

pub fn log_args(proc_: i32, payload: &[u8]) {
    match proc_ {
        logp::proc_::DOMAIN_OPEN_LOG_FILE => roundtrip!(logp::OpenLogFileArgs, payload),
        logp::proc_::DOMAIN_GET_LOG_FILE_POSITION => {
            roundtrip!(logp::GetLogFilePositionArgs, payload)
        }
        logp::proc_::DOMAIN_READ_LOG_FILE => roundtrip!(logp::ReadLogFileArgs, payload),
        logp::proc_::DOMAIN_APPEND_LOG_FILE => roundtrip!(logp::AppendLogFileArgs, payload),
        _ => {}
    }
}

pub fn lock_args(proc_: i32, payload: &[u8]) {
    match proc_ {
        lockp::proc_::REGISTER => roundtrip!(lockp::RegisterArgs, payload),
        lockp::proc_::RESTRICT => {
            let _ = Decoder::new(payload).u32();
        }
        lockp::proc_::NEW => roundtrip!(lockp::NewArgs, payload),
        lockp::proc_::CREATE_RESOURCE
        | lockp::proc_::DELETE_RESOURCE
        | lockp::proc_::ACQUIRE_RESOURCE
        | lockp::proc_::RELEASE_RESOURCE => roundtrip!(lockp::ResourceArgs, payload),
        lockp::proc_::CREATE_LOCKSPACE => {
            let _ = Decoder::new(payload).string_lossless(lockp::STRING_MAX);
        }
        _ => {}
    }
}

/// An admin call against a stand-in daemon ("virtlogd" and "admin", no clients).
pub fn admin_call(proc_: i32, payload: &[u8]) {
    let (_tx, rx) = watch::channel(RunState::Running);
    let limits = ClientLimits {
        max_clients: 1024,
        max_unauth: 1024,
    };
    let main = Server::new("virtlogd", 0, limits, Arc::new(NoHooks), rx.clone());
    let admin = Server::new("admin", 0, limits, Arc::new(NoHooks), rx);
    let target = FakeDaemon::new(vec![main, admin.clone()]);
    let weak: std::sync::Weak<dyn AdminTarget> = {
        let t: Arc<dyn AdminTarget> = target.clone();
        Arc::downgrade(&t)
    };
    let program = AdminProgram::new(weak);
    let info = ClientInfo {
        id: 1,
        pid: 1,
        uid: 0,
        gid: 0,
        conn_time: 0,
        fd: -1,
    };
    let mut private: Private = Box::new(());
    let mut ctx = CallContext {
        server: &admin,
        client: &info,
        private: &mut private,
        fds: Vec::new(),
        close_after_reply: false,
    };
    let _ = program.dispatch(&mut ctx, proc_, payload);
}

/// A whole frame, length word first, as the server would read it.
pub fn frame(data: &[u8]) {
    let Some(word) = data.get(..LEN_WORD) else {
        return;
    };
    let len = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
    let Ok(len) = protocol::check_length(len) else {
        return;
    };
    // A short input is a frame whose tail has not arrived; decode what is there.
    let body = &data[LEN_WORD..data.len().min(len)];
    let Ok(raw) = protocol::parse_body(body) else {
        return;
    };
    assert!(raw.nfds <= protocol::NUM_FDS_MAX);
    let payload = &body[raw.payload_offset..];
    let h = raw.header;
    match (h.prog, h.vers) {
        (logp::PROGRAM, logp::VERSION) => log_args(h.proc_, payload),
        (lockp::PROGRAM, lockp::VERSION) => lock_args(h.proc_, payload),
        (ADMIN_PROGRAM, ADMIN_PROTOCOL_VERSION) => admin_call(h.proc_, payload),
        _ => {}
    }
}
