//! Whole-frame I/O on a non-blocking unix stream socket.
//!
//! libvirt's peers never read past the end of a message, and neither may we: the byte
//! that carries a passed fd follows the message, and a plain `read()` that swallows that
//! byte closes the fd. So every read here is bounded by what the current frame still
//! owes, and fds are taken with `recvmsg` one at a time.
//!
//! Both directions keep their progress in a value outside the future ([`FrameReader`],
//! [`Outbox`]), so a read or write can be raced against shutdown or hand-off in
//! `select!` without losing a byte, and whatever was half done can be carried across a
//! re-exec ([`FrameReader::take_partial`], [`Outbox::take_unsent`]) and resumed by the
//! next image.

use crate::fdpass;
use crate::protocol::{self, Header};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::task::Poll;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Why a frame a previous image had half read cannot be carried on with.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error(transparent)]
    Frame(#[from] protocol::FrameError),
    #[error("carried {carried} body bytes of a {total}-byte body")]
    BodyTooLong { carried: usize, total: usize },
    #[error("{0} carried fds the frame does not announce")]
    UnannouncedFds(usize),
}

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

/// Why a connection ended while reading.
#[derive(Debug)]
pub enum ReadEnd {
    /// Orderly hang-up at a message boundary.
    Eof,
    /// Protocol violation or I/O error: close without a reply.
    Broken(String),
}

/// The first read of a body takes it whole up to this size (every call these daemons
/// get in practice); a larger body grows in steps of at least this.
const BODY_STEP: usize = 64 * 1024;

/// Read steps (each a length word, up to one body step, or one fd) one poll of
/// [`FrameReader::read`] makes before it yields: about tokio's cooperative budget.
const READ_STEPS_PER_POLL: usize = 128;

/// The frame being received: its length word, its body and its fds, as far as they
/// have come. Cancel-safe (every byte read is recorded before the next await), and
/// the memory held follows what arrived, not what the length word announced: a peer
/// that announces 32 MiB and sends 4 bytes costs 64 KiB, and a half-received frame
/// holds at most 1.25x what it received (plus one step), never twice its size.
#[derive(Debug, Default)]
pub struct FrameReader {
    len_buf: [u8; 4],
    len_got: usize,
    /// The rest of the frame, made once its length word is in: a connection waiting
    /// for its next request (most of them, most of the time) holds 24 bytes here, not
    /// the ~130 a frame being received needs.
    frame: Option<Box<PartialFrame>>,
}

/// A frame whose length word has arrived.
#[derive(Debug, Default)]
struct PartialFrame {
    /// Body length announced by the length word.
    total: usize,
    /// Room for the body, grown step by step; `filled` bytes of it have arrived.
    body: Vec<u8>,
    filled: usize,
    /// Parsed once the body is complete.
    raw: Option<protocol::RawMessage>,
    fds: Vec<OwnedFd>,
}

impl FrameReader {
    /// Whether no byte of a frame has been consumed (a message boundary).
    pub fn is_idle(&self) -> bool {
        self.len_got == 0
    }

    /// Bytes consumed of the current frame (length word included).
    pub fn consumed(&self) -> usize {
        self.len_got + self.frame.as_ref().map_or(0, |f| f.filled)
    }

    /// Reads until a whole frame (and its fds) is in; cancel-safe.
    ///
    /// A `poll_fn` over the socket's readiness rather than an `async` loop around
    /// `readable()`: it keeps no waiter of its own (the socket's one read waker slot
    /// holds the task), so the future a connection's task keeps while it waits for
    /// the next request is two references, not ~270 bytes. With thousands of mostly
    /// idle connections that future is most of what each one costs.
    pub fn read<'a>(
        &'a mut self,
        stream: &'a UnixStream,
    ) -> impl std::future::Future<Output = Result<Incoming, ReadEnd>> + 'a {
        std::future::poll_fn(move |cx| {
            // Progress counts against a budget, as tokio's cooperative budget counts an
            // await on readiness: a peer streaming a 32 MiB frame does not hold the
            // thread. Spent, the task goes to the back of the queue.
            for _ in 0..READ_STEPS_PER_POLL {
                match self.step(stream) {
                    Ok(Some(msg)) => return Poll::Ready(Ok(msg)),
                    Ok(None) => {}
                    Err(Step::Wait) => match stream.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(Err(ReadEnd::Broken(e.to_string())))
                        }
                        Poll::Pending => return Poll::Pending,
                    },
                    Err(Step::End(e)) => return Poll::Ready(Err(e)),
                }
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
    }

    /// One non-blocking step: `Ok(Some)` a whole message, `Ok(None)` progress made.
    fn step(&mut self, stream: &UnixStream) -> Result<Option<Incoming>, Step> {
        if self.len_got < 4 {
            let n = match stream.try_read(&mut self.len_buf[self.len_got..]) {
                Ok(0) if self.len_got == 0 => return Err(Step::End(ReadEnd::Eof)),
                Ok(0) => return Err(broken("EOF inside a length word")),
                Ok(n) => n,
                Err(e) if self.len_got == 0 && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(Step::End(ReadEnd::Eof))
                }
                Err(e) => return Err(Step::from_io(e)),
            };
            self.len_got += n;
            if self.len_got == 4 {
                let len = protocol::check_length(u32::from_be_bytes(self.len_buf))
                    .map_err(|e| Step::End(ReadEnd::Broken(e.to_string())))?;
                self.frame = Some(Box::new(PartialFrame {
                    total: len - protocol::LEN_WORD,
                    ..PartialFrame::default()
                }));
            }
            return Ok(None);
        }
        let Some(f) = self.frame.as_deref_mut() else {
            // Unreachable: the frame is made with the length word's last byte.
            return Err(broken("frame state lost"));
        };
        if f.filled < f.total {
            if f.filled == f.body.len() {
                // Room for the next step, zeroed once; exactly this much (`resize`
                // alone would double the capacity, and a half-received frame would
                // hold twice its size).
                let remaining = f.total - f.filled;
                let step = if f.filled == 0 && f.total <= BODY_STEP {
                    f.total
                } else {
                    remaining.min(BODY_STEP.max(f.filled / 4))
                };
                f.body.reserve_exact(step);
                f.body.resize(f.filled + step, 0);
            }
            return match stream.try_read(&mut f.body[f.filled..]) {
                Ok(0) => Err(broken("reading message: unexpected end of file")),
                Ok(n) => {
                    f.filled += n;
                    Ok(None)
                }
                Err(e) => Err(Step::from_io(e)),
            };
        }
        let raw = match &f.raw {
            Some(r) => r.clone(),
            None => {
                let r = protocol::parse_body(&f.body)
                    .map_err(|e| Step::End(ReadEnd::Broken(e.to_string())))?;
                f.raw = Some(r.clone());
                r
            }
        };
        if f.fds.len() < raw.nfds {
            let fd = stream
                .try_io(Interest::READABLE, || fdpass::recv_fd(stream.as_fd()))
                .map_err(|e| match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Step::Wait,
                    _ => broken(&format!("receiving fd: {e}")),
                })?;
            f.fds.push(fd);
            return Ok(None);
        }
        let done = std::mem::take(&mut f.body);
        let fds = std::mem::take(&mut f.fds);
        *self = FrameReader::default();
        Ok(Some(Incoming {
            header: raw.header,
            body: done,
            payload_offset: raw.payload_offset,
            fds,
        }))
    }

    /// What has been consumed of the current frame (length word and body bytes, fds
    /// received), for the next image; leaves the reader idle.
    pub fn take_partial(&mut self) -> (Vec<u8>, Vec<OwnedFd>) {
        let done = std::mem::take(self);
        let frame = done.frame.map(|f| *f).unwrap_or_default();
        let mut bytes = Vec::with_capacity(done.len_got + frame.filled);
        bytes.extend_from_slice(&done.len_buf[..done.len_got]);
        bytes.extend_from_slice(&frame.body[..frame.filled]);
        (bytes, frame.fds)
    }

    /// A reader that carries on with a frame a previous image had started.
    pub fn resume(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<FrameReader, ResumeError> {
        let mut r = FrameReader::default();
        let (word, body) = bytes.split_at(bytes.len().min(4));
        r.len_buf[..word.len()].copy_from_slice(word);
        r.len_got = word.len();
        if r.len_got < 4 {
            if !fds.is_empty() {
                return Err(ResumeError::UnannouncedFds(fds.len()));
            }
            return Ok(r);
        }
        let mut f = PartialFrame {
            total: protocol::check_length(u32::from_be_bytes(r.len_buf))? - protocol::LEN_WORD,
            ..PartialFrame::default()
        };
        if body.len() > f.total {
            return Err(ResumeError::BodyTooLong {
                carried: body.len(),
                total: f.total,
            });
        }
        f.body = body.to_vec();
        f.filled = body.len();
        if !fds.is_empty() {
            let raw = (f.filled == f.total)
                .then(|| protocol::parse_body(&f.body))
                .transpose()?;
            if raw.as_ref().map_or(0, |m| m.nfds) < fds.len() {
                return Err(ResumeError::UnannouncedFds(fds.len()));
            }
            f.raw = raw;
        }
        f.fds = fds;
        r.frame = Some(Box::new(f));
        Ok(r)
    }
}

/// Why a non-blocking step stopped.
enum Step {
    /// Nothing to read now.
    Wait,
    End(ReadEnd),
}

impl Step {
    fn from_io(e: io::Error) -> Step {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Step::Wait,
            _ => Step::End(ReadEnd::Broken(e.to_string())),
        }
    }
}

fn broken(why: &str) -> Step {
    Step::End(ReadEnd::Broken(why.to_string()))
}

/// Replies on their way out: the bytes not yet written and the fds not yet sent (each
/// fd goes after the frame that announces it, in its own 1-byte message).
#[derive(Debug, Default)]
pub struct Outbox {
    buf: Vec<u8>,
    done: usize,
    fds: VecDeque<OwnedFd>,
}

impl Outbox {
    /// An outbox holding what a previous image had not sent yet.
    pub fn resume(bytes: Vec<u8>, fds: Vec<OwnedFd>) -> Outbox {
        Outbox {
            buf: bytes,
            done: 0,
            fds: fds.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.done == self.buf.len() && self.fds.is_empty()
    }

    /// Queues one frame and its fds.
    pub fn push(&mut self, frame: Vec<u8>, fds: Vec<OwnedFd>) {
        if self.done == self.buf.len() {
            self.buf = frame;
            self.done = 0;
        } else {
            self.buf.extend_from_slice(&frame);
        }
        self.fds.extend(fds);
    }

    /// Writes everything queued; cancel-safe. A `poll_fn` over the socket's write
    /// readiness, for the same reason as [`FrameReader::read`]: no waiter kept in the
    /// connection's future.
    pub fn flush<'a>(
        &'a mut self,
        stream: &'a UnixStream,
    ) -> impl std::future::Future<Output = io::Result<()>> + 'a {
        std::future::poll_fn(move |cx| loop {
            match self.try_flush(stream) {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match stream.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        })
    }

    /// Writes what the socket takes now; `WouldBlock` when something is left.
    pub fn try_flush(&mut self, stream: &UnixStream) -> io::Result<()> {
        loop {
            if self.done < self.buf.len() {
                match stream.try_write(&self.buf[self.done..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => self.done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            } else if let Some(fd) = self.fds.front() {
                match stream.try_io(Interest::WRITABLE, || {
                    fdpass::send_fd(stream.as_fd(), fd.as_fd())
                }) {
                    Ok(()) => {
                        self.fds.pop_front();
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            } else {
                // Freed, not cleared: the next `push` replaces the buffer with its frame
                // anyway, and an idle connection should not hold its last reply.
                self.buf = Vec::new();
                self.done = 0;
                return Ok(());
            }
        }
    }

    /// What is still to be sent, for the next image; leaves the outbox empty.
    pub fn take_unsent(&mut self) -> (Vec<u8>, Vec<OwnedFd>) {
        let mut done = std::mem::take(self);
        let bytes = done.buf.split_off(done.done);
        (bytes, done.fds.into())
    }
}

/// The blocking client (one call at a time) now lives in the protocol crate; this path
/// stays for the tests and tools that import it from here.
pub use vh_proto::blocking;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_frame, msg_type, status};
    use std::io::Write;
    use std::os::unix::net::UnixStream as StdStream;

    fn pair() -> (StdStream, UnixStream) {
        let (a, b) = StdStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (a, UnixStream::from_std(b).unwrap())
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let h = Header {
            prog: 1,
            vers: 1,
            proc_: 3,
            type_: msg_type::CALL,
            serial: 9,
            status: status::OK,
        };
        encode_frame(&h, None, payload)
    }

    /// Steps until the socket has nothing more to give.
    fn drain(r: &mut FrameReader, s: &UnixStream) -> Option<Incoming> {
        loop {
            match r.step(s) {
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(Step::Wait) => return None,
                Err(Step::End(e)) => panic!("{e:?}"),
            }
        }
    }

    /// A peer announcing a 4 MiB frame and sending a little of it costs one step, and
    /// a half-received large frame holds about what arrived, not twice its size.
    #[tokio::test]
    async fn memory_follows_what_arrived() {
        let (mut peer, ours) = pair();
        let big = frame(&vec![7u8; 4 << 20]);
        peer.write_all(&big[..8]).unwrap();
        let mut r = FrameReader::default();
        ours.readable().await.unwrap();
        assert!(drain(&mut r, &ours).is_none());
        let cap = r.frame.as_ref().map_or(0, |f| f.body.capacity());
        assert!(cap <= BODY_STEP, "{cap}");
        assert_eq!(r.consumed(), 8);
        // Half of it, through a writer thread (the socket buffer is smaller).
        let half = big.len() / 2;
        let mut w = peer.try_clone().unwrap();
        let part = big[8..half].to_vec();
        let t = std::thread::spawn(move || w.write_all(&part).unwrap());
        while r.consumed() < half {
            ours.readable().await.unwrap();
            assert!(drain(&mut r, &ours).is_none());
        }
        t.join().unwrap();
        let cap = r.frame.as_ref().map_or(0, |f| f.body.capacity());
        assert!(
            cap <= half + half / 4 + BODY_STEP,
            "{cap} held for {half} received"
        );
    }

    /// What a re-exec carries resumes into the same message.
    #[tokio::test]
    async fn a_partial_frame_resumes() {
        let msg = frame(b"hello, next image");
        for cut in [1, 4, 10, msg.len() - 1] {
            let (mut peer, ours) = pair();
            peer.write_all(&msg[..cut]).unwrap();
            let mut r = FrameReader::default();
            ours.readable().await.unwrap();
            assert!(drain(&mut r, &ours).is_none());
            let (bytes, fds) = r.take_partial();
            assert_eq!(bytes, &msg[..cut]);
            assert!(r.is_idle());
            let mut r = FrameReader::resume(&bytes, fds).unwrap();
            peer.write_all(&msg[cut..]).unwrap();
            let m = r.read(&ours).await.unwrap();
            assert_eq!(m.header.serial, 9);
            assert_eq!(m.payload(), b"hello, next image");
        }
        assert!(FrameReader::resume(&frame(b"x")[..], vec![]).is_ok());
        let mut too_long = frame(b"x");
        too_long.push(0);
        assert!(FrameReader::resume(&too_long, vec![]).is_err());
    }

    /// An unsent reply is carried and finished by the next outbox.
    #[tokio::test]
    async fn an_unsent_reply_resumes() {
        let (peer, ours) = pair();
        let reply = vec![5u8; 1 << 20];
        let mut out = Outbox::default();
        out.push(reply.clone(), Vec::new());
        ours.writable().await.unwrap();
        assert!(
            out.try_flush(&ours).is_err(),
            "the socket cannot take 1 MiB"
        );
        let (rest, fds) = out.take_unsent();
        assert!(out.is_empty());
        assert!(!rest.is_empty() && rest.len() < reply.len());
        let sent = reply.len() - rest.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 1 << 20];
            std::io::Read::read_exact(&mut &peer, &mut got).unwrap();
            got
        });
        let mut out = Outbox::resume(rest, fds);
        out.flush(&ours).await.unwrap();
        assert!(out.is_empty());
        assert_eq!(reader.join().unwrap(), reply);
        assert!(sent > 0);
    }
}
