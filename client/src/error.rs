//! Errors of the client library: transport, the daemon's libvirt error, or a reply we
//! could not make sense of.
//!
//! One type with the blocking connection's (`vh_proto::blocking::CallError`): a client
//! call is a blocking call, and its failures are that call's, so there is no second enum
//! to convert into. Its classification (`is_busy`, `code`, `message`, ...) is there too.

/// What a client call can fail with.
pub use vh_proto::blocking::CallError as ClientError;

pub type Result<T> = std::result::Result<T, ClientError>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use vh_proto::error::domain;
    use vh_proto::error::{code, RpcError};

    #[test]
    fn busy_classification() {
        let lock = ClientError::Remote(RpcError::new(
            code::RESOURCE_BUSY,
            domain::LOCKSPACE,
            "Lockspace resource 'x' is locked",
        ));
        assert!(lock.is_busy());
        assert_eq!(lock.code(), Some(87));
        assert_eq!(lock.domain(), Some(51));
        assert_eq!(
            lock.message(),
            "resource busy: Lockspace resource 'x' is locked"
        );
        let log = ClientError::Remote(RpcError::system(
            domain::LOGGING,
            libc::EBUSY,
            "Cannot open log file: '/x'",
        ));
        assert!(log.is_busy());
        let other = ClientError::Remote(RpcError::system(domain::LOGGING, libc::ENOENT, "x"));
        assert!(!other.is_busy());
        let io = ClientError::Io(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(io.is_not_running() && !io.is_busy());
        assert!(ClientError::Remote(RpcError::rpc("unknown procedure: 9")).is_unsupported());
    }
}
