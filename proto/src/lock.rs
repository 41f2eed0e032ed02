//! Program 0x0EA7BEEF (`lock_protocol.x`): the eight procedures' arguments in wire order.
//! Every procedure returns void. Both the daemon and the client library use these.

use crate::xdr::{lossy, Decoder, Encoder, XdrError};

pub const PROGRAM: u32 = 0x0EA7_BEEF;
pub const VERSION: u32 = 1;
/// `VIR_LOCK_SPACE_PROTOCOL_STRING_MAX`.
pub const STRING_MAX: usize = 65_536;

pub mod proc_ {
    pub const REGISTER: i32 = 1;
    pub const RESTRICT: i32 = 2;
    pub const NEW: i32 = 3;
    pub const CREATE_RESOURCE: i32 = 4;
    pub const DELETE_RESOURCE: i32 = 5;
    pub const ACQUIRE_RESOURCE: i32 = 6;
    pub const RELEASE_RESOURCE: i32 = 7;
    pub const CREATE_LOCKSPACE: i32 = 8;
}

/// `VIR_LOCK_SPACE_ACQUIRE_SHARED`: take a read lock; compatible with other shared holders.
/// The same bits name a held resource's mode in the re-exec state.
pub const ACQUIRE_SHARED: u32 = 1;
/// `VIR_LOCK_SPACE_ACQUIRE_AUTOCREATE`: create the file if needed; unlink it on last release.
pub const ACQUIRE_AUTOCREATE: u32 = 2;
/// All flags ACQUIRE_RESOURCE accepts.
pub const ACQUIRE_FLAGS_MASK: u32 = ACQUIRE_SHARED | ACQUIRE_AUTOCREATE;

/// `virLockSpaceProtocolOwner`: the VM (uuid, name, id) and the pid of the process using
/// its disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uuid: [u8; 16],
    pub name: String,
    /// Domain id; libvirt's plugin refuses 0 ("Missing ID parameter for domain object").
    pub id: u32,
    pub pid: u32,
}

impl Owner {
    pub fn encode(&self, e: &mut Encoder) {
        e.fixed_opaque(&self.uuid)
            .string(&self.name)
            .u32(self.id)
            .u32(self.pid);
    }
    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(Owner {
            uuid: d.uuid()?,
            name: lossy(d.string_lossless(STRING_MAX)?),
            id: d.u32()?,
            pid: d.u32()?,
        })
    }
}

/// REGISTER's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterArgs {
    pub owner: Owner,
    pub flags: u32,
}

impl RegisterArgs {
    pub fn encode(&self, e: &mut Encoder) {
        self.owner.encode(e);
        e.u32(self.flags);
    }
    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(RegisterArgs {
            owner: Owner::decode(d)?,
            flags: d.u32()?,
        })
    }
}

/// The `{path, name, flags}` shape shared by CREATE/DELETE/ACQUIRE/RELEASE_RESOURCE.
/// Decoding refuses non-UTF-8 strings: a converted name would name a different file (the
/// daemon decodes the bytes itself and answers `INVALID_ARG`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceArgs {
    pub path: String,
    pub name: String,
    pub flags: u32,
}

impl ResourceArgs {
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.path).string(&self.name).u32(self.flags);
    }
    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(ResourceArgs {
            path: d.string(STRING_MAX)?,
            name: d.string(STRING_MAX)?,
            flags: d.u32()?,
        })
    }
}

/// NEW's arguments (`{path, flags}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewArgs {
    pub path: String,
    pub flags: u32,
}

impl NewArgs {
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.path).u32(self.flags);
    }
    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(NewArgs {
            path: d.string(STRING_MAX)?,
            flags: d.u32()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// REGISTER from virtlockd.md §1.10, byte for byte.
    #[test]
    fn register_bytes() {
        let uuid = uuid::Uuid::parse_str("c7a5fdbd-cdaf-9455-926a-d65c16db1809").unwrap();
        let a = RegisterArgs {
            owner: Owner {
                uuid: *uuid.as_bytes(),
                name: "vm1".into(),
                id: 1,
                pid: 12345,
            },
            flags: 0,
        };
        let mut e = Encoder::new();
        a.encode(&mut e);
        let hex: String = e.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "c7a5fdbdcdaf9455926ad65c16db180900000003766d31000000000100003039\
             00000000"
        );
    }

    proptest! {
        #[test]
        fn resource_roundtrip(path in ".{0,40}", name in ".{0,40}", flags: u32) {
            let a = ResourceArgs { path, name, flags };
            let mut e = Encoder::new();
            a.encode(&mut e);
            let b = e.into_inner();
            prop_assert_eq!(ResourceArgs::decode(&mut Decoder::new(&b)).unwrap(), a);
            for cut in 0..b.len() {
                prop_assert!(ResourceArgs::decode(&mut Decoder::new(&b[..cut])).is_err());
            }
        }
    }
}
