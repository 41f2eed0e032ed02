//! Lockspaces, resources and their owners (spec `virtlockd.md` §2).
//!
//! A [`LockSpace`] maps resource *names* to files: in the default lockspace the name is the
//! path itself (libvirt passes a disk image path); in a directory lockspace the file is
//! `<dir>/<name>`. Holding a resource means holding an open fd on that file with a record lock
//! on **byte 0 only** (`SEEK_SET`, start 0, length 1), never waiting: `F_RDLCK` for shared
//! acquisitions, `F_WRLCK` otherwise. The lock is an open-file-description lock, so it survives
//! a crash while systemd's fd store holds the fd ([`crate::lease_lock`]: why, and how POSIX
//! locks inherited from libvirt's C daemon are adopted). Not `flock(2)`: other hosts and
//! libvirt 9.0 daemons see byte-range locks, and OFD and POSIX byte-range locks exclude each
//! other. (The POSIX close pitfall below no longer drops our locks; the alias rules stay,
//! since two opens of one file would now conflict with each other.)
//!
//! Within this process, exclusion is decided by the in-memory table (a POSIX lock never
//! conflicts with its own process, and two of our OFD locks on one file would only meet
//! through two opens, which the alias rules below rule out); across processes and hosts it is
//! decided by the kernel / NFS lock manager. Shared resources are reference-counted by an owner-PID list (duplicates allowed).
//!
//! # Calls in two halves
//!
//! A call's filesystem work (open, fstat, fcntl, unlink, close) may block for as long as a
//! stuck NFS server likes, so it never runs under the table or on the thread serving
//! clients. [`LockSpaces`] only *begins* a call (checks, and marks the resource pending:
//! a second call on the same resource waits for the first, see [`Begin::Wait`]), hands
//! out a [`Job`] that does the filesystem work on its own thread, and *finishes* it
//! ([`LockSpaces::finish`]). The table (`crate::table`) drives the halves. Jobs of a
//! directory lockspace on a local disk file system run inline ([`is_local_fs`]): a
//! hand-off costs two thread wake-ups per call.
//!
//! # The POSIX close pitfall
//!
//! Closing **any** file descriptor that refers to a locked file drops **all** of this process's
//! POSIX locks on that file, not only locks taken through that descriptor (our OFD leases are
//! immune; exclusive leases inherited from libvirt's C daemon stay POSIX, see
//! [`crate::lease_lock`]). So one file must
//! never be held under two names, and no fd of a held file other than the holder's may ever
//! be closed, whatever spelling reaches the file (`/a//b` vs `/a/b`, a symlink, a hard link,
//! a directory lockspace's `<dir>/<name>` vs the same path in the default lockspace, two
//! keys naming one directory). Files are identified by (device, inode) of what is open:
//!
//! * every file this process holds, or is about to lock in a call in flight, has a *slot*
//!   ([`Claims`]); a job claims the slot right after `open`+`fstat` and before locking;
//! * a job that finds the file already claimed (by a `stat` before opening, or by the
//!   `fstat` after, when a rename raced it) reports the resource as locked, and when it
//!   already has an fd open on it, *parks* that fd in the slot instead of closing it; parked
//!   fds are closed only after the claimant's own fd (they are kept across re-exec);
//! * a job gives a claim up only after closing its fd (a close drops the lock), marking
//!   the slot *closing* first: once the fd is closed, the file may be gone and its
//!   (device, inode) given to a new file, whose claim then waits for the slot to go
//!   instead of being taken for the held file;
//! * the AUTOCREATE re-check after locking uses `stat(path)` by path, never a second `open`.
//!
//! libvirt 9.0 opens such a file twice, and the release of either name silently drops the
//! lock of the other.
//!
//! # Deliberate deviations from libvirt 9.0
//!
//! * Resource names in a directory lockspace that would leave the directory (empty, `.`, `..`,
//!   containing `/`) are refused with `VIR_ERR_INVALID_ARG` (domain LOCKSPACE); 9.0 joins them
//!   blindly. Names containing a NUL byte are refused in every lockspace (C would silently
//!   truncate them). libvirt's own names (SHA-256 hex, LVM UUIDs, SCSI ids; absolute paths in
//!   the default lockspace) are unaffected. Releasing never validates, so resources restored
//!   from a 9.0 daemon's state can always be released.
//! * Aliased files are refused as busy (see above).
//! * FIFOs, sockets and character devices are refused (`VIR_ERR_INVALID_ARG`): opening a
//!   FIFO for writing blocks 9.0 until a reader comes. Files are opened with `O_NONBLOCK`
//!   so that a FIFO swapped in after the check cannot block either.
//! * The AUTOCREATE open/lock/re-check loop gives up after [`AUTOCREATE_MAX_ATTEMPTS`] lost
//!   races (9.0 loops forever).
//! * When the last owner of an AUTOCREATE resource releases it, the lock file is unlinked only
//!   if our exclusive lock on it is re-asserted first (a lease lost to another host leaves
//!   its file alone) and `path` still names the file we hold locked (9.0 unlinks whatever is
//!   there, and an exclusive lease's file without checking its lock).

use crate::lease_lock::{self, LockKind};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use smallvec::{smallvec, SmallVec};
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use vh_common::error::{code, domain, errno_of, RpcError};

/// The lease flags live with the protocol; re-exported for the lockspace's callers.
pub use vh_proto::lock::{ACQUIRE_AUTOCREATE, ACQUIRE_FLAGS_MASK, ACQUIRE_SHARED};

/// How many times the AUTOCREATE open/lock/re-check loop retries after losing a race with a
/// concurrent unlink/recreate before giving up (libvirt 9.0 retries forever).
pub const AUTOCREATE_MAX_ATTEMPTS: usize = 100;

/// Identity of a file: (device, inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(md: &fs::Metadata) -> FileId {
        FileId {
            dev: md.dev(),
            ino: md.ino(),
        }
    }

    /// The identity of an open file (lease renewal compares it with a held one's).
    pub fn of_file(f: &File) -> io::Result<FileId> {
        f.metadata().map(|md| FileId::of(&md))
    }

    fn of_path(path: &Path) -> Option<FileId> {
        fs::metadata(path).ok().map(|md| FileId::of(&md))
    }

    /// An identity carried across a re-exec in our own state key (see
    /// [`Carried`]).
    pub fn new(dev: u64, ino: u64) -> FileId {
        FileId { dev, ino }
    }

    pub fn dev(&self) -> u64 {
        self.dev
    }

    pub fn ino(&self) -> u64 {
        self.ino
    }
}

/// What our own previous image knew about an inherited lease fd, carried in the state
/// document under a key of ours (`vhLeases`; libvirt neither writes nor reads it), so
/// that restoring 10,000 leases does not take an fstat and two fcntls each inside the
/// re-exec pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    /// The file's (device, inode), as the previous image learned it when it opened the
    /// file (or restored it).
    pub id: FileId,
    /// The lease's lock is an OFD lock on this very open file description, held by our
    /// previous image *in this process* (a re-exec, not a restart from the fd store): an
    /// OFD lock belongs to the open file, which the exec keeps, so there is nothing to
    /// adopt. False for anything else (a POSIX lock, a restart), which is adopted as
    /// before.
    pub ofd_kept: bool,
}

/// The slots of files this process holds or is locking (see the module docs). The table
/// implements it over its lock, so that a job on the blocking pool can claim a file.
pub trait Claims {
    /// Whether `id` has a slot (other than one being closed).
    fn is_claimed(&self, id: FileId) -> bool;
    /// Gives `id` a slot for `file` and returns `file`; if `id` has one already, parks
    /// `file` there (it must not be closed) and returns `None`. A slot whose claimant is
    /// closing its fd is waited for: once that fd is closed, its (device, inode) may name
    /// a new file.
    fn claim(&self, id: FileId, file: File) -> Option<File>;
    /// The claimant of `id` is about to close its fd.
    fn closing(&self, id: FileId);
    /// Removes the slot of `id`, closing the fds parked there. Only once the claimant's
    /// own fd is closed.
    fn unclaim(&self, id: FileId);
}

/// Closes a claimed file and gives up its claim, in that order (module docs).
fn close_claimed(file: File, id: FileId, claims: &dyn Claims) {
    claims.closing(id);
    drop(file);
    claims.unclaim(id);
}

/// A resource's owner pids.
type Owners = SmallVec<[u32; 2]>;

/// A lease's name and path in one allocation, as a [`Resource`] keeps them: the name is
/// nearly always the path's tail (`<dir>/<name>`, or the path itself in the default
/// lockspace), so the bytes are the path and the name starts `name_start` bytes in;
/// otherwise (a restored state whose path is not so made) the name follows the path
/// (`apart`). Returns (bytes, name_start, apart).
fn name_and_path(name: &str, path: PathBuf) -> (Box<[u8]>, u32, bool) {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let (text, start, apart) = if path.as_os_str().as_bytes().ends_with(name.as_bytes()) {
        // The path's own buffer when it is exact (a restore's, from the state
        // document: no copy inside the pause); a copy otherwise (a job's path grew
        // while it was joined, and shrinking it in place would leave its heap chunk
        // oversized for the lease's life).
        let bytes = path.into_os_string().into_vec();
        let text = if bytes.capacity() == bytes.len() {
            bytes.into_boxed_slice()
        } else {
            Box::from(&bytes[..])
        };
        let start = text.len() - name.len();
        (text, start, false)
    } else {
        let path = path.as_os_str().as_bytes();
        (
            [path, name.as_bytes()].concat().into_boxed_slice(),
            path.len(),
            true,
        )
    };
    // Names and paths come in RPC frames or the state document, far below 4 GiB; were
    // one not to, the lease would keep an empty name and path rather than a wrong split
    // (`Resource::name` relies on the split being the name's exact start).
    match u32::try_from(start) {
        Ok(start) => (text, start, apart),
        Err(_) => (Box::default(), 0, false),
    }
}

/// One held resource: an open fd carrying the byte-0 lock, plus its owners.
#[derive(Debug)]
pub struct Resource {
    /// The name (the key in its lockspace's table too, [`Resources`]: no copy of it
    /// there) and the file actually opened, in one allocation ([`name_and_path`]).
    /// The fields are packed so that the resource is 72 bytes (an 80-byte heap chunk,
    /// 10,000 leases each): hence the u8 flags and the file id without an `Option`.
    name_path: Box<[u8]>,
    name_start: u32,
    name_apart: bool,
    fd: OwnedFd,
    lock_held: bool,
    /// `ACQUIRE_SHARED` | `ACQUIRE_AUTOCREATE` (a restore keeps the low 8 bits).
    flags: u8,
    /// Inline up to two (an exclusive lease has one): no allocation per lease.
    owners: Owners,
    /// Meaningful only if `has_file_id`.
    file_id: FileId,
    has_file_id: bool,
    kind: LockKind,
    /// Close-on-exec is clear on `fd`. A held lease's fd is inheritable for its whole
    /// life (cleared once, when the lease is recorded in the table: outside any re-exec
    /// pause), so neither the old image nor the new one touches its flags at re-exec.
    /// virtlockd never runs another program, so only its next image inherits them (and
    /// that image is handed every one in the state document, C included). False only
    /// if clearing the flag failed: the re-exec clears it then.
    inheritable: bool,
}

impl Resource {
    /// The resource name (the key in its lockspace).
    pub fn name(&self) -> &str {
        let bytes = self.name_bytes();
        // SAFETY: `name_bytes` is either empty or exactly the bytes of the `&str` given
        // to `name_and_path` (the path's tail equal to them, or a copy of them: the
        // split is the name's start, or the whole is empty), so it is valid UTF-8. Not
        // checked again: the re-exec's state names and sorts 10,000 leases inside the
        // pause.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    fn name_bytes(&self) -> &[u8] {
        self.name_path
            .get(self.name_start as usize..)
            .unwrap_or_default()
    }

    /// The file actually opened and locked.
    pub fn path(&self) -> &Path {
        use std::os::unix::ffi::OsStrExt;
        let bytes = if self.name_apart {
            self.name_path
                .get(..self.name_start as usize)
                .unwrap_or_default()
        } else {
            &self.name_path
        };
        Path::new(std::ffi::OsStr::from_bytes(bytes))
    }

    /// The fd holding the lock (never close a duplicate of it: see the module docs).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The fd number, as written to the re-exec state.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether the fcntl lock is held (always true for resources acquired here).
    pub fn lock_held(&self) -> bool {
        self.lock_held
    }

    /// The flags of the first acquisition (`ACQUIRE_SHARED` | `ACQUIRE_AUTOCREATE`).
    pub fn flags(&self) -> u32 {
        u32::from(self.flags)
    }

    pub fn is_shared(&self) -> bool {
        self.flags() & ACQUIRE_SHARED != 0
    }

    pub fn is_autocreate(&self) -> bool {
        self.flags() & ACQUIRE_AUTOCREATE != 0
    }

    /// Owner PIDs in acquisition order; duplicates possible for shared resources.
    pub fn owners(&self) -> &[u32] {
        &self.owners
    }

    /// The (device, inode) of the held file, if known (restored resources may lack it).
    pub fn file_id(&self) -> Option<FileId> {
        self.has_file_id.then_some(self.file_id)
    }

    /// The kind of lock held: OFD, or POSIX for an exclusive lease inherited from C.
    pub fn lock_kind(&self) -> LockKind {
        self.kind
    }

    /// Clear (`inherit = true`) or set close-on-exec on the lock fd.
    pub fn set_inheritable(&self, inherit: bool) -> Result<(), RpcError> {
        set_inheritable(self.fd.as_raw_fd(), inherit)
    }

    /// Whether close-on-exec is known to be clear on the lock fd (see the field); a
    /// re-exec must clear it on the others.
    pub fn is_inheritable(&self) -> bool {
        self.inheritable
    }
}

fn set_inheritable(fd: RawFd, inherit: bool) -> Result<(), RpcError> {
    set_cloexec(fd, !inherit).map_err(|e| {
        let what = if inherit {
            "Cannot disable close-on-exec flag"
        } else {
            "Cannot enable close-on-exec flag"
        };
        RpcError::system(domain::LOCKSPACE, e as i32, what)
    })
}

impl Drop for Resource {
    /// Dropping a resource releases it: for a held AUTOCREATE resource the lock file is
    /// unlinked *before* the fd is closed, and only if the lock can first be re-asserted as
    /// exclusive (still ours, and for a shared one, nobody else still shares it); closing
    /// the fd drops the lock.
    /// Blocking work: the table drops resources on the blocking pool.
    fn drop(&mut self) {
        self.unlink_if_last();
        // Unlock before the close: a duplicate of the fd (systemd's fd store) would keep
        // an OFD lock alive.
        if self.lock_held {
            let _ = lease_lock::unlock(self.fd.as_raw_fd(), self.kind);
        }
        // The store's copy goes once a snapshot without this lease is written.
        vh_common::fdstore_keeper::closing(self.fd.as_raw_fd());
    }
}

impl Resource {
    fn unlink_if_last(&mut self) {
        if !(self.lock_held && self.is_autocreate()) {
            return;
        }
        // Only the holder of the exclusive lock may delete the file. `lock_held` says we
        // took the lock, not that we still hold it: shared storage drops a partitioned
        // host's locks and another host may hold the lease now; deleting its file would
        // let a third party create and lock a new one under the same name (two holders of
        // one disk). Converting to (or re-asserting) exclusive on our own fd proves it in
        // one fcntl: a no-op on a lock still ours (OFD, or POSIX inherited from C: our own
        // POSIX lock never conflicts with us), refused while anyone else holds the file,
        // and for a shared lease the check that nobody else still shares it. If the lock
        // was lost and nobody holds it, this takes it again, and deleting is then ours.
        if let Err(e) = lease_lock::relock(self.fd.as_raw_fd(), false, self.kind) {
            if self.is_shared() && matches!(e, Errno::EAGAIN | Errno::EACCES) {
                tracing::debug!(
                    path = %self.path().display(),
                    "could not upgrade shared lease to exclusive ({e}), not deleting"
                );
            } else {
                let n = crate::renewal::note_lost_at_release();
                tracing::warn!(
                    path = %self.path().display(),
                    losses = n,
                    "lease {} is no longer ours ({e}): lost while held, the file is left to its holder",
                    self.name()
                );
            }
            return;
        }
        if let Some(id) = self.file_id() {
            if FileId::of_path(self.path()) != Some(id) {
                tracing::debug!(
                    path = %self.path().display(),
                    "resource path no longer names the locked file, not deleting"
                );
                return;
            }
        }
        if let Err(e) = fs::remove_file(self.path()) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("Failed to unlink resource {}: {}", self.path().display(), e);
            }
        }
    }
}

/// Take (or convert) the byte-0 lease lock on `fd` without waiting.
fn set_lock(fd: RawFd, shared: bool) -> Result<(), Errno> {
    lease_lock::lock(fd, shared)
}

fn set_cloexec(fd: RawFd, cloexec: bool) -> Result<(), Errno> {
    let flags = if cloexec {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map(|_| ())
}

/// Render a name for an error message (NUL bytes made visible).
fn shown(name: &str) -> String {
    name.replace('\0', "\\0")
}

fn busy(name: &str) -> RpcError {
    RpcError::new(
        code::RESOURCE_BUSY,
        domain::LOCKSPACE,
        format!("Lockspace resource '{}' is locked", shown(name)),
    )
}

fn not_locked(name: &str) -> RpcError {
    RpcError::new(
        code::RESOURCE_BUSY,
        domain::LOCKSPACE,
        format!("Lockspace resource '{}' is not locked", shown(name)),
    )
}

fn not_owner(owner: u32) -> RpcError {
    // C stores the owner as pid_t, so a value above i32::MAX prints negative.
    RpcError::internal(
        domain::LOCKSPACE,
        format!("owner {} does not hold the resource lock", owner as i32),
    )
}

/// The error for a missing lockspace key, as the dispatcher reports it (domain RPC).
pub fn lockspace_not_found(key: &str) -> RpcError {
    RpcError::internal(
        domain::RPC,
        format!("Lockspace for path {key} does not exist"),
    )
}

/// Refuses what must never be opened: a FIFO (opening it for writing blocks until a reader
/// comes), a socket, a character device (a disk image is never one). Regular files,
/// block devices (disks locked directly in the default lockspace) and anything `open`
/// itself rejects (directories) pass.
fn check_kind(name: &str, path: &Path, md: &fs::Metadata) -> Result<(), RpcError> {
    let ft = md.file_type();
    let what = if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else {
        return Ok(());
    };
    Err(RpcError::new(
        code::INVALID_ARG,
        domain::LOCKSPACE,
        format!(
            "Lockspace resource '{}' ({}) is {what}, not a regular file",
            shown(name),
            path.display()
        ),
    ))
}

/// Before opening `path`: a file held under any name is locked; a FIFO and the like are
/// refused. A missing file is left for `open` to report.
fn check_before_open(name: &str, path: &Path, claims: &dyn Claims) -> Result<(), RpcError> {
    match fs::metadata(path) {
        Ok(md) if claims.is_claimed(FileId::of(&md)) => Err(busy(name)),
        Ok(md) => check_kind(name, path, &md),
        Err(_) => Ok(()),
    }
}

/// Claims the file `file` was just opened on (see the module docs). A file claimed
/// already is locked (and `file` parked); one of the wrong kind is refused.
fn claim_opened(
    name: &str,
    path: &Path,
    file: File,
    claims: &dyn Claims,
) -> Result<(File, FileId), RpcError> {
    let md = match file.metadata() {
        Ok(md) => md,
        Err(e) => {
            // Which file this is is unknown: it might be a held one, so it stays open.
            let err = fstat_error(path, &e);
            leak_fd(file, path);
            return Err(err);
        }
    };
    let id = FileId::of(&md);
    let Some(file) = claims.claim(id, file) else {
        tracing::warn!(
            path = %path.display(),
            "opened a file that is already held (a rename raced the check); its fd is kept open"
        );
        return Err(busy(name));
    };
    if let Err(e) = check_kind(name, path, &md) {
        close_claimed(file, id, claims);
        return Err(e);
    }
    Ok((file, id))
}

/// Keep an fd open forever (never close it), made inheritable so that a re-exec does not
/// close it either: for an fd whose file cannot be identified.
fn leak_fd(file: File, path: &Path) {
    use std::os::fd::IntoRawFd;
    let raw = file.into_raw_fd();
    let _ = set_cloexec(raw, false);
    tracing::warn!(path = %path.display(), fd = raw, "keeping an unidentified fd open");
}

/// `open` flags besides the access mode: never block on a FIFO, never acquire a
/// controlling terminal (std adds `O_CLOEXEC`).
const OPEN_FLAGS: i32 = libc::O_NONBLOCK | libc::O_NOCTTY;

/// A lockspace's held resources, by name. Each resource is boxed and the table holds
/// the boxes, hashed by the name inside them: 8 bytes a bucket rather than the whole
/// resource and a key (with 10,000 leases a table has 16,384 buckets, most of the
/// inline resources' room wasted on empty ones).
#[derive(Default)]
struct Resources {
    table: hashbrown::HashTable<Box<Resource>>,
    hasher: std::hash::RandomState,
}

/// A name's hash in a lockspace's table (its bytes: the table compares bytes).
fn hash_name(hasher: &std::hash::RandomState, name: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    hasher.hash_one(name)
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.table.iter()).finish()
    }
}

impl Resources {
    fn with_capacity(n: usize) -> Resources {
        Resources {
            table: hashbrown::HashTable::with_capacity(n),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn hash(&self, name: &str) -> u64 {
        hash_name(&self.hasher, name.as_bytes())
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn values(&self) -> impl Iterator<Item = &Resource> {
        self.table.iter().map(|r| &**r)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Resource> {
        self.table.iter_mut().map(|r| &mut **r)
    }

    fn get(&self, name: &str) -> Option<&Resource> {
        self.get_hashed(self.hash(name), name)
    }

    /// [`get`](Self::get) with the name's hash known (a restore hashes each name once).
    fn get_hashed(&self, hash: u64, name: &str) -> Option<&Resource> {
        self.table
            .find(hash, |r| r.name_bytes() == name.as_bytes())
            .map(|r| &**r)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Resource> {
        let hash = self.hash(name);
        self.table
            .find_mut(hash, |r| r.name_bytes() == name.as_bytes())
            .map(|r| &mut **r)
    }

    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn remove(&mut self, name: &str) -> Option<Box<Resource>> {
        let hash = self.hash(name);
        self.table
            .find_entry(hash, |r| r.name_bytes() == name.as_bytes())
            .ok()
            .map(|e| e.remove().0)
    }

    /// Adds `res`, whose name the table must not hold already (the caller checked).
    fn insert_new(&mut self, res: Box<Resource>) {
        let hash = hash_name(&self.hasher, res.name_bytes());
        self.insert_hashed(hash, res);
    }

    /// [`insert_new`](Self::insert_new) with the name's hash known.
    fn insert_hashed(&mut self, hash: u64, res: Box<Resource>) {
        let hasher = &self.hasher;
        self.table
            .insert_unique(hash, res, |r| hash_name(hasher, r.name_bytes()));
    }
}

/// One lockspace: the default one (no directory) or a directory lockspace.
#[derive(Debug, Default)]
pub struct LockSpace {
    directory: Option<PathBuf>,
    resources: Resources,
    /// The directory is on a local disk file system: its jobs run inline (see
    /// [`is_local_fs`]).
    local: bool,
}

/// Whether `dir` is on a local disk file system (ext2/3/4, XFS, Btrfs, tmpfs), whose
/// calls take microseconds: jobs on it run inline, because handing them to the
/// blocking pool costs two thread wake-ups per call (with one owner, a third of 9.0's
/// rate). Anything else (NFS, CIFS, FUSE, cluster file systems, unknown) may hang on a
/// server and runs on the pool; so does the default lockspace, whose paths are anywhere.
/// Blocking (`statfs`).
pub fn is_local_fs(dir: &Path) -> bool {
    use nix::sys::statfs::{
        statfs, BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC,
    };
    statfs(dir).is_ok_and(|st| {
        [
            EXT4_SUPER_MAGIC,
            XFS_SUPER_MAGIC,
            BTRFS_SUPER_MAGIC,
            TMPFS_MAGIC,
        ]
        .contains(&st.filesystem_type())
    })
}

impl LockSpace {
    /// A directory lockspace: `mkdir -p` with mode 0700 (subject to umask) if `dir` does not
    /// exist; an existing directory is used as is; anything else is an error. Blocking.
    pub fn create_directory(dir: impl AsRef<Path>) -> Result<LockSpace, RpcError> {
        let dir = dir.as_ref();
        // Like access(F_OK): follows symlinks; a dangling symlink counts as missing.
        match fs::metadata(dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(RpcError::internal(
                    domain::LOCKSPACE,
                    format!(
                        "Lockspace location {} exists, but is not a directory",
                        dir.display()
                    ),
                ))
            }
            Err(_) => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| {
                        RpcError::system(
                            domain::LOCKSPACE,
                            errno_of(&e),
                            format_args!("Unable to create lockspace {}", dir.display()),
                        )
                    })?;
            }
        }
        Ok(LockSpace {
            directory: Some(dir.to_path_buf()),
            resources: Resources::default(),
            local: is_local_fs(dir),
        })
    }

    /// An empty lockspace for re-exec restore: the directory is not touched (its jobs
    /// run on the blocking pool until [`LockSpaces::set_local`] says otherwise).
    /// A lockspace to restore `resources` held leases into.
    pub fn restored(directory: Option<PathBuf>, resources: usize) -> LockSpace {
        LockSpace {
            directory,
            resources: Resources::with_capacity(resources),
            local: false,
        }
    }

    /// The directory, or `None` for the default lockspace.
    pub fn directory(&self) -> Option<&Path> {
        self.directory.as_deref()
    }

    /// Number of held resources.
    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }

    /// Total number of owner entries over all held resources.
    pub fn owner_count(&self) -> usize {
        self.resources.values().map(|r| r.owners.len()).sum()
    }

    /// Number of resources `pid` appears in as an owner.
    pub fn resources_owned_by(&self, pid: u32) -> usize {
        self.resources
            .values()
            .filter(|r| r.owners.contains(&pid))
            .count()
    }

    /// A held resource by name.
    pub fn get(&self, name: &str) -> Option<&Resource> {
        self.resources.get(name)
    }

    /// All held resources (hash order), e.g. for the re-exec state.
    pub fn resources(&self) -> impl Iterator<Item = &Resource> {
        self.resources.values()
    }

    /// The file a resource name maps to: `<dir>/<name>` (plain string join, as 9.0) or the
    /// name itself in the default lockspace.
    pub fn resource_path(&self, name: &str) -> PathBuf {
        match &self.directory {
            Some(dir) => {
                // Sized exactly: a held lease keeps this buffer (see `name_and_path`).
                let mut s = OsString::with_capacity(dir.as_os_str().len() + 1 + name.len());
                s.push(dir.as_os_str());
                s.push("/");
                s.push(name);
                PathBuf::from(s)
            }
            None => PathBuf::from(name),
        }
    }

    /// Our deliberate improvement over 9.0: refuse names that would escape the directory.
    fn check_name(&self, name: &str) -> Result<(), RpcError> {
        let bad = match &self.directory {
            Some(_) => name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']),
            None => name.contains('\0'),
        };
        if !bad {
            return Ok(());
        }
        let detail = match &self.directory {
            Some(dir) => format!(
                "Resource name '{}' is not valid in lockspace {}",
                shown(name),
                dir.display()
            ),
            None => format!(
                "Resource name '{}' is not valid: it contains a NUL byte",
                shown(name)
            ),
        };
        Err(RpcError::new(code::INVALID_ARG, domain::LOCKSPACE, detail))
    }

    /// Adopt a resource inherited across SIGUSR1 re-exec or a crash restart: `fd` still carries
    /// the lock (OFD locks belong to the open file, POSIX ones to the pid, which a re-exec keeps;
    /// see [`lease_lock::adopt`]). The fd stays inheritable, as every held lease's fd is.
    /// `carried`: what our previous image knew of it (no fstat, and for an OFD lease
    /// of this process no adoption). On error the fd is closed.
    /// Its file gets a slot when the lockspace is [inserted](LockSpaces::insert).
    #[allow(clippy::too_many_arguments)]
    pub fn restore_resource(
        &mut self,
        name: String,
        path: PathBuf,
        fd: OwnedFd,
        lock_held: bool,
        flags: u32,
        owners: Vec<u32>,
        carried: Option<Carried>,
    ) -> Result<(), RpcError> {
        let hash = self.resources.hash(&name);
        if self.resources.get_hashed(hash, &name).is_some() {
            // Checked before a Resource exists, so nothing is unlinked.
            return Err(RpcError::internal(
                domain::LOCKSPACE,
                format!("Duplicate resource '{}' in JSON document", shown(&name)),
            ));
        }
        let file_id = match carried {
            Some(c) => Some(c.id),
            None => nix::sys::stat::fstat(fd.as_raw_fd()).ok().map(|st| FileId {
                dev: st.st_dev,
                ino: st.st_ino,
            }),
        };
        if owners.is_empty() {
            tracing::warn!(name = &*name, "restored resource has no owners");
        }
        let kind = if lock_held && carried.is_some_and(|c| c.ofd_kept) {
            LockKind::Ofd
        } else if lock_held {
            lease_lock::adopt(fd.as_raw_fd(), flags & ACQUIRE_SHARED != 0).map_err(|e| {
                RpcError::system(
                    domain::LOCKSPACE,
                    e as i32,
                    format_args!("Lease {} was lost while it was not held", path.display()),
                )
            })?
        } else {
            LockKind::Ofd
        };
        // Only ACQUIRE_SHARED and ACQUIRE_AUTOCREATE exist (both daemons refuse others at
        // acquire), so the flags are kept in a byte; anything above it is not a lease
        // flag either, and is dropped rather than refusing a held lease.
        let flags = u8::try_from(flags).unwrap_or_else(|_| {
            tracing::warn!(
                name = &*name,
                flags,
                "restored resource has unknown flags; only the low 8 bits are kept"
            );
            (flags & 0xff) as u8
        });
        let (name_path, name_start, name_apart) = name_and_path(&name, path);
        self.resources.insert_hashed(
            hash,
            Box::new(Resource {
                name_path,
                name_start,
                name_apart,
                fd,
                lock_held,
                flags,
                // Collected, not converted: a deserialized Vec has room for four, and
                // `from_vec` would keep that allocation.
                owners: owners.into_iter().collect(),
                file_id: file_id.unwrap_or(FileId { dev: 0, ino: 0 }),
                has_file_id: file_id.is_some(),
                kind,
                // It came through an exec (or the fd store's dup2, which clears the flag
                // too).
                inheritable: true,
            }),
        );
        Ok(())
    }
}

fn lock_error(name: &str, path: &Path, e: Errno) -> RpcError {
    match e {
        Errno::EACCES | Errno::EAGAIN => busy(name),
        e => RpcError::system(
            domain::LOCKSPACE,
            e as i32,
            format_args!("Unable to acquire lock on '{}'", path.display()),
        ),
    }
}

fn fstat_error(path: &Path, e: &io::Error) -> RpcError {
    // 9.0's text (copied from its pid file code).
    RpcError::system(
        domain::LOCKSPACE,
        errno_of(e),
        format_args!("Unable to check status of pid file '{}'", path.display()),
    )
}

/// 9.0's error for an AUTOCREATE open that failed.
fn create_error(path: &Path, errno: i32) -> RpcError {
    RpcError::system(
        domain::LOCKSPACE,
        errno,
        format_args!("Unable to open/create resource {}", path.display()),
    )
}

/// Locks the claimed `file`; with AUTOCREATE also checks that `path` still names it
/// (someone may have unlinked or replaced it meanwhile). `Ok(None)`: it does not, and the
/// claim is given up. On error the claim is given up too.
fn lock_claimed(
    name: &str,
    path: &Path,
    (file, id): (File, FileId),
    shared: bool,
    recheck: bool,
    claims: &dyn Claims,
) -> Result<Option<(OwnedFd, FileId)>, RpcError> {
    if let Err(e) = set_lock(file.as_raw_fd(), shared) {
        close_claimed(file, id, claims);
        return Err(lock_error(name, path, e));
    }
    if !recheck || FileId::of_path(path) == Some(id) {
        return Ok(Some((file.into(), id)));
    }
    tracing::debug!(path = %path.display(), "resource was unlinked or replaced, retrying");
    close_claimed(file, id, claims);
    Ok(None)
}

/// §2.3: open (AUTOCREATE: create) the file, claim and lock it. Blocking.
fn acquire_file(
    name: &str,
    path: &Path,
    flags: u32,
    claims: &dyn Claims,
) -> Result<(OwnedFd, FileId), RpcError> {
    let shared = flags & ACQUIRE_SHARED != 0;
    if flags & ACQUIRE_AUTOCREATE == 0 {
        check_before_open(name, path, claims)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(OPEN_FLAGS)
            .open(path)
            .map_err(|e| {
                RpcError::system(
                    domain::LOCKSPACE,
                    errno_of(&e),
                    format_args!("Unable to open resource {}", path.display()),
                )
            })?;
        let claimed = claim_opened(name, path, file, claims)?;
        return lock_claimed(name, path, claimed, shared, false, claims)?
            .ok_or_else(|| create_error(path, libc::EAGAIN));
    }
    // The usual AUTOCREATE case, a lease file that does not exist yet: creating it
    // exclusively proves it is no file we hold (those stay open, so their inodes live
    // on), which saves the stat before opening.
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OPEN_FLAGS)
        .open(path)
    {
        Ok(file) => {
            let claimed = claim_opened(name, path, file, claims)?;
            if let Some(done) = lock_claimed(name, path, claimed, shared, true, claims)? {
                return Ok(done);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(create_error(path, errno_of(&e))),
    }
    for _ in 0..AUTOCREATE_MAX_ATTEMPTS {
        check_before_open(name, path, claims)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(OPEN_FLAGS)
            .open(path)
            .map_err(|e| create_error(path, errno_of(&e)))?;
        let claimed = claim_opened(name, path, file, claims)?;
        if let Some(done) = lock_claimed(name, path, claimed, shared, true, claims)? {
            return Ok(done);
        }
    }
    Err(create_error(path, libc::EAGAIN))
}

/// CREATE_RESOURCE: touch the file (`O_WRONLY|O_CREAT`, 0600; an existing file is left
/// alone). Blocking.
fn create_file(name: &str, path: &Path, claims: &dyn Claims) -> Result<(), RpcError> {
    check_before_open(name, path, claims)?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(OPEN_FLAGS)
        .open(path)
        .map_err(|e| {
            RpcError::system(
                domain::LOCKSPACE,
                errno_of(&e),
                format_args!("cannot create file '{}'", path.display()),
            )
        })?;
    let (file, id) = claim_opened(name, path, file, claims)?;
    close_claimed(file, id, claims);
    Ok(())
}

/// DELETE_RESOURCE: `unlink`, ENOENT ignored; a held file (under any name) is locked.
/// Blocking.
fn delete_file(name: &str, path: &Path, claims: &dyn Claims) -> Result<(), RpcError> {
    if FileId::of_path(path).is_some_and(|id| claims.is_claimed(id)) {
        return Err(busy(name));
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RpcError::system(
            domain::LOCKSPACE,
            errno_of(&e),
            format_args!("Unable to delete lockspace resource {}", path.display()),
        )),
    }
}

/// How a call begins.
#[derive(Debug)]
pub enum Begin {
    /// Answered from the table alone.
    Done,
    /// Another call on the same resource is in flight: try again once a call finishes.
    Wait,
    /// Filesystem work to run off the table (the resource is marked pending).
    Work(Job),
}

/// The filesystem half of a call, for the blocking pool: [`run`](Job::run) it, then hand
/// the result to [`LockSpaces::finish`].
#[derive(Debug)]
pub struct Job {
    key: String,
    name: String,
    kind: JobKind,
    inline: bool,
}

#[derive(Debug)]
enum JobKind {
    Acquire {
        path: PathBuf,
        owner: u32,
        flags: u32,
    },
    Create(PathBuf),
    Delete(PathBuf),
    /// The last owner released it: unlink (AUTOCREATE) and close.
    Close(Box<Resource>),
}

/// A job's result.
#[derive(Debug)]
pub struct Finished {
    key: String,
    name: String,
    result: Result<Option<Box<Resource>>, RpcError>,
}

impl Job {
    /// The resource the job is on: (lockspace key, name).
    pub fn resource(&self) -> (String, String) {
        (self.key.clone(), self.name.clone())
    }

    /// Whether the job may run on the thread serving clients (its lockspace is on a
    /// local file system, see [`is_local_fs`]).
    pub fn runs_inline(&self) -> bool {
        self.inline
    }

    /// Does the filesystem work (blocking: run it where nothing else waits on it).
    pub fn run(self, claims: &dyn Claims) -> Finished {
        let result = match self.kind {
            JobKind::Acquire { path, owner, flags } => {
                acquire_file(&self.name, &path, flags, claims).map(|(fd, id)| {
                    tracing::debug!(name = self.name, path = %path.display(), owner, flags, "acquired resource");
                    let (name_path, name_start, name_apart) = name_and_path(&self.name, path);
                    Some(Box::new(Resource {
                        name_path,
                        name_start,
                        name_apart,
                        fd,
                        lock_held: true,
                        // The caller checked them against ACQUIRE_FLAGS_MASK.
                        flags: (flags & ACQUIRE_FLAGS_MASK) as u8,
                        owners: smallvec![owner],
                        file_id: id,
                        has_file_id: true,
                        kind: LockKind::Ofd,
                        // Opened close-on-exec (std's default): cleared once it is
                        // in the table (`finish`), never while only a job holds it.
                        inheritable: false,
                    }))
                })
            }
            JobKind::Create(path) => create_file(&self.name, &path, claims).map(|()| None),
            JobKind::Delete(path) => delete_file(&self.name, &path, claims).map(|()| None),
            JobKind::Close(res) => {
                let id = res.file_id();
                if let Some(id) = id {
                    claims.closing(id);
                }
                drop(res);
                if let Some(id) = id {
                    claims.unclaim(id);
                }
                Ok(None)
            }
        };
        Finished {
            key: self.key,
            name: self.name,
            result,
        }
    }
}

/// What a file's slot has beyond being there (module docs): only while its claimant is
/// closing it, or when fds were parked on it; so a held lease's slot is its (device,
/// inode) alone, 16 bytes a bucket in [`LockSpaces::slots`].
#[derive(Debug, Default)]
struct SlotState {
    /// The claimant is closing its fd: the (device, inode) may soon name another file.
    closing: bool,
    /// Fds opened on the file by accident, closed after the claimant's.
    parked: Vec<OwnedFd>,
}

/// What [`LockSpaces::claim`] did.
#[derive(Debug)]
pub enum Claim {
    Claimed(File),
    /// Claimed already: the file was parked.
    Parked,
    /// The slot's claimant is closing its fd: try again once it is gone.
    Closing(File),
}

/// The daemon's lockspaces: the default one (key `""`) and directory lockspaces keyed by the
/// exact path string given to NEW / CREATE_LOCKSPACE (no canonicalisation), plus the file
/// slots and the resources with a call in flight.
#[derive(Debug, Default)]
pub struct LockSpaces {
    default: LockSpace,
    dirs: HashMap<String, LockSpace>,
    /// Files held or being locked (module docs).
    slots: HashSet<FileId>,
    /// The few slots being closed or with fds parked on them.
    slot_states: HashMap<FileId, SlotState>,
    /// A re-exec's handoff has named the held leases (see [`Self::exec_started`]).
    exec_started: bool,
    /// (lockspace key, resource name) with a job in flight.
    pending: HashSet<(String, String)>,
}

impl LockSpaces {
    pub fn new() -> LockSpaces {
        LockSpaces::default()
    }

    /// Lookup by key: `""` is the default lockspace.
    pub fn get(&self, key: &str) -> Option<&LockSpace> {
        if key.is_empty() {
            Some(&self.default)
        } else {
            self.dirs.get(key)
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut LockSpace> {
        if key.is_empty() {
            Some(&mut self.default)
        } else {
            self.dirs.get_mut(key)
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn default_lockspace(&self) -> &LockSpace {
        &self.default
    }

    /// Installs a lockspace created (on the blocking pool) for `key`, unless `key` exists
    /// by now; returns whether it did.
    pub fn add(&mut self, key: &str, ls: LockSpace) -> bool {
        if self.contains(key) {
            return false;
        }
        self.dirs.insert(key.to_string(), ls);
        true
    }

    /// Install a lockspace rebuilt from re-exec state under `key` (`""` replaces the default),
    /// giving its files their slots.
    pub fn insert(&mut self, key: String, ls: LockSpace) {
        self.slots.reserve(ls.resources.len());
        for r in ls.resources() {
            if let Some(id) = r.file_id() {
                if !self.slots.insert(id) {
                    tracing::warn!(
                        resource = r.name(),
                        "the restored state holds this file under two names"
                    );
                }
            }
        }
        if key.is_empty() {
            self.default = ls;
        } else {
            self.dirs.insert(key, ls);
        }
    }

    /// Number of directory lockspaces.
    pub fn directory_count(&self) -> usize {
        self.dirs.len()
    }

    /// Held resources over all lockspaces.
    pub fn resource_count(&self) -> usize {
        self.iter().map(|(_, ls)| ls.resource_count()).sum()
    }

    /// All lockspaces with their keys, the default (`""`) first.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &LockSpace)> {
        std::iter::once(("", &self.default)).chain(self.directories())
    }

    /// The directory lockspaces with their keys (hash order).
    pub fn directories(&self) -> impl Iterator<Item = (&str, &LockSpace)> {
        self.dirs.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The fds parked on held files: a re-exec must keep them open too (closing one at
    /// exec would drop the lock).
    pub fn parked_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.slot_states
            .values()
            .flat_map(|s| s.parked.iter())
            .map(|fd| fd.as_raw_fd())
    }

    /// Whether file `id` has a slot.
    pub fn is_claimed(&self, id: FileId) -> bool {
        self.slots.contains(&id) && !self.slot_states.get(&id).is_some_and(|s| s.closing)
    }

    /// [`Claims::claim`] under the table lock.
    pub fn claim(&mut self, id: FileId, file: File) -> Claim {
        if self.slots.insert(id) {
            return Claim::Claimed(file);
        }
        let state = self.slot_states.entry(id).or_default();
        if state.closing {
            return Claim::Closing(file);
        }
        state.parked.push(file.into());
        Claim::Parked
    }

    /// [`Claims::closing`] under the table lock.
    pub fn mark_closing(&mut self, id: FileId) {
        if self.slots.contains(&id) {
            self.slot_states.entry(id).or_default().closing = true;
        }
    }

    /// One step of [`Claims::unclaim`]: removes the slot when nothing is parked there,
    /// else hands out the parked fds (to be closed outside the table lock; then call again).
    pub fn unclaim_step(&mut self, id: FileId) -> Vec<OwnedFd> {
        if !self.slots.contains(&id) {
            return Vec::new();
        }
        match self.slot_states.get_mut(&id) {
            Some(s) if !s.parked.is_empty() => std::mem::take(&mut s.parked),
            _ => {
                self.slots.remove(&id);
                self.slot_states.remove(&id);
                Vec::new()
            }
        }
    }

    /// The lockspace `key` for a call on `name`, unless a call on it is in flight.
    fn for_call(&mut self, key: &str, name: &str) -> Result<Option<&mut LockSpace>, RpcError> {
        if !self.contains(key) {
            return Err(lockspace_not_found(key));
        }
        if self.pending.contains(&(key.to_string(), name.to_string())) {
            return Ok(None);
        }
        Ok(self.get_mut(key))
    }

    /// A job on `name`, which is pending until the job [finishes](Self::finish).
    fn job(&mut self, key: &str, name: &str, mut kind: JobKind) -> Job {
        self.pending.insert((key.to_string(), name.to_string()));
        let inline = self.get(key).is_some_and(|ls| ls.local);
        if let JobKind::Close(res) = &mut kind {
            // Out of the table, a lease's fd must not outlive an exec: one closed on the
            // blocking pool while the daemon re-execs would reach the next image still
            // locked, named nowhere. (An inline close runs on the thread that execs.)
            if !inline && res.inheritable {
                match set_cloexec(res.fd.as_raw_fd(), true) {
                    Ok(()) => res.inheritable = false,
                    Err(e) => tracing::warn!(
                        resource = res.name(),
                        "cannot set close-on-exec before closing ({e})"
                    ),
                }
            }
        }
        Job {
            key: key.to_string(),
            name: name.to_string(),
            kind,
            inline,
        }
    }

    /// A re-exec has written (or is writing) its state document: from now on no lease
    /// fd becomes inheritable (see [`Self::finish`]) until [`Self::exec_failed`].
    pub fn exec_started(&mut self) {
        self.exec_started = true;
    }

    /// The exec failed and the daemon goes on serving.
    pub fn exec_failed(&mut self) {
        self.exec_started = false;
    }

    /// Records whether lockspace `key`'s directory is on a local file system (after a
    /// re-exec, found out on the blocking pool).
    pub fn set_local(&mut self, key: &str, local: bool) {
        if let Some(ls) = self.get_mut(key) {
            ls.local = local;
        }
    }

    /// ACQUIRE_RESOURCE (§2.3, §2.4). Never waits for another process: a conflict is
    /// RESOURCE_BUSY.
    pub fn begin_acquire(
        &mut self,
        key: &str,
        name: &str,
        owner: u32,
        flags: u32,
    ) -> Result<Begin, RpcError> {
        RpcError::check_flags(
            domain::LOCKSPACE,
            "virLockSpaceAcquireResource",
            flags,
            ACQUIRE_FLAGS_MASK,
        )?;
        let Some(ls) = self.for_call(key, name)? else {
            return Ok(Begin::Wait);
        };
        if let Some(res) = ls.resources.get_mut(name) {
            if res.is_shared() && flags & ACQUIRE_SHARED != 0 {
                res.owners.push(owner);
                return Ok(Begin::Done);
            }
            return Err(busy(name));
        }
        ls.check_name(name)?;
        let path = ls.resource_path(name);
        Ok(Begin::Work(self.job(
            key,
            name,
            JobKind::Acquire { path, owner, flags },
        )))
    }

    /// RELEASE_RESOURCE (§2.6): one ownership of `name` by `owner`; the last one closes the
    /// resource (unlinking an AUTOCREATE lock file first).
    pub fn begin_release(&mut self, key: &str, name: &str, owner: u32) -> Result<Begin, RpcError> {
        let ls = self.get_mut(key).ok_or_else(|| lockspace_not_found(key))?;
        let res = ls.resources.get_mut(name).ok_or_else(|| not_locked(name))?;
        let idx = res
            .owners
            .iter()
            .position(|&o| o == owner)
            .ok_or_else(|| not_owner(owner))?;
        res.owners.remove(idx);
        if !res.owners.is_empty() {
            return Ok(Begin::Done);
        }
        tracing::debug!(name, owner, "last owner released resource");
        match ls.resources.remove(name) {
            Some(res) => Ok(Begin::Work(self.job(key, name, JobKind::Close(res)))),
            None => Ok(Begin::Done),
        }
    }

    /// §2.7 step 1: drop one ownership by `owner` from every resource of every lockspace.
    /// Returns whether `owner` held anything, and the jobs closing the resources left
    /// without owners.
    pub fn release_owner(&mut self, owner: u32) -> (bool, Vec<Job>) {
        let mut any = false;
        let mut closed = Vec::new();
        let lockspaces = std::iter::once((String::new(), &mut self.default))
            .chain(self.dirs.iter_mut().map(|(k, v)| (k.clone(), v)));
        for (key, ls) in lockspaces {
            let mut gone = Vec::new();
            for res in ls.resources.values_mut() {
                if let Some(idx) = res.owners.iter().position(|&o| o == owner) {
                    any = true;
                    res.owners.remove(idx);
                    if res.owners.is_empty() {
                        gone.push(String::from(res.name()));
                    }
                }
            }
            for name in gone {
                if let Some(res) = ls.resources.remove(&name) {
                    closed.push((key.clone(), name, res));
                }
            }
        }
        let jobs = closed
            .into_iter()
            .map(|(key, name, res)| self.job(&key, &name, JobKind::Close(res)))
            .collect();
        (any, jobs)
    }

    /// CREATE_RESOURCE: refused while the resource (or its file, under any name) is held.
    pub fn begin_create(&mut self, key: &str, name: &str) -> Result<Begin, RpcError> {
        self.begin_file_op(key, name, JobKind::Create)
    }

    /// DELETE_RESOURCE: refused while held, like create. In the default lockspace this
    /// deletes the named path itself.
    pub fn begin_delete(&mut self, key: &str, name: &str) -> Result<Begin, RpcError> {
        self.begin_file_op(key, name, JobKind::Delete)
    }

    /// The checks CREATE and DELETE share (not held under this name, a valid name), then
    /// the job that `kind` makes of the resource's path.
    fn begin_file_op(
        &mut self,
        key: &str,
        name: &str,
        kind: fn(PathBuf) -> JobKind,
    ) -> Result<Begin, RpcError> {
        let Some(ls) = self.for_call(key, name)? else {
            return Ok(Begin::Wait);
        };
        if ls.resources.contains_key(name) {
            return Err(busy(name));
        }
        ls.check_name(name)?;
        let path = ls.resource_path(name);
        Ok(Begin::Work(self.job(key, name, kind(path))))
    }

    /// Ends the pending state of a job that never finished.
    pub fn abandon(&mut self, resource: &(String, String)) {
        self.pending.remove(resource);
    }

    /// Records what a job did, and ends its resource's pending state.
    pub fn finish(&mut self, done: Finished) -> Result<(), RpcError> {
        self.pending.remove(&(done.key.clone(), done.name.clone()));
        let res = done.result?;
        let exec_started = self.exec_started;
        if let (Some(mut res), Some(ls)) = (res, self.get_mut(&done.key)) {
            // Inheritable from now on, under the table lock a re-exec's handoff takes
            // too: an fd only a job held would otherwise leak into the next image with
            // its lock and nobody knowing of it. One fcntl per acquire here saves one
            // per lease on each side of every re-exec.
            // Not once a re-exec's handoff has named the leases: a lease a pool job
            // records after it must close at the exec (its lock with it), as before.
            if !res.inheritable && !exec_started {
                match set_cloexec(res.fd.as_raw_fd(), false) {
                    Ok(()) => res.inheritable = true,
                    Err(e) => tracing::warn!(
                        resource = res.name(),
                        "cannot clear close-on-exec now ({e}); the re-exec will"
                    ),
                }
            }
            ls.resources.insert_new(res);
        }
        Ok(())
    }
}

/// The table's claims, for jobs on the blocking pool: each step takes the lock briefly.
/// A poisoned lock is used anyway: every update of the slots is a single step, and a job
/// must always be able to record that it closed its fd.
impl Claims for std::sync::Mutex<LockSpaces> {
    fn is_claimed(&self, id: FileId) -> bool {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_claimed(id)
    }

    fn claim(&self, id: FileId, mut file: File) -> Option<File> {
        loop {
            match self
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .claim(id, file)
            {
                Claim::Claimed(f) => return Some(f),
                Claim::Parked => return None,
                Claim::Closing(f) => file = f,
            }
            // A close takes microseconds (or as long as a stuck NFS server likes: then
            // this call is stuck with the file it collides with, and nothing else is).
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }

    fn closing(&self, id: FileId) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .mark_closing(id);
    }

    fn unclaim(&self, id: FileId) {
        loop {
            let parked = self
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unclaim_step(id);
            if parked.is_empty() {
                return;
            }
            // Closed outside the lock: a close may block (NFS flushes on close).
            drop(parked);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, pipe, ForkResult, Pid};
    use proptest::prelude::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;

    /// The table's calls with their jobs run inline, over a plain [`LockSpaces`] (the
    /// checked path the daemon uses; the job borrows the spaces through a mutex).
    #[derive(Default)]
    struct Tbl(LockSpaces);

    impl std::ops::Deref for Tbl {
        type Target = LockSpaces;
        fn deref(&self) -> &LockSpaces {
            &self.0
        }
    }

    impl Tbl {
        fn run(&mut self, begin: Result<Begin, RpcError>) -> Result<(), RpcError> {
            match begin? {
                Begin::Done => Ok(()),
                Begin::Wait => panic!("a call is in flight"),
                Begin::Work(job) => {
                    let m = std::sync::Mutex::new(std::mem::take(&mut self.0));
                    let done = job.run(&m);
                    self.0 = m.into_inner().unwrap();
                    self.0.finish(done)
                }
            }
        }
        fn create(&mut self, key: &str) -> Result<(), RpcError> {
            if !self.0.contains(key) {
                self.0.add(key, LockSpace::create_directory(key)?);
            }
            Ok(())
        }
        fn acquire(
            &mut self,
            key: &str,
            name: &str,
            owner: u32,
            flags: u32,
        ) -> Result<(), RpcError> {
            let b = self.0.begin_acquire(key, name, owner, flags);
            self.run(b)
        }
        fn release(&mut self, key: &str, name: &str, owner: u32) -> Result<(), RpcError> {
            let b = self.0.begin_release(key, name, owner);
            self.run(b)
        }
        fn create_resource(&mut self, key: &str, name: &str) -> Result<(), RpcError> {
            let b = self.0.begin_create(key, name);
            self.run(b)
        }
        fn delete_resource(&mut self, key: &str, name: &str) -> Result<(), RpcError> {
            let b = self.0.begin_delete(key, name);
            self.run(b)
        }
        fn release_owner(&mut self, owner: u32) -> bool {
            let (any, jobs) = self.0.release_owner(owner);
            for job in jobs {
                self.run(Ok(Begin::Work(job))).unwrap();
            }
            any
        }
    }

    /// One lockspace of a [`Tbl`], with the calls of the old per-lockspace API.
    struct Ls {
        t: Tbl,
        key: String,
    }

    impl std::ops::Deref for Ls {
        type Target = LockSpace;
        fn deref(&self) -> &LockSpace {
            self.t.get(&self.key).unwrap()
        }
    }

    impl std::ops::DerefMut for Ls {
        fn deref_mut(&mut self) -> &mut LockSpace {
            self.t.0.get_mut(&self.key).unwrap()
        }
    }

    impl Ls {
        fn dir(d: &Path) -> Ls {
            let mut t = Tbl::default();
            let key = d.to_str().unwrap().to_string();
            t.create(&key).unwrap();
            Ls { t, key }
        }
        fn default_lockspace() -> Ls {
            Ls {
                t: Tbl::default(),
                key: String::new(),
            }
        }
        fn acquire(&mut self, name: &str, owner: u32, flags: u32) -> Result<(), RpcError> {
            self.t.acquire(&self.key, name, owner, flags)
        }
        fn release(&mut self, name: &str, owner: u32) -> Result<(), RpcError> {
            self.t.release(&self.key, name, owner)
        }
        fn create_resource(&mut self, name: &str) -> Result<(), RpcError> {
            self.t.create_resource(&self.key, name)
        }
        fn delete_resource(&mut self, name: &str) -> Result<(), RpcError> {
            self.t.delete_resource(&self.key, name)
        }
        fn release_owner(&mut self, owner: u32) -> bool {
            self.t.release_owner(owner)
        }
    }

    /// virlockspacetest uses the test's euid as "PID"; any constant will do.
    const OWNER: u32 = 1000;

    fn testdir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("virlockspacedata");
        (tmp, d)
    }

    /// A lease file as a previous daemon left it open: read-write, created 0600 if
    /// missing, never truncated.
    fn open_lease_file(f: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(f)
            .unwrap()
    }

    fn flock(kind: i32) -> libc::flock {
        libc::flock {
            l_type: kind as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 1,
            l_pid: 0,
        }
    }

    fn cpath(path: &Path) -> CString {
        CString::new(path.as_os_str().as_bytes()).unwrap()
    }

    /// Runs in a forked child: only async-signal-safe calls, no allocation.
    fn child_getlk(c: &CString) -> i32 {
        // SAFETY: `c` is a valid NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
        if fd < 0 {
            return 20;
        }
        let mut lk = flock(libc::F_WRLCK);
        // SAFETY: `fd` is open and `lk` is a valid flock struct.
        if unsafe { libc::fcntl(fd, libc::F_GETLK, &mut lk) } < 0 {
            return 21;
        }
        match lk.l_type as i32 {
            libc::F_UNLCK => 10,
            libc::F_RDLCK => 11,
            libc::F_WRLCK => 12,
            _ => 22,
        }
    }

    /// Runs in a forked child: try F_SETLK of `kind` on byte 0.
    fn child_setlk(c: &CString, kind: i32) -> i32 {
        // SAFETY: `c` is a valid NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
        if fd < 0 {
            return 20;
        }
        let lk = flock(kind);
        // SAFETY: `fd` is open and `lk` is a valid flock struct.
        if unsafe { libc::fcntl(fd, libc::F_SETLK, &lk) } == 0 {
            return 0;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => 1,
            _ => 2,
        }
    }

    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child runs only async-signal-safe libc calls (open, fcntl) and _exit,
        // so forking from the multi-threaded test harness is sound.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let code = f();
                // SAFETY: _exit is async-signal-safe and skips the parent's atexit state.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => match waitpid(child, None).unwrap() {
                WaitStatus::Exited(_, code) => code,
                other => panic!("child: {other:?}"),
            },
        }
    }

    #[derive(Debug, PartialEq, Eq, Clone, Copy)]
    enum Probe {
        Unlocked,
        Read,
        Write,
    }

    /// What another process sees on byte 0 (F_GETLK never reports our own locks, hence fork).
    fn probe(path: &Path) -> Probe {
        let c = cpath(path);
        match in_child(|| child_getlk(&c)) {
            10 => Probe::Unlocked,
            11 => Probe::Read,
            12 => Probe::Write,
            n => panic!("probe of {} failed: {n}", path.display()),
        }
    }

    /// Whether another process could F_SETLK byte 0 with `kind`.
    fn other_can_lock(path: &Path, kind: i32) -> bool {
        let c = cpath(path);
        match in_child(|| child_setlk(&c, kind)) {
            0 => true,
            1 => false,
            n => panic!("setlk of {} failed: {n}", path.display()),
        }
    }

    /// A forked process holding a byte-0 lock until dropped.
    struct Holder {
        pid: Pid,
        go: OwnedFd,
    }

    impl Holder {
        fn new(path: &Path, kind: i32) -> Holder {
            let c = cpath(path);
            let (ready_r, ready_w) = pipe().unwrap();
            let (go_r, go_w) = pipe().unwrap();
            let (rw, gr) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
            // SAFETY: the child runs only async-signal-safe libc calls and _exit.
            match unsafe { fork() }.unwrap() {
                ForkResult::Child => {
                    let status: u8 = match child_setlk(&c, kind) {
                        0 => 0,
                        _ => 1,
                    };
                    let mut b = [0u8; 1];
                    // SAFETY: valid fds and buffers; the lock stays held until the read.
                    unsafe {
                        libc::write(rw, [status].as_ptr().cast(), 1);
                        libc::read(gr, b.as_mut_ptr().cast(), 1);
                        libc::_exit(0)
                    }
                }
                ForkResult::Parent { child } => {
                    drop(ready_w);
                    drop(go_r);
                    let mut f = File::from(ready_r);
                    let mut b = [0u8; 1];
                    io::Read::read_exact(&mut f, &mut b).unwrap();
                    assert_eq!(b[0], 0, "holder could not lock {}", path.display());
                    Holder {
                        pid: child,
                        go: go_w,
                    }
                }
            }
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = nix::unistd::write(&self.go, b"x");
            let _ = waitpid(self.pid, None);
        }
    }

    /// Open fds of this process that point into `dir`.
    fn fds_into(dir: &Path) -> usize {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.starts_with(dir))
            .count()
    }

    // ---- §7: virlockspacetest ----

    #[test]
    fn resource_is_72_bytes() {
        // An 80-byte heap chunk per held lease (see the fields).
        assert_eq!(std::mem::size_of::<Resource>(), 72);
    }

    #[test]
    fn name_and_path_share_bytes() {
        let (t, start, apart) = name_and_path("b", PathBuf::from("/ls/b"));
        assert_eq!((&*t, start, apart), (&b"/ls/b"[..], 4, false));
        let (t, start, apart) = name_and_path("x", PathBuf::from("/ls/b"));
        assert_eq!((&*t, start, apart), (&b"/ls/bx"[..], 5, true));
    }

    #[test]
    fn t1_lockspace_creation() {
        let (_t, d) = testdir();
        assert!(!d.exists());
        let ls = LockSpace::create_directory(&d).unwrap();
        assert!(d.is_dir());
        assert_eq!(ls.directory(), Some(d.as_path()));
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o077, 0);
    }

    #[test]
    fn t2_res_lifecycle() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        ls.create_resource("foo").unwrap();
        assert!(d.join("foo").exists());
        assert_eq!(
            fs::metadata(d.join("foo")).unwrap().permissions().mode() & 0o077,
            0
        );
        ls.delete_resource("foo").unwrap();
        assert!(!d.join("foo").exists());
        // Deleting a missing file is fine.
        ls.delete_resource("foo").unwrap();
    }

    #[test]
    fn t3_res_lock_excl() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        let f = d.join("foo");
        ls.create_resource("foo").unwrap();
        ls.acquire("foo", OWNER, 0).unwrap();
        assert!(f.exists());
        assert_eq!(probe(&f), Probe::Write);
        assert!(!other_can_lock(&f, libc::F_RDLCK));
        assert!(ls.acquire("foo", OWNER, 0).is_err());
        assert!(ls.delete_resource("foo").is_err());
        assert!(ls.create_resource("foo").is_err());
        assert_eq!(
            probe(&f),
            Probe::Write,
            "refused ops must not drop the lock"
        );
        ls.release("foo", OWNER).unwrap();
        assert!(f.exists(), "no AUTOCREATE: release keeps the file");
        assert_eq!(probe(&f), Probe::Unlocked);
        ls.delete_resource("foo").unwrap();
        assert!(!f.exists());
        assert_eq!(fds_into(&d), 0);
    }

    #[test]
    fn t4_res_lock_shr() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        let f = d.join("foo");
        ls.create_resource("foo").unwrap();
        ls.acquire("foo", OWNER, ACQUIRE_SHARED).unwrap();
        assert_eq!(probe(&f), Probe::Read);
        assert!(other_can_lock(&f, libc::F_RDLCK));
        assert!(!other_can_lock(&f, libc::F_WRLCK));
        assert!(ls.acquire("foo", OWNER, 0).is_err());
        ls.acquire("foo", OWNER, ACQUIRE_SHARED).unwrap();
        assert_eq!(ls.get("foo").unwrap().owners(), &[OWNER, OWNER]);
        assert_eq!(
            fds_into(&d),
            1,
            "second shared owner must not open another fd"
        );
        assert!(ls.delete_resource("foo").is_err());
        ls.release("foo", OWNER).unwrap();
        assert!(ls.delete_resource("foo").is_err());
        assert_eq!(probe(&f), Probe::Read);
        ls.release("foo", OWNER).unwrap();
        assert!(ls.get("foo").is_none());
        assert_eq!(probe(&f), Probe::Unlocked);
        ls.delete_resource("foo").unwrap();
        assert!(!f.exists());
    }

    #[test]
    fn t5_res_lock_excl_auto() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        let f = d.join("foo");
        ls.create_resource("foo").unwrap();
        ls.acquire("foo", OWNER, ACQUIRE_AUTOCREATE).unwrap();
        assert!(f.exists());
        assert_eq!(probe(&f), Probe::Write);
        ls.release("foo", OWNER).unwrap();
        assert!(!f.exists(), "AUTOCREATE: last release unlinks");
        assert_eq!(fds_into(&d), 0);
    }

    #[test]
    fn t6_res_lock_shr_auto() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        let f = d.join("foo");
        ls.create_resource("foo").unwrap();
        ls.acquire("foo", OWNER, ACQUIRE_SHARED | ACQUIRE_AUTOCREATE)
            .unwrap();
        assert!(f.exists());
        assert!(ls.acquire("foo", OWNER, ACQUIRE_AUTOCREATE).is_err());
        assert!(f.exists());
        ls.acquire("foo", OWNER, ACQUIRE_SHARED | ACQUIRE_AUTOCREATE)
            .unwrap();
        assert!(f.exists());
        ls.release("foo", OWNER).unwrap();
        assert!(f.exists());
        assert_eq!(probe(&f), Probe::Read);
        ls.release("foo", OWNER).unwrap();
        assert!(!f.exists());
    }

    #[test]
    fn t7_res_full_path() {
        let (_t, d) = testdir();
        fs::create_dir(&d).unwrap();
        let mut ls = Ls::default_lockspace();
        assert_eq!(ls.directory(), None);
        let f = d.join("foo");
        let name = f.to_str().unwrap();
        ls.create_resource(name).unwrap();
        ls.acquire(name, OWNER, 0).unwrap();
        assert!(f.exists());
        assert_eq!(probe(&f), Probe::Write);
        assert!(ls.acquire(name, OWNER, 0).is_err());
        assert!(ls.delete_resource(name).is_err());
        ls.release(name, OWNER).unwrap();
        ls.delete_resource(name).unwrap();
        assert!(!f.exists());
    }

    // ---- error texts and fields ----

    #[test]
    fn conflict_error_fields() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        ls.acquire("NAME", 1, ACQUIRE_AUTOCREATE).unwrap();
        let e = ls.acquire("NAME", 2, ACQUIRE_AUTOCREATE).unwrap_err();
        assert_eq!(e.code, 87);
        assert_eq!(e.domain, 51);
        assert_eq!(
            e.message(),
            "resource busy: Lockspace resource 'NAME' is locked"
        );
        assert_eq!(e.level, 2);
        assert_eq!(e.str1.as_deref(), Some("resource busy: %s"));
        assert_eq!(
            e.str2.as_deref(),
            Some("Lockspace resource 'NAME' is locked")
        );
        assert_eq!(e.str3, None);
        assert_eq!((e.int1, e.int2), (-1, -1));
        // Shared after exclusive is busy too, and vice versa.
        assert_eq!(ls.acquire("NAME", 2, ACQUIRE_SHARED).unwrap_err(), e);
    }

    #[test]
    fn release_errors() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        let e = ls.release("foo", 7).unwrap_err();
        assert_eq!((e.code, e.domain), (87, 51));
        assert_eq!(
            e.message(),
            "resource busy: Lockspace resource 'foo' is not locked"
        );
        ls.acquire("foo", 7, ACQUIRE_AUTOCREATE).unwrap();
        let e = ls.release("foo", 8).unwrap_err();
        assert_eq!((e.code, e.domain), (1, 51));
        assert_eq!(
            e.message(),
            "internal error: owner 8 does not hold the resource lock"
        );
        assert!(d.join("foo").exists(), "a failed release changes nothing");
        assert_eq!(ls.get("foo").unwrap().owners(), &[7]);
        ls.release("foo", 7).unwrap();
        assert!(ls.release("foo", 7).is_err());
    }

    #[test]
    fn open_errors() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        let e = ls.acquire("missing", 1, 0).unwrap_err();
        assert_eq!((e.code, e.domain, e.int1), (38, 51, libc::ENOENT));
        assert_eq!(
            e.message(),
            format!(
                "Unable to open resource {}/missing: No such file or directory",
                d.display()
            )
        );
        assert!(!d.join("missing").exists());

        let mut dl = Ls::default_lockspace();
        let p = d.join("nodir/x");
        let e = dl
            .acquire(p.to_str().unwrap(), 1, ACQUIRE_AUTOCREATE)
            .unwrap_err();
        assert_eq!(
            e.message(),
            format!(
                "Unable to open/create resource {}: No such file or directory",
                p.display()
            )
        );
        let e = dl.create_resource(p.to_str().unwrap()).unwrap_err();
        assert_eq!(
            e.message(),
            format!(
                "cannot create file '{}': No such file or directory",
                p.display()
            )
        );
        assert_eq!(ls.resource_count() + dl.resource_count(), 0);
        assert_eq!(fds_into(&d), 0);
    }

    #[test]
    fn unsupported_acquire_flags() {
        let mut ls = Ls::default_lockspace();
        let e = ls
            .acquire("/nonexistent", 1, 4 | ACQUIRE_SHARED)
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_ARG);
        assert_eq!(
            e.message(),
            "unsupported flags (0x4) in function virLockSpaceAcquireResource"
        );
    }

    #[test]
    fn create_directory_errors_and_mkdir_p() {
        let (t, d) = testdir();
        fs::write(&d, b"").unwrap();
        let e = LockSpace::create_directory(&d).unwrap_err();
        assert_eq!((e.code, e.domain), (1, 51));
        assert_eq!(
            e.message(),
            format!(
                "internal error: Lockspace location {} exists, but is not a directory",
                d.display()
            )
        );
        let e = LockSpace::create_directory(d.join("sub")).unwrap_err();
        assert_eq!(e.code, 38);
        assert!(e
            .message()
            .starts_with(&format!("Unable to create lockspace {}/sub: ", d.display())));

        let deep = t.path().join("a/b/c");
        LockSpace::create_directory(&deep).unwrap();
        assert!(deep.is_dir());
        assert_eq!(
            fs::metadata(t.path().join("a"))
                .unwrap()
                .permissions()
                .mode()
                & 0o077,
            0
        );
        // An existing directory is used as is, permissions untouched.
        fs::set_permissions(&deep, fs::Permissions::from_mode(0o755)).unwrap();
        LockSpace::create_directory(&deep).unwrap();
        assert_eq!(
            fs::metadata(&deep).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    // ---- cross-process behaviour ----

    #[test]
    fn busy_when_another_process_holds_the_lock() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        ls.create_resource("foo").unwrap();
        let f = d.join("foo");
        {
            let _h = Holder::new(&f, libc::F_WRLCK);
            let e = ls.acquire("foo", 1, 0).unwrap_err();
            assert_eq!(
                e.message(),
                "resource busy: Lockspace resource 'foo' is locked"
            );
            let e = ls
                .acquire("foo", 1, ACQUIRE_SHARED | ACQUIRE_AUTOCREATE)
                .unwrap_err();
            assert_eq!(e.code, 87);
            assert!(f.exists(), "a failed AUTOCREATE acquire leaves the file");
            assert!(ls.get("foo").is_none());
            assert_eq!(fds_into(&d), 0);
        }
        {
            let _h = Holder::new(&f, libc::F_RDLCK);
            ls.acquire("foo", 1, ACQUIRE_SHARED).unwrap();
            ls.release("foo", 1).unwrap();
            assert!(ls.acquire("foo", 1, 0).is_err());
        }
        ls.acquire("foo", 1, 0).unwrap();
    }

    #[test]
    fn shared_autocreate_release_keeps_file_shared_by_another_process() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        let f = d.join("foo");
        ls.acquire("foo", 1, ACQUIRE_SHARED | ACQUIRE_AUTOCREATE)
            .unwrap();
        {
            let _h = Holder::new(&f, libc::F_RDLCK);
            ls.release("foo", 1).unwrap();
            assert!(f.exists(), "upgrade failed, so the file must stay");
            assert_eq!(fds_into(&d), 0);
        }
        ls.acquire("foo", 1, ACQUIRE_SHARED | ACQUIRE_AUTOCREATE)
            .unwrap();
        ls.release("foo", 1).unwrap();
        assert!(!f.exists());
    }

    #[test]
    fn autocreate_release_does_not_unlink_a_replaced_file() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        let f = d.join("foo");
        ls.acquire("foo", 1, ACQUIRE_AUTOCREATE).unwrap();
        fs::remove_file(&f).unwrap();
        fs::write(&f, b"someone else's").unwrap();
        ls.release("foo", 1).unwrap();
        assert!(f.exists());
    }

    /// A lease lost while held (the shared storage dropped our lock during a partition)
    /// and taken by another host: neither its release nor its owner's exit (nor fencing,
    /// which ends in the same release) may delete the file the other host now holds.
    /// The loss is simulated by unlocking our fd behind the lockspace's back and letting
    /// another process lock the file, which is what the lock server then sees.
    #[test]
    fn autocreate_release_of_a_lost_lease_leaves_the_file_to_its_holder() {
        use std::sync::atomic::Ordering::Relaxed;
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        let lost = || crate::renewal::stats().lost_at_release.load(Relaxed);
        let before = lost();
        let cases = [
            ("released", ACQUIRE_AUTOCREATE, 1),
            ("owner-exit", ACQUIRE_AUTOCREATE, 2),
            ("shared", ACQUIRE_SHARED | ACQUIRE_AUTOCREATE, 3),
        ];
        for (name, flags, owner) in cases {
            let f = d.join(name);
            ls.acquire(name, owner, flags).unwrap();
            {
                let r = ls.get(name).unwrap();
                assert_eq!(r.lock_kind(), LockKind::Ofd);
                lease_lock::unlock(r.raw_fd(), r.lock_kind()).unwrap();
            }
            let other_host = Holder::new(&f, libc::F_WRLCK);
            if owner == 2 {
                assert!(ls.release_owner(owner));
            } else {
                ls.release(name, owner).unwrap();
            }
            assert!(ls.get(name).is_none(), "{name}: released all the same");
            assert!(f.exists(), "{name}: the other holder's file was deleted");
            assert!(
                !other_can_lock(&f, libc::F_RDLCK),
                "{name}: still locked by its holder"
            );
            drop(other_host);
        }
        // The two exclusive ones count as losses (a shared lease cannot tell a loss from
        // another sharer; its file stays either way).
        assert!(lost() >= before + 2);
        assert_eq!(fds_into(&d), 0);
        // Still held: deleted as before (one more fcntl, the re-assert).
        ls.acquire("kept", 1, ACQUIRE_AUTOCREATE).unwrap();
        ls.release("kept", 1).unwrap();
        assert!(!d.join("kept").exists());
    }

    /// The same for an exclusive lease inherited from libvirt's C daemon (a POSIX lock,
    /// see `lease_lock`): re-asserted as POSIX, deleted while ours, left once lost.
    #[test]
    fn release_of_an_inherited_posix_lease_checks_it_too() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        for (name, lose) in [("kept", false), ("lost", true)] {
            let f = d.join(name);
            let file = open_lease_file(&f);
            fcntl(file.as_raw_fd(), FcntlArg::F_SETLK(&flock(libc::F_WRLCK))).unwrap();
            ls.restore_resource(
                name.into(),
                f.clone(),
                file.into(),
                true,
                ACQUIRE_AUTOCREATE,
                vec![7],
                None,
            )
            .unwrap();
            let raw = {
                let r = ls.get(name).unwrap();
                assert_eq!(r.lock_kind(), LockKind::Posix);
                r.raw_fd()
            };
            let other_host = lose.then(|| {
                lease_lock::unlock(raw, LockKind::Posix).unwrap();
                Holder::new(&f, libc::F_WRLCK)
            });
            assert!(ls.release_owner(7));
            assert_eq!(f.exists(), lose, "{name}");
            if other_host.is_some() {
                assert!(!other_can_lock(&f, libc::F_RDLCK), "still its holder's");
            }
        }
    }

    // ---- names and aliases ----

    #[test]
    fn names_escaping_the_directory_are_refused() {
        let (t, d) = testdir();
        let mut ls = Ls::dir(&d);
        for bad in ["", ".", "..", "../escape", "a/b", "/etc/passwd", "a\0b"] {
            for r in [
                ls.acquire(bad, 1, ACQUIRE_AUTOCREATE),
                ls.create_resource(bad),
                ls.delete_resource(bad),
            ] {
                let e = r.unwrap_err();
                assert_eq!((e.code, e.domain), (code::INVALID_ARG, 51), "{bad:?}");
                assert!(e.message().starts_with("invalid argument: Resource name '"));
                assert!(e
                    .message()
                    .ends_with(&format!("' is not valid in lockspace {}", d.display())));
            }
        }
        assert!(!t.path().join("escape").exists());
        assert_eq!(ls.resource_count(), 0);
        // Ordinary libvirt names are fine.
        ls.acquire("f2f4417b8fe812d19e40421ca4d46765", 1, ACQUIRE_AUTOCREATE)
            .unwrap();
        ls.acquire("..foo", 1, ACQUIRE_AUTOCREATE).unwrap();

        let mut dl = Ls::default_lockspace();
        let e = dl.acquire("/tmp/a\0b", 1, 0).unwrap_err();
        assert_eq!(
            e.message(),
            "invalid argument: Resource name '/tmp/a\\0b' is not valid: it contains a NUL byte"
        );
    }

    #[test]
    fn aliases_of_a_held_file_are_refused_without_dropping_the_lock() {
        let (_t, d) = testdir();
        fs::create_dir(&d).unwrap();
        let f = d.join("img");
        fs::write(&f, b"").unwrap();
        std::os::unix::fs::symlink(&f, d.join("link")).unwrap();
        let mut dl = Ls::default_lockspace();
        let name = f.to_str().unwrap().to_string();
        dl.acquire(&name, 1, ACQUIRE_SHARED).unwrap();
        let aliases = [
            format!("{}//img", d.display()),
            format!("{}/./img", d.display()),
            format!("{}/link", d.display()),
        ];
        for a in &aliases {
            let e = dl.acquire(a, 2, ACQUIRE_SHARED).unwrap_err();
            assert_eq!(
                e.message(),
                format!("resource busy: Lockspace resource '{a}' is locked")
            );
            assert!(dl.create_resource(a).is_err());
            assert!(dl.delete_resource(a).is_err());
        }
        assert_eq!(probe(&f), Probe::Read);
        assert_eq!(fds_into(&d), 1);
        dl.release(&name, 1).unwrap();
        assert_eq!(probe(&f), Probe::Unlocked);
        // Now the alias is free.
        dl.acquire(&aliases[2], 2, 0).unwrap();
        assert_eq!(probe(&f), Probe::Write);
    }

    #[test]
    fn cross_lockspace_alias_is_refused() {
        let (_t, d) = testdir();
        let key = d.to_str().unwrap().to_string();
        let mut all = Tbl::default();
        all.create(&key).unwrap();
        all.acquire(&key, "foo", 1, ACQUIRE_AUTOCREATE).unwrap();
        let full = format!("{key}/foo");
        assert_eq!(all.acquire("", &full, 2, 0).unwrap_err().code, 87);
        assert_eq!(all.create_resource("", &full).unwrap_err().code, 87);
        assert_eq!(all.delete_resource("", &full).unwrap_err().code, 87);
        // A second key spelling the same directory differently.
        let key2 = format!("{key}/");
        all.create(&key2).unwrap();
        assert_eq!(all.acquire(&key2, "foo", 2, 0).unwrap_err().code, 87);
        assert_eq!(probe(&d.join("foo")), Probe::Write);
        all.release(&key, "foo", 1).unwrap();
        assert!(!d.join("foo").exists());
    }

    /// What a job that lost a rename race is left with: an fd on a file held under
    /// another name. It is parked, not closed (closing it would drop the lock), and
    /// closed only with the resource.
    #[test]
    fn an_fd_opened_on_a_held_file_is_parked_not_closed() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        ls.acquire("foo", 1, ACQUIRE_AUTOCREATE).unwrap();
        let f = d.join("foo");
        let m = std::sync::Mutex::new(std::mem::take(&mut ls.t.0));
        let e = claim_opened("bar", &f, File::open(&f).unwrap(), &m).unwrap_err();
        ls.t.0 = m.into_inner().unwrap();
        assert_eq!(
            e.message(),
            "resource busy: Lockspace resource 'bar' is locked"
        );
        assert_eq!(probe(&f), Probe::Write, "the parked fd was not closed");
        assert_eq!(fds_into(&d), 2);
        assert_eq!(ls.t.parked_fds().count(), 1);
        ls.release("foo", 1).unwrap();
        assert_eq!(fds_into(&d), 0, "parked fd closed after the resource's");
        assert_eq!(ls.t.parked_fds().count(), 0);
        assert!(!f.exists());
    }

    #[test]
    fn fifos_sockets_and_char_devices_are_refused() {
        let (_t, d) = testdir();
        fs::create_dir(&d).unwrap();
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let sock = d.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut dl = Ls::default_lockspace();
        for (path, what) in [
            (fifo.to_str().unwrap(), "a FIFO"),
            (sock.to_str().unwrap(), "a socket"),
            ("/dev/null", "a character device"),
        ] {
            for r in [
                dl.acquire(path, 1, 0),
                dl.acquire(path, 1, ACQUIRE_SHARED | ACQUIRE_AUTOCREATE),
                dl.create_resource(path),
            ] {
                let e = r.unwrap_err();
                assert_eq!((e.code, e.domain), (code::INVALID_ARG, domain::LOCKSPACE));
                assert_eq!(
                    e.message(),
                    format!(
                        "invalid argument: Lockspace resource '{path}' ({path}) is {what}, not a regular file"
                    )
                );
            }
        }
        let mut ls = Ls::dir(&d);
        assert_eq!(
            ls.acquire("fifo", 1, ACQUIRE_AUTOCREATE).unwrap_err().code,
            code::INVALID_ARG
        );
        assert_eq!(dl.resource_count() + ls.resource_count(), 0);
        assert_eq!(fds_into(&d), 0);
        // Deleting one is only an unlink.
        ls.delete_resource("fifo").unwrap();
        assert!(!fifo.exists());
    }

    /// Unlinking and closing a lease frees its inode number, which the next new file may
    /// get at once: a claim on a slot being closed waits for it instead of reporting the
    /// new file as held (that was a spurious "locked" with 16 busy owners).
    #[test]
    fn a_claim_on_a_slot_being_closed_waits_for_it() {
        let (_t, d) = testdir();
        fs::create_dir(&d).unwrap();
        let f = d.join("f");
        fs::write(&f, b"").unwrap();
        let id = FileId::of_path(&f).unwrap();
        let m = std::sync::Arc::new(std::sync::Mutex::new(LockSpaces::new()));
        let first = m.claim(id, File::open(&f).unwrap()).unwrap();
        assert!(m.is_claimed(id));
        m.closing(id);
        assert!(
            !m.is_claimed(id),
            "a closing slot does not make a file busy"
        );
        assert!(matches!(
            m.lock().unwrap().claim(id, File::open(&f).unwrap()),
            Claim::Closing(_)
        ));
        let m2 = m.clone();
        let f2 = f.clone();
        let waiter = std::thread::spawn(move || m2.claim(id, File::open(&f2).unwrap()).is_some());
        drop(first);
        m.unclaim(id);
        assert!(waiter.join().unwrap(), "claimed once the slot was gone");
        assert!(m.is_claimed(id));
    }

    #[test]
    fn only_local_disk_file_systems_run_jobs_inline() {
        let (_t, d) = testdir();
        fs::create_dir(&d).unwrap();
        let st = nix::sys::statfs::statfs(&d).unwrap();
        // This machine's /tmp is ext4 or tmpfs; either is local.
        assert!(is_local_fs(&d), "{:?}", st.filesystem_type());
        assert!(!is_local_fs(Path::new("/proc")));
        assert!(!is_local_fs(&d.join("missing")));
        let mut s = LockSpaces::new();
        let key = d.to_str().unwrap();
        s.add(key, LockSpace::create_directory(&d).unwrap());
        let Ok(Begin::Work(job)) = s.begin_create(key, "a") else {
            panic!("create needs a job")
        };
        assert!(job.runs_inline());
        let Ok(Begin::Work(job)) = s.begin_create("", "/tmp/a") else {
            panic!("create needs a job")
        };
        assert!(
            !job.runs_inline(),
            "the default lockspace's paths are anywhere"
        );
        s.set_local(key, false);
        let Ok(Begin::Work(job)) = s.begin_create(key, "b") else {
            panic!("create needs a job")
        };
        assert!(!job.runs_inline());
    }

    /// Two calls on one resource never run their jobs at once; other resources are
    /// not held up.
    #[test]
    fn a_second_call_on_a_resource_waits_for_the_first() {
        let (_t, d) = testdir();
        let key = d.to_str().unwrap().to_string();
        let mut s = LockSpaces::new();
        assert!(s.add(&key, LockSpace::create_directory(&d).unwrap()));
        let Begin::Work(job) = s.begin_acquire(&key, "foo", 1, ACQUIRE_AUTOCREATE).unwrap() else {
            panic!("acquire needs a job");
        };
        assert!(matches!(
            s.begin_acquire(&key, "foo", 2, ACQUIRE_SHARED),
            Ok(Begin::Wait)
        ));
        assert!(matches!(s.begin_create(&key, "foo"), Ok(Begin::Wait)));
        assert!(matches!(s.begin_delete(&key, "foo"), Ok(Begin::Wait)));
        assert_eq!(s.begin_release(&key, "foo", 1).unwrap_err().code, 87);
        assert!(matches!(
            s.begin_acquire("", "/x", 2, 0),
            Ok(Begin::Work(_))
        ));
        let m = std::sync::Mutex::new(s);
        let done = job.run(&m);
        let mut s = m.into_inner().unwrap();
        s.finish(done).unwrap();
        assert_eq!(probe(&d.join("foo")), Probe::Write);
        assert_eq!(
            s.begin_acquire(&key, "foo", 2, ACQUIRE_SHARED)
                .unwrap_err()
                .code,
            87
        );
        let Begin::Work(close) = s.begin_release(&key, "foo", 1).unwrap() else {
            panic!("the last release closes");
        };
        assert!(matches!(
            s.begin_acquire(&key, "foo", 2, 0),
            Ok(Begin::Wait)
        ));
        let m = std::sync::Mutex::new(s);
        let done = close.run(&m);
        let mut s = m.into_inner().unwrap();
        s.finish(done).unwrap();
        assert!(!d.join("foo").exists());
        assert!(s.slots.is_empty() && s.slot_states.is_empty());
    }

    // ---- LockSpaces, owners, restore ----

    #[test]
    fn lockspaces_lookup_and_create() {
        let (_t, d) = testdir();
        let key = d.to_str().unwrap().to_string();
        let mut all = Tbl::default();
        assert!(all.contains(""));
        assert!(all.get("").unwrap().directory().is_none());
        assert!(!all.contains(&key));
        let e = all.acquire(&key, "foo", 1, 0).unwrap_err();
        assert_eq!((e.code, e.domain), (1, domain::RPC));
        assert_eq!(
            e.message(),
            format!("internal error: Lockspace for path {key} does not exist")
        );
        all.create(&key).unwrap();
        all.create(&key).unwrap();
        all.create("").unwrap();
        assert_eq!(all.directory_count(), 1);
        assert_eq!(
            all.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>(),
            vec![String::new(), key.clone()]
        );
        // No canonicalisation: a trailing slash is a different key.
        assert!(!all.contains(&format!("{key}/")));
        assert_eq!(all.get(&key).unwrap().directory(), Some(d.as_path()));
    }

    #[test]
    fn release_owner_across_lockspaces() {
        let (_t, d) = testdir();
        let key = d.to_str().unwrap().to_string();
        let mut all = Tbl::default();
        all.create(&key).unwrap();
        all.acquire(&key, "a", 10, ACQUIRE_AUTOCREATE).unwrap();
        all.acquire(&key, "b", 10, ACQUIRE_SHARED | ACQUIRE_AUTOCREATE)
            .unwrap();
        all.acquire(&key, "b", 10, ACQUIRE_SHARED).unwrap();
        all.acquire(&key, "b", 11, ACQUIRE_SHARED).unwrap();
        all.acquire(&key, "c", 11, ACQUIRE_AUTOCREATE).unwrap();
        let img = d.join("img");
        fs::write(&img, b"").unwrap();
        all.acquire("", img.to_str().unwrap(), 10, 0).unwrap();
        assert_eq!(all.resource_count(), 4);

        assert!(all.release_owner(10));
        let ls = all.get(&key).unwrap();
        assert!(ls.get("a").is_none());
        assert!(!d.join("a").exists());
        assert_eq!(
            ls.get("b").unwrap().owners(),
            &[10, 11],
            "one occurrence per resource"
        );
        assert_eq!(ls.resources_owned_by(10), 1);
        assert!(all.default_lockspace().get(img.to_str().unwrap()).is_none());
        assert!(img.exists(), "direct locks never unlink");
        assert_eq!(probe(&img), Probe::Unlocked);

        assert!(all.release_owner(10));
        assert!(!all.release_owner(10));
        assert!(all.release_owner(11));
        assert_eq!(all.resource_count(), 0);
        assert!(!d.join("b").exists() && !d.join("c").exists());
        assert!(!all.release_owner(11));
        assert_eq!(fds_into(&d), 0);
    }

    fn cloexec(fd: RawFd) -> bool {
        fcntl(fd, FcntlArg::F_GETFD).unwrap() & libc::FD_CLOEXEC != 0
    }

    /// A lease's fd is inheritable exactly while the table holds the lease (a re-exec
    /// names every such fd): not while only an acquire job holds it, not once it is
    /// handed to a close on the blocking pool, and not if recorded after a re-exec's
    /// handoff named the leases.
    #[test]
    fn lease_fds_are_inheritable_only_while_the_table_holds_them() {
        let (_t, d) = testdir();
        let key = d.to_str().unwrap().to_string();
        let mut t = Tbl::default();
        t.create(&key).unwrap();
        // Not local: jobs go to the blocking pool.
        t.0.set_local(&key, false);
        let Begin::Work(job) = t.0.begin_acquire(&key, "a", 1, ACQUIRE_AUTOCREATE).unwrap() else {
            panic!("an acquire is work");
        };
        let m = std::sync::Mutex::new(std::mem::take(&mut t.0));
        let done = job.run(&m);
        t.0 = m.into_inner().unwrap();
        let raw = match &done.result {
            Ok(Some(r)) => r.raw_fd(),
            other => panic!("{other:?}"),
        };
        assert!(cloexec(raw), "close-on-exec while only the job holds it");
        t.0.finish(done).unwrap();
        assert!(!cloexec(raw), "inheritable once in the table");
        assert!(t.0.get(&key).unwrap().get("a").unwrap().is_inheritable());
        let Begin::Work(job) = t.0.begin_release(&key, "a", 1).unwrap() else {
            panic!("the last release is work");
        };
        match &job.kind {
            JobKind::Close(r) => {
                assert!(cloexec(r.raw_fd()), "close-on-exec again on its way out")
            }
            _ => panic!("a close"),
        }
        t.run(Ok(Begin::Work(job))).unwrap();
        // After a handoff named the leases, a newly recorded one stays close-on-exec,
        // and the handoff's caller clears it if the exec fails and another follows.
        t.0.exec_started();
        t.acquire(&key, "b", 1, ACQUIRE_AUTOCREATE).unwrap();
        let r = t.0.get(&key).unwrap().get("b").unwrap();
        assert!(cloexec(r.raw_fd()) && !r.is_inheritable());
        t.0.exec_failed();
        t.acquire(&key, "c", 1, ACQUIRE_AUTOCREATE).unwrap();
        let r = t.0.get(&key).unwrap().get("c").unwrap();
        assert!(!cloexec(r.raw_fd()) && r.is_inheritable());
    }

    #[test]
    fn restore_adopts_an_inherited_locked_fd() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        let f = d.join("foo");
        let file = open_lease_file(&f);
        set_lock(file.as_raw_fd(), true).unwrap();
        set_cloexec(file.as_raw_fd(), false).unwrap();
        let fd: OwnedFd = file.into();
        let raw = fd.as_raw_fd();
        ls.restore_resource(
            "foo".into(),
            f.clone(),
            fd,
            true,
            ACQUIRE_SHARED | ACQUIRE_AUTOCREATE,
            vec![4242, 4300],
            None,
        )
        .unwrap();
        let flags = fcntl(raw, FcntlArg::F_GETFD).unwrap();
        assert_eq!(
            flags & libc::FD_CLOEXEC,
            0,
            "a held lease's fd stays inheritable"
        );
        let r = ls.resources().next().unwrap();
        assert_eq!(
            (
                r.name(),
                r.path(),
                r.raw_fd(),
                r.lock_held(),
                r.flags(),
                r.owners()
            ),
            ("foo", f.as_path(), raw, true, 3, &[4242u32, 4300][..])
        );
        r.set_inheritable(true).unwrap();
        assert_eq!(fcntl(raw, FcntlArg::F_GETFD).unwrap() & libc::FD_CLOEXEC, 0);
        r.set_inheritable(false).unwrap();
        assert_eq!(probe(&f), Probe::Read);
        // Restored resources keep working: sharing, aliases, release with unlink.
        ls.acquire("foo", 5, ACQUIRE_SHARED).unwrap();
        assert_eq!(ls.owner_count(), 3);
        assert!(ls
            .restore_resource(
                "foo".into(),
                f.clone(),
                File::open(&d).unwrap().into(),
                true,
                0,
                vec![1],
                None
            )
            .is_err());
        assert_eq!(probe(&f), Probe::Read);
        assert!(ls.release_owner(4242));
        assert!(ls.release_owner(4300));
        assert!(ls.release_owner(5));
        assert!(!f.exists());
    }

    /// With OFD leases the POSIX close pitfall is gone: closing another fd of a held file
    /// keeps the lease (with 9.0's POSIX locks it dropped it).
    #[test]
    fn closing_another_fd_of_a_held_file_keeps_the_lease() {
        let (_t, d) = testdir();
        let mut ls = Ls::dir(&d);
        ls.acquire("foo", 1, ACQUIRE_AUTOCREATE).unwrap();
        assert_eq!(probe(&d.join("foo")), Probe::Write);
        drop(File::open(d.join("foo")).unwrap());
        assert_eq!(probe(&d.join("foo")), Probe::Write);
    }

    // ---- state machine ----

    const NAMES: [&str; 3] = ["a", "b", "c"];

    #[derive(Debug, Clone)]
    enum Op {
        Acquire {
            name: usize,
            owner: u32,
            shared: bool,
            auto: bool,
        },
        Release {
            name: usize,
            owner: u32,
        },
        ReleaseOwner(u32),
        Create(usize),
        Delete(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize, 1..4u32, any::<bool>(), any::<bool>()).prop_map(
                |(name, owner, shared, auto)| Op::Acquire { name, owner, shared, auto }
            ),
            3 => (0..3usize, 1..4u32).prop_map(|(name, owner)| Op::Release { name, owner }),
            1 => (1..4u32).prop_map(Op::ReleaseOwner),
            1 => (0..3usize).prop_map(Op::Create),
            1 => (0..3usize).prop_map(Op::Delete),
        ]
    }

    #[derive(Debug, Clone)]
    struct MRes {
        shared: bool,
        auto: bool,
        owners: Vec<u32>,
    }

    #[derive(Debug, Default)]
    struct Model {
        res: HashMap<usize, MRes>,
        files: HashSet<usize>,
    }

    impl Model {
        fn drop_res(&mut self, n: usize) {
            if let Some(r) = self.res.remove(&n) {
                if r.auto {
                    self.files.remove(&n);
                }
            }
        }

        /// Expected result; `Err(())` stands for "the exact error below".
        fn apply(&mut self, op: &Op, dir: &Path) -> Result<bool, RpcError> {
            let path = |n: usize| format!("{}/{}", dir.display(), NAMES[n]);
            match *op {
                Op::Acquire {
                    name,
                    owner,
                    shared,
                    auto,
                } => {
                    if let Some(r) = self.res.get_mut(&name) {
                        if r.shared && shared {
                            r.owners.push(owner);
                            return Ok(true);
                        }
                        return Err(busy(NAMES[name]));
                    }
                    if !auto && !self.files.contains(&name) {
                        return Err(RpcError::system(
                            domain::LOCKSPACE,
                            libc::ENOENT,
                            format!("Unable to open resource {}", path(name)),
                        ));
                    }
                    self.files.insert(name);
                    self.res.insert(
                        name,
                        MRes {
                            shared,
                            auto,
                            owners: vec![owner],
                        },
                    );
                    Ok(true)
                }
                Op::Release { name, owner } => {
                    let r = self
                        .res
                        .get_mut(&name)
                        .ok_or_else(|| not_locked(NAMES[name]))?;
                    let i = r
                        .owners
                        .iter()
                        .position(|&o| o == owner)
                        .ok_or_else(|| not_owner(owner))?;
                    r.owners.remove(i);
                    if r.owners.is_empty() {
                        self.drop_res(name);
                    }
                    Ok(true)
                }
                Op::ReleaseOwner(owner) => {
                    let mut any = false;
                    for n in 0..NAMES.len() {
                        let Some(r) = self.res.get_mut(&n) else {
                            continue;
                        };
                        if let Some(i) = r.owners.iter().position(|&o| o == owner) {
                            any = true;
                            r.owners.remove(i);
                            if r.owners.is_empty() {
                                self.drop_res(n);
                            }
                        }
                    }
                    Ok(any)
                }
                Op::Create(n) => {
                    if self.res.contains_key(&n) {
                        return Err(busy(NAMES[n]));
                    }
                    self.files.insert(n);
                    Ok(true)
                }
                Op::Delete(n) => {
                    if self.res.contains_key(&n) {
                        return Err(busy(NAMES[n]));
                    }
                    self.files.remove(&n);
                    Ok(true)
                }
            }
        }
    }

    fn run(ls: &mut Ls, op: &Op) -> Result<bool, RpcError> {
        match *op {
            Op::Acquire {
                name,
                owner,
                shared,
                auto,
            } => {
                let flags = if shared { ACQUIRE_SHARED } else { 0 }
                    | if auto { ACQUIRE_AUTOCREATE } else { 0 };
                ls.acquire(NAMES[name], owner, flags).map(|()| true)
            }
            Op::Release { name, owner } => ls.release(NAMES[name], owner).map(|()| true),
            Op::ReleaseOwner(owner) => Ok(ls.release_owner(owner)),
            Op::Create(n) => ls.create_resource(NAMES[n]).map(|()| true),
            Op::Delete(n) => ls.delete_resource(NAMES[n]).map(|()| true),
        }
    }

    fn check_invariants(ls: &LockSpace, model: &Model, dir: &Path) {
        assert_eq!(ls.resource_count(), model.res.len());
        assert_eq!(
            fds_into(dir),
            ls.resource_count(),
            "fd held iff resource present"
        );
        for (n, name) in NAMES.iter().enumerate() {
            let path = dir.join(name);
            assert_eq!(path.exists(), model.files.contains(&n), "file {name}");
            match (ls.get(name), model.res.get(&n)) {
                (None, None) => {}
                (Some(r), Some(m)) => {
                    assert!(!r.owners().is_empty());
                    assert!(r.lock_held());
                    assert_eq!(r.is_shared(), m.shared);
                    assert_eq!(r.is_autocreate(), m.auto);
                    assert_eq!(r.owners(), &m.owners[..]);
                    if !r.is_shared() {
                        assert_eq!(r.owners().len(), 1, "never two exclusive holders");
                    }
                    assert_eq!(r.path(), path);
                }
                (r, m) => panic!("{name}: real {r:?} vs model {m:?}"),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn state_machine_matches_model(ops in prop::collection::vec(op(), 1..40)) {
            let (_t, d) = testdir();
            let mut ls = Ls::dir(&d);
            let mut model = Model::default();
            for op in &ops {
                let want = model.apply(op, &d);
                let got = run(&mut ls, op);
                prop_assert_eq!(got, want, "op {:?}", op);
                check_invariants(&ls, &model, &d);
            }
            // What other processes see agrees with the table.
            for (n, name) in NAMES.iter().enumerate() {
                let path = d.join(name);
                let want = match model.res.get(&n) {
                    Some(m) if m.shared => Probe::Read,
                    Some(_) => Probe::Write,
                    None if model.files.contains(&n) => Probe::Unlocked,
                    None => continue,
                };
                prop_assert_eq!(probe(&path), want, "{}", name);
            }
            drop(ls);
            // Dropping the lockspace releases everything (AUTOCREATE files unlinked).
            prop_assert_eq!(fds_into(&d), 0);
            for (n, name) in NAMES.iter().enumerate() {
                if model.res.get(&n).is_some_and(|m| m.auto) {
                    prop_assert!(!d.join(name).exists());
                }
            }
        }
    }
}
