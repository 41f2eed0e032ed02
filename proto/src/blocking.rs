//! A minimal blocking client for one call at a time: what the client library, the CLI
//! and the tests use to talk to a daemon.

use crate::error::{code, RpcError};
use crate::fdpass;
use crate::message::{self, encode_frame, msg_type, status, Header};
use crate::xdr::{Decoder, XdrError};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdStream;
use std::path::Path;

/// What a call returned.
#[derive(Debug)]
pub struct CallReply {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Errors of the blocking client: transport, the daemon's libvirt error, or a reply we
/// could not make sense of. The client library's `ClientError` is this type.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Connecting, spawning the daemon, or reading/writing the socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The daemon answered with a libvirt error; code, domain and message are libvirt's.
    #[error("{0}")]
    Remote(RpcError),
    /// The reply did not match the protocol (wrong fd count, undecodable payload...).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<XdrError> for CallError {
    fn from(e: XdrError) -> Self {
        CallError::Protocol(format!("undecodable reply: {e}"))
    }
}

impl CallError {
    /// A reply frame that could not be taken.
    fn frame(e: message::FrameError) -> Self {
        CallError::Protocol(e.to_string())
    }

    /// The libvirt error, when the daemon sent one.
    pub fn remote(&self) -> Option<&RpcError> {
        match self {
            CallError::Remote(e) => Some(e),
            _ => None,
        }
    }

    /// libvirt's `virErrorNumber` (`VIR_ERR_*`), when the daemon sent an error.
    pub fn code(&self) -> Option<i32> {
        self.remote().map(|e| e.code)
    }

    /// libvirt's `virErrorDomain` (`VIR_FROM_*`), when the daemon sent an error.
    pub fn domain(&self) -> Option<i32> {
        self.remote().map(|e| e.domain)
    }

    /// The daemon's message, or this error's text.
    pub fn message(&self) -> String {
        match self {
            CallError::Remote(e) => e.message().to_string(),
            other => other.to_string(),
        }
    }

    /// A lease held by someone else (`VIR_ERR_RESOURCE_BUSY`), or a log path another
    /// client already has open (system error with errno EBUSY).
    pub fn is_busy(&self) -> bool {
        match self {
            CallError::Remote(e) => {
                e.code == code::RESOURCE_BUSY
                    || (e.code == code::SYSTEM_ERROR && e.int1 == libc::EBUSY)
            }
            _ => false,
        }
    }

    /// The daemon's socket does not exist or nobody listens on it.
    pub fn is_not_running(&self) -> bool {
        match self {
            CallError::Io(e) => matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
            ),
            _ => false,
        }
    }

    /// The daemon does not serve the program or procedure (e.g. the inspect program on
    /// a libvirt C daemon).
    pub fn is_unsupported(&self) -> bool {
        match self {
            CallError::Remote(e) => {
                e.code == code::RPC
                    && (e.message().starts_with("Cannot find program")
                        || e.message().starts_with("unknown procedure"))
            }
            _ => false,
        }
    }
}

pub struct Client {
    stream: StdStream,
    prog: u32,
    vers: u32,
    serial: u32,
}

impl Client {
    pub fn connect(path: &Path, prog: u32, vers: u32) -> io::Result<Self> {
        Ok(Self::from_stream(StdStream::connect(path)?, prog, vers))
    }

    pub fn from_stream(stream: StdStream, prog: u32, vers: u32) -> Self {
        Client {
            stream,
            prog,
            vers,
            serial: 0,
        }
    }

    pub fn stream(&self) -> &StdStream {
        &self.stream
    }

    pub fn into_stream(self) -> StdStream {
        self.stream
    }

    /// One call; serials start at 0 per connection, as libvirt's clients do.
    pub fn call(&mut self, proc_: i32, args: &[u8]) -> Result<CallReply, CallError> {
        let h = Header {
            prog: self.prog,
            vers: self.vers,
            proc_,
            type_: msg_type::CALL,
            serial: self.serial,
            status: status::OK,
        };
        self.serial = self.serial.wrapping_add(1);
        self.stream.write_all(&encode_frame(&h, None, args))?;
        let reply = read_reply(&mut self.stream)?;
        if reply.header.serial != h.serial || reply.header.proc_ != proc_ {
            return Err(CallError::Protocol(format!(
                "reply for serial {} proc {} to call serial {} proc {}",
                reply.header.serial, reply.header.proc_, h.serial, proc_
            )));
        }
        if reply.header.status == status::ERROR {
            let e = RpcError::decode(&mut Decoder::new(&reply.payload))
                .map_err(|e| CallError::Protocol(format!("bad error reply: {e}")))?;
            return Err(CallError::Remote(e));
        }
        Ok(reply)
    }
}

/// Reads one whole message (and its fds) from a blocking stream.
pub fn read_reply(stream: &mut StdStream) -> Result<CallReply, CallError> {
    let mut lw = [0u8; 4];
    stream.read_exact(&mut lw)?;
    let len = message::check_length(u32::from_be_bytes(lw)).map_err(CallError::frame)?;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body)?;
    let raw = message::parse_body(&body).map_err(CallError::frame)?;
    let mut fds = Vec::new();
    for _ in 0..raw.nfds {
        fds.push(fdpass::recv_fd(stream.as_fd())?);
    }
    Ok(CallReply {
        header: raw.header,
        payload: body[raw.payload_offset..].to_vec(),
        fds,
    })
}
