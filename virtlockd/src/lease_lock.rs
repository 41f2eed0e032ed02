//! The lease lock itself: an open-file-description lock (`F_OFD_SETLK`) on byte 0,
//! length 1 (`SEEK_SET`), `F_RDLCK` for shared leases and `F_WRLCK` otherwise.
//!
//! # Why OFD locks
//!
//! A POSIX `fcntl` lock belongs to the process: it vanishes when the process dies, even
//! if systemd's fd store still holds a duplicate of the fd, so a crash of virtlockd
//! would free every lease of every running guest. An OFD lock belongs to the open file
//! description: it lives as long as any duplicate of the fd (ours, one in the fd store,
//! one inherited across exec), and dies with the last close or an explicit unlock.
//!
//! What the tests below prove on this kernel (fcntl(2) says the same):
//! * OFD and POSIX locks on byte 0 exclude each other both ways, between processes
//!   (our daemon against libvirt's C daemon, or a C daemon on another host over a
//!   shared filesystem whose lock manager sees both as byte-range locks) and even in
//!   one process on one fd: a process's own POSIX `F_WRLCK` blocks its own OFD
//!   `F_WRLCK` (`EAGAIN`) and vice versa; own shared locks of both kinds coexist.
//! * An OFD lock outlives the process that took it while a duplicate of its fd lives,
//!   and is gone once the last duplicate is closed.
//! * Closing *another* fd of the same file does not drop an OFD lock (the POSIX close
//!   pitfall is gone); two opens of one file now conflict with each other instead, so
//!   the lockspace's alias check (one open per file) is still what keeps an alias from
//!   being refused by our own lock, and for shared leases, from giving one file two fds.
//!
//! # Inherited locks (a re-exec from libvirt's C daemon)
//!
//! The C daemon hands over fds carrying POSIX locks held by the same pid. [`adopt`]
//! converts without an instant in which the lease is unlocked or weaker:
//! * shared: take the OFD `F_RDLCK` first (it coexists with our own POSIX `F_RDLCK`),
//!   then drop the POSIX one;
//! * exclusive: the OFD `F_WRLCK` conflicts with our own POSIX `F_WRLCK`, and the only
//!   way through (downgrade to POSIX read, OFD read, drop POSIX, upgrade OFD) leaves the
//!   lease shareable for an instant, so it is left POSIX: it survives our re-execs (same
//!   pid) but not a crash, until its owner releases it. Such leases are reported by kind.
//!
//! # Re-exec back into the C daemon
//!
//! C releases a lease by closing its fd. With OFD locks that releases only if no other
//! duplicate exists: the fd-store copies are removed before the exec (see
//! `vh_common::fdstore`), and a lease is always unlocked explicitly before its fd is
//! closed on our side.

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use std::os::fd::RawFd;

/// Which kind of lock a held lease carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// An open-file-description lock: survives our death while the fd store holds it.
    Ofd,
    /// A process-associated POSIX lock inherited from libvirt's C daemon (exclusive
    /// leases only; see the module docs).
    Posix,
}

/// The lease's lock range, byte 0 of length 1, as a lock of `l_type` (`F_RDLCK`,
/// `F_WRLCK`, `F_UNLCK`): also what a probe from another process asks for.
pub fn byte0(l_type: i32) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        // Must be 0 for OFD requests.
        l_pid: 0,
    }
}

fn kind_type(shared: bool) -> i32 {
    if shared {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    }
}

/// Takes (or converts between shared and exclusive) the lease's OFD lock, never waiting.
pub fn lock(fd: RawFd, shared: bool) -> Result<(), Errno> {
    fcntl(fd, FcntlArg::F_OFD_SETLK(&byte0(kind_type(shared)))).map(drop)
}

/// Converts a held lock of `kind` (an AUTOCREATE release's upgrade to exclusive).
pub fn relock(fd: RawFd, shared: bool, kind: LockKind) -> Result<(), Errno> {
    match kind {
        LockKind::Ofd => lock(fd, shared),
        LockKind::Posix => fcntl(fd, FcntlArg::F_SETLK(&byte0(kind_type(shared)))).map(drop),
    }
}

/// Unlocks explicitly: an OFD lock would otherwise live on in any duplicate of the fd.
pub fn unlock(fd: RawFd, kind: LockKind) -> Result<(), Errno> {
    let un = byte0(libc::F_UNLCK);
    match kind {
        LockKind::Ofd => fcntl(fd, FcntlArg::F_OFD_SETLK(&un)).map(drop),
        LockKind::Posix => fcntl(fd, FcntlArg::F_SETLK(&un)).map(drop),
    }
}

/// Adopts the lock an inherited fd carries (our own re-exec or crash restart: OFD,
/// kept as is; libvirt's C daemon: POSIX, converted where that has no window).
/// `Err(EAGAIN)` when another process holds a conflicting lock: the lease was lost
/// while nobody held it (a POSIX lease across our crash).
pub fn adopt(fd: RawFd, shared: bool) -> Result<LockKind, Errno> {
    match lock(fd, shared) {
        Ok(()) => {
            // Ours as OFD now (idempotent if it was OFD already). Drop an inherited
            // POSIX lock, if any: a shared one coexisted with the OFD lock just taken,
            // so the lease was never unheld. Unlocking a POSIX lock we don't hold is a
            // no-op.
            fcntl(fd, FcntlArg::F_SETLK(&byte0(libc::F_UNLCK)))?;
            Ok(LockKind::Ofd)
        }
        Err(Errno::EAGAIN | Errno::EACCES) => {
            // Either our own POSIX lock (an exclusive lease from the C daemon) or
            // someone else's. Re-asserting it as POSIX tells them apart: a no-op on our
            // own lock, refused if another owner holds a conflicting one (and if that one
            // went away meanwhile, the lease is simply ours now, as POSIX). Asking with
            // F_OFD_GETLK instead would not do: a FUSE file system (GlusterFS) reports
            // every holder of an OFD query with pid -1, ours included (tests/ofd-gluster).
            match fcntl(fd, FcntlArg::F_SETLK(&byte0(kind_type(shared)))) {
                Ok(_) => Ok(LockKind::Posix),
                Err(Errno::EAGAIN | Errno::EACCES) => Err(Errno::EAGAIN),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::path::Path;

    fn open(p: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .unwrap()
    }

    /// These tests fork children that live while a test runs; a child forked by one
    /// test holds duplicates of every other test's fds, and with them their OFD locks.
    /// So they run one at a time, and every lock is unlocked explicitly.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn posix(fd: RawFd, l_type: i32) -> Result<(), Errno> {
        fcntl(fd, FcntlArg::F_SETLK(&byte0(l_type))).map(drop)
    }

    /// Runs `f` in a forked child and returns its exit status (0..=255).
    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the test binary may have other threads; the child only makes
        // async-signal-safe calls (open, fcntl, read, write, close) and `_exit`s.
        match unsafe { libc::fork() } {
            0 => {
                let code = f();
                // SAFETY: terminates the child without running the parent's atexit.
                unsafe { libc::_exit(code) }
            }
            pid if pid > 0 => {
                let mut st = 0;
                // SAFETY: waits for our own child.
                unsafe { libc::waitpid(pid, &mut st, 0) };
                libc::WEXITSTATUS(st)
            }
            _ => panic!("fork failed"),
        }
    }

    /// Whether a fresh process with its own open could take a POSIX lock of `l_type`
    /// (what libvirt's C daemon, here or on another host, would do).
    fn c_daemon_can_lock(p: &Path, l_type: i32) -> bool {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        in_child(|| {
            // SAFETY: valid C string; plain open.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
            if fd < 0 {
                return 2;
            }
            let lk = byte0(l_type);
            // SAFETY: open fd, valid flock struct.
            (unsafe { libc::fcntl(fd, libc::F_SETLK, &lk) } != 0) as i32
        }) == 0
    }

    /// A process holding a POSIX lock (libvirt's C daemon) while the closure runs.
    fn with_c_daemon_holding<R>(p: &Path, l_type: i32, f: impl FnOnce() -> R) -> R {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
        let (go_r, go_w) = nix::unistd::pipe().unwrap();
        // SAFETY: as in `in_child`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe calls only, then _exit.
            unsafe {
                let fd = libc::open(c.as_ptr(), libc::O_RDWR);
                let lk = byte0(l_type);
                let ok: u8 = (fd >= 0 && libc::fcntl(fd, libc::F_SETLK, &lk) == 0) as u8;
                libc::write(ready_w.as_raw_fd(), (&ok as *const u8).cast(), 1);
                // Waits for a byte, not EOF: other tests' children may hold copies of
                // the write end.
                let mut b = 0u8;
                libc::read(go_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        drop(ready_w);
        drop(go_r);
        let mut ok = [0u8];
        nix::unistd::read(ready_r.as_raw_fd(), &mut ok).unwrap();
        assert_eq!(ok[0], 1, "the C daemon stand-in took its lock");
        let r = f();
        nix::unistd::write(&go_w, &[1]).unwrap();
        drop(go_w);
        let mut st = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        r
    }

    #[test]
    fn ofd_and_posix_exclude_each_other_both_ways() {
        let _serial = serial();
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("lease");
        let f = open(&p);
        // Ours (OFD) against theirs (POSIX).
        lock(f.as_raw_fd(), false).unwrap();
        assert!(!c_daemon_can_lock(&p, libc::F_WRLCK));
        assert!(!c_daemon_can_lock(&p, libc::F_RDLCK));
        lock(f.as_raw_fd(), true).unwrap();
        assert!(!c_daemon_can_lock(&p, libc::F_WRLCK));
        assert!(c_daemon_can_lock(&p, libc::F_RDLCK), "shared leases share");
        unlock(f.as_raw_fd(), LockKind::Ofd).unwrap();
        assert!(c_daemon_can_lock(&p, libc::F_WRLCK));
        // Theirs (POSIX) against ours (OFD).
        with_c_daemon_holding(&p, libc::F_WRLCK, || {
            assert_eq!(lock(f.as_raw_fd(), false), Err(Errno::EAGAIN));
            assert_eq!(lock(f.as_raw_fd(), true), Err(Errno::EAGAIN));
        });
        with_c_daemon_holding(&p, libc::F_RDLCK, || {
            assert_eq!(lock(f.as_raw_fd(), false), Err(Errno::EAGAIN));
            lock(f.as_raw_fd(), true).unwrap();
        });
        // Only byte 0: QEMU's own OFD locks at 100+ and 200+ are untouched.
        lock(f.as_raw_fd(), false).unwrap();
        let mut far = byte0(libc::F_WRLCK);
        far.l_start = 100;
        let g = open(&p);
        fcntl(g.as_raw_fd(), FcntlArg::F_OFD_SETLK(&far)).unwrap();
    }

    /// One process, one fd: its own POSIX and OFD locks conflict unless both are shared
    /// (the kernel facts `adopt` relies on).
    #[test]
    fn own_posix_and_ofd_locks_on_one_fd() {
        let _serial = serial();
        let t = tempfile::tempdir().unwrap();
        let f = open(&t.path().join("lease"));
        let fd = f.as_raw_fd();
        posix(fd, libc::F_WRLCK).unwrap();
        assert_eq!(lock(fd, false), Err(Errno::EAGAIN));
        assert_eq!(lock(fd, true), Err(Errno::EAGAIN));
        posix(fd, libc::F_UNLCK).unwrap();
        lock(fd, false).unwrap();
        assert_eq!(posix(fd, libc::F_WRLCK), Err(Errno::EAGAIN));
        assert_eq!(posix(fd, libc::F_RDLCK), Err(Errno::EAGAIN));
        unlock(fd, LockKind::Ofd).unwrap();
        posix(fd, libc::F_RDLCK).unwrap();
        lock(fd, true).unwrap();
    }

    /// The lease outlives the process that took it while a duplicate of its fd lives
    /// (systemd's store); a POSIX lock does not. The last close, or an unlock, frees it.
    #[test]
    fn an_ofd_lease_outlives_its_taker_while_a_duplicate_lives() {
        let _serial = serial();
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("lease");
        let store_copy = open(&p);
        let fd = store_copy.as_raw_fd();
        // The daemon (a child sharing the open file description) locks and dies.
        assert_eq!(in_child(|| lock(fd, false).is_err() as i32), 0);
        assert!(
            !c_daemon_can_lock(&p, libc::F_WRLCK),
            "held after its taker died"
        );
        // The same with a POSIX lock: gone with the process.
        unlock(fd, LockKind::Ofd).unwrap();
        assert_eq!(in_child(|| posix(fd, libc::F_WRLCK).is_err() as i32), 0);
        assert!(
            c_daemon_can_lock(&p, libc::F_WRLCK),
            "POSIX dies with its process"
        );
        // Closing one duplicate keeps it; closing the last frees it.
        lock(fd, false).unwrap();
        let dup: OwnedFd = store_copy.try_clone().unwrap().into();
        drop(store_copy);
        assert!(!c_daemon_can_lock(&p, libc::F_WRLCK));
        // An explicit unlock frees it even with the duplicate alive (a release whose
        // FDSTOREREMOVE is lost leaves no lock behind).
        unlock(dup.as_raw_fd(), LockKind::Ofd).unwrap();
        assert!(c_daemon_can_lock(&p, libc::F_WRLCK));
        lock(dup.as_raw_fd(), false).unwrap();
        drop(dup);
        assert!(
            c_daemon_can_lock(&p, libc::F_WRLCK),
            "the last close frees it"
        );
    }

    /// The POSIX close pitfall is gone; two opens of one file conflict instead.
    #[test]
    fn other_fds_of_the_file_neither_drop_nor_share_the_lease() {
        let _serial = serial();
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("lease");
        let f = open(&p);
        lock(f.as_raw_fd(), false).unwrap();
        let alias = open(&t.path().join(".").join("lease"));
        assert_eq!(lock(alias.as_raw_fd(), false), Err(Errno::EAGAIN));
        assert_eq!(lock(alias.as_raw_fd(), true), Err(Errno::EAGAIN));
        drop(alias);
        assert!(
            !c_daemon_can_lock(&p, libc::F_WRLCK),
            "closing an alias keeps it"
        );
        // Shared: two opens of one file could both hold it, which is why the alias
        // check stays (one file, one fd, one owner list).
        lock(f.as_raw_fd(), true).unwrap();
        let alias = open(&p);
        lock(alias.as_raw_fd(), true).unwrap();
    }

    #[test]
    fn adopt_keeps_ours_and_converts_what_it_can_without_a_window() {
        let _serial = serial();
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("lease");
        // Our own OFD lock (re-exec, crash restart): kept.
        let f = open(&p);
        lock(f.as_raw_fd(), false).unwrap();
        assert_eq!(adopt(f.as_raw_fd(), false), Ok(LockKind::Ofd));
        assert!(!c_daemon_can_lock(&p, libc::F_RDLCK));
        unlock(f.as_raw_fd(), LockKind::Ofd).unwrap();
        drop(f);
        // A C daemon's shared POSIX lease: OFD taken alongside, then POSIX dropped.
        let f = open(&p);
        posix(f.as_raw_fd(), libc::F_RDLCK).unwrap();
        assert_eq!(adopt(f.as_raw_fd(), true), Ok(LockKind::Ofd));
        assert!(!c_daemon_can_lock(&p, libc::F_WRLCK));
        // The POSIX lock is gone: our own POSIX write lock now meets only the OFD lock.
        assert_eq!(posix(f.as_raw_fd(), libc::F_WRLCK), Err(Errno::EAGAIN));
        unlock(f.as_raw_fd(), LockKind::Ofd).unwrap();
        assert!(c_daemon_can_lock(&p, libc::F_WRLCK), "nothing left behind");
        // A C daemon's exclusive POSIX lease: left POSIX, still held.
        posix(f.as_raw_fd(), libc::F_WRLCK).unwrap();
        assert_eq!(adopt(f.as_raw_fd(), false), Ok(LockKind::Posix));
        assert!(!c_daemon_can_lock(&p, libc::F_RDLCK));
        relock(f.as_raw_fd(), false, LockKind::Posix).unwrap();
        unlock(f.as_raw_fd(), LockKind::Posix).unwrap();
        // A lease someone else took while we were down: refused.
        with_c_daemon_holding(&p, libc::F_WRLCK, || {
            assert_eq!(adopt(f.as_raw_fd(), false), Err(Errno::EAGAIN));
            assert_eq!(adopt(f.as_raw_fd(), true), Err(Errno::EAGAIN));
        });
        // Unheld (lost across a crash, nobody took it): taken again as OFD.
        assert_eq!(adopt(f.as_raw_fd(), false), Ok(LockKind::Ofd));
    }
}
