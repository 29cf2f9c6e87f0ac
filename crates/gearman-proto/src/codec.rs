//! Framing: one port carries both binary packets (first byte NUL) and admin text lines.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::packet::{split_args, Magic, Packet, PacketType, HEADER_LEN};

/// Default largest packet body accepted (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
/// Default longest admin text line accepted.
pub const DEFAULT_MAX_ADMIN_LINE: usize = 64 * 1024;

/// One unit read off a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A well-formed binary packet.
    Packet(Packet),
    /// A complete binary packet that cannot be understood: unknown type code, or too few
    /// arguments. The stream stays in sync, so the connection may carry on.
    Malformed {
        magic: Magic,
        code: u32,
        reason: String,
    },
    /// An admin text line, without its line ending.
    Admin(String),
}

/// Errors after which the byte stream cannot be resynchronised: the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid magic \"{}\": expected \\0REQ or \\0RES", .0.escape_ascii())]
    BadMagic([u8; 4]),
    #[error("packet body of {declared} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { declared: usize, max: usize },
    #[error("admin line longer than {max} bytes")]
    AdminLineTooLong { max: usize },
    #[error("I/O error: {0}")]
    Io(String),
}

impl DecodeError {
    /// The code word to put in an `ERROR` packet for this error.
    pub fn error_code(&self) -> &'static str {
        match self {
            DecodeError::BadMagic(_) => "INVALID_MAGIC",
            DecodeError::FrameTooLarge { .. } => "PACKET_TOO_LARGE",
            DecodeError::AdminLineTooLong { .. } => "LINE_TOO_LONG",
            DecodeError::Io(_) => "IO_ERROR",
        }
    }
}

impl From<std::io::Error> for DecodeError {
    fn from(e: std::io::Error) -> Self {
        DecodeError::Io(e.to_string())
    }
}

/// Stateless framing with size limits. Implements the `tokio_util` codec traits.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub max_frame: usize,
    pub max_admin_line: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Codec {
            max_frame: DEFAULT_MAX_FRAME,
            max_admin_line: DEFAULT_MAX_ADMIN_LINE,
        }
    }
}

impl Codec {
    pub fn new(max_frame: usize) -> Self {
        Codec {
            max_frame,
            ..Codec::default()
        }
    }

    /// Takes one frame off the front of `buf` if a whole one is there.
    pub fn decode_frame(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        if first != 0 {
            return self.decode_admin_line(buf);
        }
        if buf.len() < HEADER_LEN {
            // Reject a bad magic as early as possible rather than waiting for a full header.
            let seen = &buf[..buf.len().min(4)];
            if !b"\0REQ".starts_with(seen) && !b"\0RES".starts_with(seen) {
                let mut m = [0u8; 4];
                m[..seen.len()].copy_from_slice(seen);
                return Err(DecodeError::BadMagic(m));
            }
            return Ok(None);
        }
        let magic_bytes: [u8; 4] = buf[0..4].try_into().expect("4 bytes");
        let magic = Magic::from_bytes(&magic_bytes).ok_or(DecodeError::BadMagic(magic_bytes))?;
        let code = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
        if len > self.max_frame {
            return Err(DecodeError::FrameTooLarge {
                declared: len,
                max: self.max_frame,
            });
        }
        if buf.len() < HEADER_LEN + len {
            buf.reserve(HEADER_LEN + len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let body = buf.split_to(len).freeze();
        Ok(Some(Self::packet_from_parts(magic, code, body)))
    }

    fn packet_from_parts(magic: Magic, code: u32, body: Bytes) -> Frame {
        let Some(ptype) = PacketType::from_code(code) else {
            return Frame::Malformed {
                magic,
                code,
                reason: format!("unknown packet type {code}"),
            };
        };
        match split_args(body, ptype.arg_count()) {
            Some(args) => Frame::Packet(Packet { magic, ptype, args }),
            None => Frame::Malformed {
                magic,
                code,
                reason: format!(
                    "{ptype} needs {} argument(s) separated by NUL",
                    ptype.arg_count()
                ),
            },
        }
    }

    fn decode_admin_line(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            if buf.len() > self.max_admin_line {
                return Err(DecodeError::AdminLineTooLong {
                    max: self.max_admin_line,
                });
            }
            return Ok(None);
        };
        if nl > self.max_admin_line {
            return Err(DecodeError::AdminLineTooLong {
                max: self.max_admin_line,
            });
        }
        let mut line = buf.split_to(nl + 1);
        line.truncate(nl);
        if line.last() == Some(&b'\r') {
            line.truncate(nl - 1);
        }
        Ok(Some(Frame::Admin(
            String::from_utf8_lossy(&line).into_owned(),
        )))
    }
}

impl Decoder for Codec {
    type Item = Frame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        self.decode_frame(src)
    }
}

impl Encoder<&Packet> for Codec {
    type Error = std::io::Error;

    fn encode(&mut self, item: &Packet, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        item.encode_into(dst);
        Ok(())
    }
}

impl Encoder<Packet> for Codec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        item.encode_into(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(codec: &Codec, bytes: &[u8]) -> Result<Vec<Frame>, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = codec.decode_frame(&mut buf)? {
            out.push(f);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        Ok(out)
    }

    #[test]
    fn admin_lines_and_packets_interleave() {
        let mut wire = b"status\r\n".to_vec();
        wire.extend_from_slice(&Packet::req(PacketType::EchoReq, ["x"]).to_bytes());
        wire.extend_from_slice(b"workers\n");
        let frames = decode_all(&Codec::default(), &wire).unwrap();
        assert_eq!(
            frames,
            vec![
                Frame::Admin("status".into()),
                Frame::Packet(Packet::req(PacketType::EchoReq, ["x"])),
                Frame::Admin("workers".into()),
            ]
        );
    }

    #[test]
    fn oversized_header_is_rejected_before_the_body_arrives() {
        let mut wire = b"\0REQ".to_vec();
        wire.extend_from_slice(&7u32.to_be_bytes());
        wire.extend_from_slice(&u32::MAX.to_be_bytes());
        let err = decode_all(&Codec::new(1024), &wire).unwrap_err();
        assert!(matches!(err, DecodeError::FrameTooLarge { .. }));
    }

    #[test]
    fn bad_magic_is_rejected_early() {
        let err = decode_all(&Codec::default(), b"\0XY").unwrap_err();
        assert!(matches!(err, DecodeError::BadMagic(_)));
    }

    #[test]
    fn unknown_type_and_missing_args_keep_the_stream_in_sync() {
        let mut wire = b"\0REQ".to_vec();
        wire.extend_from_slice(&99u32.to_be_bytes());
        wire.extend_from_slice(&2u32.to_be_bytes());
        wire.extend_from_slice(b"ab");
        wire.extend_from_slice(b"\0REQ\0\0\0\x07\0\0\0\x03abc");
        wire.extend_from_slice(&Packet::req(PacketType::Noop, Vec::<Bytes>::new()).to_bytes());
        let frames = decode_all(&Codec::default(), &wire).unwrap();
        assert!(matches!(frames[0], Frame::Malformed { code: 99, .. }));
        assert!(matches!(frames[1], Frame::Malformed { code: 7, .. }));
        assert!(matches!(frames[2], Frame::Packet(_)));
    }

    #[test]
    fn long_admin_line_is_an_error() {
        let codec = Codec {
            max_admin_line: 8,
            ..Codec::default()
        };
        assert!(decode_all(&codec, b"aaaaaaaaaaaaaaa").is_err());
        assert!(decode_all(&codec, b"aaaaaaaaaaaa\n").is_err());
        assert_eq!(decode_all(&codec, b"status\n").unwrap().len(), 1);
    }

    fn arb_packet() -> impl Strategy<Value = Packet> {
        let codes: Vec<u32> = (0..50)
            .filter_map(PacketType::from_code)
            .map(|t| t as u32)
            .collect();
        (
            prop::sample::select(codes),
            any::<bool>(),
            prop::collection::vec(prop::collection::vec(1u8..=255, 0..20), 8),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(code, req, mut args, last)| {
                let ptype = PacketType::from_code(code).unwrap();
                let n = ptype.arg_count();
                args.truncate(n.saturating_sub(1));
                let mut args: Vec<Bytes> = args.into_iter().map(Bytes::from).collect();
                if n > 0 {
                    args.push(Bytes::from(last));
                }
                Packet {
                    magic: if req { Magic::Req } else { Magic::Res },
                    ptype,
                    args,
                }
            })
    }

    proptest! {
        #[test]
        fn round_trip_split_at_every_byte(packets in prop::collection::vec(arb_packet(), 1..5)) {
            let mut wire = BytesMut::new();
            for p in &packets {
                p.encode_into(&mut wire);
            }
            let codec = Codec::default();
            for split in 0..=wire.len() {
                let mut buf = BytesMut::from(&wire[..split]);
                let mut got = Vec::new();
                while let Some(f) = codec.decode_frame(&mut buf).unwrap() {
                    got.push(f);
                }
                buf.extend_from_slice(&wire[split..]);
                while let Some(f) = codec.decode_frame(&mut buf).unwrap() {
                    got.push(f);
                }
                let want: Vec<Frame> = packets.iter().cloned().map(Frame::Packet).collect();
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let codec = Codec::new(4096);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode_frame(&mut buf) {}
        }
    }
}
