//! A private mount namespace for one daemon, set up in the child between fork and exec:
//! no shell and no `unshare(1)`, so no command line is ever built by pasting paths.
//!
//! The child unshares its mount namespace, makes every mount in it private (nothing
//! mounted here reaches the host), mounts a fresh tmpfs on `/run` and on each directory
//! asked for, creates the directories asked for, and execs the daemon itself: the
//! child's pid *is* the daemon's pid, and the test reaches the daemon's world through
//! `/proc/<pid>/root`.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How to start a daemon in its own mount namespace.
#[derive(Debug, Clone)]
pub struct Launch {
    bin: PathBuf,
    tmpfs: Vec<PathBuf>,
    mkdirs: Vec<PathBuf>,
}

impl Launch {
    /// `bin` with a fresh tmpfs on `/run`.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Launch {
            bin: bin.into(),
            tmpfs: vec![PathBuf::from("/run")],
            mkdirs: Vec::new(),
        }
    }

    /// Also a fresh tmpfs on `dir` (which must exist on the host: an empty mount point
    /// is harmless).
    pub fn tmpfs(mut self, dir: impl AsRef<Path>) -> Self {
        self.tmpfs.push(dir.as_ref().to_path_buf());
        self
    }

    /// Creates `dir` inside the namespace once the tmpfs mounts are in place (its
    /// parent must exist there).
    pub fn mkdir(mut self, dir: impl AsRef<Path>) -> Self {
        self.mkdirs.push(dir.as_ref().to_path_buf());
        self
    }

    /// The command: the binary, with the namespace set up before it runs. The caller
    /// adds arguments, environment and stdio.
    ///
    /// # Panics
    /// On a path with a NUL byte (none of ours has one).
    pub fn command(&self) -> Command {
        let c = |p: &PathBuf| {
            CString::new(p.as_os_str().as_bytes())
                .unwrap_or_else(|_| panic!("path with a NUL byte: {}", p.display()))
        };
        // Built before the fork: the child only makes system calls.
        let mounts: Vec<CString> = self.tmpfs.iter().map(c).collect();
        let dirs: Vec<CString> = self.mkdirs.iter().map(c).collect();
        let mut cmd = Command::new(&self.bin);
        // SAFETY: the hook runs in the forked child before exec and only calls
        // unshare(2), mount(2) and mkdir(2) on C strings built before the fork; it
        // allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || enter_namespace(&mounts, &dirs));
        }
        cmd
    }
}

/// The child's side of [`Launch::command`].
fn enter_namespace(mounts: &[CString], dirs: &[CString]) -> io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on NUL-terminated strings that outlive them.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        for m in mounts {
            check(libc::mount(
                c"tmpfs".as_ptr(),
                m.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            ))?;
        }
        for d in dirs {
            if libc::mkdir(d.as_ptr(), 0o755) != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
