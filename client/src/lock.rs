//! The lock manager client (libvirt's `lockd` plugin).
//!
//! libvirt's model, which this API follows:
//! * the VMM process itself connects, REGISTERs with its own pid and RESTRICTs the
//!   connection, then keeps it open for its whole life (libvirt does this in the forked
//!   child before exec, and QEMU inherits the socket: [`LockManager::into_inherited_fd`]);
//! * the manager acquires and releases on the VMM's behalf over short connections that
//!   REGISTER the same owner (pid = the VMM's pid); closing those releases nothing;
//! * when the connection whose peer pid equals the owner pid closes, the daemon releases
//!   everything that pid owns and kills that pid if it still runs.

use crate::connect::{self, Target};
use crate::error::{ClientError, Result};
use sha2::{Digest, Sha256};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use vh_proto::blocking::Client;
use vh_proto::lock::{self as p, NewArgs, RegisterArgs, ResourceArgs};
use vh_proto::paths::DaemonKind;
use vh_proto::xdr::Encoder;

/// The lock owner: the VM (uuid, name, id ≠ 0) and the pid of the process using the disks,
/// exactly as it goes on the wire.
pub use vh_proto::lock::Owner;

/// The lease name libvirt's lockd plugin uses for a disk in `file_lockspace_dir`: the
/// lowercase hex SHA-256 of the path exactly as written in the domain XML. libvirt does
/// not canonicalise it (no symlink resolution, no `//` or trailing-slash cleanup) and
/// hashes no trailing NUL, so neither does this; pass the same string libvirt would see.
pub fn lease_name_for_path(path: impl AsRef<Path>) -> String {
    hex::encode(Sha256::digest(path.as_ref().as_os_str().as_bytes()))
}

/// A connection to virtlockd.
pub struct LockManager {
    client: Client,
}

fn utf8(what: &str, p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).ok_or_else(|| {
        ClientError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what} '{}' is not valid UTF-8", p.display()),
        ))
    })
}

impl LockManager {
    /// Connects as libvirt does: session mode auto-spawns `virtlockd --timeout=120`.
    pub fn connect(target: &Target) -> Result<Self> {
        Ok(Self::from_stream(connect::connect(
            DaemonKind::Lockd,
            target,
        )?))
    }

    /// Wraps an already connected socket.
    pub fn from_stream(stream: UnixStream) -> Self {
        LockManager {
            client: Client::from_stream(stream, p::PROGRAM, p::VERSION),
        }
    }

    fn call(&mut self, proc_: i32, e: Encoder) -> Result<()> {
        self.client.call(proc_, e.as_bytes())?;
        Ok(())
    }

    /// REGISTER: must come first on a connection (except for [`Self::create_lockspace`]).
    pub fn register(&mut self, owner: &Owner) -> Result<()> {
        let mut e = Encoder::new();
        RegisterArgs {
            owner: owner.clone(),
            flags: 0,
        }
        .encode(&mut e);
        self.call(p::proc_::REGISTER, e)
    }

    /// RESTRICT: after this the connection accepts no further calls; it only keeps the
    /// owner alive (libvirt's start-paused connection that QEMU inherits).
    pub fn restrict(&mut self) -> Result<()> {
        let mut e = Encoder::new();
        e.u32(0);
        self.call(p::proc_::RESTRICT, e)
    }

    /// CREATE_LOCKSPACE for a directory (no REGISTER needed; existing is fine).
    pub fn create_lockspace(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let mut e = Encoder::new();
        e.string(&utf8("lockspace", dir.as_ref())?);
        self.call(p::proc_::CREATE_LOCKSPACE, e)
    }

    /// NEW: create a directory lockspace (fails if it exists).
    pub fn new_lockspace(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let mut e = Encoder::new();
        NewArgs {
            path: utf8("lockspace", dir.as_ref())?,
            flags: 0,
        }
        .encode(&mut e);
        self.call(p::proc_::NEW, e)
    }

    fn resource(&mut self, proc_: i32, lockspace: &str, name: &str, flags: u32) -> Result<()> {
        let mut e = Encoder::new();
        ResourceArgs {
            path: lockspace.to_string(),
            name: name.to_string(),
            flags,
        }
        .encode(&mut e);
        self.call(proc_, e)
    }

    /// ACQUIRE_RESOURCE for the registered owner. `lockspace` is `""` for the default
    /// lockspace, where `name` is the disk path locked directly (no autocreate);
    /// a held resource fails with [`ClientError::is_busy`].
    pub fn acquire(
        &mut self,
        lockspace: &str,
        name: &str,
        shared: bool,
        autocreate: bool,
    ) -> Result<()> {
        let flags = if shared { p::ACQUIRE_SHARED } else { 0 }
            | if autocreate { p::ACQUIRE_AUTOCREATE } else { 0 };
        self.resource(p::proc_::ACQUIRE_RESOURCE, lockspace, name, flags)
    }

    /// RELEASE_RESOURCE of one ownership by the registered owner.
    pub fn release(&mut self, lockspace: &str, name: &str) -> Result<()> {
        self.resource(p::proc_::RELEASE_RESOURCE, lockspace, name, 0)
    }

    /// CREATE_RESOURCE: create the lock file `name` in a directory lockspace.
    pub fn create_resource(&mut self, lockspace: &str, name: &str) -> Result<()> {
        self.resource(p::proc_::CREATE_RESOURCE, lockspace, name, 0)
    }

    /// DELETE_RESOURCE: remove an unheld lock file from a directory lockspace.
    pub fn delete_resource(&mut self, lockspace: &str, name: &str) -> Result<()> {
        self.resource(p::proc_::DELETE_RESOURCE, lockspace, name, 0)
    }

    /// Hands the connection to a child process: returns the socket with close-on-exec
    /// cleared, so a process spawned next inherits it (dup2 it to a known number in
    /// `pre_exec` if the child must find it). Do this in the process whose pid was
    /// registered (typically after [`Self::register`] + [`Self::restrict`] in the child
    /// before exec): the daemon releases the owner's leases when the last copy closes.
    /// Every process spawned while this fd is open inherits it, so close it in the
    /// parent as soon as the intended child exists.
    pub fn into_inherited_fd(self) -> Result<OwnedFd> {
        let fd: OwnedFd = self.client.into_stream().into();
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(std::io::Error::from)?;
        Ok(fd)
    }

    /// The socket, for polling or closing.
    pub fn stream(&self) -> &UnixStream {
        self.client.stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names() {
        // virtlockd.md §3.4 / libvirt's lockd plugin.
        assert_eq!(
            lease_name_for_path("/var/lib/libvirt/images/vm1.qcow2"),
            "f2f4417b8fe812d19e40421ca4d46765c702e950c54a3a74e967e48dc9812492"
        );
        // No canonicalisation: these are different leases, as in libvirt.
        let a = lease_name_for_path("/var/lib/libvirt/images/vm1.qcow2");
        assert_ne!(a, lease_name_for_path("/var/lib/libvirt//images/vm1.qcow2"));
        assert_ne!(
            a,
            lease_name_for_path("/var/lib/libvirt/images/./vm1.qcow2")
        );
        assert_eq!(lease_name_for_path("").len(), 64);
        assert_eq!(
            lease_name_for_path(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn inherited_fd_has_no_cloexec() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = LockManager::from_stream(a).into_inherited_fd().unwrap();
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_eq!(flags & libc::FD_CLOEXEC, 0);
    }
}
