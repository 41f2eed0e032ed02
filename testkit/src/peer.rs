//! A peer process of a daemon's connection: a child that connects itself, so that the
//! daemon's `SO_PEERCRED` pid for the connection is the child's (a lock owner registers
//! with that pid, as QEMU's inherited connection is registered), then sleeps.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// What the child of [`Sleeper::spawn_connected`] does besides connecting.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sleeper {
    /// How long it lives: `sleep secs`.
    pub secs: u32,
    /// It keeps its copy of the connection across exec (a QEMU holding its own): the
    /// connection then closes only once both it and the caller's end are gone. Else its
    /// copy is close-on-exec and only the caller holds the connection.
    pub keep_connection: bool,
    /// It ignores SIGTERM (an ignored signal stays ignored across exec).
    pub ignore_sigterm: bool,
}

impl Sleeper {
    /// Spawns the child, which connects to `sock` between fork and exec; returns it and
    /// the caller's end of that connection (the same file description).
    pub fn spawn_connected(self, sock: &Path) -> io::Result<(Child, UnixStream)> {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = UnixAddr::new(sock)?;
        let raw = fd.as_raw_fd();
        let Sleeper {
            secs,
            keep_connection,
            ignore_sigterm,
        } = self;
        let mut cmd = Command::new("sleep");
        cmd.arg(secs.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the hook only calls sigaction(2), connect(2) and fcntl(2), all
        // async-signal-safe, on an fd and an address prepared before the fork; the
        // SIGTERM disposition set is SIG_IGN, which no handler code depends on.
        unsafe {
            cmd.pre_exec(move || {
                use nix::sys::signal::{signal, SigHandler, Signal};
                if ignore_sigterm {
                    signal(Signal::SIGTERM, SigHandler::SigIgn)?;
                }
                connect(raw, &addr)?;
                if keep_connection {
                    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
                    fcntl(raw, FcntlArg::F_SETFD(FdFlag::empty()))?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        Ok((child, UnixStream::from(fd)))
    }
}
