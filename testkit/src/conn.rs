//! Talking raw libvirt RPC to a daemon: frame builders, a blocking connection that
//! receives whole frames with their fds, and what a daemon did with a message.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub use vh_proto::error::RpcError;
pub use vh_proto::message::{msg_type, status, Header};
use vh_proto::xdr::Decoder;

/// Read timeout of [`Conn`]: a safety net so a hung daemon fails the test instead of
/// hanging it. Never used to decide an outcome that the tests assert on, except as the
/// explicit [`Outcome::Silent`] class.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a frame: length word, header, nfds (when `Some`), payload.
pub fn frame(h: &Header, nfds: Option<u32>, payload: &[u8]) -> Vec<u8> {
    vh_proto::message::encode_frame(h, nfds, payload)
}

/// A CALL frame (status OK).
pub fn call_frame(prog: u32, vers: u32, proc_: i32, serial: u32, payload: &[u8]) -> Vec<u8> {
    frame(
        &Header {
            prog,
            vers,
            proc_,
            type_: msg_type::CALL,
            serial,
            status: status::OK,
        },
        None,
        payload,
    )
}

/// A keepalive PING (28 bytes).
pub fn ping_frame() -> Vec<u8> {
    frame(
        &Header {
            prog: vh_proto::message::KEEPALIVE_PROGRAM,
            vers: 1,
            proc_: vh_proto::message::KEEPALIVE_PING,
            type_: msg_type::MESSAGE,
            serial: 0,
            status: status::OK,
        },
        None,
        &[],
    )
}

/// Whether `bytes` is a keepalive PONG frame.
pub fn is_pong(bytes: &[u8]) -> bool {
    bytes == vh_proto::message::pong_frame().as_slice()
}

/// One received frame: all its bytes (length word included) and the fds that followed.
#[derive(Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub header: Header,
    pub fds: Vec<OwnedFd>,
}

impl Frame {
    /// The payload after header (and nfds).
    pub fn payload(&self) -> &[u8] {
        let off = 28 + if self.header.has_fds() { 4 } else { 0 };
        &self.bytes[off.min(self.bytes.len())..]
    }

    /// The error struct of an error reply.
    pub fn error(&self) -> Option<RpcError> {
        (self.header.status == status::ERROR)
            .then(|| RpcError::decode(&mut Decoder::new(self.payload())).ok())
            .flatten()
    }
}

/// How a receive ended when no frame came.
#[derive(Debug)]
pub enum RecvEnd {
    /// EOF, ECONNRESET or EPIPE: the daemon closed the connection.
    Closed(String),
    /// Nothing within [`READ_TIMEOUT`].
    Timeout,
    /// Anything else (a malformed frame from the daemon is reported here too).
    Other(String),
}

/// What a daemon did with one message, observed with a PING barrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// These frames (bytes), then the PONG of the barrier.
    Replied(Vec<Vec<u8>>),
    /// The connection was closed; frames received before that are listed.
    Closed(Vec<Vec<u8>>),
    /// Neither an answer nor a close within [`READ_TIMEOUT`] (the daemon is still
    /// waiting for more bytes of the message).
    Silent(Vec<Vec<u8>>),
}

/// A raw blocking client connection.
pub struct Conn {
    pub stream: UnixStream,
}

impl Conn {
    pub fn connect(path: &Path) -> Conn {
        let stream =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        Self::from_stream(stream)
    }

    pub fn from_stream(stream: UnixStream) -> Conn {
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("timeout");
        Conn { stream }
    }

    /// Sends raw bytes. Errors (the daemon may already have closed) are returned.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Receives one whole frame and the fds its header announces.
    pub fn recv(&mut self) -> Result<Frame, RecvEnd> {
        let mut lw = [0u8; 4];
        read_exact_classified(&mut self.stream, &mut lw)?;
        let len = u32::from_be_bytes(lw) as usize;
        if !(28..=vh_proto::message::MESSAGE_MAX + 4).contains(&len) {
            return Err(RecvEnd::Other(format!("daemon sent length word {len}")));
        }
        let mut bytes = vec![0u8; len];
        bytes[..4].copy_from_slice(&lw);
        read_exact_classified(&mut self.stream, &mut bytes[4..])?;
        let raw = vh_proto::message::parse_body(&bytes[4..])
            .map_err(|e| RecvEnd::Other(e.to_string()))?;
        let mut fds = Vec::new();
        for _ in 0..raw.nfds {
            match vh_proto::fdpass::recv_fd(self.stream.as_fd()) {
                Ok(fd) => fds.push(fd),
                Err(e) => return Err(RecvEnd::Other(format!("receiving fd: {e}"))),
            }
        }
        Ok(Frame {
            bytes,
            header: raw.header,
            fds,
        })
    }

    /// Receives one frame, failing the test if none comes.
    pub fn recv_ok(&mut self, ctx: &str) -> Frame {
        match self.recv() {
            Ok(f) => f,
            Err(e) => panic!("{ctx}: expected a frame, got {e:?}"),
        }
    }

    /// Sends a frame and receives the answer, failing the test on transport errors.
    pub fn roundtrip(&mut self, bytes: &[u8], ctx: &str) -> Frame {
        self.send(bytes)
            .unwrap_or_else(|e| panic!("{ctx}: send failed: {e}"));
        self.recv_ok(ctx)
    }

    /// Sends `bytes` then a PING, and reads until the PONG, a close or the read timeout.
    /// Because the daemon handles one message at a time in order, everything before the
    /// PONG is the answer to `bytes`; a PONG alone means "no answer". Fds that come with
    /// answers are closed.
    pub fn outcome_after(&mut self, bytes: &[u8]) -> Outcome {
        let mut got = Vec::new();
        let mut all = bytes.to_vec();
        all.extend_from_slice(&ping_frame());
        if self.send(&all).is_err() {
            // Closed before we finished sending: still read whatever came.
        }
        loop {
            match self.recv() {
                Ok(f) if is_pong(&f.bytes) => return Outcome::Replied(got),
                Ok(f) => got.push(f.bytes),
                Err(RecvEnd::Closed(_)) => return Outcome::Closed(got),
                Err(RecvEnd::Timeout) => return Outcome::Silent(got),
                Err(RecvEnd::Other(e)) => panic!("unexpected receive failure: {e}"),
            }
        }
    }

    /// Whether the daemon still answers a PING on this connection.
    pub fn alive(&mut self) -> bool {
        matches!(self.outcome_after(&[]), Outcome::Replied(v) if v.is_empty())
    }
}

fn read_exact_classified(s: &mut UnixStream, buf: &mut [u8]) -> Result<(), RecvEnd> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(RecvEnd::Closed("EOF".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(RecvEnd::Timeout)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                return Err(RecvEnd::Closed(e.to_string()))
            }
            Err(e) => return Err(RecvEnd::Other(e.to_string())),
        }
    }
    Ok(())
}

/// A CALL of virtlogd's program.
pub fn log_call(proc_: i32, serial: u32, args: &[u8]) -> Vec<u8> {
    use vh_proto::log::{PROGRAM, VERSION};
    call_frame(PROGRAM, VERSION, proc_, serial, args)
}

/// A CALL of virtlockd's program.
pub fn lock_call(proc_: i32, serial: u32, args: &[u8]) -> Vec<u8> {
    use vh_proto::lock::{PROGRAM, VERSION};
    call_frame(PROGRAM, VERSION, proc_, serial, args)
}

/// Asserts that `f` is a successful reply.
#[track_caller]
pub fn expect_ok(f: &Frame, what: &str) {
    assert_eq!(
        f.header.status,
        status::OK,
        "{what}: {}",
        describe(&f.bytes)
    );
}

/// The error of an error reply; fails the test for anything else.
#[track_caller]
pub fn expect_error(f: &Frame, what: &str) -> RpcError {
    f.error()
        .unwrap_or_else(|| panic!("{what}: expected an error, got {}", describe(&f.bytes)))
}

/// A readable description of a frame: header, decoded error if any, and hex.
pub fn describe(bytes: &[u8]) -> String {
    let mut s = String::new();
    if bytes.len() >= 28 {
        if let Ok(raw) = vh_proto::message::parse_body(&bytes[4..]) {
            let h = raw.header;
            s.push_str(&format!(
                "len={} prog={:#x} vers={} proc={} type={} serial={} status={}",
                bytes.len(),
                h.prog,
                h.vers,
                h.proc_,
                h.type_,
                h.serial,
                h.status
            ));
            if h.status == status::ERROR {
                match RpcError::decode(&mut Decoder::new(&bytes[4 + raw.payload_offset..])) {
                    Ok(e) => s.push_str(&format!("\n  error: {e:?}")),
                    Err(e) => s.push_str(&format!("\n  undecodable error payload: {e}")),
                }
            }
        }
    }
    s.push_str(&format!("\n  hex: {}", hex::encode(bytes)));
    s
}
