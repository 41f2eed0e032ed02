//! Program 0x87539319 (`log_protocol.x`): the four procedures' arguments and replies,
//! encoded and decoded in wire order. Both the daemon and the client library use these.

use crate::message::STRING_MAX;
use crate::xdr::{Decoder, Encoder, XdrError};

pub const PROGRAM: u32 = 0x8753_9319;
pub const VERSION: u32 = 1;

pub mod proc_ {
    pub const DOMAIN_OPEN_LOG_FILE: i32 = 1;
    pub const DOMAIN_GET_LOG_FILE_POSITION: i32 = 2;
    pub const DOMAIN_READ_LOG_FILE: i32 = 3;
    pub const DOMAIN_APPEND_LOG_FILE: i32 = 4;
}

/// `VIR_LOG_MANAGER_PROTOCOL_DOMAIN_OPEN_LOG_FILE_TRUNCATE`.
pub const OPEN_TRUNCATE: u32 = 1;

/// The domain a log belongs to; recorded only for the re-exec state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub uuid: [u8; 16],
    pub name: String,
}

impl Domain {
    fn encode(&self, e: &mut Encoder) {
        e.fixed_opaque(&self.uuid).string(&self.name);
    }
    fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(Domain {
            uuid: d.uuid()?,
            name: lossy(d.string_lossless(STRING_MAX)?),
        })
    }
}

/// `(inode, offset)` of a position in a rotating log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogFilePosition {
    pub inode: u64,
    pub offset: u64,
}

impl LogFilePosition {
    pub fn encode(&self, e: &mut Encoder) {
        e.u64(self.inode).u64(self.offset);
    }
    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(LogFilePosition {
            inode: d.u64()?,
            offset: d.u64()?,
        })
    }
}

fn lossy(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Paths and messages stay raw bytes: Linux paths need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenLogFileArgs {
    pub driver: String,
    pub dom: Domain,
    pub path: Vec<u8>,
    pub flags: u32,
}

impl OpenLogFileArgs {
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.driver);
        self.dom.encode(e);
        e.opaque(&self.path).u32(self.flags);
    }
    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(OpenLogFileArgs {
            driver: lossy(d.string_lossless(STRING_MAX)?),
            dom: Domain::decode(d)?,
            path: d.string_lossless(STRING_MAX)?,
            flags: d.u32()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetLogFilePositionArgs {
    pub path: Vec<u8>,
    pub flags: u32,
}

impl GetLogFilePositionArgs {
    pub fn encode(&self, e: &mut Encoder) {
        e.opaque(&self.path).u32(self.flags);
    }
    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(GetLogFilePositionArgs {
            path: d.string_lossless(STRING_MAX)?,
            flags: d.u32()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadLogFileArgs {
    pub path: Vec<u8>,
    pub pos: LogFilePosition,
    pub maxlen: u64,
    pub flags: u32,
}

impl ReadLogFileArgs {
    pub fn encode(&self, e: &mut Encoder) {
        e.opaque(&self.path);
        self.pos.encode(e);
        e.u64(self.maxlen).u32(self.flags);
    }
    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(ReadLogFileArgs {
            path: d.string_lossless(STRING_MAX)?,
            pos: LogFilePosition::decode(d)?,
            maxlen: d.u64()?,
            flags: d.u32()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendLogFileArgs {
    pub driver: String,
    pub dom: Domain,
    pub path: Vec<u8>,
    pub message: Vec<u8>,
    pub flags: u32,
}

impl AppendLogFileArgs {
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.driver);
        self.dom.encode(e);
        e.opaque(&self.path).opaque(&self.message).u32(self.flags);
    }
    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(AppendLogFileArgs {
            driver: lossy(d.string_lossless(STRING_MAX)?),
            dom: Domain::decode(d)?,
            path: d.string_lossless(STRING_MAX)?,
            message: d.string_lossless(STRING_MAX)?,
            flags: d.u32()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The OpenLogFile call of virtlogd.md §1.3 is 72 bytes of payload.
    #[test]
    fn open_call_size() {
        let a = OpenLogFileArgs {
            driver: "qemu".into(),
            dom: Domain {
                uuid: [0; 16],
                name: "vm1".into(),
            },
            path: b"/var/log/libvirt/qemu/vm1.log".to_vec(),
            flags: 0,
        };
        let mut e = Encoder::new();
        a.encode(&mut e);
        assert_eq!(e.len(), 72);
    }

    proptest! {
        #[test]
        fn append_roundtrip(driver in "[a-z]{0,8}", name in ".{0,16}", uuid: [u8; 16],
                            path in proptest::collection::vec(1u8..=255, 0..64),
                            message in proptest::collection::vec(any::<u8>(), 0..128), flags: u32) {
            let a = AppendLogFileArgs { driver, dom: Domain { uuid, name }, path, message, flags };
            let mut e = Encoder::new();
            a.encode(&mut e);
            let bytes = e.into_inner();
            prop_assert_eq!(AppendLogFileArgs::decode(&mut Decoder::new(&bytes)).unwrap(), a);
            for cut in 0..bytes.len() {
                prop_assert!(AppendLogFileArgs::decode(&mut Decoder::new(&bytes[..cut])).is_err());
            }
        }

        #[test]
        fn read_roundtrip(path in proptest::collection::vec(any::<u8>(), 0..64), inode: u64, offset: u64, maxlen: u64, flags: u32) {
            let a = ReadLogFileArgs { path, pos: LogFilePosition { inode, offset }, maxlen, flags };
            let mut e = Encoder::new();
            a.encode(&mut e);
            let bytes = e.into_inner();
            prop_assert_eq!(ReadLogFileArgs::decode(&mut Decoder::new(&bytes)).unwrap(), a);
        }
    }
}
