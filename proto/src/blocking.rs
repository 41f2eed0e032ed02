//! A minimal blocking client for one call at a time: what the client library, the CLI
//! and the tests use to talk to a daemon.

use crate::error::RpcError;
use crate::fdpass;
use crate::message::{self, encode_frame, msg_type, status, Header};
use crate::xdr::Decoder;
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

/// Errors of the blocking client: transport, or the daemon's error reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Remote(RpcError),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl CallError {
    /// A reply frame that could not be taken.
    fn frame(e: message::FrameError) -> Self {
        CallError::Protocol(e.to_string())
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
