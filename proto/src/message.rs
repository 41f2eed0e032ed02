//! libvirt's RPC message layout (`virnetprotocol.x`): the length word, the 24-byte header,
//! the fd count of the `*_WITH_FDS` types, and the size limits that go with them.

use crate::error::RpcError;
use crate::xdr::{Decoder, Encoder, XdrError};

/// Largest header + payload (+ nfds) of one message, length word excluded.
pub const MESSAGE_MAX: usize = 33_554_432;
/// Size of the length word that starts every frame (it counts itself).
pub const LEN_WORD: usize = 4;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 24;
/// Most fds one message may carry.
pub const NUM_FDS_MAX: usize = 32;
/// `virNetMessageNonnullString` bound, used by the log and admin programs.
pub const STRING_MAX: usize = 4_194_304;

/// The keepalive program ("keep"); these daemons only ever answer its PINGs.
pub const KEEPALIVE_PROGRAM: u32 = 0x6b65_6570;
pub const KEEPALIVE_VERSION: u32 = 1;
pub const KEEPALIVE_PING: i32 = 1;
pub const KEEPALIVE_PONG: i32 = 2;

/// `virNetMessageType`.
pub mod msg_type {
    pub const CALL: i32 = 0;
    pub const REPLY: i32 = 1;
    pub const MESSAGE: i32 = 2;
    pub const STREAM: i32 = 3;
    pub const CALL_WITH_FDS: i32 = 4;
    pub const REPLY_WITH_FDS: i32 = 5;
    pub const STREAM_HOLE: i32 = 6;
}

/// `virNetMessageStatus`.
pub mod status {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const CONTINUE: i32 = 2;
}

/// `virNetMessageHeader`, in wire order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub prog: u32,
    pub vers: u32,
    pub proc_: i32,
    pub type_: i32,
    pub serial: u32,
    pub status: i32,
}

impl Header {
    pub fn encode(&self, e: &mut Encoder) {
        e.u32(self.prog)
            .u32(self.vers)
            .i32(self.proc_)
            .i32(self.type_)
            .u32(self.serial)
            .i32(self.status);
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        Ok(Header {
            prog: d.u32()?,
            vers: d.u32()?,
            proc_: d.i32()?,
            type_: d.i32()?,
            serial: d.u32()?,
            status: d.i32()?,
        })
    }

    /// Whether this message type carries an nfds word after the header.
    pub fn has_fds(&self) -> bool {
        self.type_ == msg_type::CALL_WITH_FDS || self.type_ == msg_type::REPLY_WITH_FDS
    }

    /// The reply header for a call: prog, vers, proc and serial echoed.
    pub fn reply(&self, with_fds: bool, status: i32) -> Header {
        Header {
            type_: if with_fds {
                msg_type::REPLY_WITH_FDS
            } else {
                msg_type::REPLY
            },
            status,
            ..*self
        }
    }
}

/// Why a received frame cannot be taken: the connection is closed without a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("packet {0} bytes received from server too small")]
    TooSmall(usize),
    #[error("packet {0} bytes received from server too large")]
    TooLarge(usize),
    #[error("cannot decode header: {0}")]
    Header(XdrError),
    #[error("cannot decode fd count: {0}")]
    FdCount(XdrError),
    #[error("Too many FDs to receive ({0} > {NUM_FDS_MAX})")]
    TooManyFds(usize),
}

/// Checks a received length word. `Err` means: close the connection without a reply,
/// which is what libvirt does for both too-small and too-large frames.
pub fn check_length(len: u32) -> Result<usize, FrameError> {
    let len = len as usize;
    if len < LEN_WORD + HEADER_LEN {
        // libvirt accepts 4..27 at this point and then fails to decode the header;
        // the outcome (connection closed, nothing sent) is the same.
        return Err(FrameError::TooSmall(len));
    }
    if len - LEN_WORD > MESSAGE_MAX {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Builds one complete frame: length word, header, optional nfds, payload.
pub fn encode_frame(header: &Header, nfds: Option<u32>, payload: &[u8]) -> Vec<u8> {
    let body = HEADER_LEN + nfds.map_or(0, |_| 4) + payload.len();
    let mut e = Encoder::with_buffer(Vec::with_capacity(LEN_WORD + body));
    e.u32((LEN_WORD + body) as u32);
    header.encode(&mut e);
    if let Some(n) = nfds {
        e.u32(n);
    }
    let mut v = e.into_inner();
    v.extend_from_slice(payload);
    v
}

/// The frame of an error reply to `call`: always type REPLY, status ERROR, no fds.
pub fn encode_error_frame(call: &Header, err: &RpcError) -> Vec<u8> {
    let mut e = Encoder::new();
    err.encode(&mut e);
    encode_frame(&call.reply(false, status::ERROR), None, e.as_bytes())
}

/// The keepalive PONG answering a PING.
pub fn pong_frame() -> Vec<u8> {
    encode_frame(
        &Header {
            prog: KEEPALIVE_PROGRAM,
            vers: KEEPALIVE_VERSION,
            proc_: KEEPALIVE_PONG,
            type_: msg_type::MESSAGE,
            serial: 0,
            status: status::OK,
        },
        None,
        &[],
    )
}

/// A decoded message body (everything after the length word), fds not yet attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub header: Header,
    /// Announced fd count (0 for types without fds).
    pub nfds: usize,
    /// Offset of the payload in the body buffer.
    pub payload_offset: usize,
}

/// Parses the header (and nfds) of a message body. `Err` means close the connection.
pub fn parse_body(body: &[u8]) -> Result<RawMessage, FrameError> {
    let mut d = Decoder::new(body);
    let header = Header::decode(&mut d).map_err(FrameError::Header)?;
    let mut nfds = 0;
    if header.has_fds() {
        let n = d.u32().map_err(FrameError::FdCount)? as usize;
        if n > NUM_FDS_MAX {
            return Err(FrameError::TooManyFds(n));
        }
        nfds = n;
    }
    Ok(RawMessage {
        header,
        nfds,
        payload_offset: d.position(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ping_pong_bytes() {
        let hex: String = pong_frame().iter().map(|b| format!("{b:02x}")).collect();
        let want = concat!(
            "0000001c", "6b656570", "00000001", "00000002", "00000002", "00000000", "00000000"
        );
        assert_eq!(hex, want);
    }

    #[test]
    fn length_limits() {
        assert!(check_length(3).is_err());
        assert!(check_length(27).is_err());
        assert!(check_length(28).is_ok());
        assert!(check_length((MESSAGE_MAX + 4) as u32).is_ok());
        assert!(check_length((MESSAGE_MAX + 5) as u32).is_err());
    }

    #[test]
    fn too_many_fds() {
        let h = Header {
            prog: 1,
            vers: 1,
            proc_: 1,
            type_: msg_type::CALL_WITH_FDS,
            serial: 0,
            status: 0,
        };
        let f = encode_frame(&h, Some(33), &[]);
        assert!(parse_body(&f[4..]).is_err());
        let f = encode_frame(&h, Some(32), &[]);
        assert_eq!(parse_body(&f[4..]).unwrap().nfds, 32);
    }

    proptest! {
        #[test]
        fn frame_roundtrip(prog: u32, vers: u32, proc_: i32, ty in 0i32..7, serial: u32, st in 0i32..3,
                           nfds in 0u32..=32, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let h = Header { prog, vers, proc_, type_: ty, serial, status: st };
            let n = if h.has_fds() { Some(nfds) } else { None };
            let f = encode_frame(&h, n, &payload);
            let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]);
            prop_assert_eq!(len as usize, f.len());
            let m = parse_body(&f[4..]).unwrap();
            prop_assert_eq!(m.header, h);
            prop_assert_eq!(m.nfds, n.unwrap_or(0) as usize);
            prop_assert_eq!(&f[4 + m.payload_offset..], &payload[..]);
        }

        #[test]
        fn truncated_header_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            prop_assert!(parse_body(&bytes).is_err());
        }
    }
}
