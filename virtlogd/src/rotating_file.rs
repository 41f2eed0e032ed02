//! Size-capped log file with numbered backups, and a reader across the set.
//!
//! This reproduces libvirt 9.0's `virRotatingFileWriter` / `virRotatingFileReader`
//! byte for byte (spec `virtlogd.md` §2.4, §2.5 and §3):
//!
//! * the primary file is `path`; backups are `path.0` (newest) .. `path.(N-1)` (oldest);
//! * a write never makes the file exceed `max_size` (unless it was already bigger when
//!   opened), and prefers to cut just after a newline found in the last 80 bytes of
//!   the part that fits;
//! * `max_size == 0` disables rollover entirely.
//!
//! The C daemon feeds the writer one 1024-byte pipe read at a time and the newline
//! search is done per call, so split points depend on chunking.
//! [`RotatingFileWriter::append_in_chunks`] replays that chunking for parity while
//! issuing one `write(2)` per contiguous run of bytes that land in the same file.
//!
//! Errors are [`io::Error`]s that carry libvirt's description of the failed step
//! ([`FileError`]: "Unable to open file: %s", "Unable to write to file %s", ...) and the
//! errno, so the daemon replies with 9.0's text; a seek error is plain and described by
//! the caller. Two departures from 9.0, both about never losing the daemon or the data:
//! a FIFO is refused instead of blocking in open(2), and a rollover that fails leaves
//! the writer appending past `max_size` until a later retry succeeds (see
//! [`ROLLOVER_RETRY`]).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Size of one pipe read in the C daemon; split points are computed per chunk of this.
pub const PIPE_CHUNK: usize = 1024;

/// Highest `max_backups` libvirt accepts (`VIR_MAX_MAX_BACKUP`).
pub const MAX_MAX_BACKUP: usize = 32;

/// How far back from the cut point the writer looks for a newline.
const NEWLINE_WINDOW: usize = 80;

/// libvirt rejects more than [`MAX_MAX_BACKUP`] backups, with this text; callers report
/// it as `VIR_ERR_CONFIG_UNSUPPORTED` (67). The one place that checks the limit.
pub fn max_backups(requested: u64) -> Result<usize, TooManyBackups> {
    match usize::try_from(requested) {
        Ok(n) if n <= MAX_MAX_BACKUP => Ok(n),
        _ => Err(TooManyBackups(requested)),
    }
}

/// More backups asked for than libvirt allows (see [`max_backups`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Max backup {0} must be less than or equal to {MAX_MAX_BACKUP}")]
pub struct TooManyBackups(pub u64);

fn check_max_backups(max_backups: usize) -> io::Result<()> {
    self::max_backups(max_backups as u64)
        .map(drop)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// [`check_max_backups`], and the count as the byte a writer keeps.
fn checked_backups(max_backups: usize) -> io::Result<u8> {
    check_max_backups(max_backups)?;
    u8::try_from(max_backups).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// `path.index`, built from raw bytes so non-UTF-8 paths survive.
fn backup_path(base: &Path, index: usize) -> PathBuf {
    let mut raw = base.as_os_str().to_os_string().into_vec();
    raw.extend_from_slice(format!(".{index}").as_bytes());
    PathBuf::from(OsString::from_vec(raw))
}

fn ignore_enoent(res: io::Result<()>) -> io::Result<()> {
    match res {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A failed file operation, described as libvirt 9.0 describes it, so the daemon can
/// send the same error text. It travels inside an [`io::Error`] (of the same kind as
/// the OS error); [`FileError::of`] finds it again.
#[derive(Debug)]
pub enum FileError {
    /// libvirt's text (before `: <strerror>`) and the errno.
    System { what: String, errno: i32 },
    /// The path names a FIFO: opening or reading it would wait for a peer that may never
    /// come (9.0 hangs there, with every other client).
    Fifo { path: PathBuf },
}

impl FileError {
    /// The description carried by `e`, if it came from this module.
    pub fn of(e: &io::Error) -> Option<&FileError> {
        e.get_ref().and_then(|r| r.downcast_ref::<FileError>())
    }

    fn system(e: io::Error, what: String) -> io::Error {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        io::Error::new(e.kind(), FileError::System { what, errno })
    }

    fn fifo(path: &Path) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            FileError::Fifo {
                path: path.to_path_buf(),
            },
        )
    }
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileError::System { what, errno } => {
                write!(f, "{what}: {}", io::Error::from_raw_os_error(*errno))
            }
            FileError::Fifo { path } => write!(
                f,
                "{} is a FIFO, not a log file: a FIFO blocks until its other end is opened",
                path.display()
            ),
        }
    }
}

impl std::error::Error for FileError {}

/// `described` gives an error from this module's own syscalls libvirt's description.
trait Describe<T> {
    fn described(self, what: impl FnOnce() -> String) -> io::Result<T>;
}

impl<T> Describe<T> for io::Result<T> {
    fn described(self, what: impl FnOnce() -> String) -> io::Result<T> {
        self.map_err(|e| {
            if FileError::of(&e).is_some() {
                e
            } else {
                FileError::system(e, what())
            }
        })
    }
}

/// Opens `path` (close-on-exec only with `cloexec`) without ever waiting for a FIFO's other end: the
/// open is O_NONBLOCK, a FIFO is refused (with or without a peer), and O_NONBLOCK is
/// then cleared on a regular file. A device keeps it, so that one with nothing to say
/// (a tty) answers EAGAIN instead of holding the call. A regular file under a lease
/// (F_SETLEASE) says EWOULDBLOCK to a non-blocking open: that open started the lease
/// break, and the file is opened again, blocking, to wait for its end as 9.0 does (the
/// kernel bounds the wait by `fs.lease-break-time`). Also returns the file's metadata.
fn open_no_wait(
    path: &Path,
    opts: &OpenOptions,
    cloexec: bool,
) -> io::Result<(File, std::fs::Metadata)> {
    use std::os::unix::fs::FileTypeExt;
    // std opens every file close-on-exec; an inheritable one is cleared after.
    let first = opts.clone().custom_flags(libc::O_NONBLOCK).open(path);
    let file = match first {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
            opts.clone().custom_flags(0).open(path)?
        }
        // A writer's non-blocking open of a FIFO nobody reads.
        Err(e)
            if e.raw_os_error() == Some(libc::ENXIO)
                && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) =>
        {
            return Err(FileError::fifo(path))
        }
        Err(e) => return Err(e),
    };
    let meta = file
        .metadata()
        .described(|| format!("Unable to determine current file inode: {}", path.display()))?;
    if meta.file_type().is_fifo() {
        return Err(FileError::fifo(path));
    }
    if !cloexec {
        vh_common::restart::clear_cloexec(file.as_raw_fd())?;
    }
    if meta.file_type().is_file() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let fd = file.as_raw_fd();
        let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(fl & !OFlag::O_NONBLOCK))?;
    }
    Ok((file, meta))
}

/// Below this much room before a rollover, splicing is not worth it.
const SPLICE_MIN: usize = 4096;

/// Why [`RotatingFileWriter::splice_batch`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceStop {
    /// The pipe is empty for now.
    Empty,
    /// The writers closed the pipe and it is empty.
    Eof,
    /// The next bytes may roll the file over: read them instead.
    Rollover,
    /// `calls` splices done; more may be waiting.
    Budget,
}

/// One step of the rollover: `from` takes the place of `to`, as rename(2) would.
///
/// Never as a rename *over* an existing file, though: ext4 (auto_da_alloc) treats that
/// as the replace-via-rename idiom and forces block allocation and writeback of `from`
/// right there. For a log that is 2 MiB of disk writes per rotation, in the rename call,
/// for data that is mostly deleted a few rotations later. Unlinking the old `to` first
/// leaves the pages to normal writeback (or to be dropped, unwritten, with the oldest
/// backup). Readers see the same kind of gap between steps as with plain renames.
fn shift(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{renameat2, RenameFlags};
    let noreplace = |from: &Path, to: &Path| {
        renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE).map_err(io::Error::from)
    };
    match noreplace(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            // Only now that `from` is known to exist may the old `to` go.
            ignore_enoent(std::fs::remove_file(to))?;
            match noreplace(from, to) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => std::fs::rename(from, to),
                other => other,
            }
        }
        // A filesystem without RENAME_NOREPLACE (older NFS): a plain rename.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => std::fs::rename(from, to),
        other => other,
    }
}

/// Sees what a writer puts into its files, as it does (the log's followers).
pub trait WriteTap: Send + Sync + std::fmt::Debug {
    /// `data` was just written at the end of the current file.
    fn wrote(&self, data: &[u8]);
    /// The log rolled over; the current file is now the one with `inode`, empty.
    fn rolled(&self, inode: u64);
    /// Whether anyone looks: bytes then go through [`Self::wrote`] (no splice).
    fn active(&self) -> bool;
}

/// Writer that appends to `path` and rolls it over into `path.0..path.(N-1)`.
#[derive(Debug)]
pub struct RotatingFileWriter {
    /// Told of every byte written and every rollover.
    tap: Option<std::sync::Arc<dyn WriteTap>>,
    /// Shared with the log's other holders of its path (the log and the handler's
    /// table): with ten thousand open logs each copy of the path is ~64 bytes a log.
    path: std::sync::Arc<Path>,
    /// N: the backups are `path.0 .. path.(N-1)`. Their names are formatted at
    /// rollover, once per `max_size` bytes, rather than kept: with ten thousand open
    /// logs three names each were about a fifth of the daemon's memory. At most
    /// [`MAX_MAX_BACKUP`], so a byte (the writer is in every open log).
    max_backups: u8,
    max_size: u64,
    /// Permission bits for the files it creates (u16: they fit, and it packs).
    mode: u16,
    file: File,
    inode: u64,
    /// Bytes written to the current file according to our own count (not re-read from
    /// disk: an external truncate makes it drift, exactly as in libvirt).
    pos: u64,
    /// Set while rollover keeps failing (see [`Stall`]). Boxed: rare, and the writer
    /// is in every open log.
    stall: Option<Box<Stall>>,
    /// A rollover moved (or, without backups, removed) the current file away from
    /// `path` but could not open the new one: the retry only opens it.
    displaced: bool,
    /// How long a stalled rollover waits before it is tried again (at the latest):
    /// [`ROLLOVER_RETRY`], which tests change (see [`Self::retry_after`]).
    #[cfg(test)]
    retry_after: Duration,
    /// Bytes this writer put into its files (write and splice), for operator metrics.
    written: u64,
    /// Rollovers this writer completed, for operator metrics.
    rollovers: u64,
    /// Number of `write(2)` calls issued, so tests can check the batching.
    #[cfg(test)]
    write_calls: usize,
}

/// A rollover that failed (a backup name taken by a directory, an immutable or
/// read-only backup, no inodes left): the writer keeps appending to the current file
/// past `max_size` rather than dropping output, and tries again once another
/// `max_size` bytes were written since the failure or [`ROLLOVER_RETRY`] has passed,
/// whichever comes first. The first bound means a retry never costs more syscalls than
/// a healthy log's rollovers would; the second that a slow log gets back under its
/// size cap soon after the obstacle is gone.
#[derive(Debug, Clone, Copy)]
struct Stall {
    /// `pos` when it failed.
    at: u64,
    since: Instant,
}

/// At the latest, how long after a failed rollover it is tried again; it is also
/// tried once another `max_size` bytes were written since the failure. Meanwhile the
/// writer appends past `max_size` rather than dropping output.
pub const ROLLOVER_RETRY: Duration = Duration::from_secs(5);

/// An append that stopped at a failed write: how many of the bytes reached the file
/// (the rest are lost), and why.
#[derive(Debug)]
pub struct PartialAppend {
    pub written: usize,
    pub error: io::Error,
}

impl From<PartialAppend> for io::Error {
    fn from(p: PartialAppend) -> io::Error {
        p.error
    }
}

impl std::fmt::Display for PartialAppend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (after {} bytes)", self.error, self.written)
    }
}

/// Open `path` the way libvirt does and return the file, its end offset and inode,
/// with libvirt's description of a failure.
///
/// The file is inheritable for its whole life, as a log's pipe is (see `LogFile`): a
/// re-exec into our own image hands it over open, and making ten thousand of them
/// inheritable at that moment would be ten thousand fcntls inside the pause. The only
/// other program virtlogd runs (`systemctl`, see `stop_intent`) closes every fd past
/// stdio first, and a re-exec into any other image closes every file beforehand.
fn open_entry(path: &Path, mode: u32) -> io::Result<(File, u64, u64)> {
    // append(true) gives O_WRONLY|O_APPEND.
    let mut opts = OpenOptions::new();
    opts.append(true).create(true).mode(mode);
    let (mut file, meta) = open_no_wait(path, &opts, false)
        .described(|| format!("Unable to open file: {}", path.display()))?;
    // The position comes from lseek(END), like the C code (a tty fails here, as in 9.0).
    let pos = file.seek(SeekFrom::End(0)).described(|| {
        format!(
            "Unable to determine current file offset: {}",
            path.display()
        )
    })?;
    Ok((file, pos, meta.ino()))
}

impl RotatingFileWriter {
    /// Open (creating if needed) `path` for appending with rollover.
    ///
    /// With `truncate`, `path` and `path.0 .. path.(max_backups-1)` are unlinked first
    /// (missing ones ignored). `mode` is the creation mode (0600 for virtlogd), subject
    /// to the umask. `max_backups` above [`MAX_MAX_BACKUP`] fails with
    /// [`io::ErrorKind::InvalidInput`].
    pub fn open(
        path: impl AsRef<Path>,
        max_size: u64,
        max_backups: usize,
        truncate: bool,
        mode: u32,
    ) -> io::Result<Self> {
        Self::open_shared(path.as_ref().into(), max_size, max_backups, truncate, mode)
    }

    /// [`Self::open`] keeping the caller's copy of the path rather than making one.
    pub fn open_shared(
        path: std::sync::Arc<Path>,
        max_size: u64,
        max_backups: usize,
        truncate: bool,
        mode: u32,
    ) -> io::Result<Self> {
        let backups_u8 = checked_backups(max_backups)?;
        if truncate {
            let backups = (0..max_backups).map(|i| backup_path(&path, i));
            for p in std::iter::once(path.to_path_buf()).chain(backups) {
                ignore_enoent(std::fs::remove_file(&p))
                    .described(|| format!("Unable to delete file {}", p.display()))?;
            }
        }
        let (file, pos, inode) = open_entry(&path, mode)?;
        Ok(Self::with_file(
            path, max_size, backups_u8, mode, file, pos, inode,
        ))
    }

    /// A log's file handed over open across re-exec: kept if it is still the file at
    /// `path` (same device and inode), which a reopen by path would have found;
    /// otherwise closed, and `path` opened as [`Self::open`] does (no truncate). Either
    /// way the position is the file's end, as after libvirt's reopen. The kept file
    /// stays inheritable, as the files this writer opens itself are (see `open_entry`).
    pub fn adopt(
        file: OwnedFd,
        path: std::sync::Arc<Path>,
        max_size: u64,
        max_backups: usize,
        mode: u32,
    ) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let backups_u8 = checked_backups(max_backups)?;
        let mut file = File::from(file);
        let same = match (file.metadata(), std::fs::metadata(&path)) {
            (Ok(held), Ok(named)) => {
                held.file_type().is_file()
                    && !held.file_type().is_fifo()
                    && (held.dev(), held.ino()) == (named.dev(), named.ino())
            }
            _ => false,
        };
        if !same {
            drop(file);
            return Self::open_shared(path, max_size, max_backups, false, mode);
        }
        let pos = file.seek(SeekFrom::End(0)).described(|| {
            format!(
                "Unable to determine current file offset: {}",
                path.display()
            )
        })?;
        let inode = file.metadata()?.ino();
        Ok(Self::with_file(
            path, max_size, backups_u8, mode, file, pos, inode,
        ))
    }

    fn with_file(
        path: std::sync::Arc<Path>,
        max_size: u64,
        backups_u8: u8,
        mode: u32,
        file: File,
        pos: u64,
        inode: u64,
    ) -> Self {
        Self {
            tap: None,
            path,
            max_backups: backups_u8,
            max_size,
            // Masked to the permission bits, which fit in 16.
            mode: (mode & 0o7777) as u16,
            file,
            inode,
            pos,
            stall: None,
            displaced: false,
            #[cfg(test)]
            retry_after: ROLLOVER_RETRY,
            written: 0,
            rollovers: 0,
            #[cfg(test)]
            write_calls: 0,
        }
    }

    /// The open file to hand to our next image across re-exec, if there is one that a
    /// reopen by path would find: not after a rollover that moved the current file
    /// away and could not open the new one (the next image opens `path` then).
    pub fn file_for_handoff(&self) -> Option<RawFd> {
        (!self.displaced).then(|| self.file.as_raw_fd())
    }

    /// Primary file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Inode of the file currently written to.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Offset at which the next byte will be written in the current file.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// True when [`Self::splice_batch`] would decline: the next bytes may roll over.
    pub fn at_rollover(&self) -> bool {
        self.room().is_some_and(|r| r < SPLICE_MIN as u64)
    }

    /// Bytes that may still go into the current file before a rollover, or before the
    /// retry of a failed one falls due (a splice must not carry the file past that
    /// point unnoticed); `None` without `max_size`.
    fn room(&self) -> Option<u64> {
        if self.max_size == 0 {
            return None;
        }
        Some(match self.stall.as_deref() {
            Some(st) if self.limit(self.pos) == 0 => {
                st.at.saturating_add(self.max_size).saturating_sub(self.pos)
            }
            _ => self.max_size.saturating_sub(self.pos),
        })
    }

    /// The `max_size` the append algorithm works with when the file is at `vpos`: 0
    /// (never roll over) while a failed rollover waits for its retry (see [`Stall`]).
    fn limit(&self, vpos: u64) -> u64 {
        match self.stall.as_deref() {
            Some(st)
                if vpos < st.at.saturating_add(self.max_size)
                    && st.since.elapsed() < self.retry_after() =>
            {
                0
            }
            _ => self.max_size,
        }
    }

    #[cfg(not(test))]
    fn retry_after(&self) -> Duration {
        ROLLOVER_RETRY
    }

    #[cfg(test)]
    fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// Whether a rollover failed and has not succeeded since.
    pub fn rollover_stalled(&self) -> bool {
        self.stall.is_some()
    }

    /// Tells `tap` of every write and rollover from now on.
    pub fn set_tap(&mut self, tap: std::sync::Arc<dyn WriteTap>) {
        self.tap = Some(tap);
    }

    /// Bytes this writer has put into its files since it was opened.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Rollovers this writer has completed since it was opened.
    pub fn rollovers(&self) -> u64 {
        self.rollovers
    }

    /// Configured maximum size (0 = never roll over).
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// Configured number of backups.
    pub fn max_backups(&self) -> usize {
        usize::from(self.max_backups)
    }

    /// Append `data` as a single call of libvirt's append algorithm.
    pub fn append(&mut self, data: &[u8]) -> Result<(), PartialAppend> {
        self.append_in_chunks(data, data.len())
    }

    /// Append `data` as if it had arrived in successive chunks of at most `chunk`
    /// bytes (use [`PIPE_CHUNK`] for parity with the C daemon's pipe reads).
    ///
    /// Split points are those libvirt would produce for that chunking, but bytes that
    /// land in the same file are written with one `write(2)` (looping only on short
    /// writes / EINTR). `chunk == 0` means "one chunk". A rollover that fails does not
    /// fail the append (it is retried later, see [`ROLLOVER_RETRY`]); a write that fails does, and the error says how
    /// many bytes reached the file first ([`Self::position`] counts them too).
    pub fn append_in_chunks(&mut self, data: &[u8], chunk: usize) -> Result<(), PartialAppend> {
        let chunk = if chunk == 0 { data.len() } else { chunk };
        if self.displaced && self.max_backups == 0 {
            // The current file is unlinked: nothing may go there.
            self.try_rollover()
                .map_err(|error| PartialAppend { written: 0, error })?;
        }
        // data[flushed..off] has been accepted by the algorithm but not yet written.
        let mut flushed = 0usize;
        let mut off = 0usize;
        while off < data.len() {
            let chunk_end = data.len().min(off.saturating_add(chunk));
            while off < chunk_end {
                // Where the file would be if the pending bytes were already written.
                let vpos = self.pos + (off - flushed) as u64;
                let max = self.limit(vpos);
                let remaining = chunk_end - off;
                let mut towrite = remaining;
                let mut force = false;
                if max != 0 {
                    if vpos > max {
                        // File was already oversize at open: never write to it.
                        force = true;
                        towrite = 0;
                    } else if vpos.saturating_add(remaining as u64) > max {
                        // Fits in usize: it is smaller than `remaining`.
                        towrite = (max - vpos) as usize;
                        let fitting = &data[off..off + towrite];
                        let window = &fitting[towrite - towrite.min(NEWLINE_WINDOW)..];
                        // Distance of the newline from the end of the fitting part.
                        if let Some(i) = window.iter().rev().position(|&b| b == b'\n') {
                            towrite -= i;
                            force = true;
                        }
                    }
                }
                off += towrite;
                let vpos = vpos + towrite as u64;
                if max != 0 && (force || (vpos == max && off < chunk_end)) {
                    self.write_all(&data[flushed..off])
                        .map_err(|(n, error)| PartialAppend {
                            written: flushed + n,
                            error,
                        })?;
                    flushed = off;
                    self.try_rollover().map_err(|error| PartialAppend {
                        written: flushed,
                        error,
                    })?;
                }
            }
        }
        self.write_all(&data[flushed..])
            .map_err(|(n, error)| PartialAppend {
                written: flushed + n,
                error,
            })
    }

    /// Moves bytes straight from `pipe` into the current file with splice(2): one copy
    /// in the kernel instead of read + write, worth it for a busy pipe. At most `calls`
    /// splices of up to `max` bytes, and only bytes that certainly all belong in this
    /// file: never past `max_size`, so no rollover point can fall inside them (the
    /// caller reads and uses [`Self::append_in_chunks`] for the bytes around one).
    ///
    /// splice(2) refuses O_APPEND files, and the append mode is what keeps writes at the
    /// end after an outside truncation (logrotate's copytruncate, which Debian configures
    /// for these logs). So append mode is lifted only for the batch, after a seek to the
    /// current end, and restored before returning, error or not.
    pub fn splice_batch(
        &mut self,
        pipe: BorrowedFd,
        calls: usize,
        max: usize,
    ) -> io::Result<(SpliceStop, usize)> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        // Spliced bytes never pass through user space: a tap that looks needs reads.
        if self.at_rollover() || self.tap.as_ref().is_some_and(|t| t.active()) {
            return Ok((SpliceStop::Rollover, 0));
        }
        let fd = self.file.as_raw_fd();
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(flags & !OFlag::O_APPEND))?;
        let res = self
            .file
            .seek(SeekFrom::End(0))
            .and_then(|_| self.splice_calls(pipe, calls, max));
        let restored = fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_APPEND));
        let out = res?;
        restored?;
        Ok(out)
    }

    fn splice_calls(
        &mut self,
        pipe: BorrowedFd,
        calls: usize,
        max: usize,
    ) -> io::Result<(SpliceStop, usize)> {
        use nix::fcntl::{splice, SpliceFFlags};
        let mut moved = 0;
        for _ in 0..calls {
            if self.at_rollover() {
                return Ok((SpliceStop::Rollover, moved));
            }
            let room = self
                .room()
                .map_or(max, |r| usize::try_from(r).map_or(max, |r| r.min(max)));
            match splice(
                pipe,
                None,
                &self.file,
                None,
                room,
                SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(0) => return Ok((SpliceStop::Eof, moved)),
                Ok(n) => {
                    self.pos += n as u64;
                    self.written += n as u64;
                    moved += n;
                    // Short of the room asked for: the pipe is empty (a pipe splice
                    // takes everything present up to `room`).
                    if n < room {
                        return Ok((SpliceStop::Empty, moved));
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return Ok((SpliceStop::Empty, moved)),
                Err(e) => return Err(e.into()),
            }
        }
        Ok((SpliceStop::Budget, moved))
    }

    /// One `write(2)` per call unless the kernel writes short; retries EINTR. On
    /// failure, also says how many bytes were written first.
    fn write_all(&mut self, buf: &[u8]) -> Result<(), (usize, io::Error)> {
        let mut done = 0;
        while done < buf.len() {
            #[cfg(test)]
            {
                self.write_calls += 1;
            }
            match self.file.write(&buf[done..]) {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "write returned 0 bytes");
                    return Err((done, self.write_error(e)));
                }
                Ok(n) => {
                    self.pos += n as u64;
                    self.written += n as u64;
                    if let Some(t) = &self.tap {
                        t.wrote(&buf[done..done + n]);
                    }
                    done += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((done, self.write_error(e))),
            }
        }
        Ok(())
    }

    fn write_error(&self, e: io::Error) -> io::Error {
        FileError::system(
            e,
            format!("Unable to write to file {}", self.path.display()),
        )
    }

    /// A rollover whose failure only stalls it (see [`Stall`]), except where the
    /// current file is already gone from the directory (no backups, removed, and no new
    /// file could be made): then the data has nowhere to go, and the error says so.
    fn try_rollover(&mut self) -> io::Result<()> {
        match self.rollover() {
            Ok(()) => {
                if self.stall.take().is_some() {
                    info!(path = %self.path.display(), "log rolls over again");
                }
                Ok(())
            }
            Err(e) if self.displaced && self.max_backups == 0 => Err(e),
            Err(e) => {
                if self.stall.is_none() {
                    warn!(
                        path = %self.path.display(),
                        "cannot roll the log over: {e}; appending past max_size and trying \
                         again after another {} bytes or {:?}",
                        self.max_size,
                        self.retry_after()
                    );
                } else {
                    debug!(path = %self.path.display(), "rollover still fails: {e}");
                }
                self.stall = Some(Box::new(Stall {
                    at: self.pos,
                    since: Instant::now(),
                }));
                Ok(())
            }
        }
    }

    /// Shift the backups, then start a fresh primary file. On failure the current file
    /// stays the one written to; `displaced` records whether it was already moved.
    fn rollover(&mut self) -> io::Result<()> {
        if !self.displaced {
            if self.max_backups == 0 {
                ignore_enoent(std::fs::remove_file(&self.path))
                    .described(|| format!("Unable to remove {}", self.path.display()))?;
            } else {
                // path.(N-2) -> path.(N-1), ..., path.0 -> path.1, then path -> path.0.
                // A missing source is skipped, leaving its target as it was.
                let backups = usize::from(self.max_backups);
                let mut to = backup_path(&self.path, backups - 1);
                for i in (0..backups).rev() {
                    let from = if i == 0 {
                        self.path.to_path_buf()
                    } else {
                        backup_path(&self.path, i - 1)
                    };
                    ignore_enoent(shift(&from, &to)).described(|| {
                        format!("Unable to rename {} to {}", from.display(), to.display())
                    })?;
                    to = from;
                }
            }
            self.displaced = true;
        }
        // Only replace the old fd once the new one is open, like libvirt.
        let (file, pos, inode) = open_entry(&self.path, u32::from(self.mode))?;
        self.displaced = false;
        self.file = file;
        self.pos = pos;
        self.inode = inode;
        self.rollovers += 1;
        if let Some(t) = &self.tap {
            t.rolled(inode);
        }
        Ok(())
    }

    #[cfg(test)]
    fn write_calls(&self) -> usize {
        self.write_calls
    }
}

#[derive(Debug)]
struct ReaderEntry {
    path: PathBuf,
    /// `None` when the file did not exist at open time.
    file: Option<File>,
    inode: u64,
}

/// Reader over `path.(N-1) .. path.0, path`, oldest first.
#[derive(Debug)]
pub struct RotatingFileReader {
    entries: Vec<ReaderEntry>,
    current: usize,
}

impl RotatingFileReader {
    /// Open the `max_backups + 1` files; missing files become absent slots.
    /// Any error other than ENOENT on open/fstat is returned.
    pub fn open(path: impl Into<PathBuf>, max_backups: usize) -> io::Result<Self> {
        let path = path.into();
        check_max_backups(max_backups)?;
        let mut entries = Vec::with_capacity(max_backups + 1);
        let names = (0..max_backups)
            .rev()
            .map(|i| backup_path(&path, i))
            .chain(std::iter::once(path.clone()));
        for p in names {
            let (file, inode) = match open_no_wait(&p, OpenOptions::new().read(true), true) {
                Ok((f, meta)) => (Some(f), meta.ino()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => (None, 0),
                Err(e) => {
                    return Err(e).described(|| format!("Unable to open file: {}", p.display()))
                }
            };
            entries.push(ReaderEntry {
                path: p,
                file,
                inode,
            });
        }
        Ok(Self {
            entries,
            current: 0,
        })
    }

    /// Seek to `offset` in the file whose inode is `inode`.
    ///
    /// If no present file has that inode, libvirt seeks to `offset` in the *oldest*
    /// slot (not to its start), and an absent oldest slot fails with EBADF because
    /// the C code calls `lseek(-1, ...)`. Both quirks are kept.
    pub fn seek(&mut self, inode: u64, offset: u64) -> io::Result<()> {
        let found = self
            .entries
            .iter()
            .position(|e| e.file.is_some() && e.inode == inode);
        let idx = found.unwrap_or(0);
        self.current = idx;
        match &mut self.entries[idx].file {
            // SeekFrom::Start casts to off_t like the C code, so huge offsets give EINVAL.
            Some(f) => f.seek(SeekFrom::Start(offset)).map(|_| ()),
            None => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// Read up to `maxlen` bytes, moving on to newer files at each end of file and
    /// stopping at the end of the newest one.
    pub fn read(&mut self, maxlen: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while out.len() < maxlen {
            let Some(entry) = self.entries.get(self.current) else {
                break;
            };
            let Some(file) = &entry.file else {
                self.current += 1;
                continue;
            };
            let want = (maxlen - out.len()) as u64;
            // read_to_end retries EINTR and stops at EOF or at `want` bytes.
            let got = Read::take(file, want)
                .read_to_end(&mut out)
                .described(|| format!("Unable to read from file {}", entry.path.display()))?;
            if (got as u64) < want {
                // Hit end of this file.
                self.current += 1;
            }
        }
        Ok(out)
    }

    /// Path of each slot, oldest first (for error messages).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.entries.iter().map(|e| e.path.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file handed over across re-exec is kept, position at its end, when it is
    /// still the file at the path; one moved away is left for the file at the path.
    #[test]
    fn adopt_keeps_the_file_at_the_path_and_reopens_another() {
        use std::os::fd::OwnedFd;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vm.log");
        std::fs::write(&p, b"abc").unwrap();
        let f = OpenOptions::new().append(true).open(&p).unwrap();
        let n = f.as_raw_fd();
        let w =
            RotatingFileWriter::adopt(OwnedFd::from(f), p.as_path().into(), 0, 0, 0o600).unwrap();
        assert_eq!((w.file.as_raw_fd(), w.position()), (n, 3));
        assert_eq!(w.file_for_handoff(), Some(n));
        let f = OpenOptions::new().append(true).open(&p).unwrap();
        let moved = d.path().join("moved");
        std::fs::rename(&p, &moved).unwrap();
        let w =
            RotatingFileWriter::adopt(OwnedFd::from(f), p.as_path().into(), 0, 0, 0o600).unwrap();
        assert_eq!(w.position(), 0);
        assert_eq!(w.inode(), std::fs::metadata(&p).unwrap().ino());
        assert_ne!(w.inode(), std::fs::metadata(&moved).unwrap().ino());
    }
    use proptest::prelude::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;

    const MODE: u32 = 0o700;

    fn size_of(p: &Path) -> Option<u64> {
        std::fs::metadata(p).ok().map(|m| m.len())
    }

    /// Sizes of (F, F.0, F.1).
    fn sizes(base: &Path) -> (Option<u64>, Option<u64>, Option<u64>) {
        (
            size_of(base),
            size_of(&backup_path(base, 0)),
            size_of(&backup_path(base, 1)),
        )
    }

    fn fill(p: &Path, byte: u8, len: usize) {
        std::fs::write(p, vec![byte; len]).unwrap();
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("virrotatingfiledata.txt");
        (dir, base)
    }

    /// A writer of `max_size` bytes and one backup whose rollover fails: the backup's
    /// name is taken by a non-empty directory. Its retry is put off by an hour, so only
    /// the data written (or a test that lowers `retry_after`) brings it on.
    fn blocked_rollover(
        max_size: u64,
    ) -> (tempfile::TempDir, PathBuf, PathBuf, RotatingFileWriter) {
        let (d, f) = setup();
        let b0 = backup_path(&f, 0);
        std::fs::create_dir(&b0).unwrap();
        std::fs::write(b0.join("x"), b"x").unwrap();
        let mut w = RotatingFileWriter::open(&f, max_size, 1, false, MODE).unwrap();
        w.retry_after = Duration::from_secs(3600);
        (d, f, b0, w)
    }

    const BLOCK: [u8; 512] = [0x5e; 512];

    fn two_lines() -> Vec<u8> {
        let mut v = b"The quick brown fox jumps over the lazy dog\n".to_vec();
        v.extend_from_slice(b"The wizard quickly jinxed the gnomes before they vaporized\n");
        assert_eq!(v.len(), 103);
        v
    }

    /// The append mode is back after a splice batch: an outside truncation
    /// (logrotate's copytruncate) is followed by writes at the new end, not by a hole.
    #[test]
    fn splice_keeps_append_mode() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 0, 0, false, MODE).unwrap();
        let (rd, wr) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&wr, &[b'a'; 8192]).unwrap();
        let (stop, n) = w.splice_batch(rd.as_fd(), 4, 1 << 20).unwrap();
        assert_eq!((stop, n), (SpliceStop::Empty, 8192));
        let fl = OFlag::from_bits_truncate(fcntl(w.file.as_raw_fd(), FcntlArg::F_GETFL).unwrap());
        assert!(fl.contains(OFlag::O_APPEND));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(0)
            .unwrap();
        w.append(b"after\n").unwrap();
        nix::unistd::write(&wr, &[b'b'; 5000]).unwrap();
        w.splice_batch(rd.as_fd(), 4, 1 << 20).unwrap();
        let got = std::fs::read(&f).unwrap();
        assert_eq!(got.len(), 6 + 5000);
        assert!(got.starts_with(b"after\n"));
    }

    fn described(e: &io::Error) -> String {
        FileError::of(e)
            .unwrap_or_else(|| panic!("undescribed error {e:?}"))
            .to_string()
    }

    /// A FIFO is refused by the writer and the reader, with no peer (where a blocking
    /// open would wait for ever) and with one.
    #[test]
    fn fifos_are_refused_without_waiting() {
        let (_d, f) = setup();
        nix::unistd::mkfifo(&f, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let is_fifo = |e: io::Error| matches!(FileError::of(&e), Some(FileError::Fifo { .. }));
        assert!(is_fifo(
            RotatingFileWriter::open(&f, 0, 0, false, MODE).unwrap_err()
        ));
        assert!(is_fifo(RotatingFileReader::open(&f, 2).unwrap_err()));
        let _peer = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&f)
            .unwrap();
        assert!(is_fifo(
            RotatingFileWriter::open(&f, 0, 0, false, MODE).unwrap_err()
        ));
    }

    /// A regular file is written through a blocking fd (O_NONBLOCK was only for the
    /// open); a device keeps O_NONBLOCK.
    #[test]
    fn only_devices_stay_nonblocking() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (_d, f) = setup();
        let flags = |w: &RotatingFileWriter| {
            OFlag::from_bits_truncate(fcntl(w.file.as_raw_fd(), FcntlArg::F_GETFL).unwrap())
        };
        let w = RotatingFileWriter::open(&f, 0, 0, false, MODE).unwrap();
        assert!(!flags(&w).contains(OFlag::O_NONBLOCK));
        assert!(flags(&w).contains(OFlag::O_APPEND));
        let w = RotatingFileWriter::open("/dev/null", 0, 0, false, MODE).unwrap();
        assert!(flags(&w).contains(OFlag::O_NONBLOCK));
    }

    /// Failures carry libvirt 9.0's texts.
    #[test]
    fn errors_are_described_as_in_9_0() {
        let (d, f) = setup();
        let missing = d.path().join("no/such.log");
        let e = RotatingFileWriter::open(&missing, 0, 0, false, MODE).unwrap_err();
        assert_eq!(
            described(&e),
            format!(
                "Unable to open file: {}: No such file or directory (os error 2)",
                missing.display()
            )
        );
        let mut w = RotatingFileWriter::open("/dev/full", 0, 0, false, MODE).unwrap();
        let e = w.append(b"x").unwrap_err();
        assert_eq!(e.written, 0);
        assert!(described(&e.error).starts_with("Unable to write to file /dev/full: "));
        std::fs::create_dir(backup_path(&f, 1)).unwrap();
        std::fs::write(backup_path(&f, 1).join("x"), b"x").unwrap();
        let e = RotatingFileWriter::open(&f, 10, 2, true, MODE).unwrap_err();
        assert!(described(&e).starts_with(&format!(
            "Unable to delete file {}: ",
            backup_path(&f, 1).display()
        )));
        let e = RotatingFileWriter::open("/dev/ptmx", 10, 2, false, MODE).unwrap_err();
        assert!(described(&e).starts_with("Unable to determine current file offset: /dev/ptmx: "));
        let mut r = RotatingFileReader::open(d.path(), 0).unwrap();
        let ino = std::fs::metadata(d.path()).unwrap().ino();
        r.seek(ino, 0).unwrap();
        let e = r.read(10).unwrap_err();
        assert!(described(&e).starts_with(&format!(
            "Unable to read from file {}: ",
            d.path().display()
        )));
    }

    /// A write that stops part way says how many bytes made it: here the "file" is a
    /// non-blocking pipe with one page of room.
    #[test]
    fn a_short_write_counts_what_was_written() {
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 0, 0, false, MODE).unwrap();
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        let room = nix::fcntl::fcntl(wr.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096))
            .unwrap() as usize;
        w.file = File::from(wr);
        let before = w.position();
        let e = w.append(&vec![b'p'; room * 3]).unwrap_err();
        assert_eq!(e.written, room);
        assert_eq!(e.error.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(w.position(), before + room as u64);
        drop(rd);
    }

    /// The backup's name is taken by a directory: appends go on past max_size (nothing
    /// is lost, no error), and the retry comes after another max_size of data; once the
    /// directory is gone it succeeds.
    #[test]
    fn failed_rollover_keeps_appending_and_retries_after_max_size() {
        let (_d, f, b0, mut w) = blocked_rollover(100);
        let ino = w.inode();
        let data: Vec<u8> = (0..350u32).map(|i| b'a' + (i % 26) as u8).collect();
        w.append_in_chunks(&data, 7).unwrap();
        assert!(w.rollover_stalled());
        assert_eq!((w.inode(), w.position()), (ino, 350));
        assert_eq!(std::fs::read(&f).unwrap(), data);
        std::fs::remove_dir_all(&b0).unwrap();
        // The last failure was at 300 or a little after (the check is per chunk): the
        // next try is due once the file is another 100 bytes further.
        w.append(&[b'y'; 10]).unwrap();
        assert!(w.rollover_stalled(), "not due yet");
        let mut extra = 10;
        while w.rollover_stalled() {
            w.append(&[b'z'; 10]).unwrap();
            extra += 10;
            assert!(extra <= 120, "retried within max_size and a chunk");
        }
        assert_ne!(w.inode(), ino);
        let old = std::fs::read(&b0).unwrap();
        let new = std::fs::read(&f).unwrap();
        assert_eq!(old.len() + new.len(), 350 + extra);
        assert!(new.len() <= 100);
        assert!(old.starts_with(&data));
    }

    /// The retry also comes after `retry_after`, however little was written.
    #[test]
    fn failed_rollover_retries_after_a_while() {
        let (_d, f, b0, mut w) = blocked_rollover(100);
        w.append(&[b'a'; 150]).unwrap();
        assert!(w.rollover_stalled());
        std::fs::remove_dir_all(&b0).unwrap();
        w.append(b"b").unwrap();
        assert!(w.rollover_stalled(), "not due yet");
        w.retry_after = Duration::ZERO;
        w.append(b"c").unwrap();
        assert!(!w.rollover_stalled());
        assert_eq!(std::fs::read(&f).unwrap(), b"c");
        assert_eq!(std::fs::read(&b0).unwrap().len(), 151);
    }

    /// Splicing while a failed rollover waits never computes room past max_size (it
    /// used to subtract `max_size - pos` unchecked).
    #[test]
    fn splice_past_max_size_while_stalled() {
        let (_d, f, _b0, mut w) = blocked_rollover(10_000);
        w.append(&[b'a'; 15_000]).unwrap();
        let (rd, wr) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&wr, &[b'b'; 30]).unwrap();
        let (stop, n) = w.splice_batch(rd.as_fd(), 4, 1 << 20).unwrap();
        assert_eq!((stop, n), (SpliceStop::Empty, 30));
        assert_eq!(std::fs::read(&f).unwrap().len(), 15_030);
    }

    /// A splice stops where the retry of a failed rollover falls due, so a busy pipe
    /// cannot carry the file past it: the bytes there go by read, and the retry happens.
    #[test]
    fn splice_stops_where_the_retry_is_due() {
        let max = 10_000u64;
        let (_d, f, b0, mut w) = blocked_rollover(max);
        w.append(&vec![b'a'; max as usize + 1]).unwrap();
        assert!(w.rollover_stalled());
        std::fs::remove_dir_all(&b0).unwrap();
        let (rd, wr) = nix::unistd::pipe().unwrap();
        nix::fcntl::fcntl(wr.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 16)).unwrap();
        nix::unistd::write(&wr, &vec![b'b'; 10_000]).unwrap();
        let (stop, n) = w.splice_batch(rd.as_fd(), 16, 1 << 20).unwrap();
        // The failure was at 10000 (then one more byte went in): due at 20000.
        assert_eq!((stop, n), (SpliceStop::Rollover, 9_999));
        let mut rest = vec![0u8; 10_000 - n];
        std::io::Read::read_exact(&mut File::from(rd), &mut rest).unwrap();
        w.append_in_chunks(&rest, PIPE_CHUNK).unwrap();
        assert!(!w.rollover_stalled(), "retried at the due point");
        let (old, new) = (std::fs::read(&b0).unwrap(), std::fs::read(&f).unwrap());
        assert_eq!((old.len(), new.len()), (20_000, 1));
    }

    /// Rollover never renames over an existing file (ext4 would force writeback of
    /// the renamed file), yet leaves the same files as libvirt's renames.
    #[test]
    fn rollover_shifts_without_replacing() {
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 10, 2, false, MODE).unwrap();
        for c in [b'a', b'b', b'c', b'd'] {
            w.append(&[c; 10]).unwrap();
            w.append(b"").unwrap();
        }
        w.append(b"e").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"e");
        assert_eq!(std::fs::read(backup_path(&f, 0)).unwrap(), [b'd'; 10]);
        assert_eq!(std::fs::read(backup_path(&f, 1)).unwrap(), [b'c'; 10]);
        // A missing middle backup: its target stays as it was.
        std::fs::remove_file(backup_path(&f, 0)).unwrap();
        w.append(&[b'f'; 10]).unwrap();
        assert_eq!(std::fs::read(backup_path(&f, 1)).unwrap(), [b'c'; 10]);
        assert_eq!(std::fs::read(backup_path(&f, 0)).unwrap(), b"efffffffff");
        assert_eq!(std::fs::read(&f).unwrap(), b"f");
    }

    // ---- §3.5 acceptance cases 1-9 (writer) ----

    #[test]
    fn case01_write_new() {
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 1024, 2, false, MODE).unwrap();
        assert_eq!(sizes(&f), (Some(0), None, None));
        w.append(&BLOCK).unwrap();
        assert_eq!(sizes(&f), (Some(512), None, None));
    }

    #[test]
    fn case02_write_append() {
        let (_d, f) = setup();
        fill(&f, 0x5e, 512);
        let mut w = RotatingFileWriter::open(&f, 1024, 2, false, MODE).unwrap();
        assert_eq!(w.position(), 512);
        w.append(&BLOCK).unwrap();
        assert_eq!(sizes(&f), (Some(1024), None, None));
        assert_eq!(w.position(), 1024);
    }

    #[test]
    fn case03_write_truncate() {
        let (_d, f) = setup();
        fill(&f, 0x5e, 512);
        let mut w = RotatingFileWriter::open(&f, 1024, 2, true, MODE).unwrap();
        assert_eq!(sizes(&f), (Some(0), None, None));
        assert_eq!(w.position(), 0);
        w.append(&BLOCK).unwrap();
        assert_eq!(sizes(&f), (Some(512), None, None));
    }

    #[test]
    fn case04_rollover_no_backup() {
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 200, 0, false, MODE).unwrap();
        w.append(&BLOCK).unwrap();
        assert_eq!(sizes(&f), (Some(112), None, None));
    }

    #[test]
    fn case05_rollover_one() {
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 1024, 2, false, MODE).unwrap();
        for _ in 0..3 {
            w.append(&BLOCK).unwrap();
        }
        assert_eq!(sizes(&f), (Some(512), Some(1024), None));
    }

    #[test]
    fn case06_rollover_append() {
        let (_d, f) = setup();
        fill(&f, 0x5e, 768);
        let mut w = RotatingFileWriter::open(&f, 1024, 2, false, MODE).unwrap();
        w.append(&BLOCK).unwrap();
        assert_eq!(sizes(&f), (Some(256), Some(1024), None));
    }

    #[test]
    fn case07_rollover_many() {
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 1024, 2, false, MODE).unwrap();
        for _ in 0..7 {
            w.append(&BLOCK).unwrap();
        }
        assert_eq!(sizes(&f), (Some(512), Some(1024), Some(1024)));
    }

    #[test]
    fn case08_rollover_line_break() {
        let (_d, f) = setup();
        fill(&f, 0x5e, 100);
        let mut w = RotatingFileWriter::open(&f, 160, 2, false, MODE).unwrap();
        w.append(&two_lines()).unwrap();
        assert_eq!(sizes(&f), (Some(59), Some(144), None));
        let f0 = std::fs::read(backup_path(&f, 0)).unwrap();
        assert_eq!(&f0[100..], &two_lines()[..44]);
    }

    #[test]
    fn case09_write_to_file_larger_then_maxlen() {
        let (_d, f) = setup();
        fill(&f, 0x5e, 200);
        let mut w = RotatingFileWriter::open(&f, 160, 2, false, MODE).unwrap();
        w.append(&two_lines()).unwrap();
        assert_eq!(sizes(&f), (Some(103), Some(200), None));
    }

    // ---- §3.5 acceptance cases 10-13 (reader) ----

    fn reader_files(f: &Path, all: bool) {
        fill(f, 0xde, 256);
        if all {
            fill(&backup_path(f, 0), 0xad, 256);
            fill(&backup_path(f, 1), 0xbe, 256);
        }
    }

    fn expect(parts: &[(u8, usize)]) -> Vec<u8> {
        parts.iter().flat_map(|&(b, n)| vec![b; n]).collect()
    }

    #[test]
    fn case10_read_one() {
        let (_d, f) = setup();
        reader_files(&f, false);
        let mut r = RotatingFileReader::open(&f, 2).unwrap();
        assert_eq!(r.read(512).unwrap(), expect(&[(0xde, 256)]));
    }

    #[test]
    fn case11_read_all() {
        let (_d, f) = setup();
        reader_files(&f, true);
        let mut r = RotatingFileReader::open(&f, 2).unwrap();
        assert_eq!(
            r.read(768).unwrap(),
            expect(&[(0xbe, 256), (0xad, 256), (0xde, 256)])
        );
    }

    #[test]
    fn case12_read_partial() {
        let (_d, f) = setup();
        reader_files(&f, true);
        let mut r = RotatingFileReader::open(&f, 2).unwrap();
        assert_eq!(
            r.read(600).unwrap(),
            expect(&[(0xbe, 256), (0xad, 256), (0xde, 88)])
        );
    }

    #[test]
    fn case13_read_seek() {
        let (_d, f) = setup();
        reader_files(&f, true);
        let ino = std::fs::metadata(backup_path(&f, 0)).unwrap().ino();
        let mut r = RotatingFileReader::open(&f, 2).unwrap();
        r.seek(ino, 100).unwrap();
        let got = r.read(600).unwrap();
        assert_eq!(got.len(), 412);
        assert_eq!(got, expect(&[(0xad, 156), (0xde, 256)]));
    }

    // ---- Extra cases A-D observed against the 9.0.0 daemon ----

    fn lines(byte: u8, n: usize, len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.resize(v.len() + len - 1, byte);
            v.push(b'\n');
        }
        v
    }

    /// Runs case A and returns the writer.
    fn run_case_a(f: &Path) -> RotatingFileWriter {
        let mut w = RotatingFileWriter::open(f, 200, 2, false, 0o600).unwrap();
        let ino0 = w.inode();
        w.append_in_chunks(&lines(b'a', 3, 50), PIPE_CHUNK).unwrap();
        assert_eq!(sizes(f), (Some(150), None, None));
        assert_eq!((w.inode(), w.position()), (ino0, 150));

        w.append_in_chunks(&lines(b'b', 2, 50), PIPE_CHUNK).unwrap();
        assert_eq!(sizes(f), (Some(50), Some(200), None));
        let ino1 = w.inode();
        assert_ne!(ino1, ino0);
        assert_eq!(w.position(), 50);

        w.append_in_chunks(&[b'c'; 300], PIPE_CHUNK).unwrap();
        assert_eq!(sizes(f), (Some(150), Some(200), Some(200)));
        assert_ne!(w.inode(), ino1);
        assert_ne!(w.inode(), ino0);
        assert_eq!(w.position(), 150);
        w
    }

    #[test]
    fn extra_a_rollover_sequence() {
        let (_d, f) = setup();
        let w = run_case_a(&f);
        assert_eq!(w.inode(), std::fs::metadata(&f).unwrap().ino());
    }

    #[test]
    fn extra_b_no_backups_mid_line() {
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 100, 0, false, 0o600).unwrap();
        w.append_in_chunks(&lines(b'x', 3, 30), PIPE_CHUNK).unwrap();
        assert_eq!(size_of(&f), Some(90));
        w.append_in_chunks(&lines(b'y', 2, 30), PIPE_CHUNK).unwrap();
        assert_eq!(sizes(&f), (Some(50), None, None));
        let mut want = vec![b'y'; 19];
        want.push(b'\n');
        want.extend(lines(b'y', 1, 30));
        assert_eq!(std::fs::read(&f).unwrap(), want);
    }

    #[test]
    fn extra_c_reopen_truncate() {
        let (_d, f) = setup();
        drop(run_case_a(&f));
        let w = RotatingFileWriter::open(&f, 200, 2, true, 0o600).unwrap();
        assert_eq!(sizes(&f), (Some(0), None, None));
        assert_eq!(w.position(), 0);
    }

    #[test]
    fn extra_d_reopen_no_truncate() {
        let (_d, f) = setup();
        let old = run_case_a(&f);
        let ino = old.inode();
        drop(old);
        let w = RotatingFileWriter::open(&f, 200, 2, false, 0o600).unwrap();
        assert_eq!(w.position(), size_of(&f).unwrap());
        assert_eq!(w.inode(), ino);
        assert_eq!(sizes(&f), (Some(150), Some(200), Some(200)));
    }

    // ---- Other behaviour ----

    #[test]
    fn mode_is_applied_on_create() {
        let (_d, f) = setup();
        let _w = RotatingFileWriter::open(&f, 0, 3, false, 0o600).unwrap();
        let m = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o600);
    }

    #[test]
    fn too_many_backups_rejected() {
        let (_d, f) = setup();
        let e = RotatingFileWriter::open(&f, 10, 33, false, 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(RotatingFileReader::open(&f, 33).is_err());
        assert!(RotatingFileWriter::open(&f, 10, 32, false, 0o600).is_ok());
    }

    #[test]
    fn max_size_zero_never_rolls() {
        let (_d, f) = setup();
        fill(&f, b'z', 5000);
        let mut w = RotatingFileWriter::open(&f, 0, 2, false, 0o600).unwrap();
        w.append_in_chunks(&[b'q'; 70_000], PIPE_CHUNK).unwrap();
        assert_eq!(sizes(&f), (Some(75_000), None, None));
        assert_eq!(w.position(), 75_000);
        assert_eq!(w.write_calls(), 1);
    }

    #[test]
    fn batching_one_write_for_64k_below_max() {
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 2 * 1024 * 1024, 3, false, 0o600).unwrap();
        let mut data = vec![b'x'; 64 * 1024];
        for i in (0..data.len()).step_by(77) {
            data[i] = b'\n';
        }
        w.append_in_chunks(&data, PIPE_CHUNK).unwrap();
        assert_eq!(w.write_calls(), 1);
        assert_eq!(std::fs::read(&f).unwrap(), data);
    }

    #[test]
    fn batching_one_write_per_file_across_rollovers() {
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 10_000, 3, false, 0o600).unwrap();
        w.append_in_chunks(&[b'x'; 25_000], PIPE_CHUNK).unwrap();
        // 10000 + 10000 + 5000: one write per file.
        assert_eq!(w.write_calls(), 3);
        assert_eq!(sizes(&f), (Some(5_000), Some(10_000), Some(10_000)));
    }

    #[test]
    fn chunking_changes_split_point() {
        // A newline 40 bytes before max_size is found when the data is one chunk, but
        // not when the chunk that crosses max_size starts after it (the window only
        // covers the part of the *current chunk* that fits).
        let mut data = vec![b'x'; 1100];
        data[959] = b'\n';
        let run = |chunk: usize| {
            let (_d, f) = setup();
            let mut w = RotatingFileWriter::open(&f, 1000, 1, false, 0o600).unwrap();
            w.append_in_chunks(&data, chunk).unwrap();
            let s = sizes(&f);
            (s.0, s.1)
        };
        assert_eq!(run(0), (Some(140), Some(960)));
        assert_eq!(run(PIPE_CHUNK), (Some(140), Some(960)));
        assert_eq!(run(950), (Some(140), Some(960)));
        assert_eq!(run(970), (Some(100), Some(1000)));
        assert_eq!(run(1000), (Some(100), Some(1000)));
    }

    #[test]
    fn newline_window_is_exactly_80_bytes() {
        // Newline at index 120 of a 300-byte write with max 200: 80th byte from the
        // cut, so it is found; at index 119 it is just outside.
        let run = |nl: usize| {
            let (_d, f) = setup();
            let mut data = vec![b'x'; 300];
            data[nl] = b'\n';
            let mut w = RotatingFileWriter::open(&f, 200, 1, false, 0o600).unwrap();
            w.append(&data).unwrap();
            let s = sizes(&f);
            (s.0, s.1)
        };
        assert_eq!(run(120), (Some(179), Some(121)));
        assert_eq!(run(119), (Some(100), Some(200)));
        // Newline as the last byte that fits: cut right there, forced rollover.
        assert_eq!(run(199), (Some(100), Some(200)));
        // Exact fill followed by nothing more: no rollover.
        let (_d, f) = setup();
        let mut w = RotatingFileWriter::open(&f, 200, 1, false, 0o600).unwrap();
        let ino = w.inode();
        w.append(&[b'x'; 200]).unwrap();
        assert_eq!((w.inode(), w.position()), (ino, 200));
        assert_eq!(sizes(&f), (Some(200), None, None));
        w.append(b"y").unwrap();
        assert_ne!(w.inode(), ino);
        assert_eq!(sizes(&f), (Some(1), Some(200), None));
    }

    #[test]
    fn reader_seek_unknown_inode_absent_oldest_is_ebadf() {
        let (_d, f) = setup();
        reader_files(&f, false);
        let mut r = RotatingFileReader::open(&f, 2).unwrap();
        let e = r.seek(0xdead_beef, 5).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn reader_seek_unknown_inode_present_oldest_uses_offset() {
        let (_d, f) = setup();
        reader_files(&f, true);
        let mut r = RotatingFileReader::open(&f, 2).unwrap();
        r.seek(0xdead_beef, 200).unwrap();
        assert_eq!(
            r.read(10_000).unwrap(),
            expect(&[(0xbe, 56), (0xad, 256), (0xde, 256)])
        );
    }

    #[test]
    fn reader_no_backups_oldest_is_path() {
        let (_d, f) = setup();
        reader_files(&f, true);
        let mut r = RotatingFileReader::open(&f, 0).unwrap();
        r.seek(0xdead_beef, 250).unwrap();
        assert_eq!(r.read(10_000).unwrap(), expect(&[(0xde, 6)]));
        let paths: Vec<_> = r.paths().collect();
        assert_eq!(paths, vec![f.as_path()]);
    }

    #[test]
    fn reader_skips_absent_middle_slot_and_reads_after_writer() {
        let (_d, f) = setup();
        // Worked example of §2.5: max 200, 2 backups, two rollovers.
        let mut w = RotatingFileWriter::open(&f, 200, 2, false, 0o600).unwrap();
        let ino = w.inode();
        w.append(&[b'a'; 200]).unwrap();
        w.append(&[b'b'; 200]).unwrap();
        w.append(&[b'c'; 150]).unwrap();
        let mut r = RotatingFileReader::open(&f, 2).unwrap();
        r.seek(ino, 0).unwrap();
        let got = r.read(10_000).unwrap();
        assert_eq!(got, expect(&[(b'a', 200), (b'b', 200), (b'c', 150)]));

        std::fs::remove_file(backup_path(&f, 0)).unwrap();
        let mut r = RotatingFileReader::open(&f, 2).unwrap();
        r.seek(ino, 190).unwrap();
        assert_eq!(r.read(10_000).unwrap(), expect(&[(b'a', 10), (b'c', 150)]));
    }

    // ---- Model-based property tests ----

    /// Slot 0 = path, slot k = path.(k-1); the last slot is path.N, which the writer
    /// must never touch.
    struct Model {
        files: Vec<Option<Vec<u8>>>,
        max_size: u64,
        n: usize,
        pos: u64,
    }

    impl Model {
        fn open(initial: Vec<Option<Vec<u8>>>, max_size: u64, n: usize, truncate: bool) -> Self {
            let mut files = initial;
            if truncate {
                for f in files.iter_mut().take(n + 1) {
                    *f = None;
                }
            }
            let pos = files[0].get_or_insert_with(Vec::new).len() as u64;
            Model {
                files,
                max_size,
                n,
                pos,
            }
        }

        fn rollover(&mut self) {
            for i in (1..=self.n).rev() {
                if let Some(src) = self.files[i - 1].take() {
                    self.files[i] = Some(src);
                }
            }
            self.files[0] = Some(Vec::new());
            self.pos = 0;
        }

        /// Straight transcription of spec §3.3 for one call.
        fn append(&mut self, mut buf: &[u8]) {
            while !buf.is_empty() {
                let mut towrite = buf.len();
                let mut force = false;
                if self.max_size != 0 {
                    if self.pos > self.max_size {
                        force = true;
                        towrite = 0;
                    } else if self.pos + towrite as u64 > self.max_size {
                        towrite = (self.max_size - self.pos) as usize;
                        let mut i = 0;
                        while i < towrite && i < 80 {
                            if buf[towrite - i - 1] == b'\n' {
                                towrite -= i;
                                force = true;
                                break;
                            }
                            i += 1;
                        }
                    }
                }
                if let Some(f) = self.files[0].as_mut() {
                    f.extend_from_slice(&buf[..towrite]);
                }
                self.pos += towrite as u64;
                buf = &buf[towrite..];
                if self.max_size != 0 && (force || (self.pos == self.max_size && !buf.is_empty())) {
                    self.rollover();
                }
            }
        }
    }

    fn slot_path(base: &Path, slot: usize) -> PathBuf {
        if slot == 0 {
            base.to_path_buf()
        } else {
            backup_path(base, slot - 1)
        }
    }

    fn disk_state(base: &Path, slots: usize) -> Vec<Option<Vec<u8>>> {
        (0..slots)
            .map(|s| std::fs::read(slot_path(base, s)).ok())
            .collect()
    }

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        // Either noise with frequent newlines, or "lines" whose lengths cluster around
        // the 80-byte newline window so its edges get exercised.
        let noise = prop::collection::vec(
            prop_oneof![8 => Just(b'x'), 1 => Just(b'\n'), 1 => any::<u8>()],
            0..max,
        );
        let line_len = prop_oneof![0usize..8, 76usize..84, 0usize..300];
        let lines = prop::collection::vec((line_len, prop::bool::weighted(0.8)), 0..20).prop_map(
            move |ls| {
                let mut v = Vec::new();
                for (len, nl) in ls {
                    v.resize(v.len() + len, b'y');
                    if nl {
                        v.push(b'\n');
                    }
                }
                v.truncate(max);
                v
            },
        );
        prop_oneof![noise, lines]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<u8>),
        Chunks(Vec<u8>, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            bytes(700).prop_map(Op::Append),
            (
                bytes(3000),
                prop_oneof![1usize..120, Just(PIPE_CHUNK), Just(0usize)]
            )
                .prop_map(|(d, c)| Op::Chunks(d, c)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn writer_matches_model(
            max_size in prop_oneof![Just(0u64), 1u64..300, 900u64..1200],
            n in 0usize..4,
            truncate in any::<bool>(),
            initial in prop::collection::vec(prop::option::of(bytes(400)), 5),
            main_near_max in prop::option::of(-2i64..3),
            ops in prop::collection::vec(op(), 0..8),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().join("log");
            let slots = n + 2;
            let mut initial: Vec<_> = initial.into_iter().take(slots).collect();
            // Start near max_size often, to hit the "already oversize" and exact-fill
            // boundaries.
            if let Some(delta) = main_near_max {
                let len = (max_size as i64 + delta).max(0) as usize;
                initial[0] = Some(vec![b'z'; len]);
            }
            for (s, c) in initial.iter().enumerate() {
                if let Some(c) = c {
                    std::fs::write(slot_path(&base, s), c).unwrap();
                }
            }
            let mut model = Model::open(initial, max_size, n, truncate);
            let mut w = RotatingFileWriter::open(&base, max_size, n, truncate, 0o600).unwrap();
            prop_assert_eq!(w.position(), model.pos);
            for op in &ops {
                match op {
                    Op::Append(d) => {
                        w.append(d).unwrap();
                        model.append(d);
                    }
                    Op::Chunks(d, c) => {
                        w.append_in_chunks(d, *c).unwrap();
                        let c = if *c == 0 { d.len().max(1) } else { *c };
                        for piece in d.chunks(c) {
                            model.append(piece);
                        }
                    }
                }
                prop_assert_eq!(w.position(), model.pos);
                prop_assert_eq!(&disk_state(&base, slots), &model.files);
                prop_assert_eq!(w.inode(), std::fs::metadata(&base).unwrap().ino());
            }
        }

        /// What the pump does with a busy pipe (splice until a rollover may come, then
        /// read the rest) gives the same files as reading everything: the spliced
        /// bytes never contain a rollover point.
        #[test]
        fn spliced_equals_read(
            max_size in prop_oneof![Just(0u64), 1u64..300, 1000u64..9000],
            n in 0usize..4,
            start in 0usize..400,
            data in bytes(6000),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let a = dir.path().join("a");
            let b = dir.path().join("b");
            std::fs::write(&a, vec![b'x'; start]).unwrap();
            std::fs::write(&b, vec![b'x'; start]).unwrap();
            let mut wa = RotatingFileWriter::open(&a, max_size, n, false, 0o600).unwrap();
            let mut wb = RotatingFileWriter::open(&b, max_size, n, false, 0o600).unwrap();
            let (rd, wr) = nix::unistd::pipe().unwrap();
            nix::unistd::write(&wr, &data).unwrap();
            drop(wr);
            let before = wa.position();
            let (stop, spliced) = wa.splice_batch(rd.as_fd(), 4, 1 << 20).unwrap();
            if max_size != 0 {
                prop_assert!(before > max_size || before + spliced as u64 <= max_size);
            }
            let mut rest = Vec::new();
            if stop != SpliceStop::Eof {
                std::fs::File::from(rd).read_to_end(&mut rest).unwrap();
                wa.append_in_chunks(&rest, PIPE_CHUNK).unwrap();
            }
            prop_assert_eq!(spliced + rest.len(), data.len());
            wb.append(&data[..spliced]).unwrap();
            wb.append_in_chunks(&data[spliced..], PIPE_CHUNK).unwrap();
            prop_assert_eq!(wa.position(), wb.position());
            prop_assert_eq!(disk_state(&a, n + 1), disk_state(&b, n + 1));
        }

        #[test]
        fn chunked_equals_sliced_appends(
            max_size in prop_oneof![Just(0u64), 1u64..300, 1000u64..3000],
            n in 0usize..4,
            start in 0usize..400,
            data in bytes(6000),
            chunk in prop_oneof![1usize..200, Just(PIPE_CHUNK)],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let a = dir.path().join("a");
            let b = dir.path().join("b");
            std::fs::write(&a, vec![b'x'; start]).unwrap();
            std::fs::write(&b, vec![b'x'; start]).unwrap();
            let mut wa = RotatingFileWriter::open(&a, max_size, n, false, 0o600).unwrap();
            let mut wb = RotatingFileWriter::open(&b, max_size, n, false, 0o600).unwrap();
            wa.append_in_chunks(&data, chunk).unwrap();
            for piece in data.chunks(chunk) {
                wb.append(piece).unwrap();
            }
            prop_assert_eq!(wa.position(), wb.position());
            prop_assert_eq!(disk_state(&a, n + 1), disk_state(&b, n + 1));
            prop_assert!(wa.write_calls() <= wb.write_calls());
        }
    }
}
