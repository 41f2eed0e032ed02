//! Whole-frame I/O on a non-blocking unix stream socket.
//!
//! libvirt's peers never read past the end of a message, and neither may we: the byte
//! that carries a passed fd follows the message, and a plain `read()` that swallows that
//! byte closes the fd. So every read here is bounded by what the current frame still
//! owes, and fds are taken with `recvmsg` one at a time.
//!
//! The length-word reader keeps its progress outside the future, so it can be raced
//! against shutdown or hand-off in `select!` without losing bytes.

use crate::fdpass;
use crate::protocol::{self, Header};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// One received message with its fds.
#[derive(Debug)]
pub struct Incoming {
    pub header: Header,
    /// Everything after the length word.
    pub body: Vec<u8>,
    pub payload_offset: usize,
    pub fds: Vec<OwnedFd>,
}

impl Incoming {
    pub fn payload(&self) -> &[u8] {
        &self.body[self.payload_offset..]
    }
}

/// Progress of the 4-byte length word; lives across cancelled reads.
#[derive(Debug, Default)]
pub struct LengthWord {
    buf: [u8; 4],
    got: usize,
}

impl LengthWord {
    /// Whether part of a length word has been consumed (so a hand-off now loses it).
    pub fn partial(&self) -> bool {
        self.got != 0
    }
}

/// Why a connection ended while reading.
#[derive(Debug)]
pub enum ReadEnd {
    /// Orderly hang-up at a message boundary.
    Eof,
    /// Protocol violation or I/O error: close without a reply.
    Broken(String),
}

/// Reads the next length word. Cancel-safe: progress is kept in `state`.
/// Returns `Ok(None)` on EOF before any byte of it.
pub async fn read_length(stream: &UnixStream, state: &mut LengthWord) -> Result<u32, ReadEnd> {
    while state.got < 4 {
        stream
            .readable()
            .await
            .map_err(|e| ReadEnd::Broken(e.to_string()))?;
        match stream.try_read(&mut state.buf[state.got..]) {
            Ok(0) if state.got == 0 => return Err(ReadEnd::Eof),
            Ok(0) => return Err(ReadEnd::Broken("EOF inside a length word".into())),
            Ok(n) => state.got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if state.got == 0 && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ReadEnd::Eof)
            }
            Err(e) => return Err(ReadEnd::Broken(e.to_string())),
        }
    }
    let len = u32::from_be_bytes(state.buf);
    state.got = 0;
    Ok(len)
}

/// Reads exactly `buf.len()` bytes.
pub async fn read_exact(stream: &UnixStream, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        stream.readable().await?;
        match stream.try_read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads the rest of a frame whose length word was `len`, then its fds.
///
/// The buffer grows with the data actually received (64 KiB steps, doubling), so a
/// peer that announces 32 MiB and sends nothing costs us nothing.
pub async fn read_message(stream: &UnixStream, len: u32) -> Result<Incoming, ReadEnd> {
    let total = protocol::check_length(len).map_err(ReadEnd::Broken)? - protocol::LEN_WORD;
    let mut body: Vec<u8> = Vec::new();
    let mut filled = 0usize;
    while filled < total {
        let target = total.min((filled * 2).max(64 * 1024));
        body.resize(target, 0);
        read_exact(stream, &mut body[filled..target])
            .await
            .map_err(|e| ReadEnd::Broken(format!("reading message: {e}")))?;
        filled = target;
    }
    let raw = protocol::parse_body(&body).map_err(ReadEnd::Broken)?;
    let mut fds = Vec::with_capacity(raw.nfds);
    for _ in 0..raw.nfds {
        let fd = loop {
            stream
                .readable()
                .await
                .map_err(|e| ReadEnd::Broken(e.to_string()))?;
            match stream.try_io(Interest::READABLE, || fdpass::recv_fd(stream.as_fd())) {
                Ok(fd) => break fd,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(ReadEnd::Broken(format!("receiving fd: {e}"))),
            }
        };
        fds.push(fd);
    }
    Ok(Incoming {
        header: raw.header,
        body,
        payload_offset: raw.payload_offset,
        fds,
    })
}

/// Writes all of `buf`.
pub async fn write_all(stream: &UnixStream, buf: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        stream.writable().await?;
        match stream.try_write(&buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes one frame, then each of its fds in its own 1-byte message.
pub async fn write_message(stream: &UnixStream, frame: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    write_all(stream, frame).await?;
    for fd in fds {
        loop {
            stream.writable().await?;
            match stream.try_io(Interest::WRITABLE, || {
                fdpass::send_fd(stream.as_fd(), fd.as_fd())
            }) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// A minimal blocking client for one call at a time: what the client library, the CLI
/// and the tests use to talk to a daemon.
pub mod blocking {
    use super::*;
    use crate::error::RpcError;
    use crate::protocol::{encode_frame, msg_type, status};
    use crate::xdr::Decoder;
    use std::io::{Read, Write};
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
        let len = protocol::check_length(u32::from_be_bytes(lw)).map_err(CallError::Protocol)?;
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body)?;
        let raw = protocol::parse_body(&body).map_err(CallError::Protocol)?;
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
}
