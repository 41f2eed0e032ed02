//! The "VHIP" inspect program (0x56484950, version 1): an operator-only view of what a
//! daemon holds, served on its admin socket (so only the daemon's own uid gets in).
//! libvirt's clients never see it. virtlogd answers LIST_LOGS, virtlockd LIST_LOCKS, under
//! the same program number. These are its wire types; the daemons fill them.

use crate::lock;
use crate::message::STRING_MAX;
use crate::xdr::{lossy, Decoder, Encoder, XdrError};

pub const PROGRAM: u32 = 0x5648_4950;
pub const VERSION: u32 = 1;

pub mod proc_ {
    /// virtlogd: `LogEntry<>` of every open log file.
    pub const LIST_LOGS: i32 = 1;
    /// virtlockd: `LockEntry<>` of every held resource.
    pub const LIST_LOCKS: i32 = 2;
}

/// Most entries a reply may carry (a bound for the decoder, not a daemon limit).
pub const LIST_MAX: usize = 1 << 20;

/// One open log: `{path string, driver string, domname string, domuuid opaque[16],
/// inode u64, offset u64}` in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub path: Vec<u8>,
    pub driver: String,
    pub domname: String,
    pub domuuid: [u8; 16],
    pub inode: u64,
    pub offset: u64,
}

impl LogEntry {
    pub fn encode(&self, e: &mut Encoder) {
        e.opaque(&self.path)
            .string(&self.driver)
            .string(&self.domname)
            .fixed_opaque(&self.domuuid)
            .u64(self.inode)
            .u64(self.offset);
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(LogEntry {
            path: d.string_lossless(STRING_MAX)?,
            driver: lossy(d.string_lossless(STRING_MAX)?),
            domname: lossy(d.string_lossless(STRING_MAX)?),
            domuuid: d.uuid()?,
            inode: d.u64()?,
            offset: d.u64()?,
        })
    }

    /// The whole LIST_LOGS reply.
    pub fn encode_list(list: &[LogEntry]) -> Vec<u8> {
        encode_list(list, LogEntry::encode)
    }

    pub fn decode_list(buf: &[u8]) -> Result<Vec<LogEntry>, XdrError> {
        // Smallest entry: 3 empty strings + uuid + 2 hypers = 12 + 16 + 16.
        decode_list(buf, 44, LogEntry::decode)
    }
}

/// Most owners per entry the decoder accepts.
pub const OWNERS_MAX: usize = 1 << 16;

/// One held resource: `{lockspace string, name string, path string, shared bool,
/// owners u32<>}` in wire order. `lockspace` is `""` for the default lockspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockEntry {
    pub lockspace: String,
    pub name: String,
    pub path: String,
    pub shared: bool,
    pub owners: Vec<u32>,
}

impl LockEntry {
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.lockspace)
            .string(&self.name)
            .string(&self.path)
            .bool(self.shared)
            .u32(self.owners.len() as u32);
        for &o in &self.owners {
            e.u32(o);
        }
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        let lockspace = lossy(d.string_lossless(lock::STRING_MAX)?);
        let name = lossy(d.string_lossless(lock::STRING_MAX)?);
        let path = lossy(d.string_lossless(lock::STRING_MAX)?);
        let shared = d.bool()?;
        let n = d.array_len(OWNERS_MAX, 4)?;
        let owners = (0..n).map(|_| d.u32()).collect::<Result<_, _>>()?;
        Ok(LockEntry {
            lockspace,
            name,
            path,
            shared,
            owners,
        })
    }

    /// The whole LIST_LOCKS reply.
    pub fn encode_list(list: &[LockEntry]) -> Vec<u8> {
        encode_list(list, LockEntry::encode)
    }

    pub fn decode_list(buf: &[u8]) -> Result<Vec<LockEntry>, XdrError> {
        // Smallest entry: 3 empty strings + bool + empty array.
        decode_list(buf, 20, LockEntry::decode)
    }
}

/// A list reply: `entry<LIST_MAX>`.
fn encode_list<T>(list: &[T], encode: impl Fn(&T, &mut Encoder)) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u32(list.len() as u32);
    for l in list {
        encode(l, &mut e);
    }
    e.into_inner()
}

fn decode_list<T>(
    buf: &[u8],
    min_entry: usize,
    decode: impl Fn(&mut Decoder<'_>) -> Result<T, XdrError>,
) -> Result<Vec<T>, XdrError> {
    let mut d = Decoder::new(buf);
    let n = d.array_len(LIST_MAX, min_entry)?;
    (0..n).map(|_| decode(&mut d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_roundtrip() {
        let list = vec![
            LogEntry {
                path: b"/var/log/libvirt/qemu/vm1.log".to_vec(),
                driver: "qemu".into(),
                domname: "vm1".into(),
                domuuid: [7; 16],
                inode: 123,
                offset: 456,
            },
            LogEntry {
                path: vec![0xff, b'x'],
                driver: String::new(),
                domname: String::new(),
                domuuid: [0; 16],
                inode: 0,
                offset: u64::MAX,
            },
        ];
        let bytes = LogEntry::encode_list(&list);
        assert_eq!(LogEntry::decode_list(&bytes).unwrap(), list);
        for cut in 0..bytes.len() {
            assert!(LogEntry::decode_list(&bytes[..cut]).is_err());
        }
        assert_eq!(LogEntry::decode_list(&[0, 0, 0, 0]).unwrap(), vec![]);
    }
}
