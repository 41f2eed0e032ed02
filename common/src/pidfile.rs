//! The daemon's pid file, locked the way libvirt's `virPidFileAcquirePath`
//! does it: a POSIX (fcntl, per-process) write lock on byte 0, taken
//! without waiting, re-checked against the path's current inode, and the
//! pid written in decimal with no trailing newline.
//!
//! The descriptor is close-on-exec: after an exec-restart the new image
//! acquires the file again (the lock is dropped when the old descriptor is
//! closed by the exec, and nothing else can take it in between because the
//! pid stays the same and no other instance is running).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::strerror;

/// A held pid file. Dropping it closes the descriptor (which releases the
/// lock) but leaves the file; call [`PidFile::release`] on a clean exit.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: File,
}

/// Which step failed; `Display` gives libvirt's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidFileStep {
    /// open(2).
    Open,
    /// stat/fstat for the inode check.
    Stat,
    /// The fcntl lock (held by another process: EAGAIN).
    Acquire,
    /// ftruncate(2).
    Truncate,
    /// write(2).
    Write,
}

/// A pid file could not be acquired.
#[derive(Debug)]
pub struct PidFileError {
    /// The failing step.
    pub step: PidFileStep,
    /// The pid file path.
    pub path: PathBuf,
    /// The underlying OS error.
    pub source: io::Error,
}

impl fmt::Display for PidFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.step {
            PidFileStep::Open => "Failed to open pid file",
            PidFileStep::Stat => "Unable to check status of pid file",
            PidFileStep::Acquire => "Failed to acquire pid file",
            PidFileStep::Truncate => "Failed to truncate pid file",
            PidFileStep::Write => "Failed to write to pid file",
        };
        write!(
            f,
            "{what} '{}': {}",
            self.path.display(),
            strerror(&self.source)
        )
    }
}

impl std::error::Error for PidFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl PidFileError {
    /// True when another process holds the lock (the "already running" case).
    pub fn is_locked(&self) -> bool {
        self.step == PidFileStep::Acquire
            && matches!(
                self.source.raw_os_error(),
                Some(libc::EAGAIN) | Some(libc::EACCES)
            )
    }
}

/// Takes a non-blocking POSIX write lock on byte 0 (length 1).
fn lock_byte0(file: &File) -> io::Result<()> {
    // SAFETY: flock is a plain C struct; all-zero is a valid value and every
    // field we rely on is set explicitly below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 1;
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETLK(&fl))
        .map(|_| ())
        .map_err(io::Error::from)
}

impl PidFile {
    /// Acquires `path` for the current process id.
    pub fn acquire(path: &Path) -> Result<PidFile, PidFileError> {
        PidFile::acquire_for(path, std::process::id())
    }

    /// Acquires `path` and writes `pid` into it.
    pub fn acquire_for(path: &Path, pid: u32) -> Result<PidFile, PidFileError> {
        let err = |step, source| PidFileError {
            step,
            path: path.to_path_buf(),
            source,
        };
        let file = loop {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| err(PidFileStep::Open, e))?;
            let fd_meta = file.metadata().map_err(|e| err(PidFileStep::Stat, e))?;
            lock_byte0(&file).map_err(|e| err(PidFileStep::Acquire, e))?;
            // Someone may have unlinked or replaced the file between our
            // open and our lock (e.g. a previous holder releasing it): then
            // our lock protects nothing, so start over.
            match fs::metadata(path) {
                Ok(m) if m.dev() == fd_meta.dev() && m.ino() == fd_meta.ino() => break file,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err(PidFileStep::Stat, e)),
            }
        };
        file.set_len(0).map_err(|e| err(PidFileStep::Truncate, e))?;
        (&file)
            .write_all(pid.to_string().as_bytes())
            .map_err(|e| err(PidFileStep::Write, e))?;
        Ok(PidFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The pid file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The locked descriptor (kept open for the life of the daemon).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Clean exit: unlink the file, then close the descriptor (in that
    /// order, so no other instance can lock a file we are about to remove).
    pub fn release(self) -> io::Result<()> {
        let r = match fs::remove_file(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        };
        drop(self.file);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const CHILD_ENV: &str = "VH_PIDFILE_TEST_CHILD";

    /// Not a real test on its own: when run as a subprocess with
    /// `VH_PIDFILE_TEST_CHILD=<path>` it tries to acquire that pid file and
    /// reports the outcome on stdout. POSIX locks are per process, so a
    /// conflict can only be observed from a second process.
    #[test]
    fn subprocess_helper() {
        let Some(path) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        match PidFile::acquire(Path::new(&path)) {
            Ok(_pf) => println!("CHILD-RESULT: OK {}", std::process::id()),
            Err(e) => println!("CHILD-RESULT: ERR {e} locked={}", e.is_locked()),
        }
    }

    fn child_try(path: &Path) -> String {
        let exe = std::env::current_exe().unwrap();
        let out = Command::new(exe)
            .args([
                "--exact",
                "pidfile::tests::subprocess_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        stdout
            .lines()
            .find_map(|l| l.split_once("CHILD-RESULT: ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no result from child: {stdout}"))
            .to_string()
    }

    #[test]
    fn acquire_writes_pid_without_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.pid");
        fs::write(&path, "999999999\n").unwrap();
        let pf = PidFile::acquire(&path).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            std::process::id().to_string()
        );
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777 & !0o022, 0o644 & !0o022);
        let flags =
            nix::fcntl::fcntl(pf.file().as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        assert_eq!(pf.path(), path);
        pf.release().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.pid");
        let pf = PidFile::acquire(&path).unwrap();
        let r = child_try(&path);
        assert_eq!(
            r,
            format!(
                "ERR Failed to acquire pid file '{}': Resource temporarily unavailable locked=true",
                path.display()
            )
        );
        // The loser must not have touched the content.
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            std::process::id().to_string()
        );
        pf.release().unwrap();
        let r = child_try(&path);
        let child_pid = r.strip_prefix("OK ").unwrap_or_else(|| panic!("{r}"));
        assert_eq!(fs::read_to_string(&path).unwrap(), child_pid);
    }

    #[test]
    fn open_error_text() {
        let e = PidFile::acquire(Path::new("/nonexistent-dir-vh/x.pid")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Failed to open pid file '/nonexistent-dir-vh/x.pid': No such file or directory"
        );
        assert!(!e.is_locked());
    }
}
