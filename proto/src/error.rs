//! libvirt's error struct (`virNetMessageError`) and the constructors that fill it the way
//! libvirt 9.0 does, so our replies are byte-identical to the C daemons'.

use crate::xdr::{Decoder, Encoder, XdrError};
use std::fmt;

/// Longest error text libvirt accepts (`VIR_NET_MESSAGE_STRING_MAX`).
pub const MESSAGE_STRING_MAX: usize = 4_194_304;

/// `virErrorNumber` values used by these daemons.
pub mod code {
    pub const INTERNAL_ERROR: i32 = 1;
    pub const NO_SUPPORT: i32 = 3;
    pub const INVALID_ARG: i32 = 8;
    pub const OPERATION_FAILED: i32 = 9;
    pub const OPERATION_DENIED: i32 = 29;
    pub const SYSTEM_ERROR: i32 = 38;
    pub const RPC: i32 = 39;
    pub const OPERATION_INVALID: i32 = 55;
    pub const CONFIG_UNSUPPORTED: i32 = 67;
    pub const ARGUMENT_UNSUPPORTED: i32 = 74;
    pub const OPERATION_UNSUPPORTED: i32 = 84;
    pub const RESOURCE_BUSY: i32 = 87;
    pub const ACCESS_DENIED: i32 = 88;
    pub const NO_SERVER: i32 = 95;
    pub const NO_CLIENT: i32 = 96;
}

/// `virErrorDomain` values used by these daemons.
pub mod domain {
    pub const NONE: i32 = 0;
    pub const RPC: i32 = 7;
    pub const CONF: i32 = 9;
    pub const REMOTE: i32 = 13;
    pub const LOCKING: i32 = 42;
    pub const LOCKSPACE: i32 = 51;
    pub const ADMIN: i32 = 62;
    pub const LOGGING: i32 = 63;
}

/// `VIR_ERR_ERROR`: the only level these daemons send.
pub const LEVEL_ERROR: i32 = 2;

/// The fixed text libvirt puts in front of a detail message for each error code
/// (its `msginfo` table). Codes without a prefix use the bare detail.
pub fn prefix(code: i32) -> &'static str {
    match code {
        code::INTERNAL_ERROR => "internal error: ",
        code::NO_SUPPORT => "this function is not supported by the connection driver: ",
        code::INVALID_ARG => "invalid argument: ",
        code::OPERATION_FAILED => "operation failed: ",
        code::OPERATION_DENIED => "operation forbidden: ",
        code::OPERATION_INVALID => "Requested operation is not valid: ",
        code::CONFIG_UNSUPPORTED => "unsupported configuration: ",
        code::ARGUMENT_UNSUPPORTED => "argument unsupported: ",
        code::OPERATION_UNSUPPORTED => "Operation not supported: ",
        code::RESOURCE_BUSY => "resource busy: ",
        code::ACCESS_DENIED => "access denied: ",
        code::NO_SERVER => "Server not found: ",
        code::NO_CLIENT => "Client not found: ",
        _ => "",
    }
}

/// One libvirt error, as carried in an error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i32,
    pub domain: i32,
    pub message: Option<String>,
    pub level: i32,
    pub str1: Option<String>,
    pub str2: Option<String>,
    pub str3: Option<String>,
    pub int1: i32,
    pub int2: i32,
}

impl RpcError {
    /// An error raised through libvirt's general reporting function: message = prefix +
    /// detail, str1 = the template, str2 = the detail, int1 = int2 = -1.
    pub fn new(code: i32, domain: i32, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        let p = prefix(code);
        RpcError {
            code,
            domain,
            message: Some(format!("{p}{detail}")),
            level: LEVEL_ERROR,
            str1: Some(format!("{p}%s")),
            str2: Some(detail),
            str3: None,
            int1: -1,
            int2: -1,
        }
    }

    /// `VIR_ERR_RPC` from the dispatch layer (no prefix, domain RPC).
    pub fn rpc(detail: impl Into<String>) -> Self {
        Self::new(code::RPC, domain::RPC, detail)
    }

    pub fn internal(domain: i32, detail: impl Into<String>) -> Self {
        Self::new(code::INTERNAL_ERROR, domain, detail)
    }

    /// A system error: "<detail>: <strerror(errno)>", int1 = errno.
    pub fn system(domain: i32, errno: i32, detail: impl fmt::Display) -> Self {
        let text = format!("{detail}: {}", strerror(errno));
        let mut e = Self::new(code::SYSTEM_ERROR, domain, text);
        e.int1 = errno;
        e
    }

    /// libvirt's `virCheckFlags(allowed)`: any bit outside `allowed` is refused, and the
    /// error names only those bits.
    pub fn check_flags(domain: i32, function: &str, flags: u32, allowed: u32) -> Result<(), Self> {
        match flags & !allowed {
            0 => Ok(()),
            unknown => Err(Self::unsupported_flags(
                domain,
                function,
                u64::from(unknown),
            )),
        }
    }

    /// `virCheckFlags` failure: no prefix, str1 = function, str2 = "flags", ints 0.
    pub fn unsupported_flags(domain: i32, function: &str, bits: u64) -> Self {
        RpcError {
            code: code::INVALID_ARG,
            domain,
            message: Some(format!(
                "unsupported flags (0x{bits:x}) in function {function}"
            )),
            level: LEVEL_ERROR,
            str1: Some(function.to_string()),
            str2: Some("flags".to_string()),
            str3: None,
            int1: 0,
            int2: 0,
        }
    }

    /// What libvirt sends when a handler fails without recording an error.
    pub fn unset() -> Self {
        RpcError {
            code: code::INTERNAL_ERROR,
            domain: domain::RPC,
            message: Some("Library function returned error but did not set virError".into()),
            level: LEVEL_ERROR,
            str1: None,
            str2: None,
            str3: None,
            int1: 0,
            int2: 0,
        }
    }

    pub fn message(&self) -> &str {
        self.message.as_deref().unwrap_or("")
    }

    pub fn encode(&self, e: &mut Encoder) {
        e.i32(self.code).i32(self.domain);
        e.optional_string(self.message.as_deref());
        e.i32(self.level);
        e.u32(0); // dom: always absent
        e.optional_string(self.str1.as_deref());
        e.optional_string(self.str2.as_deref());
        e.optional_string(self.str3.as_deref());
        e.i32(self.int1).i32(self.int2);
        e.u32(0); // net: always absent
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        let code = d.i32()?;
        let domain = d.i32()?;
        let message = d.optional_string(MESSAGE_STRING_MAX)?;
        let level = d.i32()?;
        d.optional(|d| {
            d.string(MESSAGE_STRING_MAX)?;
            d.uuid()?;
            d.i32()
        })?;
        let str1 = d.optional_string(MESSAGE_STRING_MAX)?;
        let str2 = d.optional_string(MESSAGE_STRING_MAX)?;
        let str3 = d.optional_string(MESSAGE_STRING_MAX)?;
        let int1 = d.i32()?;
        let int2 = d.i32()?;
        d.optional(|d| {
            d.string(MESSAGE_STRING_MAX)?;
            d.uuid()
        })?;
        Ok(RpcError {
            code,
            domain,
            message,
            level,
            str1,
            str2,
            str3,
            int1,
            int2,
        })
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message())
    }
}

impl std::error::Error for RpcError {}

/// glibc's text for an errno, as libvirt prints it.
pub fn strerror(errno: i32) -> String {
    // glibc's own texts, as the C daemons print them ("Bad file descriptor"); nix's table
    // differs for some errnos ("Bad file number").
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for `buf.len()` bytes; the XSI strerror_r NUL-terminates
    // what it writes on success.
    let r = unsafe { libc::strerror_r(errno, buf.as_mut_ptr().cast(), buf.len()) };
    if r == 0 {
        if let Ok(s) = std::ffi::CStr::from_bytes_until_nul(&buf) {
            return s.to_string_lossy().into_owned();
        }
    }
    format!("Unknown error {errno}")
}

/// The errno of an I/O error (EIO when it has none).
pub fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unknown-procedure reply from rpc-wire.md §1.8, byte for byte (payload part).
    #[test]
    fn unknown_procedure_payload() {
        let mut e = Encoder::new();
        RpcError::rpc("unknown procedure: 99").encode(&mut e);
        let hex: String = e.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let want = concat!(
            "00000027",
            "00000007",
            "00000001",
            "00000015",
            "756e6b6e6f776e2070726f6365647572653a203939",
            "000000",
            "00000002",
            "00000000",
            "00000001",
            "00000002",
            "25730000",
            "00000001",
            "00000015",
            "756e6b6e6f776e2070726f6365647572653a203939",
            "000000",
            "00000000",
            "ffffffff",
            "ffffffff",
            "00000000"
        );
        assert_eq!(hex, want);
        let back = RpcError::decode(&mut Decoder::new(e.as_bytes())).unwrap();
        assert_eq!(back, RpcError::rpc("unknown procedure: 99"));
    }

    #[test]
    fn system_error_text() {
        let e = RpcError::system(domain::LOGGING, libc::EBUSY, "Cannot open log file: '/x'");
        assert_eq!(
            e.message(),
            "Cannot open log file: '/x': Device or resource busy"
        );
        assert_eq!(e.int1, 16);
        assert_eq!(e.str1.as_deref(), Some("%s"));
    }

    #[test]
    fn check_flags_names_only_unknown_bits() {
        assert!(RpcError::check_flags(domain::LOGGING, "f", 0, 0).is_ok());
        assert!(RpcError::check_flags(domain::LOGGING, "f", 3, 3).is_ok());
        let e = RpcError::check_flags(domain::LOCKSPACE, "g", 7, 3).unwrap_err();
        assert_eq!(e, RpcError::unsupported_flags(domain::LOCKSPACE, "g", 4));
        assert_eq!(e.message(), "unsupported flags (0x4) in function g");
    }
}
