//! The log pump: one thread that moves the bytes of every log pipe into its file.
//!
//! A log daemon's cost is per wake-up, not per byte: QEMU writes a line, the daemon
//! wakes, reads the line and writes it. The C daemon (and a task per pipe on an async
//! runtime) pays an epoll_wait, a read and a write for nearly every line. This thread
//! coalesces instead: after a round that found the pipes nearly empty it sleeps a
//! moment before looking again, and the lines that arrive meanwhile are taken with one
//! read(2) and written with one write(2) per file. The epoll set is level-triggered, so
//! the kernel just keeps the pipes marked readable while we sleep: no wake-up is spent
//! per line, and nothing can be missed.
//!
//! The sleep adapts per round: it grows while rounds find every pipe under 1/8 full and
//! halves as soon as one is found half full, so a flooding guest is never left blocked
//! on a full pipe. A pipe found half full is also enlarged (F_SETPIPE_SZ, within a
//! daemon-wide budget) so that a round takes more per read.
//!
//! The delay never reaches libvirtd: every call that reads or reports a log
//! (GetLogFilePosition, ReadLogFile, AppendLogFile) first drains that file's pipe under
//! the file lock. It is visible only to a process reading the file itself (`tail -f`),
//! and bounded by [`MAX_COALESCE`] while at most 1,250 pipes are busy at once (beyond
//! that, by up to a quarter of a second: see [`stretched_pause`]). An isolated line is
//! handled at once: the sleep comes after a round, never before it.

use crate::log_file::{LogFile, Pumped, DRAIN_READS};
use nix::errno::Errno;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{debug, error, warn};

/// Longest pause between rounds, and about the most a `tail -f` reader waits for a
/// line: a round over a thousand busy pipes takes milliseconds itself, so the pause
/// after a round is what is left of this once the round is taken off (see
/// [`Thread::run`]).
pub const MAX_COALESCE: Duration = Duration::from_millis(20);
/// Pipes giving bytes in one round above which a round of tiny reads is stretched (see
/// [`stretched_pause`]): above the latency target's 1,000 busy pipes, with room for a
/// few more (a probe, a console) so that its bound is untouched.
const STRETCH_FROM: usize = 1250;
/// Time each such pipe past [`STRETCH_FROM`] adds to a stretched round (pause
/// included): 40,000 more pipe services a second at most.
const STRETCH_PER_PIPE: Duration = Duration::from_micros(25);
/// The longest a stretched round may last (reached at about 10,450 such pipes): a writer
/// that starts flooding during one must not wait long on a full pipe (a round that
/// finds a pipe filling is not stretched again).
const MAX_STRETCHED: Duration = Duration::from_millis(250);
/// A round whose reads averaged at least this much is not stretched: each read then
/// carries ten lines or so, enough for its syscalls to matter less. Also keeps bulk
/// rounds out (a 4,100-byte write can be read as 4,096 bytes and then 4).
const STRETCH_BELOW: usize = 1024;
/// First pause once rounds find little data.
const START_COALESCE: Duration = Duration::from_micros(200);
/// Shorter pauses than this are not worth a sleep.
const MIN_COALESCE: Duration = Duration::from_micros(50);
/// A pass that moved this much marks the pipe as busy (spliced on the next pass).
const BULK_BYTES: usize = 32 * 1024;
/// A busy pipe whose pass moved less than this goes back to read + write.
const BULK_END: usize = 2048;
/// Reads of one file per round; a file with more waiting gets another round at once.
const READS_PER_ROUND: usize = 8;
/// Size a busy pipe is raised to (the kernel's default pipe-max-size).
const BIG_PIPE: usize = 1 << 20;
/// Extra pipe capacity all enlarged pipes may add together: pipe pages are kernel
/// memory charged to our user, and a session daemon's user has a 64 MiB soft cap.
const ENLARGE_BUDGET: usize = 32 << 20;
/// Epoll token of the command eventfd; a pipe's is its fd number + 1, so that the epoll
/// set means the same to the next image, which inherits it at re-exec (see
/// [`Pump::add_many`]).
const WAKE_TOKEN: u64 = 0;
const EVENTS_PER_WAIT: usize = 256;
/// The most the event buffer grows to (24 KiB; a pipe and its file take two fds, so
/// this covers about 2,000 logs in one wait).
const MAX_EVENTS_PER_WAIT: usize = 4096;
/// How long a stop waits for the thread to let go of the logs.
const STOP_WAIT: Duration = Duration::from_secs(5);

enum Cmd {
    Add(Arc<LogFile>),
    /// Logs restored across re-exec (one command for all); each opens its file on
    /// first use. With the previous image's epoll set, whose registrations are kept.
    Restore(Vec<Arc<LogFile>>, Option<OwnedFd>),
    /// Ends the thread; `drain` first moves whatever the pipes hold into the files.
    /// `done` is signalled once the thread holds no log any more.
    Stop {
        drain: bool,
        done: Option<Sender<()>>,
    },
    /// Ends the thread for a re-exec (see [`HandoffAcks`]).
    Handoff {
        stopped: oneshot::Sender<()>,
        prepared: oneshot::Sender<Option<OwnedFd>>,
        /// The files go to our own next image (see [`LogFile::release_for_handoff`]).
        keep_files: bool,
    },
}

/// A re-exec's stop, done by the pump thread itself so that its per-log syscalls run
/// beside the writing of the state document rather than before it.
pub(crate) struct HandoffAcks {
    /// The thread no longer pumps, so no log closes any more: the table is final.
    pub(crate) stopped: oneshot::Receiver<()>,
    /// No file is open in any log (each pipe is blocking again, see
    /// [`LogFile::release_for_handoff`]) and the thread has let go of the logs. The
    /// files themselves are closed after this. Carries the epoll set, every pipe still
    /// registered in it, for the next image.
    pub(crate) prepared: oneshot::Receiver<Option<OwnedFd>>,
    /// The number of the epoll set `prepared` hands back.
    pub(crate) epoll_fd: RawFd,
}

struct Running {
    /// The thread's epoll set, named in the re-exec state before it is handed back.
    epoll_fd: RawFd,
    tx: Sender<Cmd>,
    wake: Arc<EventFd>,
    thread: JoinHandle<()>,
    /// Set once a re-exec's stop was sent (see [`Pump::request_handoff`]).
    handoff: Option<HandoffAcks>,
}

/// How the pump reports a log it closed (EOF, a failure, a pipe it cannot watch) to
/// whoever keeps the table of open logs: upward, so the pump never holds the handler.
pub(crate) type OnClosed = Arc<dyn Fn(&Arc<LogFile>) + Send + Sync>;

/// Handle on the pump thread. The thread starts with the handler and can be stopped and
/// started again (a failed re-exec restores the logs into the same process).
pub(crate) struct Pump {
    running: Mutex<Option<Running>>,
    on_closed: OnClosed,
}

impl Pump {
    pub(crate) fn new(on_closed: OnClosed) -> Self {
        Pump {
            running: Mutex::new(None),
            on_closed,
        }
    }

    /// Starts the thread (if it is not running), so its fds exist from start-up on.
    pub(crate) fn start(&self) -> io::Result<()> {
        self.with_running(|_| Ok(()))
    }

    /// Starts pumping `file`'s pipe.
    pub(crate) fn add(&self, file: Arc<LogFile>) -> io::Result<()> {
        self.with_running(|r| {
            r.tx.send(Cmd::Add(file))
                .map_err(|_| io::Error::other("log pump gone"))?;
            r.wake.write(1)?;
            Ok(())
        })
    }

    /// Starts pumping the pipes of logs restored across re-exec (one wake-up for all).
    /// `epoll` is the previous image's set (see [`HandoffAcks::prepared`]): the thread
    /// takes it over, so the pipes registered there need no new registration; one it
    /// cannot use is closed and every pipe registered afresh.
    pub(crate) fn add_many(
        &self,
        files: Vec<Arc<LogFile>>,
        epoll: Option<OwnedFd>,
    ) -> io::Result<()> {
        self.with_running(|r| {
            r.tx.send(Cmd::Restore(files, epoll))
                .map_err(|_| io::Error::other("log pump gone"))?;
            r.wake.write(1)?;
            Ok(())
        })
    }

    fn with_running(&self, f: impl FnOnce(&Running) -> io::Result<()>) -> io::Result<()> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| io::Error::other("log pump lock poisoned"))?;
        if running.as_ref().is_some_and(|r| r.thread.is_finished()) {
            // It ends only on Stop; start a new one rather than queue to nobody.
            *running = None;
        }
        if running.is_none() {
            *running = Some(self.spawn()?);
        }
        match running.as_ref() {
            Some(r) => f(r),
            None => Err(io::Error::other("log pump not running")),
        }
    }

    /// A re-exec has begun: the thread stops and prepares the hand-off while the
    /// servers park their clients; [`Self::take_handoff`] collects the answers.
    pub(crate) fn request_handoff(&self, keep_files: bool) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        if let Some(r) = running.as_mut().filter(|r| r.handoff.is_none()) {
            r.handoff = Some(send_handoff(r, keep_files));
        }
    }

    /// The re-exec's hand-off: detaches the thread (a later `add` starts a new one, as
    /// after a failed exec) and returns its acknowledgements; `None` if no thread ran.
    pub(crate) fn take_handoff(&self, keep_files: bool) -> Option<HandoffAcks> {
        let mut r = self.running.lock().ok().and_then(|mut r| r.take())?;
        Some(match r.handoff.take() {
            Some(acks) => acks,
            None => send_handoff(&r, keep_files),
        })
    }

    /// Stops the thread and waits for it; with `drain`, everything already in the pipes
    /// reaches the files first. The thread drops its references to the files, so after
    /// this the handler holds the only ones.
    pub(crate) fn stop(&self, drain: bool) {
        let Some(r) = self.running.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        // A re-exec's stop was sent already: the thread is ending by itself, and the
        // hand-off, not a drain, is what it does on the way.
        if r.handoff.is_some() {
            return;
        }
        // Not a join: the thread's own exit (stack unmapping and so on) need not wait.
        // A pump stuck in a write (a hung filesystem) is left behind; the logs it holds
        // are then not drained.
        let stopped = send_stop(&r, drain);
        match stopped.recv_timeout(STOP_WAIT) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                error!("log pump did not stop within {STOP_WAIT:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if r.thread.join().is_err() {
                    error!("log pump thread panicked");
                }
            }
        }
    }

    fn spawn(&self) -> io::Result<Running> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        epoll.add(
            wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
        )?;
        let epoll_fd = epoll.0.as_raw_fd();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name("log-pump".into()).spawn({
            let wake = wake.clone();
            let on_closed = self.on_closed.clone();
            move || Thread::new(epoll, wake, rx, on_closed).run()
        })?;
        Ok(Running {
            epoll_fd,
            tx,
            wake,
            thread,
            handoff: None,
        })
    }
}

/// Queues a stop; the receiver gets the thread's acknowledgement.
fn send_stop(r: &Running, drain: bool) -> Receiver<()> {
    let (done, stopped) = mpsc::channel();
    if r.tx
        .send(Cmd::Stop {
            drain,
            done: Some(done),
        })
        .is_ok()
    {
        let _ = r.wake.write(1);
    }
    stopped
}

/// Queues a re-exec's stop.
fn send_handoff(r: &Running, keep_files: bool) -> HandoffAcks {
    let (stopped_tx, stopped) = oneshot::channel();
    let (prepared_tx, prepared) = oneshot::channel();
    let cmd = Cmd::Handoff {
        stopped: stopped_tx,
        prepared: prepared_tx,
        keep_files,
    };
    if r.tx.send(cmd).is_ok() {
        let _ = r.wake.write(1);
    }
    HandoffAcks {
        stopped,
        prepared,
        epoll_fd: r.epoll_fd,
    }
}

impl Slot {
    fn capacity(&self) -> usize {
        self.capacity as usize
    }

    fn set_capacity(&mut self, bytes: usize) {
        self.capacity = u32::try_from(bytes).unwrap_or(u32::MAX);
    }
}

/// One pipe in the thread's table.
struct Slot {
    file: Arc<LogFile>,
    /// Current capacity of the pipe, bytes; 0 until first serviced. A u32 (the kernel's
    /// pipe sizes are ints): the slot is 16 bytes, and there is one per fd number.
    capacity: u32,
    /// The kernel refused to enlarge this pipe; do not ask again.
    fixed: bool,
    /// The last pass moved at least [`BULK_BYTES`]: use splice(2).
    bulk: bool,
}

struct Thread {
    epoll: Epoll,
    wake: Arc<EventFd>,
    rx: Receiver<Cmd>,
    on_closed: OnClosed,
    /// Pipes by fd number (token - 1): fds are small and dense, so lookups never scan.
    slots: Vec<Option<Slot>>,
    /// Capacity added by enlarging pipes, counted against [`ENLARGE_BUDGET`].
    enlarged: usize,
    coalesce: Duration,
}

impl Thread {
    fn new(epoll: Epoll, wake: Arc<EventFd>, rx: Receiver<Cmd>, on_closed: OnClosed) -> Self {
        Thread {
            epoll,
            wake,
            rx,
            on_closed,
            slots: Vec::new(),
            enlarged: 0,
            coalesce: Duration::ZERO,
        }
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); EVENTS_PER_WAIT];
        let mut more_waiting = false;
        // One round may take several waits: the buffer has room for every pipe only
        // up to MAX_EVENTS_PER_WAIT, and a restored epoll set may also hold
        // registrations the state did not name.
        let mut moved_any = false;
        let mut fullest = 0.0f64;
        let mut round_events = 0usize;
        // Pipes that gave bytes in this round, and the bytes (see stretched_pause).
        let mut round_pipes = 0usize;
        let mut round_bytes = 0usize;
        // When the current round found its first ready pipe (see MAX_COALESCE).
        let mut round_start: Option<Instant> = None;
        loop {
            match self.commands() {
                // `commands` applies Add and Restore itself; only an ending comes back.
                None | Some(Cmd::Add(_) | Cmd::Restore(..)) => {}
                Some(Cmd::Stop { drain, done }) => {
                    if drain {
                        self.drain_all();
                    }
                    self.slots.clear();
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                Some(Cmd::Handoff {
                    stopped,
                    prepared,
                    keep_files,
                }) => {
                    let _ = stopped.send(());
                    return self.hand_off(prepared, keep_files);
                }
            }
            let timeout = if more_waiting {
                EpollTimeout::ZERO
            } else {
                EpollTimeout::NONE
            };
            // Room for every pipe at once (fds are dense: `slots` is as long as the
            // highest pipe fd), so a round is normally one wait, sorted below; up to
            // MAX_EVENTS_PER_WAIT, beyond which each wait's share is sorted.
            let want = (self.slots.len() + 1).min(MAX_EVENTS_PER_WAIT);
            if events.len() < want {
                events.resize(want, EpollEvent::empty());
            }
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    // Cannot happen with a valid epoll fd and buffer; do not spin.
                    error!("log pump: epoll_wait: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            more_waiting = false;
            if round_start.is_none() {
                round_start = Some(Instant::now());
            }
            // In fd order, not in the order the pipes became ready: a pipe then has the
            // same place in every round, so a line waits at most one round plus one
            // pause. In readiness order a line written just after its pipe's turn
            // could come last in the next round (p99 25-36 ms with 1,000 busy pipes).
            events[..n].sort_unstable_by_key(EpollEvent::data);
            for ev in &events[..n] {
                let token = ev.data();
                if token == WAKE_TOKEN {
                    let _ = self.wake.read();
                    continue;
                }
                let idx = (token - 1) as usize;
                if self.slots.get(idx).is_none_or(Option::is_none) {
                    self.forget(idx);
                    continue;
                }
                let (bytes, fill, more) = self.service(idx);
                // Only pipes that gave bytes: a round of pipes found at EOF (guests
                // gone) is not one of tiny reads, and is not to be stretched.
                if bytes > 0 {
                    round_pipes += 1;
                    round_bytes += bytes;
                }
                moved_any |= bytes > 0;
                more_waiting |= more;
                fullest = fullest.max(fill);
            }
            // A full batch: more pipes may be ready. The round goes on at once and the
            // pause comes after it, so a thousand busy pipes wait one pause, not one per
            // batch of 256 (a line took four pauses, ~80 ms, to reach its file). A round
            // ends once it has had as many pipes as there are, or busy writers would
            // keep it from ever ending (and from coalescing anything).
            round_events += n;
            if n == events.len()
                && !more_waiting
                && round_events < self.slots.iter().filter(|s| s.is_some()).count()
            {
                continue;
            }
            round_events = 0;
            let round = round_start.take().map_or(Duration::ZERO, |t| t.elapsed());
            if more_waiting {
                self.coalesce = Duration::ZERO;
            } else if moved_any {
                self.adapt(fullest);
                // The round counts against the pause: a line written just after its
                // pipe's turn waits the rest of this round, the pause and the next
                // round up to its turn, i.e. one round plus one pause. With a thousand
                // busy pipes a round takes 5-10 ms on a loaded machine, and a full
                // pause after it put a line's p99 at 25-31 ms. The adaptive value
                // itself is kept, so the pause grows back when rounds get short.
                let pause = self
                    .coalesce
                    .min(MAX_COALESCE.saturating_sub(round))
                    .max(stretched_pause(round, round_pipes, round_bytes, fullest));
                if pause >= MIN_COALESCE {
                    self.pause(pause);
                }
            }
            moved_any = false;
            fullest = 0.0;
            round_pipes = 0;
            round_bytes = 0;
        }
    }

    /// One ready pipe: moves what it holds, closes the log at EOF. Returns the bytes
    /// moved, how full that left the pipe's capacity, and whether more is waiting.
    fn service(&mut self, idx: usize) -> (usize, f64, bool) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return (0, 0.0, false);
        };
        if slot.capacity == 0 {
            // A pipe enlarged by the previous image counts against the budget here too.
            slot.set_capacity(pipe_capacity(&slot.file));
            self.enlarged += slot.capacity().saturating_sub(DEFAULT_PIPE);
        }
        // A pipe that gave a lot last time is read by splice(2); small amounts are
        // cheaper by plain read + write.
        let (outcome, bytes) = if slot.bulk {
            slot.file.pump_spliced(READS_PER_ROUND)
        } else {
            slot.file.pump(READS_PER_ROUND)
        };
        // Hysteresis, so a flood does not flip paths on every short pass.
        slot.bulk = bytes >= if slot.bulk { BULK_END } else { BULK_BYTES };
        let fill = bytes as f64 / slot.capacity().max(1) as f64;
        match outcome {
            Pumped::Empty => {
                if fill >= 0.5 {
                    self.enlarge(idx);
                }
                (bytes, fill, false)
            }
            Pumped::More => {
                self.enlarge(idx);
                (bytes, fill, true)
            }
            Pumped::Done(err) => {
                if let Some(e) = err {
                    error!(path = %slot.file.path.display(), "closing log after failure: {e}");
                }
                self.remove(idx);
                (bytes, fill, false)
            }
        }
    }

    /// Applies queued commands. Returns the one that ends the thread (a stop or a
    /// hand-off), if any.
    fn commands(&mut self) -> Option<Cmd> {
        loop {
            match self.rx.try_recv() {
                Ok(Cmd::Add(file)) => self.insert(file),
                // Restored logs open their files on first use (first data, an RPC or
                // the operator listing): right after a re-exec the daemon serves
                // rather than opening a thousand files, and idle logs cost nothing.
                Ok(Cmd::Restore(files, epoll)) => {
                    if let Some(fd) = epoll {
                        self.take_over(fd);
                    }
                    files.into_iter().for_each(|f| self.insert(f));
                }
                Ok(end @ (Cmd::Stop { .. } | Cmd::Handoff { .. })) => return Some(end),
                Err(TryRecvError::Empty) => return None,
                // The handle is gone (handler dropped): nothing left to serve.
                Err(TryRecvError::Disconnected) => {
                    return Some(Cmd::Stop {
                        drain: false,
                        done: None,
                    })
                }
            }
        }
    }

    /// Re-exec: adopts the previous image's epoll set in place of this thread's (still
    /// empty but for the command eventfd). Its pipes stay registered under their fd
    /// numbers; whatever else it holds is gone with the old image's fds.
    fn take_over(&mut self, fd: OwnedFd) {
        let inherited = Epoll(fd);
        if let Err(e) = inherited.add(
            self.wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
        ) {
            // Not an epoll set after all (EINVAL): keep ours, register every pipe.
            warn!("inherited log pump epoll set unusable: {e}");
            return;
        }
        for slot in self.slots.iter().flatten() {
            let token = slot.file.pipe.as_raw_fd() as u64 + 1;
            let _ = inherited.add(
                slot.file.pipe.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, token),
            );
        }
        self.epoll = inherited;
    }

    /// An event for no pipe of ours: a registration the previous image left behind
    /// for an fd the state did not name. Removed, or level-triggering would repeat it.
    fn forget(&mut self, idx: usize) {
        let Ok(fd) = i32::try_from(idx) else {
            return;
        };
        // SAFETY: only for the duration of the epoll_ctl call; a registration's fd is
        // open for as long as it is reported (closing the file removes it).
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Err(e) = self.epoll.delete(bfd) {
            warn!("log pump: stray epoll registration of fd {fd}: {e}");
        }
    }

    fn insert(&mut self, file: Arc<LogFile>) {
        let fd = file.pipe.as_raw_fd();
        let Ok(idx) = usize::try_from(fd) else {
            return;
        };
        if self.slots.len() <= idx {
            self.slots.resize_with(idx + 1, || None);
        }
        let token = idx as u64 + 1;
        match self.epoll.add(
            file.pipe.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, token),
        ) {
            // Registered by the previous image, under the same token (a restore).
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                error!(path = %file.path.display(), "cannot watch log pipe: {e}");
                (self.on_closed)(&file);
                return;
            }
        }
        self.slots[idx] = Some(Slot {
            file,
            capacity: 0,
            fixed: false,
            bulk: false,
        });
    }

    fn remove(&mut self, idx: usize) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) else {
            return;
        };
        let _ = self.epoll.delete(slot.file.pipe.as_fd());
        self.enlarged = self
            .enlarged
            .saturating_sub(slot.capacity().saturating_sub(DEFAULT_PIPE));
        (self.on_closed)(&slot.file);
    }

    /// Raises a busy pipe to [`BIG_PIPE`] if the budget allows. Failure is harmless: the
    /// pipe keeps its size (an unprivileged user may be over its pipe quota).
    fn enlarge(&mut self, idx: usize) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        if slot.fixed
            || slot.capacity() >= BIG_PIPE
            || self.enlarged + BIG_PIPE - slot.capacity() > ENLARGE_BUDGET
        {
            return;
        }
        let fd = slot.file.pipe.as_raw_fd();
        match nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(BIG_PIPE as i32)) {
            Ok(n) if n > 0 && n as usize > slot.capacity() => {
                self.enlarged += n as usize - slot.capacity();
                slot.set_capacity(n as usize);
                debug!(path = %slot.file.path.display(), "pipe raised to {n} bytes");
            }
            Ok(_) => {}
            Err(e) => {
                debug!(path = %slot.file.path.display(), "cannot raise pipe size: {e}");
                slot.fixed = true;
            }
        }
    }

    /// Next pause from how full the fullest pipe of this round was: back off fast when
    /// a pipe fills (its writer must not block), creep up while every pipe is nearly empty.
    fn adapt(&mut self, fullest: f64) {
        self.coalesce = if fullest >= 0.5 {
            let half = self.coalesce / 2;
            if half < MIN_COALESCE {
                Duration::ZERO
            } else {
                half
            }
        } else if fullest < 0.125 {
            if self.coalesce.is_zero() {
                START_COALESCE
            } else {
                (self.coalesce * 2).min(MAX_COALESCE)
            }
        } else {
            self.coalesce
        };
    }

    /// Sleeps for `d`, waking early only for a command (never for pipe data).
    fn pause(&self, d: Duration) {
        let mut fds = [PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        let ts = TimeSpec::from_duration(d);
        match ppoll(&mut fds, Some(ts), None) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => warn!("log pump: ppoll: {e}"),
        }
    }

    /// Re-exec: every file leaves its log (see [`LogFile::release_for_handoff`]) and is
    /// closed, while the daemon writes its state, unless `keep_files` (they go to our
    /// own next image, open); then the logs are let go of. The
    /// epoll set goes to the next image with its pipes still registered: closing it
    /// here would unregister every pipe one by one (about a microsecond each) inside
    /// the pause, and the next image would register them again.
    fn hand_off(mut self, prepared: oneshot::Sender<Option<OwnedFd>>, keep_files: bool) {
        let mut files = Vec::with_capacity(if keep_files { 0 } else { self.slots.len() });
        for slot in self.slots.drain(..).flatten() {
            files.extend(slot.file.release_for_handoff(keep_files));
        }
        // Our command eventfd closes at exec, which unregisters it by itself; taken out
        // now so that a restore after a failed exec does not get its wake-ups.
        let _ = self.epoll.delete(self.wake.as_fd());
        // Closed before the exec may start (none when `keep_files`): the files are
        // inheritable (see `rotating_file::open_entry`), and the next image is not ours.
        drop(files);
        let _ = prepared.send(Some(self.epoll.0));
    }

    /// Quit: what QEMU wrote before the stop reaches its file (bounded, as for RPCs).
    fn drain_all(&mut self) {
        for slot in self.slots.iter().flatten() {
            slot.file.pump(DRAIN_READS);
        }
    }
}

/// The pause after a round over very many pipes that each gave a line or two.
///
/// The pump's cost is per pipe serviced (an epoll event, a read, a write), hardly per
/// byte, so when thousands of pipes each get a line now and then, CPU per byte is set
/// by how often each is serviced. Past [`STRETCH_FROM`] pipes giving bytes, a round
/// plus its pause lasts [`MAX_COALESCE`] plus [`STRETCH_PER_PIPE`] for each pipe
/// beyond, up to [`MAX_STRETCHED`]: with 10,000 pipes each getting a line every 70 ms a read then
/// carries two or three lines instead of about one. The price is that a `tail -f` (or
/// a follower) may wait that long for a line while that many pipes are busy;
/// libvirt's own calls never wait (each drains its log first). Up to `STRETCH_FROM`
/// this is zero, so the caller's pause (at most `MAX_COALESCE` minus the round) and
/// the latency bound for 1,000 busy pipes are untouched.
///
/// Never when a pipe was found filling (`fullest`, see [`Thread::adapt`]): a guest
/// that floods must not wait on a full pipe for a stretched pause; nor when the reads
/// were big enough to be cheap per byte.
fn stretched_pause(round: Duration, pipes: usize, bytes: usize, fullest: f64) -> Duration {
    if fullest >= 0.125 || pipes <= STRETCH_FROM || bytes / pipes >= STRETCH_BELOW {
        return Duration::ZERO;
    }
    let beyond = u32::try_from(pipes - STRETCH_FROM).unwrap_or(u32::MAX);
    let cycle = MAX_COALESCE
        .saturating_add(STRETCH_PER_PIPE.saturating_mul(beyond))
        .min(MAX_STRETCHED);
    cycle.saturating_sub(round)
}

/// Linux's default pipe capacity (16 pages).
const DEFAULT_PIPE: usize = 65_536;

fn pipe_capacity(file: &LogFile) -> usize {
    match nix::fcntl::fcntl(file.pipe.as_raw_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ) {
        Ok(n) if n > 0 => n as usize,
        _ => DEFAULT_PIPE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_is_sixteen_bytes() {
        // One per fd number (pipes and log files alike): 10,000 logs, 20,000 slots.
        assert_eq!(std::mem::size_of::<Option<Slot>>(), 16);
    }

    const MS: Duration = Duration::from_millis(1);

    /// Up to 1,250 ready pipes nothing is stretched, so the 1,000-busy-pipe latency
    /// bound is untouched.
    #[test]
    fn no_stretch_up_to_the_latency_targets_pipes() {
        for pipes in [1, 100, 1000, STRETCH_FROM] {
            for round in [Duration::ZERO, 3 * MS, 10 * MS] {
                let p = stretched_pause(round, pipes, pipes * 100, 0.0);
                assert_eq!(p, Duration::ZERO, "{pipes} pipes");
            }
        }
        // Continuous at the knee: one pipe more adds one step, not a jump.
        let p = stretched_pause(Duration::ZERO, STRETCH_FROM + 1, 100, 0.0);
        assert_eq!(p, MAX_COALESCE + STRETCH_PER_PIPE);
    }

    #[test]
    fn many_tiny_reads_stretch_the_round() {
        // 5,250 pipes of one line each: a round plus its pause of 120 ms.
        assert_eq!(stretched_pause(40 * MS, 5_250, 525_000, 0.0), 80 * MS);
        // Bounded, and never negative when the round alone took longer.
        assert_eq!(
            stretched_pause(Duration::ZERO, 100_000, 100, 0.0),
            MAX_STRETCHED
        );
        assert_eq!(stretched_pause(300 * MS, 10_000, 100, 0.0), Duration::ZERO);
    }

    #[test]
    fn filling_pipes_or_big_reads_are_not_stretched() {
        assert_eq!(stretched_pause(MS, 10_000, 1_000_000, 0.2), Duration::ZERO);
        assert_eq!(
            stretched_pause(MS, 10_000, 10_000 * STRETCH_BELOW, 0.0),
            Duration::ZERO
        );
        assert_eq!(stretched_pause(MS, 0, 0, 0.0), Duration::ZERO);
    }
}
