//! Connecting to a daemon the way libvirt 9.0's clients do (`virNetSocketNewConnectUNIX`):
//! system mode connects once (socket activation is systemd's job); session mode holds an
//! fcntl lock on `$XDG_RUNTIME_DIR/libvirt/<binary>.lock`, spawns `<binary> --timeout=120`
//! daemonized on ENOENT/ECONNREFUSED, and retries `connect()` every 10 ms, 500 times.

use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;
use vh_proto::paths::{create_dir_with_mode, DaemonKind, DaemonPaths, Env, Mode};

/// `connect()` attempts in session mode, and the pause between them.
pub const CONNECT_RETRIES: u32 = 500;
pub const CONNECT_RETRY_DELAY: Duration = Duration::from_millis(10);
/// The argument libvirt's clients start a session daemon with.
pub const SPAWN_TIMEOUT_ARG: &str = "--timeout=120";

/// Which daemon instance to talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/run/libvirt/<daemon>-sock`; never spawns (systemd socket activation does).
    System,
    /// `$XDG_RUNTIME_DIR/libvirt/<daemon>-sock`; spawns the daemon when it is not running.
    Session,
    /// This socket path exactly; never spawns.
    Socket(PathBuf),
}

impl Target {
    /// What libvirt picks for this process: system when root, session otherwise.
    pub fn current() -> Target {
        match Mode::current() {
            Mode::System => Target::System,
            Mode::Session => Target::Session,
        }
    }

    /// The main socket of `kind` for this target.
    pub fn socket(&self, kind: DaemonKind) -> io::Result<PathBuf> {
        Ok(self.paths(kind)?.map_or_else(
            || match self {
                Target::Socket(p) => p.clone(),
                _ => PathBuf::new(),
            },
            |p| p.socket,
        ))
    }

    /// The admin socket of `kind` (for [`Target::Socket`], the path itself).
    pub fn admin_socket(&self, kind: DaemonKind) -> io::Result<PathBuf> {
        Ok(self.paths(kind)?.map_or_else(
            || match self {
                Target::Socket(p) => p.clone(),
                _ => PathBuf::new(),
            },
            |p| p.admin_socket,
        ))
    }

    fn paths(&self, kind: DaemonKind) -> io::Result<Option<DaemonPaths>> {
        let mode = match self {
            Target::System => Mode::System,
            Target::Session => Mode::Session,
            Target::Socket(_) => return Ok(None),
        };
        DaemonPaths::new(kind, mode, &Env::from_process())
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))
    }
}

/// The daemon binary a session client spawns: `$VIRTLOGD_PATH` / `$VIRTLOCKD_PATH`, else
/// `/usr/sbin/virtlogd` / `/usr/sbin/virtlockd`.
pub fn daemon_binary(kind: DaemonKind) -> PathBuf {
    let var = match kind {
        DaemonKind::Logd => "VIRTLOGD_PATH",
        DaemonKind::Lockd => "VIRTLOCKD_PATH",
    };
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => Path::new("/usr/sbin").join(kind.name()),
    }
}

fn connect_error(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("Failed to connect socket to '{}': {e}", path.display()),
    )
}

/// Connects to the main socket of `kind` (auto-spawning in session mode, unless root).
pub fn connect(kind: DaemonKind, target: &Target) -> io::Result<UnixStream> {
    let path = target.socket(kind)?;
    match target {
        // libvirt never spawns from a privileged client: a root daemon would run in
        // system mode and never listen on the session socket.
        Target::Session if !Mode::current().is_privileged() => {
            connect_spawning(&path, &daemon_binary(kind))
        }
        _ => UnixStream::connect(&path).map_err(|e| connect_error(&path, e)),
    }
}

/// Connects to the admin socket of `kind`; never spawns.
pub fn connect_admin(kind: DaemonKind, target: &Target) -> io::Result<UnixStream> {
    let path = target.admin_socket(kind)?;
    UnixStream::connect(&path).map_err(|e| connect_error(&path, e))
}

/// Session-mode connect: lock file, spawn once on ENOENT/ECONNREFUSED, retry.
pub fn connect_spawning(path: &Path, binary: &Path) -> io::Result<UnixStream> {
    let run_dir = path.parent().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "socket path has no directory")
    })?;
    create_dir_with_mode(run_dir, 0o700)?;
    let base = binary.file_name().unwrap_or(OsStr::new("daemon"));
    let mut lock_name = OsString::from(base);
    lock_name.push(".lock");
    let lock_path = run_dir.join(lock_name);
    let lock_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)?;
    // A blocking write lock on byte 0 serialises concurrent spawners, as libvirt does.
    let lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&lock_file),
        nix::fcntl::FcntlArg::F_SETLKW(&lock),
    )
    .map_err(io::Error::from)?;
    let res = retry_connect(path, binary);
    let _ = fs::remove_file(&lock_path);
    drop(lock_file);
    res
}

fn retry_connect(path: &Path, binary: &Path) -> io::Result<UnixStream> {
    let mut spawned = false;
    let mut attempt = 0;
    loop {
        let err = match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        let retryable = matches!(
            err.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
        );
        attempt += 1;
        if !retryable || attempt >= CONNECT_RETRIES {
            return Err(connect_error(path, err));
        }
        if !spawned {
            spawn_daemon(binary)?;
            spawned = true;
        }
        sleep(CONNECT_RETRY_DELAY);
    }
}

/// `binary --timeout=120`, daemonized (double fork, new session, stdio on /dev/null),
/// with libvirt's common environment plus the XDG directories.
pub fn spawn_daemon(binary: &Path) -> io::Result<()> {
    let mut cmd = Command::new(binary);
    cmd.arg(SPAWN_TIMEOUT_ARG)
        .env_clear()
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/");
    for var in [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "TMPDIR",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "XDG_RUNTIME_DIR",
    ] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    // SAFETY: runs in the forked child before exec and only calls the async-signal-safe
    // setsid(), fork() and _exit(); no allocation, no locks.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            match libc::fork() {
                -1 => Err(io::Error::last_os_error()),
                0 => Ok(()),
                _ => libc::_exit(0),
            }
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("Failed to spawn '{}': {e}", binary.display()),
        )
    })?;
    // Reap the intermediate process; the daemon itself is reparented.
    child.wait()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_socket_paths() {
        let t = Target::Socket(PathBuf::from("/x/y-sock"));
        assert_eq!(t.socket(DaemonKind::Logd).unwrap(), Path::new("/x/y-sock"));
        assert_eq!(
            Target::System.socket(DaemonKind::Lockd).unwrap(),
            Path::new("/run/libvirt/virtlockd-sock")
        );
        assert_eq!(
            Target::System.admin_socket(DaemonKind::Logd).unwrap(),
            Path::new("/run/libvirt/virtlogd-admin-sock")
        );
    }

    #[test]
    fn connect_error_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none-sock");
        let e = connect(DaemonKind::Logd, &Target::Socket(p.clone())).unwrap_err();
        assert_eq!(e.raw_os_error(), None);
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e
            .to_string()
            .starts_with(&format!("Failed to connect socket to '{}': ", p.display())));
    }

    /// Session auto-spawn with a fake "daemon" that binds the socket: the client must
    /// spawn it with `--timeout=120`, connect, and remove the lock file.
    #[test]
    fn spawns_and_retries() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/fake-sock");
        let argv_out = dir.path().join("argv");
        let script = dir.path().join("fakedaemon");
        fs::write(
            &script,
            format!(
                "#!/usr/bin/python3\nimport socket,sys,time\nopen('{}','w').write(' '.join(sys.argv[1:]))\n\
                 s=socket.socket(socket.AF_UNIX)\ns.bind('{}')\ns.listen(1)\nc,_=s.accept()\ntime.sleep(0.2)\n",
                argv_out.display(),
                sock.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let s = connect_spawning(&sock, &script).unwrap();
        drop(s);
        assert_eq!(fs::read_to_string(&argv_out).unwrap(), "--timeout=120");
        assert!(!dir.path().join("run/fakedaemon.lock").exists());
    }
}
