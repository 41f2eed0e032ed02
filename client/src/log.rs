//! The log manager client (libvirt's `log_manager.c`): one connection, calls made one at
//! a time with serials from 0.

use crate::connect::{self, Target};
use crate::error::{ClientError, Result};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use vh_proto::blocking::Client;
use vh_proto::log::{
    self as p, AppendLogFileArgs, Domain, GetLogFilePositionArgs, OpenLogFileArgs, ReadLogFileArgs,
};
use vh_proto::paths::DaemonKind;
use vh_proto::xdr::{Decoder, Encoder};

/// `(inode, offset)` in a rotating log: what OpenLogFile and GetLogFilePosition return
/// and ReadLogFile starts from.
pub type LogPosition = p::LogFilePosition;

/// What libvirt's QEMU driver asks for per ReadLogFile.
pub const DEFAULT_READ_MAX: u64 = 131_072;
/// The largest `maxlen` the daemon accepts.
pub const READ_MAX: u64 = 4_194_304;

/// A connection to virtlogd.
pub struct LogManager {
    client: Client,
}

fn path_bytes(path: &Path) -> Vec<u8> {
    path.as_os_str().as_bytes().to_vec()
}

impl LogManager {
    /// Connects as libvirt does: session mode auto-spawns `virtlogd --timeout=120`.
    pub fn connect(target: &Target) -> Result<Self> {
        Ok(Self::from_stream(connect::connect(
            DaemonKind::Logd,
            target,
        )?))
    }

    /// Wraps an already connected socket.
    pub fn from_stream(stream: UnixStream) -> Self {
        LogManager {
            client: Client::from_stream(stream, p::PROGRAM, p::VERSION),
        }
    }

    /// OpenLogFile: returns the write end of the pipe the daemon drains into `path`
    /// (close-on-exec set; dup it onto a child's stdout/stderr) and the current position.
    /// Fails with EBUSY ([`ClientError::is_busy`]) while another writer has `path` open.
    pub fn open_log(
        &mut self,
        driver: &str,
        uuid: [u8; 16],
        name: &str,
        path: impl AsRef<Path>,
        truncate: bool,
    ) -> Result<(OwnedFd, LogPosition)> {
        let args = OpenLogFileArgs {
            driver: driver.to_string(),
            dom: Domain {
                uuid,
                name: name.to_string(),
            },
            path: path_bytes(path.as_ref()),
            flags: if truncate { p::OPEN_TRUNCATE } else { 0 },
        };
        let mut e = Encoder::new();
        args.encode(&mut e);
        let mut reply = self
            .client
            .call(p::proc_::DOMAIN_OPEN_LOG_FILE, e.as_bytes())?;
        let pos = LogPosition::decode(&mut Decoder::new(&reply.payload))?;
        if reply.fds.len() != 1 {
            return Err(ClientError::Protocol(if reply.fds.is_empty() {
                "no file descriptor received".into()
            } else {
                "too many file descriptors received".into()
            }));
        }
        let fd = reply
            .fds
            .pop()
            .ok_or_else(|| ClientError::Protocol("no file descriptor received".into()))?;
        set_cloexec(&fd)?;
        Ok((fd, pos))
    }

    /// GetLogFilePosition: drains the pipe first, so the position covers everything
    /// written so far. Fails unless `path` is currently open.
    pub fn position(&mut self, path: impl AsRef<Path>) -> Result<LogPosition> {
        let mut e = Encoder::new();
        GetLogFilePositionArgs {
            path: path_bytes(path.as_ref()),
            flags: 0,
        }
        .encode(&mut e);
        let reply = self
            .client
            .call(p::proc_::DOMAIN_GET_LOG_FILE_POSITION, e.as_bytes())?;
        Ok(LogPosition::decode(&mut Decoder::new(&reply.payload))?)
    }

    /// ReadLogFile: up to `maxlen` (at most 4 MiB) bytes from `pos`, walking from older
    /// backups into newer files. As in libvirt 9.0, the data stops at the first NUL byte.
    pub fn read(
        &mut self,
        path: impl AsRef<Path>,
        pos: LogPosition,
        maxlen: u64,
    ) -> Result<Vec<u8>> {
        let mut e = Encoder::new();
        ReadLogFileArgs {
            path: path_bytes(path.as_ref()),
            pos,
            maxlen,
            flags: 0,
        }
        .encode(&mut e);
        let reply = self
            .client
            .call(p::proc_::DOMAIN_READ_LOG_FILE, e.as_bytes())?;
        let mut d = Decoder::new(&reply.payload);
        Ok(d.string_lossless(READ_MAX as usize)?)
    }

    /// AppendLogFile: writes `message` through the open writer of `path` (or opens the
    /// file just for this), with rotation.
    pub fn append(
        &mut self,
        driver: &str,
        uuid: [u8; 16],
        name: &str,
        path: impl AsRef<Path>,
        message: &[u8],
    ) -> Result<()> {
        let mut e = Encoder::new();
        AppendLogFileArgs {
            driver: driver.to_string(),
            dom: Domain {
                uuid,
                name: name.to_string(),
            },
            path: path_bytes(path.as_ref()),
            message: message.to_vec(),
            flags: 0,
        }
        .encode(&mut e);
        let reply = self
            .client
            .call(p::proc_::DOMAIN_APPEND_LOG_FILE, e.as_bytes())?;
        let ret = Decoder::new(&reply.payload).i32()?;
        if ret != 0 {
            return Err(ClientError::Protocol(format!(
                "AppendLogFile returned {ret}"
            )));
        }
        Ok(())
    }

    /// The socket, for polling or closing.
    pub fn stream(&self) -> &UnixStream {
        self.client.stream()
    }
}

pub(crate) fn set_cloexec(fd: &OwnedFd) -> std::io::Result<()> {
    vh_proto::fdpass::set_cloexec(fd.as_raw_fd())
}
