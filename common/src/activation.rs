//! systemd socket activation (`LISTEN_PID` / `LISTEN_FDS` / `LISTEN_FDNAMES`)
//! as libvirt 9.0 handles them (`rpc-wire.md` §5.2), and the notifications 11.3 sends
//! (`Type=notify`): `READY=1` once serving, `STOPPING=1` and `EXTEND_TIMEOUT_USEC` when
//! a quit begins.
//!
//! # Threads and the environment
//!
//! [`Activation::from_env`] removes `LISTEN_PID` and `LISTEN_FDS` from the
//! process environment. Changing the environment is only sound while no
//! other thread may read it concurrently, so it must be called early in
//! `main`, before the tokio runtime or any other thread is started.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// libvirt's `VIR_DAEMON_ERR_NETWORK`, the exit status when activation fails.
pub const EXIT_NETWORK: i32 = 6;

/// Activation problems. `Display` gives libvirt's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDNAMES` is absent (logged; the daemon continues unactivated).
    #[error("internal error: Missing LISTEN_FDNAMES env from systemd socket activation")]
    MissingNames,
    /// The name count differs from `LISTEN_FDS` (logged; continues unactivated).
    #[error("internal error: Expecting {expected} FD names but got {got}")]
    NameCount {
        /// `LISTEN_FDS`.
        expected: usize,
        /// Number of ':'-separated names.
        got: usize,
    },
    /// Descriptors were passed that no service claimed (fatal, exit 6).
    #[error("internal error: Some activation file descriptors are unclaimed")]
    Unclaimed,
}

impl ActivationError {
    /// The exit status for a fatal activation error.
    pub fn exit_code(&self) -> i32 {
        EXIT_NETWORK
    }
}

/// What the environment says, before any descriptor is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// No (valid) activation for this process.
    NotActivated,
    /// Activated with `count` descriptors, but the names are unusable: the
    /// error is to be logged and the daemon carries on unactivated.
    BadNames {
        /// The number of descriptors passed.
        count: usize,
        /// Why the names were rejected.
        error: ActivationError,
    },
    /// Activated: one name per descriptor, in descriptor order from fd 3.
    Activated(Vec<String>),
}

fn parse_decimal(v: &OsStr) -> Option<u64> {
    let b = v.as_bytes();
    let b = b.strip_prefix(b"+").unwrap_or(b);
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Interprets the three variables for a process with id `my_pid`
/// (pure; no side effects).
pub fn parse_env(
    listen_pid: Option<&OsStr>,
    listen_fds: Option<&OsStr>,
    listen_fdnames: Option<&OsStr>,
    my_pid: u32,
) -> Parsed {
    let Some(pid) = listen_pid.and_then(parse_decimal) else {
        return Parsed::NotActivated;
    };
    if pid != u64::from(my_pid) {
        return Parsed::NotActivated;
    }
    let Some(count) = listen_fds
        .and_then(parse_decimal)
        .and_then(|n| u32::try_from(n).ok())
    else {
        return Parsed::NotActivated;
    };
    let count = count as usize;
    if count == 0 {
        return Parsed::NotActivated;
    }
    let Some(names) = listen_fdnames else {
        return Parsed::BadNames {
            count,
            error: ActivationError::MissingNames,
        };
    };
    let names: Vec<String> = names
        .as_bytes()
        .split(|&b| b == b':')
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    if names.len() != count {
        return Parsed::BadNames {
            count,
            error: ActivationError::NameCount {
                expected: count,
                got: names.len(),
            },
        };
    }
    Parsed::Activated(names)
}

/// Passed listening sockets, grouped by name, waiting to be claimed.
#[derive(Debug, Default)]
pub struct Activation {
    entries: Vec<(String, VecDeque<OwnedFd>)>,
}

use vh_proto::fdpass::set_cloexec;

impl Activation {
    /// Reads the activation variables of this process.
    ///
    /// Returns `Ok(None)` when not activated. When `LISTEN_PID` and
    /// `LISTEN_FDS` are valid for us they are removed from the environment
    /// and fds 3..3+n are made close-on-exec. When the names are missing or
    /// miscounted the error is returned in `Err`; the caller logs it and
    /// carries on as if not activated (the passed fds stay open, marked
    /// close-on-exec; libvirt closes them, which is only safe if they really
    /// came from systemd).
    ///
    /// Must be called before any other thread exists (see the module docs).
    pub fn from_env() -> Result<Option<Activation>, ActivationError> {
        let parsed = parse_env(
            std::env::var_os("LISTEN_PID").as_deref(),
            std::env::var_os("LISTEN_FDS").as_deref(),
            std::env::var_os("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        );
        let count = match &parsed {
            Parsed::NotActivated => return Ok(None),
            Parsed::BadNames { count, .. } => *count,
            Parsed::Activated(names) => names.len(),
        };
        // Single-threaded at this point by contract (module docs), so
        // changing the environment cannot race with a reader.
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        for i in 0..count {
            let fd = LISTEN_FDS_START.saturating_add(i as RawFd);
            if let Err(e) = set_cloexec(fd) {
                tracing::warn!("Couldn't disable inheritance of passed FD {fd}: {e}");
            }
        }
        match parsed {
            Parsed::Activated(names) => {
                let mut act = Activation::default();
                for (i, name) in names.into_iter().enumerate() {
                    let fd = LISTEN_FDS_START.saturating_add(i as RawFd);
                    if set_cloexec(fd).is_err() {
                        // Not an open descriptor: nothing to own.
                        continue;
                    }
                    // SAFETY: systemd handed this descriptor to us; it is
                    // open (F_GETFD succeeded just above) and nothing else
                    // in the process owns it, since we take each of the
                    // passed fds exactly once, here.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    act.push(name, owned);
                }
                Ok(Some(act))
            }
            // The passed fds are left open (close-on-exec) rather than closed:
            // with a bogus LISTEN_FDS they might not be sockets from systemd.
            Parsed::BadNames { error, .. } => Err(error),
            Parsed::NotActivated => Ok(None),
        }
    }

    /// Records `fd` under `name` (used by `from_env`, and by tests).
    pub fn push(&mut self, name: String, fd: OwnedFd) {
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some((_, fds)) => fds.push_back(fd),
            None => self.entries.push((name, VecDeque::from([fd]))),
        }
    }

    /// Takes every descriptor recorded under `name`, in order (possibly none).
    pub fn claim(&mut self, name: &str) -> Vec<OwnedFd> {
        match self.entries.iter().position(|(n, _)| n == name) {
            Some(i) => self.entries.remove(i).1.into(),
            None => Vec::new(),
        }
    }

    /// True if a descriptor is recorded under `name`.
    pub fn has_name(&self, name: &str) -> bool {
        self.entries.iter().any(|(n, _)| n == name)
    }

    /// Fails with [`ActivationError::Unclaimed`] (exit 6) if anything is
    /// left unclaimed.
    pub fn complete(&self) -> Result<(), ActivationError> {
        if self.entries.is_empty() {
            Ok(())
        } else {
            Err(ActivationError::Unclaimed)
        }
    }
}

/// Sends `READY=1` to `$NOTIFY_SOCKET` if it is set; abstract sockets
/// (names starting with '@') are supported. Does nothing without the
/// variable. Errors are returned for the caller to log as warnings.
///
/// Hand-written rather than using `sd-notify`: its 0.4 `notify` passes the
/// variable to `connect()` as a path, so an abstract '@' socket fails.
pub fn notify_ready() -> io::Result<()> {
    notify(b"READY=1")
}

/// Sends `STOPPING=1`: 11.3 sends it as soon as a quit is processed, before the servers
/// close. Like 11.3, `NOTIFY_SOCKET` stays in the environment for the later messages.
pub fn notify_stopping() -> io::Result<()> {
    notify(b"STOPPING=1")
}

/// Asks systemd for `secs` more seconds of stop time (`EXTEND_TIMEOUT_USEC`), as 11.3
/// does for the wait on its servers (30 s) once the servers are closed.
pub fn notify_extend_timeout(secs: u64) -> io::Result<()> {
    notify(extend_timeout_message(secs).as_bytes())
}

/// 11.3's text: microseconds, in decimal.
fn extend_timeout_message(secs: u64) -> String {
    format!("EXTEND_TIMEOUT_USEC={}", secs.saturating_mul(1_000_000))
}

/// Sends `msg` to `$NOTIFY_SOCKET` if it is set and not empty.
fn notify(msg: &[u8]) -> io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(addr) if !addr.is_empty() => notify_to(&addr, msg),
        _ => Ok(()),
    }
}

/// Sends `msg` as one datagram to the notify socket named `addr`.
pub fn notify_to(addr: &OsStr, msg: &[u8]) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = addr.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let sa = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(msg, &sa)?;
    } else {
        sock.send_to(msg, addr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn s(v: &str) -> Option<&OsStr> {
        Some(OsStr::new(v))
    }

    #[test]
    fn parse_cases() {
        let names = s("virtlogd.socket:virtlogd-admin.socket");
        assert_eq!(
            parse_env(s("42"), s("2"), names, 42),
            Parsed::Activated(vec![
                "virtlogd.socket".into(),
                "virtlogd-admin.socket".into()
            ])
        );
        assert_eq!(parse_env(None, s("2"), names, 42), Parsed::NotActivated);
        assert_eq!(parse_env(s("41"), s("2"), names, 42), Parsed::NotActivated);
        assert_eq!(parse_env(s("x"), s("2"), names, 42), Parsed::NotActivated);
        assert_eq!(parse_env(s("42"), None, names, 42), Parsed::NotActivated);
        assert_eq!(
            parse_env(s("42"), s("two"), names, 42),
            Parsed::NotActivated
        );
        assert_eq!(parse_env(s("42"), s("0"), names, 42), Parsed::NotActivated);
        assert_eq!(
            parse_env(s("42"), s("2"), None, 42),
            Parsed::BadNames {
                count: 2,
                error: ActivationError::MissingNames
            }
        );
        let p = parse_env(s("42"), s("3"), names, 42);
        assert_eq!(
            p,
            Parsed::BadNames {
                count: 3,
                error: ActivationError::NameCount {
                    expected: 3,
                    got: 2
                }
            }
        );
        // Repeated names are fine (several fds for one service).
        assert_eq!(
            parse_env(s("42"), s("2"), s("a:a"), 42),
            Parsed::Activated(vec!["a".into(), "a".into()])
        );
    }

    #[test]
    fn extend_timeout_text() {
        assert_eq!(extend_timeout_message(30), "EXTEND_TIMEOUT_USEC=30000000");
        assert_eq!(extend_timeout_message(10), "EXTEND_TIMEOUT_USEC=10000000");
    }

    #[test]
    fn error_texts() {
        assert_eq!(
            ActivationError::Unclaimed.to_string(),
            "internal error: Some activation file descriptors are unclaimed"
        );
        assert_eq!(ActivationError::Unclaimed.exit_code(), 6);
        assert_eq!(
            ActivationError::MissingNames.to_string(),
            "internal error: Missing LISTEN_FDNAMES env from systemd socket activation"
        );
        assert_eq!(
            ActivationError::NameCount {
                expected: 2,
                got: 1
            }
            .to_string(),
            "internal error: Expecting 2 FD names but got 1"
        );
    }

    #[test]
    fn claim_and_complete() {
        let mut act = Activation::default();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
        let (ra, rb) = (a.as_raw_fd(), b.as_raw_fd());
        act.push("virtlogd.socket".into(), a.into());
        act.push("virtlogd.socket".into(), b.into());
        act.push("other.socket".into(), c.into());
        assert!(act.has_name("virtlogd.socket"));
        let got = act.claim("virtlogd.socket");
        let raws: Vec<RawFd> = got.iter().map(|f| f.as_raw_fd()).collect();
        assert_eq!(raws, vec![ra, rb]);
        assert!(act.claim("virtlogd-admin.socket").is_empty());
        assert!(act.claim("virtlogd.socket").is_empty());
        assert_eq!(act.complete(), Err(ActivationError::Unclaimed));
        assert_eq!(act.claim("other.socket").len(), 1);
        assert_eq!(act.complete(), Ok(()));
    }

    #[test]
    fn notify_path_and_abstract() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), b"READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("vh-notify-test-{}", std::process::id());
        let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&sa).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), b"READY=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        assert!(notify_to(OsStr::new("/nonexistent/vh/notify"), b"READY=1").is_err());
    }
}
