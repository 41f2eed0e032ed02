//! A private mount namespace (and, if asked, UTS namespace) for one daemon, set up in the
//! child between fork and exec: no shell and no `unshare(1)`, so no command line is ever
//! built by pasting paths.
//!
//! The child unshares its mount namespace, makes every mount in it private (nothing
//! mounted here reaches the host), mounts a fresh tmpfs on `/run` and on each directory
//! asked for, creates the directories asked for, sets its own hostname if asked (in its
//! own UTS namespace, so the host's stays), and execs the daemon itself: the
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
    hostname: Option<String>,
}

impl Launch {
    /// `bin` with a fresh tmpfs on `/run`.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Launch {
            bin: bin.into(),
            tmpfs: vec![PathBuf::from("/run")],
            mkdirs: Vec::new(),
            hostname: None,
        }
    }

    /// Also a UTS namespace of its own, with this hostname (what a daemon names its
    /// host by, e.g. virtlockd's lease heartbeats, differs from the host's).
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = Some(name.into());
        self
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
    /// On a path or hostname with a NUL byte (none of ours has one).
    pub fn command(&self) -> Command {
        let c = |p: &PathBuf| {
            CString::new(p.as_os_str().as_bytes())
                .unwrap_or_else(|_| panic!("path with a NUL byte: {}", p.display()))
        };
        // Built before the fork: the child only makes system calls.
        let mounts: Vec<CString> = self.tmpfs.iter().map(c).collect();
        let dirs: Vec<CString> = self.mkdirs.iter().map(c).collect();
        let hostname: Option<Vec<u8>> = self.hostname.as_ref().map(|h| {
            if h.as_bytes().contains(&0) {
                panic!("hostname with a NUL byte: {h:?}");
            }
            h.as_bytes().to_vec()
        });
        let mut cmd = Command::new(&self.bin);
        // SAFETY: the hook runs in the forked child before exec and only calls
        // unshare(2), mount(2), mkdir(2) and sethostname(2) on buffers built before the
        // fork; it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || enter_namespace(&mounts, &dirs, hostname.as_deref()));
        }
        cmd
    }
}

/// The child's side of [`Launch::command`].
fn enter_namespace(
    mounts: &[CString],
    dirs: &[CString],
    hostname: Option<&[u8]>,
) -> io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on NUL-terminated strings that outlive them.
    unsafe {
        let uts = if hostname.is_some() {
            libc::CLONE_NEWUTS
        } else {
            0
        };
        check(libc::unshare(libc::CLONE_NEWNS | uts))?;
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
        if let Some(h) = hostname {
            check(libc::sethostname(h.as_ptr().cast(), h.len()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Launch;

    /// The hostname is the child's own: set in its UTS namespace before exec, the host's
    /// unchanged. Needs root (unshare), as every namespace test does.
    #[test]
    fn hostname_is_set_in_the_child_only() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let out = Launch::new("/bin/hostname")
            .hostname("vh-kit-uts")
            .command()
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "vh-kit-uts");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
            host
        );
    }
}
