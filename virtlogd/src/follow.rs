//! Followers of a log: sockets that receive every byte written into the log's files as
//! it is written (the inspect program's FOLLOW), so a `tail -f` needs no polling and
//! cannot be confused by rotation.
//!
//! The writer calls [`Followers`] (as its [`WriteTap`]) with exactly the bytes each
//! write(2) put into the file and with each rollover, under the log's lock, so a follower
//! sees the file's bytes in order with nothing missing or repeated. A follower socket is
//! SOCK_SEQPACKET (records keep their boundaries) and is written with MSG_DONTWAIT: a
//! follower that reads too slowly never stalls the log. What did not fit is counted and
//! reported by a [`RECORD_MISSED`] record as soon as the follower has room again (a
//! thread waits for that, only while a follower is behind), and always before the next
//! bytes it gets.
//!
//! Records (the first byte is the kind):
//! * [`RECORD_DATA`] + bytes: the next bytes of the log (at most [`DATA_MAX`]);
//! * [`RECORD_MISSED`] + u64 (big-endian): that many bytes were written here but not
//!   sent to this follower;
//! * [`RECORD_ROTATED`] + u64 (big-endian): the log rolled over; what follows goes into
//!   the new file with that inode, from offset 0.
//!
//! The stream ends (EOF) when the log closes or the daemon re-executes.

use crate::rotating_file::WriteTap;
use nix::errno::Errno;
use nix::sys::socket::{send, MsgFlags};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

// The record kinds are wire format, shared with the client (`vh_proto::inspect`).
pub use vh_proto::inspect::{DATA_MAX, RECORD_DATA, RECORD_MISSED, RECORD_ROTATED};
/// Most followers one log takes (each costs an fd and a copy of every write).
pub const FOLLOWERS_MAX: usize = 64;
/// Send buffer asked for each follower socket: how far a follower may fall behind
/// before it misses bytes (the kernel caps it at `net.core.wmem_max`).
const SEND_BUFFER: usize = 4 << 20;

#[derive(Debug)]
struct Follower {
    id: u64,
    /// A thread waits for room to report what was missed (see [`wait_for_room`]).
    waiting: bool,
    sock: OwnedFd,
    /// Bytes not sent since the last missed record that got through.
    missed: u64,
    /// The inode of a rollover whose record did not fit yet.
    rotated: Option<u64>,
}

enum Sent {
    Ok,
    Full,
    Gone,
}

impl Follower {
    fn send_record(&self, kind: u8, body: &[u8]) -> Sent {
        let mut rec = Vec::with_capacity(1 + body.len());
        rec.push(kind);
        rec.extend_from_slice(body);
        match send(
            self.sock.as_raw_fd(),
            &rec,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(_) => Sent::Ok,
            Err(Errno::EAGAIN | Errno::ENOBUFS) => Sent::Full,
            Err(Errno::EINTR) => self.send_record(kind, body),
            Err(_) => Sent::Gone,
        }
    }

    /// Reports what was missed and a rollover not reported yet; false if that still
    /// does not fit (nothing else may be sent before it).
    fn flush_missed(&mut self) -> Result<bool, ()> {
        if self.missed > 0 {
            match self.send_record(RECORD_MISSED, &self.missed.to_be_bytes()) {
                Sent::Ok => self.missed = 0,
                Sent::Full => return Ok(false),
                Sent::Gone => return Err(()),
            }
        }
        if let Some(inode) = self.rotated {
            match self.send_record(RECORD_ROTATED, &inode.to_be_bytes()) {
                Sent::Ok => self.rotated = None,
                Sent::Full => return Ok(false),
                Sent::Gone => return Err(()),
            }
        }
        Ok(true)
    }

    /// Sends `data`; returns false if the follower is gone.
    fn data(&mut self, data: &[u8]) -> bool {
        for chunk in data.chunks(DATA_MAX) {
            match self.flush_missed() {
                Err(()) => return false,
                Ok(false) => {
                    self.missed += chunk.len() as u64;
                    continue;
                }
                Ok(true) => {}
            }
            match self.send_record(RECORD_DATA, chunk) {
                Sent::Ok => {}
                Sent::Full => self.missed += chunk.len() as u64,
                Sent::Gone => return false,
            }
        }
        true
    }

    /// A rollover record; one that does not fit is sent before the next data (after
    /// the missed count: a follower that missed bytes around a rollover cannot tell on
    /// which side of it they were).
    fn rotated(&mut self, inode: u64) -> bool {
        self.rotated = Some(inode);
        self.flush_missed().is_ok()
    }
}

/// The followers of one log.
#[derive(Debug)]
pub struct Followers {
    me: Weak<Followers>,
    next_id: AtomicU64,
    list: Mutex<Vec<Follower>>,
    /// `list.len()`, readable without the lock: the writer's fast path when nobody
    /// follows (the common case) is one atomic load.
    count: AtomicUsize,
}

impl Followers {
    pub fn new() -> Arc<Followers> {
        Arc::new_cyclic(|me| Followers {
            me: me.clone(),
            next_id: AtomicU64::new(0),
            list: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
        })
    }

    /// Adds a follower socket (SOCK_SEQPACKET). Call under the log's writer lock, so the
    /// first byte it gets is the one written after the position the caller reported.
    pub fn add(&self, sock: OwnedFd) -> Result<(), &'static str> {
        let Ok(mut list) = self.list.lock() else {
            return Err("follower list poisoned");
        };
        list.retain(|f| still_connected(&f.sock));
        if list.len() >= FOLLOWERS_MAX {
            return Err("too many followers of this log");
        }
        // Best effort: a smaller buffer only means a slow follower misses bytes sooner.
        let _ =
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SndBuf, &SEND_BUFFER);
        list.push(Follower {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            waiting: false,
            sock,
            missed: 0,
            rotated: None,
        });
        self.count.store(list.len(), Ordering::Release);
        Ok(())
    }

    /// Ends every follower's stream (EOF): the log closed or the daemon re-executes.
    pub fn clear(&self) {
        if let Ok(mut list) = self.list.lock() {
            list.clear();
            self.count.store(0, Ordering::Release);
        }
    }

    /// Whether anyone follows (bytes must then pass through user space, not splice).
    pub fn following(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// How many follow this log (operator metrics).
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn each(&self, mut f: impl FnMut(&mut Follower) -> bool) {
        if !self.following() {
            return;
        }
        if let Ok(mut list) = self.list.lock() {
            list.retain_mut(|fl| {
                let keep = f(fl);
                if keep && !fl.waiting && (fl.missed > 0 || fl.rotated.is_some()) {
                    fl.waiting = self.spawn_waiter(fl);
                }
                keep
            });
            self.count.store(list.len(), Ordering::Release);
        }
    }

    /// Starts a thread that reports `f`'s missed bytes once its socket has room.
    /// Returns false if none could be started (the report then waits for the next
    /// write).
    fn spawn_waiter(&self, f: &Follower) -> bool {
        let Ok(sock) = f.sock.try_clone() else {
            return false;
        };
        let (me, id) = (self.me.clone(), f.id);
        std::thread::Builder::new()
            .name("log-follower".into())
            .spawn(move || wait_for_room(me, id, sock))
            .is_ok()
    }
}

/// A lagging follower's thread: blocks until the socket can take a record, then sends
/// the missed count (under the list lock, so it stays in order with the data). Ends
/// when that is done, the follower is gone, or the log's followers are.
fn wait_for_room(followers: Weak<Followers>, id: u64, sock: OwnedFd) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
        let Some(f) = followers.upgrade() else {
            return;
        };
        let Ok(mut list) = f.list.lock() else {
            return;
        };
        let Some(pos) = list.iter().position(|x| x.id == id) else {
            return;
        };
        match list[pos].flush_missed() {
            Ok(true) => {
                list[pos].waiting = false;
                return;
            }
            // Readable as writable yet the record did not fit (the reader's queue is
            // full): wait again, without spinning.
            Ok(false) => {
                drop(list);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(()) => {
                list.remove(pos);
                f.count.store(list.len(), Ordering::Release);
                return;
            }
        }
    }
}

/// A follower whose reader went away is noticed at the next write; this catches the ones
/// of an idle log when another follower is added.
fn still_connected(sock: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => true,
    }
}

impl WriteTap for Followers {
    fn wrote(&self, data: &[u8]) {
        self.each(|f| f.data(data));
    }

    fn rolled(&self, inode: u64) {
        self.each(|f| f.rotated(inode));
    }

    fn active(&self) -> bool {
        self.following()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recv, socketpair, AddressFamily, SockFlag, SockType};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    /// Reads every queued record: (data bytes, missed total, rotations).
    fn drain(sock: &OwnedFd) -> (Vec<u8>, u64, Vec<u64>) {
        let mut data = Vec::new();
        let mut missed = 0;
        let mut rot = Vec::new();
        let mut buf = vec![0u8; DATA_MAX + 1];
        loop {
            match recv(sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(n) => {
                    let body = &buf[1..n];
                    match buf[0] {
                        RECORD_DATA => data.extend_from_slice(body),
                        RECORD_MISSED => missed += u64::from_be_bytes(body.try_into().unwrap()),
                        RECORD_ROTATED => rot.push(u64::from_be_bytes(body.try_into().unwrap())),
                        k => panic!("record kind {k}"),
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(e) => panic!("{e}"),
            }
        }
        (data, missed, rot)
    }

    #[test]
    fn passes_bytes_and_rotations_in_order() {
        let f = Followers::new();
        assert!(!f.following());
        let (ours, theirs) = pair();
        f.add(ours).unwrap();
        assert!(f.following());
        f.wrote(b"hello ");
        f.rolled(42);
        f.wrote(b"world");
        let (data, missed, rot) = drain(&theirs);
        assert_eq!(data, b"hello world");
        assert_eq!(missed, 0);
        assert_eq!(rot, vec![42]);
    }

    /// A follower that does not read loses bytes, is told how many, and never blocks
    /// the writer; what it got plus what it missed is everything.
    #[test]
    fn slow_follower_is_told_what_it_missed() {
        let f = Followers::new();
        let (ours, theirs) = pair();
        f.add(ours).unwrap();
        let chunk = vec![b'x'; 8192];
        let total = 64 << 20;
        for _ in 0..total / chunk.len() {
            f.wrote(&chunk);
        }
        let (mut data, mut missed, _) = drain(&theirs);
        // The count goes out as soon as there is room (a thread waits for it), with no
        // further write.
        while missed == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            let (d, m, _) = drain(&theirs);
            data.extend(d);
            missed += m;
        }
        f.wrote(b"end");
        let (more, missed2, _) = drain(&theirs);
        assert!(missed + missed2 > 0);
        assert_eq!(
            missed + missed2 + (data.len() + more.len()) as u64,
            total as u64 + 3
        );
        assert_eq!(more, b"end");
    }

    #[test]
    fn gone_follower_is_dropped() {
        let f = Followers::new();
        let (ours, theirs) = pair();
        f.add(ours).unwrap();
        drop(theirs);
        f.wrote(b"x");
        assert!(!f.following());
    }
}
