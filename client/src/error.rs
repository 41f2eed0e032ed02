//! Errors of the client library: transport, the daemon's libvirt error, or a reply we
//! could not make sense of.

use std::io;
use vh_proto::blocking::CallError;
use vh_proto::error::{code, RpcError};
use vh_proto::xdr::XdrError;

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, spawning the daemon, or reading/writing the socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The daemon answered with a libvirt error; code, domain and message are libvirt's.
    #[error("{0}")]
    Remote(RpcError),
    /// The reply did not match the protocol (wrong fd count, undecodable payload...).
    #[error("protocol error: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

impl From<CallError> for ClientError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Io(e) => ClientError::Io(e),
            CallError::Remote(e) => ClientError::Remote(e),
            CallError::Protocol(s) => ClientError::Protocol(s),
        }
    }
}

impl From<XdrError> for ClientError {
    fn from(e: XdrError) -> Self {
        ClientError::Protocol(format!("undecodable reply: {e}"))
    }
}

impl ClientError {
    /// The libvirt error, when the daemon sent one.
    pub fn remote(&self) -> Option<&RpcError> {
        match self {
            ClientError::Remote(e) => Some(e),
            _ => None,
        }
    }

    /// libvirt's `virErrorNumber` (`VIR_ERR_*`), when the daemon sent an error.
    pub fn code(&self) -> Option<i32> {
        self.remote().map(|e| e.code)
    }

    /// libvirt's `virErrorDomain` (`VIR_FROM_*`), when the daemon sent an error.
    pub fn domain(&self) -> Option<i32> {
        self.remote().map(|e| e.domain)
    }

    /// The daemon's message, or this error's text.
    pub fn message(&self) -> String {
        match self {
            ClientError::Remote(e) => e.message().to_string(),
            other => other.to_string(),
        }
    }

    /// A lease held by someone else (`VIR_ERR_RESOURCE_BUSY`), or a log path another
    /// client already has open (system error with errno EBUSY).
    pub fn is_busy(&self) -> bool {
        match self {
            ClientError::Remote(e) => {
                e.code == code::RESOURCE_BUSY
                    || (e.code == code::SYSTEM_ERROR && e.int1 == libc::EBUSY)
            }
            _ => false,
        }
    }

    /// The daemon's socket does not exist or nobody listens on it.
    pub fn is_not_running(&self) -> bool {
        match self {
            ClientError::Io(e) => matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
            ),
            _ => false,
        }
    }

    /// The daemon does not serve the program or procedure (e.g. the inspect program on
    /// a libvirt C daemon).
    pub fn is_unsupported(&self) -> bool {
        match self {
            ClientError::Remote(e) => {
                e.code == code::RPC
                    && (e.message().starts_with("Cannot find program")
                        || e.message().starts_with("unknown procedure"))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vh_proto::error::domain;

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
