//! One open log: its pipe, its file and what it counts. Below both the handler (which
//! keeps the table of open logs and answers the RPCs) and the pump (which moves the
//! bytes): neither reaches into the other, and the walk of a log write goes downward,
//! handler or pump → log file → rotating file.
//!
//! Reads from a pipe always happen under the file's lock, together with the append, so
//! the pump and a synchronous drain (every RPC on an open log drains its pipe first)
//! can never reorder data, and a re-exec hand-off finds every byte either in the file or
//! still in the pipe.

use crate::follow::Followers;
use crate::rotating_file::{RotatingFileWriter, SpliceStop, PIPE_CHUNK};
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tracing::{debug, error, warn};

/// Log files are private to root (or the session user).
pub(crate) const LOG_MODE: u32 = 0o600;
/// One pipe read: two default pipe buffers.
const READ_BUF: usize = 128 * 1024;
/// Reads one drain may make: twice the largest pipe we make (1 MiB) in 128 KiB reads.
pub(crate) const DRAIN_READS: usize = 16;
/// Most one splice(2) moves: a whole enlarged pipe.
const SPLICE_MAX: usize = 1 << 20;

thread_local! {
    static READ_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
}

/// Rotation settings from the config file.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_size: u64,
    pub max_backups: u64,
}

/// Who a log file belongs to; kept only for the re-exec state and for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOwner {
    pub driver: String,
    pub domname: String,
    pub domuuid: [u8; 16],
}

/// A [`LogOwner`] as an open log keeps it: both names in one allocation (as two
/// strings they were two allocations and 48 bytes in every open log).
#[derive(Debug)]
pub struct CompactOwner {
    /// The driver's name, then the domain's.
    names: Box<str>,
    driver_len: usize,
    pub domuuid: [u8; 16],
}

impl CompactOwner {
    pub fn driver(&self) -> &str {
        self.names.get(..self.driver_len).unwrap_or_default()
    }

    pub fn domname(&self) -> &str {
        self.names.get(self.driver_len..).unwrap_or_default()
    }

    pub fn to_owner(&self) -> LogOwner {
        LogOwner {
            driver: self.driver().to_owned(),
            domname: self.domname().to_owned(),
            domuuid: self.domuuid,
        }
    }
}

impl From<LogOwner> for CompactOwner {
    fn from(o: LogOwner) -> Self {
        // Exactly the capacity needed, so the boxing does not reallocate.
        let mut names = String::with_capacity(o.driver.len() + o.domname.len());
        names.push_str(&o.driver);
        names.push_str(&o.domname);
        CompactOwner {
            names: names.into_boxed_str(),
            driver_len: o.driver.len(),
            domuuid: o.domuuid,
        }
    }
}

pub(crate) struct LogFile {
    /// The one copy of the path: the handler's table and the writer share it.
    pub(crate) path: Arc<Path>,
    pub(crate) owner: CompactOwner,
    /// Our read end, blocking (see [`Self::read_pipe`]). It is never close-on-exec
    /// while the log is in the table: the only program virtlogd ever executes is its
    /// own next image, which must inherit it, and a thousand logs would otherwise cost
    /// two thousand syscalls of re-exec downtime (clearing the flag before exec,
    /// setting it after).
    pub(crate) pipe: OwnedFd,
    /// `None` for a log restored across re-exec that nobody has touched yet: the file is
    /// reopened on first use, under this lock, so the new image serves before it has
    /// opened a thousand files.
    writer: Mutex<Option<RotatingFileWriter>>,
    /// The rotation settings, for the writer's reopen after a re-exec; the backups as a
    /// byte (at most 32; it packs with the flags).
    max_size: u64,
    max_backups: u8,
    /// The file as our previous image handed it over open (inheritable), until the
    /// first use makes it the writer's (see [`RotatingFileWriter::adopt`]). Taken only
    /// under the writer lock; its own lock lets a hand-off into a stranger close it
    /// even while a stuck write holds the writer.
    inherited_file: Mutex<Option<OwnedFd>>,
    closed: AtomicBool,
    /// Handed off for re-exec (see [`Self::freeze`]).
    frozen: AtomicBool,
    /// The pipe had to be made O_NONBLOCK (a kernel without RWF_NOWAIT for pipes).
    nonblocking: AtomicBool,
    /// Bytes read from the pipe that could not be written (disk full, I/O error).
    /// Changed only under the writer lock.
    dropped: AtomicU64,
    /// Operator counters: they start from those carried across re-exec, and each use
    /// of the writer adds what it wrote and rolled (so the counters can be read while
    /// a write hangs, and after the hand-off took the writer away). Changed only
    /// under the writer lock.
    written: AtomicU64,
    rotations: AtomicU64,
    /// Every byte ever dropped (`dropped` is only the ones not reported yet).
    dropped_total: AtomicU64,
    /// Sockets that receive what is written, as it is (see `follow.rs`). Made by the
    /// first FOLLOW: most logs are never followed, and the list is ~80 bytes.
    followers: OnceLock<Arc<Followers>>,
}

/// A log's operator counters (the metrics), kept across re-exec; the inspect
/// program's LOG_METRICS reply carries them, hence their home in `vh-proto`.
pub use vh_proto::inspect::LogCounters;

/// What one pump pass found in the pipe.
pub(crate) enum Pumped {
    /// Pipe empty for now.
    Empty,
    /// Read budget used up; more may be waiting.
    More,
    /// Writer side closed, or a read/append failure: close the log.
    Done(Option<io::Error>),
}

impl LogFile {
    /// Runs `f` on the writer under the file lock, reopening the file first if this log
    /// came across a re-exec and has not been touched since.
    pub(crate) fn with_writer<R>(
        &self,
        f: impl FnOnce(&mut RotatingFileWriter) -> R,
    ) -> io::Result<R> {
        let mut slot = self
            .writer
            .lock()
            .map_err(|_| io::Error::other("log file lock poisoned"))?;
        if self.frozen.load(Ordering::Acquire) {
            return Err(io::Error::other("log handed over for re-exec"));
        }
        if slot.is_none() {
            let backups = usize::from(self.max_backups);
            let mut w = match self.take_inherited_file() {
                Some(fd) => RotatingFileWriter::adopt(
                    fd,
                    self.path.clone(),
                    self.max_size,
                    backups,
                    LOG_MODE,
                )?,
                None => RotatingFileWriter::open_shared(
                    self.path.clone(),
                    self.max_size,
                    backups,
                    false,
                    LOG_MODE,
                )?,
            };
            if let Some(f) = self.followers.get() {
                w.set_tap(f.clone());
            }
            *slot = Some(w);
        }
        let w = slot
            .as_mut()
            .ok_or_else(|| io::Error::other("log writer missing"))?;
        let (written, rollovers) = (w.bytes_written(), w.rollovers());
        let r = f(w);
        // Plain loads and stores: only the holder of the writer lock changes them.
        let add = |c: &AtomicU64, n: u64| {
            c.store(
                c.load(Ordering::Relaxed).saturating_add(n),
                Ordering::Relaxed,
            )
        };
        add(&self.written, w.bytes_written().saturating_sub(written));
        add(&self.rotations, w.rollovers().saturating_sub(rollovers));
        Ok(r)
    }

    /// The counters as of the last use of the writer.
    pub(crate) fn counters(&self) -> LogCounters {
        LogCounters {
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped_total.load(Ordering::Relaxed),
            rotations: self.rotations.load(Ordering::Relaxed),
        }
    }

    /// Adds a follower socket (see [`Followers::add`]); the writer, which `w` must be
    /// (the caller holds the writer lock), is told of the list when it is made.
    pub(crate) fn add_follower(
        &self,
        w: &mut RotatingFileWriter,
        sock: OwnedFd,
    ) -> Result<(), &'static str> {
        let followers = self.followers.get_or_init(|| {
            let f = Followers::new();
            w.set_tap(f.clone());
            f
        });
        followers.add(sock)
    }

    /// How many follow this log.
    pub(crate) fn follower_count(&self) -> usize {
        self.followers.get().map_or(0, |f| f.count())
    }

    /// Ends every follower's stream (their sockets are not handed across re-exec).
    pub(crate) fn clear_followers(&self) {
        if let Some(f) = self.followers.get() {
            f.clear();
        }
    }

    fn take_inherited_file(&self) -> Option<OwnedFd> {
        self.inherited_file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Re-exec into our own next image, after [`Self::freeze`]: the file to hand over
    /// open (it is inheritable already, see `rotating_file::open_entry`), or `None`: the
    /// next image reopens it by path then.
    ///
    /// Never waits for the writer: a write stuck on storage holds its lock, and the
    /// hand-off must not hang on it (that log's file is then reopened by path).
    pub(crate) fn file_for_handoff(&self) -> Option<RawFd> {
        let mut slot = self.writer.try_lock().ok()?;
        match slot.as_ref() {
            Some(w) => {
                let fd = w.file_for_handoff();
                if fd.is_none() {
                    // Not the file at the path (a rollover moved it away): closed here
                    // rather than reaching the next image unnamed (it is inheritable).
                    drop(slot.take());
                }
                fd
            }
            None => self
                .inherited_file
                .try_lock()
                .ok()?
                .as_ref()
                .map(|f| f.as_raw_fd()),
        }
    }

    pub(crate) fn new(
        path: Arc<Path>,
        owner: LogOwner,
        pipe: OwnedFd,
        writer: Option<RotatingFileWriter>,
        inherited_file: Option<OwnedFd>,
        limits: Limits,
        carried: LogCounters,
    ) -> Self {
        LogFile {
            path,
            owner: owner.into(),
            pipe,
            writer: Mutex::new(writer),
            max_size: limits.max_size,
            // More than 255 (the handler refuses over 32) fails the reopen, as it should.
            max_backups: u8::try_from(limits.max_backups).unwrap_or(u8::MAX),
            inherited_file: Mutex::new(inherited_file),
            closed: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            nonblocking: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(carried.written),
            rotations: AtomicU64::new(carried.rotations),
            dropped_total: AtomicU64::new(carried.dropped),
            followers: OnceLock::new(),
        }
    }

    /// Re-exec (on the pump thread): unless the file goes to our own next image
    /// (`keep_file`, see [`Self::file_for_handoff`]), takes it out, for the caller to
    /// close; a file still as our previous image handed it over (inheritable) is
    /// closed here, so a stranger never gets it. The pipe is handed over blocking, as
    /// libvirt's pipes are (its event handler reads once per wake-up, and the next
    /// image may be the C daemon); it already is, unless this kernel made us fall back
    /// to O_NONBLOCK (see [`Self::read_pipe`]).
    pub(crate) fn release_for_handoff(&self, keep_file: bool) -> Option<RotatingFileWriter> {
        // Nothing to do then, and the writer lock is left to the hand-off's own pass
        // over the files (see `file_for_handoff`), which does not wait for it.
        if keep_file && !self.nonblocking.load(Ordering::Relaxed) {
            return None;
        }
        let mut slot = self.writer.lock().ok()?;
        if self.nonblocking.swap(false, Ordering::Relaxed) {
            if let Err(e) = set_blocking(&self.pipe) {
                warn!(path = %self.path.display(), "cannot make log pipe blocking: {e}");
            }
        }
        if keep_file {
            return None;
        }
        drop(self.take_inherited_file());
        slot.take()
    }

    /// Re-exec into a stranger, after the pump's hand-off: closes this log's file (the
    /// pump's pass closes those of the logs it held; this covers the rest). A write
    /// stuck on storage keeps its writer locked, and that one file then reaches the
    /// next image, unnamed; the hand-off does not wait for it.
    pub(crate) fn close_file(&self) {
        if let Ok(mut f) = self.inherited_file.try_lock() {
            drop(f.take());
        }
        match self.writer.try_lock() {
            Ok(mut w) => drop(w.take()),
            Err(_) => {
                error!(path = %self.path.display(), "log file busy; it stays open across re-exec")
            }
        }
    }

    /// Re-exec: from now on this log's file stays as it is (no first open, no
    /// rollover), so the file the state document names is the one the exec hands over;
    /// a call that comes too late to be parked gets an error instead.
    pub(crate) fn freeze(&self) {
        self.frozen.store(true, Ordering::Release);
    }

    /// One read of the pipe that never waits. The pipe itself stays blocking (as
    /// libvirt makes it, so a re-exec hands it over untouched): the read asks for
    /// RWF_NOWAIT instead, which pipes honour since Linux 5.x. A kernel that refuses
    /// it gets O_NONBLOCK on this pipe once (the hand-off then clears it again).
    fn read_pipe(&self, buf: &mut [u8]) -> nix::Result<usize> {
        use nix::errno::Errno;
        let fd = self.pipe.as_raw_fd();
        if !self.nonblocking.load(Ordering::Relaxed) {
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: `iov` describes `buf`, which is exclusively borrowed and valid for
            // writes of `buf.len()` bytes for the whole call; offset -1 means "no
            // offset" (a pipe has none).
            let n = unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
            match Errno::result(n) {
                Ok(n) => return Ok(n as usize),
                Err(Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENOSYS) => {
                    set_nonblocking(&self.pipe).map_err(|_| Errno::last())?;
                    self.nonblocking.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        nix::unistd::read(fd, buf)
    }

    /// Moves up to `max_reads` reads from the pipe into the file, under the file lock.
    /// Also returns how many bytes it moved.
    pub(crate) fn pump(&self, max_reads: usize) -> (Pumped, usize) {
        // With the fd store on, a crash between a read and its write would lose the
        // bytes read (the pipe keeps only what nobody took): splice(2) takes from the
        // pipe exactly what reached the file. (It falls back to reads around a
        // rollover, after a failed write, or while someone follows the log.)
        if vh_common::fdstore_keeper::active() {
            return self.pump_spliced(max_reads);
        }
        self.with_writer(|w| self.pump_locked(w, max_reads))
            .unwrap_or_else(|e| (Pumped::Done(Some(e)), 0))
    }

    /// The pump thread's pass over a busy pipe: bulk data goes by splice(2) while the
    /// file has room; the bytes around a rollover, and everything after a failure (a
    /// full disk included, so the loss accounting stays in one place), by read.
    pub(crate) fn pump_spliced(&self, max_calls: usize) -> (Pumped, usize) {
        self.with_writer(|w| self.pump_spliced_locked(w, max_calls))
            .unwrap_or_else(|e| (Pumped::Done(Some(e)), 0))
    }

    fn pump_spliced_locked(&self, w: &mut RotatingFileWriter, max_calls: usize) -> (Pumped, usize) {
        if self.dropped.load(Ordering::Relaxed) == 0 {
            match w.splice_batch(self.pipe.as_fd(), max_calls, SPLICE_MAX) {
                Ok((SpliceStop::Empty, n)) => return (Pumped::Empty, n),
                Ok((SpliceStop::Eof, n)) => return (Pumped::Done(None), n),
                Ok((SpliceStop::Budget, n)) => return (Pumped::More, n),
                Ok((SpliceStop::Rollover, n)) => {
                    let (p, m) = self.pump_locked(w, max_calls);
                    return (p, n + m);
                }
                Err(e) => debug!(path = %self.path.display(), "splice: {e}; reading instead"),
            }
        }
        self.pump_locked(w, max_calls)
    }

    fn pump_locked(&self, w: &mut RotatingFileWriter, max_reads: usize) -> (Pumped, usize) {
        let mut moved = 0;
        let outcome = READ_BUFFER.with(|b| {
            let mut buf = b.borrow_mut();
            for _ in 0..max_reads {
                match self.read_pipe(&mut buf[..]) {
                    Ok(0) => return Pumped::Done(None),
                    Ok(n) => {
                        moved += n;
                        self.deliver(w, &buf[..n]);
                        // A pipe read returns everything present up to the buffer size,
                        // so a short one emptied the pipe: skip the read that would only
                        // say EAGAIN (one syscall of ~5 per wake-up). Any later write
                        // raises a new readiness event, so clearing readiness is safe.
                        if n < buf.len() {
                            return Pumped::Empty;
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) => return Pumped::Empty,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Pumped::Done(Some(e.into())),
                }
            }
            Pumped::More
        });
        (outcome, moved)
    }

    /// Moves what the pipe holds into the file (before an RPC looks at the file). EOF or
    /// a read error is left for the pump thread to act on. Bounded: a pipe holds at most
    /// 1 MiB, so this takes everything written before the call, yet a guest that keeps
    /// writing cannot hold the RPC (and the file lock) forever.
    pub(crate) fn drain_locked(&self, w: &mut RotatingFileWriter) {
        // Spliced with the fd store on, for the reason given in `pump`.
        if vh_common::fdstore_keeper::active() {
            self.pump_spliced_locked(w, DRAIN_READS);
        } else {
            self.pump_locked(w, DRAIN_READS);
        }
    }
}

impl LogFile {
    /// Marks the log closed; true only for the first call (the one that must take it
    /// out of the table). Followers get EOF now, not when the last reference goes.
    pub(crate) fn mark_closed(&self) -> bool {
        if self.closed.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.clear_followers();
        true
    }

    /// Appends pipe data. A failed write never closes the pipe (libvirt 9.0 closes it,
    /// so QEMU gets EPIPE and everything after a full disk is lost): the data that
    /// cannot be written is counted and dropped, and once the file takes writes again
    /// a marker line says how much is missing.
    fn deliver(&self, w: &mut RotatingFileWriter, data: &[u8]) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            let note = format!(
                "virtlogd: {dropped} bytes of output were lost: the log could not be written\n"
            );
            if w.append(note.as_bytes()).is_err() {
                self.dropped.fetch_add(data.len() as u64, Ordering::Relaxed);
                self.dropped_total
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                return;
            }
            self.dropped.store(0, Ordering::Relaxed);
            warn!(path = %self.path.display(), "log writable again after losing {dropped} bytes");
        }
        if let Err(e) = w.append_in_chunks(data, PIPE_CHUNK) {
            if dropped == 0 {
                error!(path = %self.path.display(), "cannot write log: {e}; dropping output until it can be written");
            }
            // Exactly what did not reach the file.
            let lost = data.len().saturating_sub(e.written);
            self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
            self.dropped_total.fetch_add(lost as u64, Ordering::Relaxed);
        }
    }
}

/// Clears O_NONBLOCK with one syscall (see [`set_nonblocking`]).
fn set_blocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::empty()))?;
    Ok(())
}

/// Sets O_NONBLOCK with one syscall: F_SETFL only touches O_APPEND, O_ASYNC, O_DIRECT,
/// O_NOATIME and O_NONBLOCK, and a log pipe's read end has none of the others.
fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok(())
}
