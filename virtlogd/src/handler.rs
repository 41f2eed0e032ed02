//! The log handler: the table of open logs (`log_file.rs`) and the RPC operations on
//! them. The pump thread (`pump.rs`) moves the data and reports the logs it closes
//! back through the callback this module gives it; neither module imports the other's
//! internals, both stand on `log_file.rs`.
//!
//! Design, against the C daemon's single lock, 1 KiB reads and linear scans:
//! * each file has its own lock; the pump finds a ready pipe's file by its epoll token
//!   (an index), never by a scan;
//! * reads are up to 128 KiB into a per-thread buffer (no allocation per chunk, no
//!   128 KiB per idle pipe), and the rotation logic still sees 1 KiB pieces so split
//!   points match the C daemon's, while the write(2)s are batched;
//! * the table of open paths is a map, touched only on open, close and lookups by RPC.

use crate::log_file::{LogFile, LOG_MODE};
use crate::pump::{HandoffAcks, Pump};
use crate::rotating_file::{FileError, RotatingFileReader, RotatingFileWriter};
use std::borrow::Borrow;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use tracing::{debug, error, warn};
use vh_common::error::{code, domain, errno_of, RpcError};
use vh_common::restart::RestoreError;

// The log's own types, at their old paths too.
pub use crate::log_file::{CompactOwner, Limits, LogCounters, LogOwner};

/// Largest number of backups libvirt allows.
pub const MAX_BACKUPS_LIMIT: u64 = crate::rotating_file::MAX_MAX_BACKUP as u64;
/// Largest ReadLogFile reply.
pub const READ_MAX: u64 = 4_194_304;

/// The open logs by path. Shared with the pump's close callback (see
/// [`LogHandler::new`]), which is how the pump takes a log it closed out of the table
/// without holding the handler.
type LogTable = Arc<Mutex<HashSet<ByPath>>>;

/// A log in the table, hashed and compared by its path: a set of these costs 8 bytes a
/// slot where a map from a copy of the path cost 32 (and the copy ~64 more), which with
/// ten thousand open logs was ~0.1 KiB a log.
#[derive(Clone)]
struct ByPath(Arc<LogFile>);

impl Borrow<Path> for ByPath {
    fn borrow(&self) -> &Path {
        &self.0.path
    }
}

// Hash and Eq exactly as `Path` does, which `Borrow<Path>` requires for lookups by path.
impl Hash for ByPath {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.path.hash(state);
    }
}

impl PartialEq for ByPath {
    fn eq(&self, other: &Self) -> bool {
        self.0.path == other.0.path
    }
}

impl Eq for ByPath {}

/// Keeps logs (and so their pipes) alive; see [`LogHandler::snapshot`].
pub struct LogsHeld(#[allow(dead_code)] Vec<Arc<LogFile>>);

/// A log file as it is handed over across re-exec.
#[derive(Debug)]
pub struct HandedOffLog {
    pub pipe: OwnedFd,
    pub path: PathBuf,
    pub owner: LogOwner,
    /// Carried in our own key of the state document (zero after the C daemon).
    pub counters: LogCounters,
    /// The log's file, handed over open by our own previous image (see
    /// `LogdState::log_files`); `None`: reopened by path on first use.
    pub file: Option<OwnedFd>,
}

/// Operator view of one open log.
#[derive(Debug, Clone)]
pub struct LogFileInfo {
    pub path: PathBuf,
    pub owner: LogOwner,
    pub inode: u64,
    pub offset: u64,
}

pub struct LogHandler {
    limits: Limits,
    files: LogTable,
    /// Set (under the table lock) once a re-exec took the table: a straggling open
    /// must not add a log the state document no longer names.
    handed_off: AtomicBool,
    /// The coming re-exec runs our own image, which takes the files open (see
    /// [`Self::next_image_is_ours`]).
    files_to_next_image: AtomicBool,
    pump: Pump,
    /// Held shared by every open from before its file is opened until it is in the
    /// table, and exclusively by the log cleaner while it checks and deletes one chain:
    /// a log is never opened between the cleaner's "not open" and its unlink.
    opening: RwLock<()>,
}

/// A re-exec's logs, taken out of the table (see [`LogHandler::begin_handoff`]).
pub struct Handoff {
    logs: Vec<Arc<LogFile>>,
    acks: Option<HandoffAcks>,
    /// The files go to our own next image, open.
    keep_files: bool,
}

/// What the state document records of one handed-off log.
pub struct HandedOffView<'a> {
    pub pipe: RawFd,
    pub path: &'a Path,
    pub owner: &'a CompactOwner,
    pub counters: LogCounters,
    /// The open file handed over with it (only into our own next image).
    pub file: Option<RawFd>,
}

/// How long a re-exec waits for each step of the pump's hand-off.
const HANDOFF_STEP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Handoff {
    /// Whether the files go to the next image (see [`HandedOffView::file`]).
    pub fn keeps_files(&self) -> bool {
        self.keep_files
    }

    /// Each log as the document names it.
    pub fn logs(&self) -> impl Iterator<Item = HandedOffView<'_>> {
        self.logs.iter().map(|f| HandedOffView {
            pipe: f.pipe.as_raw_fd(),
            path: &f.path,
            owner: &f.owner,
            counters: f.counters(),
            file: if self.keep_files {
                f.file_for_handoff()
            } else {
                None
            },
        })
    }

    /// The pump's part, to wait for while the document is written from [`Self::logs`].
    pub fn take_pump(&mut self) -> PumpHandoff {
        PumpHandoff {
            acks: self.acks.take(),
        }
    }

    /// Waits until the pump has let go of the logs, then releases them (see
    /// [`Self::release`]). Returns the pump's epoll set, every pipe still registered in
    /// it, for the next image (see `LogHandlerState::pumpfd`).
    pub async fn finish(mut self) -> Option<OwnedFd> {
        let epoll = self.take_pump().prepared().await;
        self.release();
        epoll
    }

    /// After the pump's part ([`PumpHandoff::prepared`]): gives up ownership of every
    /// pipe (and, into our own image, file): they stay open for the next image (or for
    /// the restore after a failed exec, which adopts them from the document again).
    pub fn release(self) {
        if !self.keep_files {
            // Into a stranger: no log file may reach it (they are inheritable, see
            // `rotating_file::open_entry`); the pump closed those of the logs it held.
            for l in &self.logs {
                l.close_file();
            }
        }
        // The pipes must stay open, for the next image or for the restore after a
        // failed exec (which adopts them again from the document). Forgetting the logs
        // does that without a pass over them: a successful exec discards the memory
        // with the address space; a failed one (rare) leaks a few hundred bytes a log.
        std::mem::forget(self.logs);
    }
}

/// The pump's side of a re-exec hand-off (see [`Handoff::take_pump`]).
pub struct PumpHandoff {
    acks: Option<HandoffAcks>,
}

impl PumpHandoff {
    /// The number of the pump's epoll set that [`Self::prepared`] returns.
    pub fn fd(&self) -> Option<RawFd> {
        self.acks.as_ref().map(|a| a.epoll_fd)
    }

    /// Waits until the pump has let go of the logs; returns its epoll set.
    pub async fn prepared(self) -> Option<OwnedFd> {
        let acks = self.acks?;
        match tokio::time::timeout(HANDOFF_STEP_WAIT, acks.prepared).await {
            Ok(Ok(fd)) => fd,
            _ => {
                error!("the log pump did not hand off in time");
                None
            }
        }
    }
}

fn path_of(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(bytes))
}

/// The text libvirt prints for a path (its bytes as a C string).
fn shown(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The error reply for a failed file operation: libvirt's text where the rotating file
/// described the failure, else `fallback` (the text before ": <strerror>").
fn file_error(e: &io::Error, fallback: impl FnOnce() -> String) -> RpcError {
    match FileError::of(e) {
        Some(FileError::System { what, errno }) => RpcError::system(domain::NONE, *errno, what),
        Some(f @ FileError::Fifo { .. }) => {
            RpcError::new(code::INVALID_ARG, domain::LOGGING, f.to_string())
        }
        None => RpcError::system(domain::NONE, errno_of(e), fallback()),
    }
}

/// Closes a log and takes it out of `files` (if it is still the one under its path).
fn forget(files: &Mutex<HashSet<ByPath>>, file: &Arc<LogFile>) {
    if !file.mark_closed() {
        return;
    }
    // The fd store's copy of the pipe goes once a snapshot without it is written.
    vh_common::fdstore_keeper::closing(file.pipe.as_raw_fd());
    vh_common::fdstore_keeper::touch_soon();
    if let Ok(mut files) = files.lock() {
        if files
            .get(&*file.path)
            .is_some_and(|f| Arc::ptr_eq(&f.0, file))
        {
            files.remove(&*file.path);
        }
    }
    debug!(path = %file.path.display(), "log closed");
}

impl LogHandler {
    pub fn new(limits: Limits) -> Arc<Self> {
        let files = LogTable::default();
        // The pump reports a log it closed (EOF, a failure) upward through this: it
        // holds the table, not the handler.
        let on_closed = {
            let files = files.clone();
            move |file: &Arc<LogFile>| forget(&files, file)
        };
        let h = Arc::new(LogHandler {
            limits,
            files,
            handed_off: AtomicBool::new(false),
            files_to_next_image: AtomicBool::new(false),
            pump: Pump::new(Arc::new(on_closed)),
            opening: RwLock::new(()),
        });
        // Now rather than at the first log, so the daemon's fds are steady from start-up;
        // a failure here is retried by the first open.
        if let Err(e) = h.pump.start() {
            error!("cannot start the log pump: {e}");
        }
        h
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn check_backups(&self) -> Result<usize, RpcError> {
        crate::rotating_file::max_backups(self.limits.max_backups)
            .map_err(|e| RpcError::new(code::CONFIG_UNSUPPORTED, domain::NONE, e.to_string()))
    }

    fn lookup(&self, path: &Path) -> Option<Arc<LogFile>> {
        self.files
            .lock()
            .ok()
            .and_then(|f| f.get(path).map(|l| l.0.clone()))
    }

    /// The table of open logs. A poisoned lock (a panic while it was held) is an error
    /// for the caller to report, never an empty table: the cleaner would take every
    /// open log's chain for a closed one.
    fn table(&self) -> Result<MutexGuard<'_, HashSet<ByPath>>, RpcError> {
        self.files
            .lock()
            .map_err(|_| RpcError::internal(domain::LOGGING, "log table poisoned"))
    }

    /// The paths of the open logs (the cleaner keeps their chains).
    pub fn open_paths(&self) -> Result<Vec<PathBuf>, RpcError> {
        Ok(self
            .table()?
            .iter()
            .map(|l| l.0.path.to_path_buf())
            .collect())
    }

    /// Runs `f` with no open in progress or starting (the log cleaner's deletion of one
    /// chain: a few unlinks).
    pub fn without_opens<R>(&self, f: impl FnOnce() -> R) -> R {
        let _guard = self.opening.write().unwrap_or_else(|e| e.into_inner());
        f()
    }

    /// Number of open log files (session-mode shutdown inhibitions). A poisoned table
    /// still counts what it holds (an idle daemon must not quit with logs open).
    pub fn nfiles(&self) -> usize {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn list(&self) -> Result<Vec<LogFileInfo>, RpcError> {
        let files: Vec<Arc<LogFile>> = self.table()?.iter().map(|l| l.0.clone()).collect();
        let mut out: Vec<LogFileInfo> = files
            .iter()
            .filter_map(|f| {
                let (inode, offset) = f.with_writer(|w| (w.inode(), w.position())).ok()?;
                Some(LogFileInfo {
                    path: f.path.to_path_buf(),
                    owner: f.owner.to_owner(),
                    inode,
                    offset,
                })
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// DOMAIN_OPEN_LOG_FILE: returns (inode, offset, write end of the pipe).
    pub fn open(
        self: &Arc<Self>,
        owner: LogOwner,
        path: &[u8],
        truncate: bool,
    ) -> Result<(u64, u64, OwnedFd), RpcError> {
        // The log's one copy of its path (see `LogFile::path`).
        let path: Arc<Path> = Path::new(OsStr::from_bytes(path)).into();
        let _opening = self.opening.read().unwrap_or_else(|e| e.into_inner());
        // Uniqueness is per exact path string, as in libvirt.
        if self.lookup(&path).is_some() {
            return Err(RpcError::system(
                domain::LOGGING,
                libc::EBUSY,
                format!("Cannot open log file: '{}'", shown(&path)),
            ));
        }
        // An open log is named in the re-exec state, a JSON string, which cannot hold
        // other bytes than UTF-8: the next image would open a different file.
        if path.to_str().is_none() {
            return Err(RpcError::new(
                code::INVALID_ARG,
                domain::LOGGING,
                format!(
                    "log file path {:?} is not valid UTF-8, which the daemon's re-exec state \
                     cannot carry",
                    path.as_os_str()
                ),
            ));
        }
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| RpcError::system(domain::LOGGING, e as i32, "Cannot create pipe"))?;
        let backups = self.check_backups()?;
        let writer = RotatingFileWriter::open_shared(
            path.clone(),
            self.limits.max_size,
            backups,
            truncate,
            LOG_MODE,
        )
        .map_err(|e| file_error(&e, || format!("Unable to open file: {}", shown(&path))))?;
        let (inode, offset) = (writer.inode(), writer.position());
        self.install(rd, path, owner, Some(writer)).map_err(|e| {
            RpcError::system(domain::LOGGING, errno_of(&e), "Cannot watch log pipe")
        })?;
        Ok((inode, offset, wr))
    }

    /// Registers a file and starts its pump. Fails only if the path raced in meanwhile.
    fn install(
        self: &Arc<Self>,
        rd: OwnedFd,
        path: Arc<Path>,
        owner: LogOwner,
        writer: Option<RotatingFileWriter>,
    ) -> io::Result<()> {
        let file = Arc::new(LogFile::new(
            path,
            owner,
            rd,
            writer,
            None,
            self.limits,
            LogCounters::default(),
        ));
        {
            let mut files = self
                .files
                .lock()
                .map_err(|_| io::Error::other("log table poisoned"))?;
            if files.contains(&*file.path) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            if self.handed_off.load(Ordering::Acquire) {
                return Err(io::Error::other("the daemon is re-executing"));
            }
            // Inheritable only once in the table (see `LogFile::pipe`), so the state
            // document names every pipe that can reach the next image.
            vh_proto::fdpass::clear_cloexec(file.pipe.as_raw_fd())?;
            files.insert(ByPath(file.clone()));
            vh_common::fdstore_keeper::touch();
        }
        if let Err(e) = self.pump.add(file.clone()) {
            self.close(&file);
            return Err(e);
        }
        Ok(())
    }

    /// Forgets a file: its pipe closes when the last reference goes.
    pub(crate) fn close(&self, file: &Arc<LogFile>) {
        forget(&self.files, file);
    }

    /// With the fd store on: every open log as the state document records it (read end,
    /// path, owner), and a guard keeping their pipes open while the caller stores them.
    pub fn snapshot(&self) -> (Vec<(RawFd, PathBuf, LogOwner)>, LogsHeld) {
        let files: Vec<Arc<LogFile>> = self
            .files
            .lock()
            .map(|f| f.iter().map(|l| l.0.clone()).collect())
            .unwrap_or_default();
        let logs = files
            .iter()
            .map(|f| (f.pipe.as_raw_fd(), f.path.to_path_buf(), f.owner.to_owner()))
            .collect();
        (logs, LogsHeld(files))
    }

    /// Every open log's counters, sorted by path (operator metrics). A log restored
    /// across re-exec and not touched since reports what it carried.
    /// Also gives how many follow each log.
    pub fn counters(&self) -> Result<Vec<(PathBuf, LogCounters, usize)>, RpcError> {
        let mut out: Vec<(PathBuf, LogCounters, usize)> = self
            .table()?
            .iter()
            .map(|l| (l.0.path.to_path_buf(), l.0.counters(), l.0.follower_count()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The open log at `path`, or the error both FOLLOW and GET_LOG_FILE_POSITION give
    /// for a path no log is open at.
    fn open_log(&self, path: &Path) -> Result<Arc<LogFile>, RpcError> {
        self.lookup(path).ok_or_else(|| {
            RpcError::internal(domain::LOGGING, format!("No open log file {}", shown(path)))
        })
    }

    /// Adds `sock` as a follower of the open log at `path` (see `follow.rs`). Returns
    /// the (inode, offset) its stream starts at: every byte the writer had written
    /// before is in the files, every later one goes to the follower.
    pub fn follow(&self, path: &[u8], sock: OwnedFd) -> Result<(u64, u64), RpcError> {
        let path = path_of(path);
        let file = self.open_log(&path)?;
        file.with_writer(|w| {
            file.drain_locked(w);
            file.add_follower(w, sock)
                .map_err(|e| RpcError::new(code::OPERATION_FAILED, domain::LOGGING, e))?;
            Ok((w.inode(), w.position()))
        })
        .map_err(|e| file_error(&e, || format!("Unable to open file: {}", shown(&path))))?
    }

    /// DOMAIN_GET_LOG_FILE_POSITION: drains the pipe first, so the answer covers every
    /// byte already written into it.
    pub fn position(&self, path: &[u8]) -> Result<(u64, u64), RpcError> {
        let path = path_of(path);
        let file = self.open_log(&path)?;
        file.with_writer(|w| {
            file.drain_locked(w);
            (w.inode(), w.position())
        })
        .map_err(|e| file_error(&e, || format!("Unable to open file: {}", shown(&path))))
    }

    /// DOMAIN_READ_LOG_FILE (flags and maxlen already checked by the caller).
    pub fn read(
        &self,
        path: &[u8],
        inode: u64,
        offset: u64,
        maxlen: u64,
    ) -> Result<Vec<u8>, RpcError> {
        let path = path_of(path);
        let backups = self.check_backups()?;
        // What QEMU has written must be readable, even if the pump has not come by yet.
        if let Some(file) = self.lookup(&path) {
            // A failure here is the pump's to report; the read goes on regardless.
            let _ = file.with_writer(|w| file.drain_locked(w));
        }
        let mut r = RotatingFileReader::open(path.clone(), backups)
            .map_err(|e| file_error(&e, || format!("Unable to open file: {}", shown(&path))))?;
        r.seek(inode, offset).map_err(|e| {
            RpcError::system(
                domain::NONE,
                errno_of(&e),
                format!("Unable to seek to inode {inode} offset {offset}"),
            )
        })?;
        let mut data = r
            .read(maxlen.min(READ_MAX) as usize)
            .map_err(|e| file_error(&e, || format!("Unable to read from file {}", shown(&path))))?;
        // libvirt builds the reply from a C string: it ends at the first NUL.
        if let Some(nul) = data.iter().position(|&b| b == 0) {
            data.truncate(nul);
        }
        Ok(data)
    }

    /// DOMAIN_APPEND_LOG_FILE: through the open file's writer if there is one, else a
    /// writer opened for this message only.
    pub fn append(&self, path: &[u8], message: &[u8]) -> Result<(), RpcError> {
        let path = path_of(path);
        // The message is a C string on libvirt's side.
        let msg = match message.iter().position(|&b| b == 0) {
            Some(n) => &message[..n],
            None => message,
        };
        let write_err =
            |e: io::Error| file_error(&e, || format!("Unable to write to file {}", shown(&path)));
        if let Some(file) = self.lookup(&path) {
            // Output QEMU wrote before this call goes first.
            return file
                .with_writer(|w| {
                    file.drain_locked(w);
                    w.append(msg).map_err(io::Error::from)
                })
                .and_then(|r| r)
                .map_err(write_err);
        }
        let backups = self.check_backups()?;
        let mut w =
            RotatingFileWriter::open(path.clone(), self.limits.max_size, backups, false, LOG_MODE)
                .map_err(|e| file_error(&e, || format!("Unable to open file: {}", shown(&path))))?;
        w.append(msg).map_err(|e| write_err(e.into()))
    }

    /// A re-exec has begun: the pump stops and prepares the hand-off while the
    /// servers park their clients.
    pub fn handoff_begins(&self) {
        self.pump
            .request_handoff(self.files_to_next_image.load(Ordering::Acquire));
    }

    /// Before a re-exec begins: whether the program it runs is our own image, which
    /// takes each log's file open instead of reopening it by path (saving a close per
    /// log in this image's pause). Into anything else every file is closed first.
    pub fn next_image_is_ours(&self, ours: bool) {
        self.files_to_next_image.store(ours, Ordering::Release);
    }

    /// Re-exec, once the clients are parked: waits until the pump has stopped (so no
    /// log closes any more), then takes every log out of the table. Nothing is closed;
    /// whatever is still in a pipe stays there for the next image. The pump takes the
    /// files out of the logs and closes them meanwhile; [`Handoff::finish`] waits for
    /// the first half of that.
    pub async fn begin_handoff(&self) -> Handoff {
        let keep_files = self.files_to_next_image.load(Ordering::Acquire);
        let acks = self.pump.take_handoff(keep_files);
        let acks = match acks {
            Some(mut a) => {
                let stopped = tokio::time::timeout(HANDOFF_STEP_WAIT, &mut a.stopped).await;
                if !matches!(stopped, Ok(Ok(()))) {
                    error!("the log pump did not stop in time");
                }
                Some(a)
            }
            None => None,
        };
        // A poisoned table is still the list of pipes the next image needs: handed
        // over as it is, rather than dropping every log from the document.
        let logs: Vec<Arc<LogFile>> = {
            let mut f = self.files.lock().unwrap_or_else(|e| {
                error!("log table poisoned; handing over what it holds");
                e.into_inner()
            });
            self.handed_off.store(true, Ordering::Release);
            f.drain().map(|l| l.0).collect()
        };
        // Follower sockets are not handed over: their streams end here (and the logs
        // are forgotten, not dropped, after a failed exec).
        for l in &logs {
            l.clear_followers();
            l.freeze();
        }
        Handoff {
            logs,
            acks,
            keep_files,
        }
    }

    /// Clean stop: what QEMU already wrote reaches the files, then the pump ends.
    pub fn shutdown(&self) {
        self.pump.stop(true);
    }

    /// Adopts the pipes inherited across re-exec (they are inheritable, and stay so)
    /// and resumes pumping. Each file is
    /// reopened by path (no truncate) on first use: its first data, an RPC on it, or an
    /// operator listing. A log whose file cannot be reopened then loses only itself.
    /// `epoll` is the previous image's pump epoll set, if it handed one over.
    pub fn restore(
        self: &Arc<Self>,
        logs: Vec<HandedOffLog>,
        epoll: Option<OwnedFd>,
    ) -> Result<(), RestoreError> {
        self.check_backups()?;
        let mut files = Vec::with_capacity(logs.len());
        {
            let mut table = self
                .files
                .lock()
                .map_err(|_| RestoreError::Poisoned("log table"))?;
            self.handed_off.store(false, Ordering::Release);
            table.reserve(logs.len());
            for log in logs {
                let file = Arc::new(LogFile::new(
                    log.path.into(),
                    log.owner,
                    log.pipe,
                    None,
                    log.file,
                    self.limits,
                    log.counters,
                ));
                // One hash of the path per log (a `Path` hashes component by component),
                // not a lookup and an insert. A duplicate's pipe closes with it here.
                if !table.insert(ByPath(file.clone())) {
                    warn!(path = %file.path.display(), "log named twice in the re-exec state; keeping the first");
                    continue;
                }
                files.push(file);
            }
        }
        Ok(self.pump.add_many(files, epoll)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn owner() -> LogOwner {
        LogOwner {
            driver: "qemu".into(),
            domname: "t".into(),
            domuuid: [0; 16],
        }
    }

    /// A log that cannot be written (here /dev/full: every write is ENOSPC) keeps its
    /// pipe: QEMU's writes never fail with EPIPE, and the log stays open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_disk_keeps_the_pipe() {
        let h = LogHandler::new(Limits {
            max_size: 0,
            max_backups: 0,
        });
        let (_, _, wr) = h.open(owner(), b"/dev/full", false).unwrap();
        let mut w = std::fs::File::from(wr);
        // Several pipe buffers' worth: this blocks unless the pump keeps draining.
        let chunk = [b'x'; 4096];
        let writer = std::thread::spawn(move || {
            for _ in 0..64 {
                w.write_all(&chunk)?;
            }
            Ok::<_, std::io::Error>(w)
        });
        let mut w = tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        h.position(b"/dev/full").unwrap();
        assert_eq!(h.nfiles(), 1);
        w.write_all(b"still accepted\n").unwrap();
    }

    /// Every RPC on an open log drains its pipe first: output the pump has not taken
    /// yet (it may be pausing to batch) is readable at once, and comes before a message
    /// appended after it.
    #[tokio::test]
    async fn rpcs_see_output_the_pump_has_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        let p = path.as_os_str().as_encoded_bytes();
        let h = LogHandler::new(Limits {
            max_size: 0,
            max_backups: 0,
        });
        let (ino, _, wr) = h.open(owner(), p, false).unwrap();
        let mut w = std::fs::File::from(wr);
        w.write_all(b"qemu says\n").unwrap();
        assert_eq!(h.read(p, ino, 0, 100).unwrap(), b"qemu says\n");
        w.write_all(b"then this\n").unwrap();
        h.append(p, b"libvirt note\n").unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"qemu says\nthen this\nlibvirt note\n"
        );
    }

    /// Our end of a log pipe is as libvirt makes it, blocking, and is inheritable (the
    /// next image must get it); QEMU's end stays close-on-exec until it is sent. Reads
    /// never wait all the same: a drain of an empty pipe returns at once.
    #[tokio::test]
    async fn pipes_are_blocking_and_inheritable_yet_reads_never_wait() {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        let p = path.as_os_str().as_encoded_bytes();
        let h = LogHandler::new(Limits {
            max_size: 0,
            max_backups: 0,
        });
        let (_, _, wr) = h.open(owner(), p, false).unwrap();
        let rd = h.lookup(&path).unwrap().pipe.as_raw_fd();
        let fl = OFlag::from_bits_truncate(fcntl(rd, FcntlArg::F_GETFL).unwrap());
        assert!(!fl.contains(OFlag::O_NONBLOCK));
        let fd = FdFlag::from_bits_truncate(fcntl(rd, FcntlArg::F_GETFD).unwrap());
        assert!(!fd.contains(FdFlag::FD_CLOEXEC));
        let fd = FdFlag::from_bits_truncate(fcntl(wr.as_raw_fd(), FcntlArg::F_GETFD).unwrap());
        assert!(fd.contains(FdFlag::FD_CLOEXEC));
        // Empty pipe, writer still open: a blocking read would hang here.
        assert_eq!(h.position(p).unwrap().1, 0);
        let mut w = std::fs::File::from(wr);
        w.write_all(b"one line\n").unwrap();
        assert_eq!(h.position(p).unwrap().1, 9);
        assert_eq!(h.position(p).unwrap().1, 9);
    }

    /// Once a re-exec has taken the table, a straggling open is refused (its pipe
    /// would reach the next image without the state document naming it); the logs
    /// handed off are the ones open before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_after_handoff_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.log");
        let b = dir.path().join("b.log");
        let h = LogHandler::new(Limits {
            max_size: 0,
            max_backups: 0,
        });
        let (_, _, _wa) = h
            .open(owner(), a.as_os_str().as_encoded_bytes(), false)
            .unwrap();
        h.handoff_begins();
        let handoff = h.begin_handoff().await;
        let paths: Vec<&Path> = handoff.logs().map(|l| l.path).collect();
        assert_eq!(paths, [a.as_path()]);
        assert!(h
            .open(owner(), b.as_os_str().as_encoded_bytes(), false)
            .is_err());
        assert_eq!(h.nfiles(), 0);
        handoff.finish().await;
    }

    /// A flood through one pipe (spliced once busy) arrives complete and in order, with
    /// rollovers, exactly as the read path would write it.
    #[tokio::test]
    async fn flood_arrives_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        let p = path.as_os_str().as_encoded_bytes().to_vec();
        let h = LogHandler::new(Limits {
            max_size: 1 << 20,
            max_backups: 8,
        });
        let (_, _, wr) = h.open(owner(), &p, false).unwrap();
        let mut w = std::fs::File::from(wr);
        let mut sent = Vec::new();
        for i in 0..40_000u32 {
            sent.extend_from_slice(format!("line {i:08} of the flood test\n").as_bytes());
        }
        let data = sent.clone();
        // The writer end comes back open: at EOF the log would close before we ask.
        let writer = std::thread::spawn(move || w.write_all(&data).map(|()| w));
        let _w = tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        h.position(&p).unwrap();
        let mut got = Vec::new();
        for i in (0..8).rev() {
            if let Ok(b) = std::fs::read(format!("{}.{i}", path.display())) {
                got.extend(b);
            }
        }
        got.extend(std::fs::read(&path).unwrap());
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "log content differs from what was written");
    }

    /// OpenLogFile refuses a path that is not UTF-8 (the re-exec state could not name
    /// it) and creates nothing; AppendLogFile and ReadLogFile use the exact bytes.
    #[tokio::test]
    async fn non_utf8_paths_are_not_opened_but_appended_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = dir.path().as_os_str().as_encoded_bytes().to_vec();
        p.extend_from_slice(b"/vm-\xff.log");
        let h = LogHandler::new(Limits {
            max_size: 0,
            max_backups: 0,
        });
        let e = h.open(owner(), &p, false).unwrap_err();
        assert_eq!((e.code, e.domain), (code::INVALID_ARG, domain::LOGGING));
        assert!(!path_of(&p).exists());
        h.append(&p, b"exact\n").unwrap();
        assert_eq!(std::fs::read(path_of(&p)).unwrap(), b"exact\n");
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path_of(&p)).unwrap());
        assert_eq!(h.read(&p, ino, 0, 100).unwrap(), b"exact\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Output that a failing rollover would have dropped reaches the file: the log's
    /// backup name is a directory, and several max_sizes go through the pipe.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipe_output_survives_a_failing_rollover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        std::fs::create_dir(dir.path().join("vm.log.0")).unwrap();
        std::fs::write(dir.path().join("vm.log.0/x"), b"x").unwrap();
        let p = path.as_os_str().as_encoded_bytes().to_vec();
        let h = LogHandler::new(Limits {
            max_size: 4096,
            max_backups: 1,
        });
        let (_, _, wr) = h.open(owner(), &p, false).unwrap();
        let mut w = std::fs::File::from(wr);
        let data: Vec<u8> = (0..50_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || w.write_all(&sent).map(|()| w));
        let _w = tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(h.position(&p).unwrap().1, data.len() as u64);
        assert!(std::fs::read(&path).unwrap() == data);
    }

    /// The rotation check on open happens after the EBUSY check, as in 9.0.
    #[tokio::test]
    async fn second_open_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        let h = LogHandler::new(Limits {
            max_size: 100,
            max_backups: 2,
        });
        let p = path.as_os_str().as_encoded_bytes();
        let _keep = h.open(owner(), p, false).unwrap();
        let e = h.open(owner(), p, true).unwrap_err();
        assert_eq!(e.int1, libc::EBUSY);
        assert_eq!(e.domain, domain::LOGGING);
    }

    /// A path the re-exec state names twice is restored once (the table is a set keyed
    /// by the log's own path); the second pipe is closed, and lookups by path, the
    /// listing and the owner's names work on the restored log.
    #[tokio::test]
    async fn restore_keeps_the_first_of_a_path_named_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        let h = LogHandler::new(Limits {
            max_size: 0,
            max_backups: 0,
        });
        let (rd1, _wr1) = nix::unistd::pipe().unwrap();
        let (rd2, wr2) = nix::unistd::pipe().unwrap();
        let log = |pipe, written| HandedOffLog {
            pipe,
            path: path.clone(),
            owner: owner(),
            counters: LogCounters {
                written,
                ..LogCounters::default()
            },
            file: None,
        };
        h.restore(vec![log(rd1, 7), log(rd2, 9)], None).unwrap();
        assert_eq!(h.nfiles(), 1);
        let mut w2 = std::fs::File::from(wr2);
        assert_eq!(
            w2.write(b"x").unwrap_err().raw_os_error(),
            Some(libc::EPIPE),
            "the duplicate's pipe is closed"
        );
        let p = path.as_os_str().as_encoded_bytes();
        assert_eq!(
            h.position(p).unwrap(),
            (
                std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()),
                0
            )
        );
        let listed = h.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].owner, owner());
        assert_eq!(
            h.counters().unwrap()[0].1.written,
            7,
            "the first one's counters"
        );
    }
}
