//! Which daemon we are, whether we run in system or session mode, and the
//! socket / pid / state / config / log paths that follow from both.
//!
//! The environment is passed in as an [`Env`] value so that every path rule
//! can be tested without touching the process environment.

use std::ffi::OsString;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The two daemons this project replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DaemonKind {
    /// `virtlogd`, the log manager.
    Logd,
    /// `virtlockd`, the lock manager.
    Lockd,
}

impl DaemonKind {
    /// The program name, used in every path and message: `virtlogd` / `virtlockd`.
    pub fn name(self) -> &'static str {
        match self {
            DaemonKind::Logd => "virtlogd",
            DaemonKind::Lockd => "virtlockd",
        }
    }

    /// The systemd socket-activation fd name of the main socket (`virtlogd.socket`).
    pub fn socket_fd_name(self) -> &'static str {
        match self {
            DaemonKind::Logd => "virtlogd.socket",
            DaemonKind::Lockd => "virtlockd.socket",
        }
    }

    /// The systemd socket-activation fd name of the admin socket (`virtlogd-admin.socket`).
    pub fn admin_socket_fd_name(self) -> &'static str {
        match self {
            DaemonKind::Logd => "virtlogd-admin.socket",
            DaemonKind::Lockd => "virtlockd-admin.socket",
        }
    }

    /// The one-line description used in `--help` ("libvirt log management daemon").
    pub fn description(self) -> &'static str {
        match self {
            DaemonKind::Logd => "libvirt log management daemon",
            DaemonKind::Lockd => "libvirt lock management daemon",
        }
    }
}

/// System mode (privileged, euid 0) or session mode (any other user).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Running as root: paths under `/run` and `/etc`.
    System,
    /// Running as an ordinary user: paths under the XDG directories.
    Session,
}

impl Mode {
    /// System iff the effective uid is 0.
    pub fn current() -> Mode {
        Mode::from_euid(nix::unistd::geteuid().as_raw())
    }

    /// System iff `euid` is 0.
    pub fn from_euid(euid: u32) -> Mode {
        if euid == 0 {
            Mode::System
        } else {
            Mode::Session
        }
    }

    /// True in system mode (libvirt's `privileged`).
    pub fn is_privileged(self) -> bool {
        self == Mode::System
    }
}

/// The parts of the environment the session-mode paths depend on.
///
/// Empty variables count as unset, as GLib does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    /// The home directory (`$HOME`, else the passwd entry).
    pub home: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// `$XDG_CONFIG_HOME`.
    pub xdg_config_home: Option<PathBuf>,
    /// `$XDG_CACHE_HOME`.
    pub xdg_cache_home: Option<PathBuf>,
}

fn non_empty(v: Option<OsString>) -> Option<PathBuf> {
    v.filter(|s| !s.is_empty()).map(PathBuf::from)
}

impl Env {
    /// Builds an [`Env`] from a lookup function (for tests: a closure over a map).
    pub fn from_lookup<F: Fn(&str) -> Option<OsString>>(get: F) -> Env {
        Env {
            home: non_empty(get("HOME")),
            xdg_runtime_dir: non_empty(get("XDG_RUNTIME_DIR")),
            xdg_config_home: non_empty(get("XDG_CONFIG_HOME")),
            xdg_cache_home: non_empty(get("XDG_CACHE_HOME")),
        }
    }

    /// Reads the real process environment; falls back to the passwd entry
    /// for the home directory when `$HOME` is unset.
    pub fn from_process() -> Env {
        let mut env = Env::from_lookup(|k| std::env::var_os(k));
        if env.home.is_none() {
            if let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::geteuid()) {
                env.home = Some(user.dir);
            }
        }
        env
    }

    fn home(&self) -> Result<&Path, PathError> {
        self.home.as_deref().ok_or(PathError::NoHome)
    }

    /// `$XDG_CACHE_HOME`, default `~/.cache`.
    pub fn cache_dir(&self) -> Result<PathBuf, PathError> {
        match &self.xdg_cache_home {
            Some(p) => Ok(p.clone()),
            None => Ok(self.home()?.join(".cache")),
        }
    }

    /// `$XDG_CONFIG_HOME`, default `~/.config`.
    pub fn config_dir(&self) -> Result<PathBuf, PathError> {
        match &self.xdg_config_home {
            Some(p) => Ok(p.clone()),
            None => Ok(self.home()?.join(".config")),
        }
    }

    /// `$XDG_RUNTIME_DIR`, falling back to the cache dir as GLib does.
    pub fn runtime_dir(&self) -> Result<PathBuf, PathError> {
        match &self.xdg_runtime_dir {
            Some(p) => Ok(p.clone()),
            None => self.cache_dir(),
        }
    }
}

/// A session-mode path could not be determined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Neither `$HOME` nor a passwd entry gave a home directory.
    #[error("cannot determine the home directory")]
    NoHome,
}

/// Every default path of one daemon in one mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonPaths {
    /// Main RPC socket, e.g. `/run/libvirt/virtlogd-sock`.
    pub socket: PathBuf,
    /// Admin socket, e.g. `/run/libvirt/virtlogd-admin-sock`.
    pub admin_socket: PathBuf,
    /// Pid file, e.g. `/run/virtlogd.pid`.
    pub pid_file: PathBuf,
    /// Re-exec state file, e.g. `/run/virtlogd-restart-exec.json`.
    pub state_file: PathBuf,
    /// Directory created at start, e.g. `/run/libvirt`.
    pub run_dir: PathBuf,
    /// Implicit config file, e.g. `/etc/libvirt/virtlogd.conf`.
    pub config_file: PathBuf,
    /// The log file used by default with `-d`, e.g. `/var/log/libvirt/virtlogd.log`.
    pub default_log_file: PathBuf,
    /// The mode these paths were computed for.
    pub mode: Mode,
}

impl DaemonPaths {
    /// Computes the paths of `kind` in `mode`. System mode ignores `env`.
    pub fn new(kind: DaemonKind, mode: Mode, env: &Env) -> Result<DaemonPaths, PathError> {
        let name = kind.name();
        match mode {
            Mode::System => {
                let run_dir = PathBuf::from("/run/libvirt");
                Ok(DaemonPaths {
                    socket: run_dir.join(format!("{name}-sock")),
                    admin_socket: run_dir.join(format!("{name}-admin-sock")),
                    pid_file: PathBuf::from(format!("/run/{name}.pid")),
                    state_file: PathBuf::from(format!("/run/{name}-restart-exec.json")),
                    run_dir,
                    config_file: PathBuf::from(format!("/etc/libvirt/{name}.conf")),
                    default_log_file: PathBuf::from(format!("/var/log/libvirt/{name}.log")),
                    mode,
                })
            }
            Mode::Session => {
                let run_dir = env.runtime_dir()?.join("libvirt");
                Ok(DaemonPaths {
                    socket: run_dir.join(format!("{name}-sock")),
                    admin_socket: run_dir.join(format!("{name}-admin-sock")),
                    pid_file: run_dir.join(format!("{name}.pid")),
                    state_file: run_dir.join(format!("{name}-restart-exec.json")),
                    config_file: env
                        .config_dir()?
                        .join("libvirt")
                        .join(format!("{name}.conf")),
                    default_log_file: env.cache_dir()?.join("libvirt").join(format!("{name}.log")),
                    run_dir,
                    mode,
                })
            }
        }
    }

    /// Paths for the current process: [`Mode::current`] and [`Env::from_process`].
    pub fn current(kind: DaemonKind) -> Result<DaemonPaths, PathError> {
        DaemonPaths::new(kind, Mode::current(), &Env::from_process())
    }

    /// Creates the run directory (and missing parents) as libvirt does under
    /// umask 022 (system, 0755) or 077 (session, 0700). Directories that
    /// already exist are left as they are. Does not touch the process umask,
    /// so it is safe with threads running.
    pub fn create_run_dir(&self) -> io::Result<()> {
        create_dir_with_mode(&self.run_dir, self.run_dir_mode())
    }

    /// 0755 in system mode, 0700 in session mode.
    pub fn run_dir_mode(&self) -> u32 {
        match self.mode {
            Mode::System => 0o755,
            Mode::Session => 0o700,
        }
    }
}

/// `mkdir -p` where every directory created gets exactly `mode`
/// (independent of the umask), existing ones are untouched.
pub fn create_dir_with_mode(path: &Path, mode: u32) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    // Collect the missing ancestors, outermost first.
    let mut missing = Vec::new();
    let mut cur = Some(path);
    while let Some(p) = cur {
        if p.as_os_str().is_empty() || p.is_dir() {
            break;
        }
        missing.push(p.to_path_buf());
        cur = p.parent();
    }
    for dir in missing.iter().rev() {
        match DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(mode))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Env {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn names() {
        assert_eq!(DaemonKind::Logd.name(), "virtlogd");
        assert_eq!(DaemonKind::Lockd.name(), "virtlockd");
        assert_eq!(DaemonKind::Logd.socket_fd_name(), "virtlogd.socket");
        assert_eq!(
            DaemonKind::Lockd.admin_socket_fd_name(),
            "virtlockd-admin.socket"
        );
        assert_eq!(Mode::from_euid(0), Mode::System);
        assert_eq!(Mode::from_euid(1000), Mode::Session);
    }

    #[test]
    fn system_paths() {
        let p = DaemonPaths::new(DaemonKind::Logd, Mode::System, &Env::default()).unwrap();
        assert_eq!(p.socket, Path::new("/run/libvirt/virtlogd-sock"));
        assert_eq!(
            p.admin_socket,
            Path::new("/run/libvirt/virtlogd-admin-sock")
        );
        assert_eq!(p.pid_file, Path::new("/run/virtlogd.pid"));
        assert_eq!(p.state_file, Path::new("/run/virtlogd-restart-exec.json"));
        assert_eq!(p.run_dir, Path::new("/run/libvirt"));
        assert_eq!(p.config_file, Path::new("/etc/libvirt/virtlogd.conf"));
        assert_eq!(
            p.default_log_file,
            Path::new("/var/log/libvirt/virtlogd.log")
        );
        assert_eq!(p.run_dir_mode(), 0o755);

        let l = DaemonPaths::new(DaemonKind::Lockd, Mode::System, &Env::default()).unwrap();
        assert_eq!(l.socket, Path::new("/run/libvirt/virtlockd-sock"));
        assert_eq!(
            l.admin_socket,
            Path::new("/run/libvirt/virtlockd-admin-sock")
        );
        assert_eq!(l.pid_file, Path::new("/run/virtlockd.pid"));
        assert_eq!(l.state_file, Path::new("/run/virtlockd-restart-exec.json"));
        assert_eq!(l.config_file, Path::new("/etc/libvirt/virtlockd.conf"));
        assert_eq!(
            l.default_log_file,
            Path::new("/var/log/libvirt/virtlockd.log")
        );
    }

    #[test]
    fn session_paths_with_xdg() {
        let e = env(&[
            ("HOME", "/home/u"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("XDG_CONFIG_HOME", "/cfg"),
            ("XDG_CACHE_HOME", "/cache"),
        ]);
        let p = DaemonPaths::new(DaemonKind::Logd, Mode::Session, &e).unwrap();
        assert_eq!(p.socket, Path::new("/run/user/1000/libvirt/virtlogd-sock"));
        assert_eq!(
            p.admin_socket,
            Path::new("/run/user/1000/libvirt/virtlogd-admin-sock")
        );
        assert_eq!(p.pid_file, Path::new("/run/user/1000/libvirt/virtlogd.pid"));
        assert_eq!(
            p.state_file,
            Path::new("/run/user/1000/libvirt/virtlogd-restart-exec.json")
        );
        assert_eq!(p.run_dir, Path::new("/run/user/1000/libvirt"));
        assert_eq!(p.config_file, Path::new("/cfg/libvirt/virtlogd.conf"));
        assert_eq!(p.default_log_file, Path::new("/cache/libvirt/virtlogd.log"));
        assert_eq!(p.run_dir_mode(), 0o700);
    }

    #[test]
    fn session_paths_fallbacks() {
        // No XDG variables at all (empty counts as unset): ~/.cache and ~/.config.
        let e = env(&[("HOME", "/home/u"), ("XDG_RUNTIME_DIR", "")]);
        let p = DaemonPaths::new(DaemonKind::Lockd, Mode::Session, &e).unwrap();
        assert_eq!(p.run_dir, Path::new("/home/u/.cache/libvirt"));
        assert_eq!(p.socket, Path::new("/home/u/.cache/libvirt/virtlockd-sock"));
        assert_eq!(
            p.pid_file,
            Path::new("/home/u/.cache/libvirt/virtlockd.pid")
        );
        assert_eq!(
            p.config_file,
            Path::new("/home/u/.config/libvirt/virtlockd.conf")
        );
        assert_eq!(
            p.default_log_file,
            Path::new("/home/u/.cache/libvirt/virtlockd.log")
        );

        // Runtime dir unset but cache home set: the runtime dir follows the cache home.
        let e = env(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/c")]);
        let p = DaemonPaths::new(DaemonKind::Logd, Mode::Session, &e).unwrap();
        assert_eq!(p.run_dir, Path::new("/c/libvirt"));

        assert_eq!(
            DaemonPaths::new(DaemonKind::Logd, Mode::Session, &Env::default()),
            Err(PathError::NoHome)
        );
    }

    #[test]
    fn create_run_dir_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let e = Env {
            xdg_runtime_dir: Some(tmp.path().join("a/b")),
            home: Some(tmp.path().to_path_buf()),
            ..Env::default()
        };
        let p = DaemonPaths::new(DaemonKind::Logd, Mode::Session, &e).unwrap();
        p.create_run_dir().unwrap();
        let m = fs::metadata(&p.run_dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(m, 0o700);
        let m = fs::metadata(tmp.path().join("a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(m, 0o700);
        // Idempotent.
        p.create_run_dir().unwrap();

        let d = tmp.path().join("sys/libvirt");
        create_dir_with_mode(&d, 0o755).unwrap();
        let m = fs::metadata(&d).unwrap().permissions().mode() & 0o7777;
        assert_eq!(m, 0o755);
    }
}
