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
//! Within this process, exclusion is decided by the in-memory table (POSIX locks never conflict
//! inside one process); across processes and hosts it is decided by the kernel / NFS lock
//! manager. Shared resources are reference-counted by an owner-PID list (duplicates allowed).
//!
//! # The POSIX close pitfall
//!
//! Closing **any** file descriptor that refers to a locked file drops **all** of this process's
//! POSIX locks on that file, not only locks taken through that descriptor. Therefore this module
//! never opens and closes a file that might be a held resource:
//!
//! * `create_resource` on a held name is refused before the file is touched;
//! * the AUTOCREATE re-check after locking uses `stat(path)` by path, never a second `open`;
//! * before opening a file for acquire/create, its identity (device, inode) is checked by
//!   `stat` against every held resource; a file that is already held under *another* name
//!   (an alias: `/a//b` vs `/a/b`, a symlink, a hard link, or the same file reached through
//!   two lockspaces when using the [`LockSpaces`] entry points) is reported as locked instead
//!   of being opened a second time (libvirt 9.0 would open it twice, and the release of either
//!   name would silently drop the lock of the other).
//! * If that identity check is lost to a race (the file is renamed in between), the extra fd is
//!   deliberately leaked (kept open, inheritable across re-exec) rather than closed.
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
//! * The AUTOCREATE open/lock/re-check loop gives up after [`AUTOCREATE_MAX_ATTEMPTS`] lost
//!   races (9.0 loops forever, which would stall the single-threaded daemon).
//! * When the last owner of an AUTOCREATE resource releases it, the lock file is unlinked only
//!   if `path` still names the file we hold locked (9.0 unlinks whatever is there).

use crate::lease_lock::{self, LockKind};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use vh_common::error::{code, domain, errno_of, RpcError};

/// `VIR_LOCK_SPACE_ACQUIRE_SHARED`: take a read lock; compatible with other shared holders.
pub const ACQUIRE_SHARED: u32 = 1;
/// `VIR_LOCK_SPACE_ACQUIRE_AUTOCREATE`: create the file if needed; unlink it on last release.
pub const ACQUIRE_AUTOCREATE: u32 = 2;
/// All flags `acquire` accepts.
pub const ACQUIRE_FLAGS_MASK: u32 = ACQUIRE_SHARED | ACQUIRE_AUTOCREATE;

/// How many times the AUTOCREATE open/lock/re-check loop retries after losing a race with a
/// concurrent unlink/recreate before giving up (libvirt 9.0 retries forever).
pub const AUTOCREATE_MAX_ATTEMPTS: usize = 100;

/// Identity of a file: (device, inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileId {
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

    fn of_path(path: &Path) -> Option<FileId> {
        fs::metadata(path).ok().map(|md| FileId::of(&md))
    }
}

/// One held resource: an open fd carrying the byte-0 lock, plus its owners.
#[derive(Debug)]
pub struct Resource {
    name: String,
    path: PathBuf,
    fd: OwnedFd,
    lock_held: bool,
    flags: u32,
    owners: Vec<u32>,
    file_id: Option<FileId>,
    kind: LockKind,
}

impl Resource {
    /// The resource name (the key in its lockspace).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file actually opened and locked.
    pub fn path(&self) -> &Path {
        &self.path
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
        self.flags
    }

    pub fn is_shared(&self) -> bool {
        self.flags & ACQUIRE_SHARED != 0
    }

    pub fn is_autocreate(&self) -> bool {
        self.flags & ACQUIRE_AUTOCREATE != 0
    }

    /// Owner PIDs in acquisition order; duplicates possible for shared resources.
    pub fn owners(&self) -> &[u32] {
        &self.owners
    }

    /// The kind of lock held: OFD, or POSIX for an exclusive lease inherited from C.
    pub fn lock_kind(&self) -> LockKind {
        self.kind
    }

    /// Clear (`inherit = true`) or set close-on-exec on the lock fd, for SIGUSR1 re-exec.
    pub fn set_inheritable(&self, inherit: bool) -> Result<(), RpcError> {
        set_cloexec(self.fd.as_raw_fd(), !inherit).map_err(|e| {
            let what = if inherit {
                "Cannot disable close-on-exec flag"
            } else {
                "Cannot enable close-on-exec flag"
            };
            RpcError::system(domain::LOCKSPACE, e as i32, what)
        })
    }
}

impl Drop for Resource {
    /// Dropping a resource releases it: for a held AUTOCREATE resource the lock file is
    /// unlinked *before* the fd is closed (a shared one only if the lock can first be
    /// upgraded to exclusive, i.e. nobody else still shares it); closing the fd drops the lock.
    fn drop(&mut self) {
        self.unlink_if_last();
        // Unlock before the close: a duplicate of the fd (systemd's fd store) would keep
        // an OFD lock alive.
        if self.lock_held {
            let _ = lease_lock::unlock(self.fd.as_raw_fd(), self.kind);
        }
    }
}

impl Resource {
    fn unlink_if_last(&mut self) {
        if !(self.lock_held && self.is_autocreate()) {
            return;
        }
        if self.is_shared() {
            if let Err(e) = lease_lock::relock(self.fd.as_raw_fd(), false, self.kind) {
                tracing::debug!(
                    path = %self.path.display(),
                    "could not upgrade shared lease to exclusive ({e}), not deleting"
                );
                return;
            }
        }
        if let Some(id) = self.file_id {
            if FileId::of_path(&self.path) != Some(id) {
                tracing::debug!(
                    path = %self.path.display(),
                    "resource path no longer names the locked file, not deleting"
                );
                return;
            }
        }
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("Failed to unlink resource {}: {}", self.path.display(), e);
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

/// Keep an fd open forever (never close it): used when an fd for an already-held file was
/// opened by accident, because closing it would drop the held lock. It is made inheritable
/// so that a re-exec does not close it either.
fn leak_fd(file: File, path: &Path) {
    let raw = file.into_raw_fd();
    let _ = set_cloexec(raw, false);
    tracing::warn!(
        path = %path.display(),
        fd = raw,
        "opened an fd on an already-held file (lost a rename race); keeping it open so the lock survives"
    );
}

/// One lockspace: the default one (no directory) or a directory lockspace.
#[derive(Debug, Default)]
pub struct LockSpace {
    directory: Option<PathBuf>,
    resources: HashMap<String, Resource>,
}

impl LockSpace {
    /// The default lockspace: resource names are file paths.
    pub fn default_lockspace() -> LockSpace {
        LockSpace::default()
    }

    /// A directory lockspace: `mkdir -p` with mode 0700 (subject to umask) if `dir` does not
    /// exist; an existing directory is used as is; anything else is an error.
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
            resources: HashMap::new(),
        })
    }

    /// An empty directory lockspace for re-exec restore: the directory is not touched.
    pub fn restored(directory: Option<PathBuf>) -> LockSpace {
        LockSpace {
            directory,
            resources: HashMap::new(),
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
                let mut s = OsString::from(dir.as_os_str());
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

    fn holds_file(&self, id: FileId) -> bool {
        self.resources.values().any(|r| r.file_id == Some(id))
    }

    fn file_ids(&self) -> impl Iterator<Item = FileId> + '_ {
        self.resources.values().filter_map(|r| r.file_id)
    }

    /// Acquire `name` for `owner` (§2.3, §2.4). Never waits: a conflict is RESOURCE_BUSY.
    pub fn acquire(&mut self, name: &str, owner: u32, flags: u32) -> Result<(), RpcError> {
        self.acquire_checked(name, owner, flags, &|_| false)
    }

    fn acquire_checked(
        &mut self,
        name: &str,
        owner: u32,
        flags: u32,
        held_elsewhere: &dyn Fn(FileId) -> bool,
    ) -> Result<(), RpcError> {
        let unknown = flags & !ACQUIRE_FLAGS_MASK;
        if unknown != 0 {
            return Err(RpcError::unsupported_flags(
                domain::LOCKSPACE,
                "virLockSpaceAcquireResource",
                u64::from(unknown),
            ));
        }
        let shared = flags & ACQUIRE_SHARED != 0;

        if let Some(res) = self.resources.get_mut(name) {
            if res.is_shared() && shared {
                res.owners.push(owner);
                return Ok(());
            }
            return Err(busy(name));
        }

        self.check_name(name)?;
        let path = self.resource_path(name);
        let is_held = |id: FileId| self.holds_file(id) || held_elsewhere(id);

        // The usual AUTOCREATE case, a lease file that does not exist yet: creating it
        // exclusively proves it is no file we hold (those stay open, so their inodes
        // live on), which saves the alias check's stat.
        let created = if flags & ACQUIRE_AUTOCREATE != 0 {
            create_new_and_lock(name, &path, shared)?
        } else {
            None
        };
        let (fd, file_id) = match created {
            Some(locked) => locked,
            None => {
                // Never open a file we already hold under another name (module docs).
                if FileId::of_path(&path).is_some_and(is_held) {
                    return Err(busy(name));
                }
                if flags & ACQUIRE_AUTOCREATE != 0 {
                    open_create_and_lock(name, &path, shared, &is_held)?
                } else {
                    open_and_lock(name, &path, shared, &is_held)?
                }
            }
        };

        tracing::debug!(name, path = %path.display(), owner, flags, "acquired resource");
        self.resources.insert(
            name.to_string(),
            Resource {
                name: name.to_string(),
                path,
                fd,
                lock_held: true,
                flags,
                owners: vec![owner],
                file_id: Some(file_id),
                kind: LockKind::Ofd,
            },
        );
        Ok(())
    }

    /// Release one ownership of `name` by `owner` (§2.6); the last release drops the resource
    /// (unlinking an AUTOCREATE lock file, then closing the fd).
    pub fn release(&mut self, name: &str, owner: u32) -> Result<(), RpcError> {
        let res = self
            .resources
            .get_mut(name)
            .ok_or_else(|| not_locked(name))?;
        let idx = res
            .owners
            .iter()
            .position(|&o| o == owner)
            .ok_or_else(|| not_owner(owner))?;
        res.owners.remove(idx);
        if res.owners.is_empty() {
            tracing::debug!(name, owner, "last owner released resource");
            self.resources.remove(name);
        }
        Ok(())
    }

    /// Remove one occurrence of `owner` from every resource, dropping resources left without
    /// owners (same rules as [`release`](Self::release)). Returns whether `owner` held anything.
    pub fn release_owner(&mut self, owner: u32) -> bool {
        let mut any = false;
        self.resources
            .retain(|_, res| match res.owners.iter().position(|&o| o == owner) {
                Some(idx) => {
                    any = true;
                    res.owners.remove(idx);
                    !res.owners.is_empty()
                }
                None => true,
            });
        any
    }

    /// The file of a resource that create/delete may touch: not held under this name,
    /// a valid name, and not a file held under another name (touching that one and
    /// closing it would drop its lock).
    fn unheld_resource_path(
        &self,
        name: &str,
        held_elsewhere: &dyn Fn(FileId) -> bool,
    ) -> Result<PathBuf, RpcError> {
        if self.resources.contains_key(name) {
            return Err(busy(name));
        }
        self.check_name(name)?;
        let path = self.resource_path(name);
        if FileId::of_path(&path).is_some_and(|id| self.holds_file(id) || held_elsewhere(id)) {
            return Err(busy(name));
        }
        Ok(path)
    }

    /// Create the resource file (touch: `O_WRONLY|O_CREAT`, 0600; an existing file is left
    /// alone). Refused while the resource is held.
    pub fn create_resource(&mut self, name: &str) -> Result<(), RpcError> {
        self.create_resource_checked(name, &|_| false)
    }

    fn create_resource_checked(
        &mut self,
        name: &str,
        held_elsewhere: &dyn Fn(FileId) -> bool,
    ) -> Result<(), RpcError> {
        let path = self.unheld_resource_path(name, held_elsewhere)?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                RpcError::system(
                    domain::LOCKSPACE,
                    errno_of(&e),
                    format_args!("cannot create file '{}'", path.display()),
                )
            })?;
        // Lost a rename race onto a held file: closing would drop that lock.
        match file.metadata() {
            Ok(md) if self.holds_file(FileId::of(&md)) || held_elsewhere(FileId::of(&md)) => {
                leak_fd(file, &path);
            }
            _ => drop(file),
        }
        Ok(())
    }

    /// Delete the resource file (`unlink`, ENOENT ignored). Refused while the resource is held.
    /// In the default lockspace this deletes the named path itself.
    pub fn delete_resource(&mut self, name: &str) -> Result<(), RpcError> {
        self.delete_resource_checked(name, &|_| false)
    }

    fn delete_resource_checked(
        &mut self,
        name: &str,
        held_elsewhere: &dyn Fn(FileId) -> bool,
    ) -> Result<(), RpcError> {
        let path = self.unheld_resource_path(name, held_elsewhere)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RpcError::system(
                domain::LOCKSPACE,
                errno_of(&e),
                format_args!("Unable to delete lockspace resource {}", path.display()),
            )),
        }
    }

    /// Adopt a resource inherited across SIGUSR1 re-exec or a crash restart: `fd` still carries
    /// the lock (OFD locks belong to the open file, POSIX ones to the pid, which a re-exec keeps;
    /// see [`lease_lock::adopt`]). Sets close-on-exec again. On error the fd is closed.
    pub fn restore_resource(
        &mut self,
        name: String,
        path: PathBuf,
        fd: OwnedFd,
        lock_held: bool,
        flags: u32,
        owners: Vec<u32>,
    ) -> Result<(), RpcError> {
        if self.resources.contains_key(&name) {
            // Checked before a Resource exists, so nothing is unlinked.
            return Err(RpcError::internal(
                domain::LOCKSPACE,
                format!("Duplicate resource '{}' in JSON document", shown(&name)),
            ));
        }
        set_cloexec(fd.as_raw_fd(), true).map_err(|e| {
            RpcError::system(
                domain::LOCKSPACE,
                e as i32,
                "Cannot enable close-on-exec flag",
            )
        })?;
        let file_id = nix::sys::stat::fstat(fd.as_raw_fd()).ok().map(|st| FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        });
        if owners.is_empty() {
            tracing::warn!(name, "restored resource has no owners");
        }
        let kind = if lock_held {
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
        self.resources.insert(
            name.clone(),
            Resource {
                name,
                path,
                fd,
                lock_held,
                flags,
                owners,
                file_id,
                kind,
            },
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

/// §2.3 without AUTOCREATE: the file must exist.
fn open_and_lock(
    name: &str,
    path: &Path,
    shared: bool,
    is_held: &dyn Fn(FileId) -> bool,
) -> Result<(OwnedFd, FileId), RpcError> {
    // std opens with O_CLOEXEC.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            RpcError::system(
                domain::LOCKSPACE,
                errno_of(&e),
                format_args!("Unable to open resource {}", path.display()),
            )
        })?;
    let id = FileId::of(&file.metadata().map_err(|e| fstat_error(path, &e))?);
    if is_held(id) {
        leak_fd(file, path);
        return Err(busy(name));
    }
    set_lock(file.as_raw_fd(), shared).map_err(|e| lock_error(name, path, e))?;
    Ok((file.into(), id))
}

/// AUTOCREATE's fast path: create the file exclusively (O_EXCL), lock it, and check the
/// path still names it. `None` when the file already exists, or vanished or was replaced
/// before the check: the general path below then deals with it.
fn create_new_and_lock(
    name: &str,
    path: &Path,
    shared: bool,
) -> Result<Option<(OwnedFd, FileId)>, RpcError> {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(create_error(path, errno_of(&e))),
    };
    let id = FileId::of(&file.metadata().map_err(|e| fstat_error(path, &e))?);
    set_lock(file.as_raw_fd(), shared).map_err(|e| lock_error(name, path, e))?;
    if FileId::of_path(path) == Some(id) {
        return Ok(Some((file.into(), id)));
    }
    // Unlinked or replaced between create and lock; `file` is ours alone, closing it
    // drops nothing anyone holds.
    Ok(None)
}

/// §2.3 with AUTOCREATE: open/create, lock, then make sure the path still names the file we
/// locked (someone may have unlinked or replaced it meanwhile); retry otherwise.
fn open_create_and_lock(
    name: &str,
    path: &Path,
    shared: bool,
    is_held: &dyn Fn(FileId) -> bool,
) -> Result<(OwnedFd, FileId), RpcError> {
    for _ in 0..AUTOCREATE_MAX_ATTEMPTS {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| create_error(path, errno_of(&e)))?;
        let id = FileId::of(&file.metadata().map_err(|e| fstat_error(path, &e))?);
        if is_held(id) {
            leak_fd(file, path);
            return Err(busy(name));
        }
        set_lock(file.as_raw_fd(), shared).map_err(|e| lock_error(name, path, e))?;
        match FileId::of_path(path) {
            Some(now) if now == id => return Ok((file.into(), id)),
            Some(_) => tracing::debug!(path = %path.display(), "resource was recreated, retrying"),
            None => tracing::debug!(path = %path.display(), "resource disappeared, retrying"),
        }
        // `file` is closed here; it is not a held resource (checked above).
    }
    Err(create_error(path, libc::EAGAIN))
}

/// 9.0's error for an AUTOCREATE open that failed.
fn create_error(path: &Path, errno: i32) -> RpcError {
    RpcError::system(
        domain::LOCKSPACE,
        errno,
        format_args!("Unable to open/create resource {}", path.display()),
    )
}

/// The daemon's lockspaces: the default one (key `""`) and directory lockspaces keyed by the
/// exact path string given to NEW / CREATE_LOCKSPACE (no canonicalisation).
#[derive(Debug, Default)]
pub struct LockSpaces {
    default: LockSpace,
    dirs: HashMap<String, LockSpace>,
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

    pub fn get_mut(&mut self, key: &str) -> Option<&mut LockSpace> {
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

    pub fn default_lockspace_mut(&mut self) -> &mut LockSpace {
        &mut self.default
    }

    /// CREATE_LOCKSPACE semantics: an existing key (including `""`) is success, as in 9.0;
    /// otherwise create the directory lockspace and register it under `key`.
    pub fn create(&mut self, key: &str) -> Result<(), RpcError> {
        if self.contains(key) {
            tracing::debug!(key, "lockspace already exists");
            return Ok(());
        }
        let ls = LockSpace::create_directory(key)?;
        self.dirs.insert(key.to_string(), ls);
        Ok(())
    }

    /// Install a lockspace rebuilt from re-exec state under `key` (`""` replaces the default).
    pub fn insert(&mut self, key: String, ls: LockSpace) {
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

    /// §2.7 step 1: drop one ownership by `owner` from every resource of every lockspace.
    /// Returns whether `owner` held anything.
    pub fn release_owner(&mut self, owner: u32) -> bool {
        let mut any = self.default.release_owner(owner);
        for ls in self.dirs.values_mut() {
            any |= ls.release_owner(owner);
        }
        any
    }

    /// Identities of the files held by every lockspace except `key`.
    fn held_elsewhere(&self, key: &str) -> HashSet<FileId> {
        self.iter()
            .filter(|(k, _)| *k != key)
            .flat_map(|(_, ls)| ls.file_ids())
            .collect()
    }

    /// [`LockSpace::acquire`] in lockspace `key`, additionally refusing (as busy) a file that
    /// another lockspace already holds. Missing key → "Lockspace for path %s does not exist".
    pub fn acquire(
        &mut self,
        key: &str,
        name: &str,
        owner: u32,
        flags: u32,
    ) -> Result<(), RpcError> {
        let others = self.held_elsewhere(key);
        let ls = self.get_mut(key).ok_or_else(|| lockspace_not_found(key))?;
        ls.acquire_checked(name, owner, flags, &|id| others.contains(&id))
    }

    /// [`LockSpace::release`] in lockspace `key`.
    pub fn release(&mut self, key: &str, name: &str, owner: u32) -> Result<(), RpcError> {
        let ls = self.get_mut(key).ok_or_else(|| lockspace_not_found(key))?;
        ls.release(name, owner)
    }

    /// [`LockSpace::create_resource`] in lockspace `key`, with the cross-lockspace check.
    pub fn create_resource(&mut self, key: &str, name: &str) -> Result<(), RpcError> {
        let others = self.held_elsewhere(key);
        let ls = self.get_mut(key).ok_or_else(|| lockspace_not_found(key))?;
        ls.create_resource_checked(name, &|id| others.contains(&id))
    }

    /// [`LockSpace::delete_resource`] in lockspace `key`, with the cross-lockspace check.
    pub fn delete_resource(&mut self, key: &str, name: &str) -> Result<(), RpcError> {
        let others = self.held_elsewhere(key);
        let ls = self.get_mut(key).ok_or_else(|| lockspace_not_found(key))?;
        ls.delete_resource_checked(name, &|id| others.contains(&id))
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

    /// virlockspacetest uses the test's euid as "PID"; any constant will do.
    const OWNER: u32 = 1000;

    fn testdir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("virlockspacedata");
        (tmp, d)
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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
        let mut ls = LockSpace::default_lockspace();
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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

        let mut dl = LockSpace::default_lockspace();
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
        let mut ls = LockSpace::default_lockspace();
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
        let f = d.join("foo");
        ls.acquire("foo", 1, ACQUIRE_AUTOCREATE).unwrap();
        fs::remove_file(&f).unwrap();
        fs::write(&f, b"someone else's").unwrap();
        ls.release("foo", 1).unwrap();
        assert!(f.exists());
    }

    // ---- names and aliases ----

    #[test]
    fn names_escaping_the_directory_are_refused() {
        let (t, d) = testdir();
        let mut ls = LockSpace::create_directory(&d).unwrap();
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

        let mut dl = LockSpace::default_lockspace();
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
        let mut dl = LockSpace::default_lockspace();
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
        let mut all = LockSpaces::new();
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

    // ---- LockSpaces, owners, restore ----

    #[test]
    fn lockspaces_lookup_and_create() {
        let (_t, d) = testdir();
        let key = d.to_str().unwrap().to_string();
        let mut all = LockSpaces::new();
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
        let mut all = LockSpaces::new();
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

    #[test]
    fn restore_adopts_an_inherited_locked_fd() {
        let (_t, d) = testdir();
        let mut ls = LockSpace::create_directory(&d).unwrap();
        let f = d.join("foo");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&f)
            .unwrap();
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
        )
        .unwrap();
        let flags = fcntl(raw, FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec set again");
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
                vec![1]
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
        let mut ls = LockSpace::create_directory(&d).unwrap();
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

    fn run(ls: &mut LockSpace, op: &Op) -> Result<bool, RpcError> {
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
            let mut ls = LockSpace::create_directory(&d).unwrap();
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
