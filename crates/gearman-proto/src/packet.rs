//! Binary packets: `MAGIC(4) TYPE(u32 BE) LEN(u32 BE) ARGS`, arguments separated by NUL; the last
//! argument is opaque and may itself hold NULs.

use bytes::{BufMut, Bytes, BytesMut};

/// Size of the fixed packet header.
pub const HEADER_LEN: usize = 12;

/// Direction marker of a binary packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Magic {
    /// `\0REQ`: a request, sent by clients and workers to the server.
    Req,
    /// `\0RES`: a response, sent by the server.
    Res,
}

impl Magic {
    pub const REQ_BYTES: [u8; 4] = *b"\0REQ";
    pub const RES_BYTES: [u8; 4] = *b"\0RES";

    pub fn as_bytes(self) -> &'static [u8; 4] {
        match self {
            Magic::Req => &Self::REQ_BYTES,
            Magic::Res => &Self::RES_BYTES,
        }
    }

    pub fn from_bytes(b: &[u8]) -> Option<Magic> {
        match b {
            b"\0REQ" => Some(Magic::Req),
            b"\0RES" => Some(Magic::Res),
            _ => None,
        }
    }
}

macro_rules! packet_types {
    ($( $name:ident = $code:literal, $args:literal; )*) => {
        /// Every packet type of the Gearman protocol, with its wire code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum PacketType {
            $( $name = $code, )*
        }

        impl PacketType {
            /// The packet type for a wire code, if the code is one the protocol defines.
            pub fn from_code(code: u32) -> Option<PacketType> {
                match code {
                    $( $code => Some(PacketType::$name), )*
                    _ => None,
                }
            }

            /// Number of NUL-separated arguments this packet type carries.
            pub fn arg_count(self) -> usize {
                match self {
                    $( PacketType::$name => $args, )*
                }
            }

            /// The protocol's name for this type, e.g. `SUBMIT_JOB_BG`.
            pub fn name(self) -> &'static str {
                match self {
                    $( PacketType::$name => packet_name(stringify!($name)), )*
                }
            }
        }
    };
}

// The names are spelled in CamelCase in Rust; `name()` maps them back to the protocol's spelling.
fn packet_name(camel: &'static str) -> &'static str {
    match camel {
        "CanDo" => "CAN_DO",
        "CantDo" => "CANT_DO",
        "ResetAbilities" => "RESET_ABILITIES",
        "PreSleep" => "PRE_SLEEP",
        "Noop" => "NOOP",
        "SubmitJob" => "SUBMIT_JOB",
        "JobCreated" => "JOB_CREATED",
        "GrabJob" => "GRAB_JOB",
        "NoJob" => "NO_JOB",
        "JobAssign" => "JOB_ASSIGN",
        "WorkStatus" => "WORK_STATUS",
        "WorkComplete" => "WORK_COMPLETE",
        "WorkFail" => "WORK_FAIL",
        "GetStatus" => "GET_STATUS",
        "EchoReq" => "ECHO_REQ",
        "EchoRes" => "ECHO_RES",
        "SubmitJobBg" => "SUBMIT_JOB_BG",
        "Error" => "ERROR",
        "StatusRes" => "STATUS_RES",
        "SubmitJobHigh" => "SUBMIT_JOB_HIGH",
        "SetClientId" => "SET_CLIENT_ID",
        "CanDoTimeout" => "CAN_DO_TIMEOUT",
        "AllYours" => "ALL_YOURS",
        "WorkException" => "WORK_EXCEPTION",
        "OptionReq" => "OPTION_REQ",
        "OptionRes" => "OPTION_RES",
        "WorkData" => "WORK_DATA",
        "WorkWarning" => "WORK_WARNING",
        "GrabJobUniq" => "GRAB_JOB_UNIQ",
        "JobAssignUniq" => "JOB_ASSIGN_UNIQ",
        "SubmitJobHighBg" => "SUBMIT_JOB_HIGH_BG",
        "SubmitJobLow" => "SUBMIT_JOB_LOW",
        "SubmitJobLowBg" => "SUBMIT_JOB_LOW_BG",
        "SubmitJobSched" => "SUBMIT_JOB_SCHED",
        "SubmitJobEpoch" => "SUBMIT_JOB_EPOCH",
        "SubmitReduceJob" => "SUBMIT_REDUCE_JOB",
        "SubmitReduceJobBackground" => "SUBMIT_REDUCE_JOB_BACKGROUND",
        "GrabJobAll" => "GRAB_JOB_ALL",
        "JobAssignAll" => "JOB_ASSIGN_ALL",
        "GetStatusUnique" => "GET_STATUS_UNIQUE",
        "StatusResUnique" => "STATUS_RES_UNIQUE",
        other => other,
    }
}

packet_types! {
    CanDo = 1, 1;
    CantDo = 2, 1;
    ResetAbilities = 3, 0;
    PreSleep = 4, 0;
    Noop = 6, 0;
    SubmitJob = 7, 3;
    JobCreated = 8, 1;
    GrabJob = 9, 0;
    NoJob = 10, 0;
    JobAssign = 11, 3;
    WorkStatus = 12, 3;
    WorkComplete = 13, 2;
    WorkFail = 14, 1;
    GetStatus = 15, 1;
    EchoReq = 16, 1;
    EchoRes = 17, 1;
    SubmitJobBg = 18, 3;
    Error = 19, 2;
    StatusRes = 20, 5;
    SubmitJobHigh = 21, 3;
    SetClientId = 22, 1;
    CanDoTimeout = 23, 2;
    AllYours = 24, 0;
    WorkException = 25, 2;
    OptionReq = 26, 1;
    OptionRes = 27, 1;
    WorkData = 28, 2;
    WorkWarning = 29, 2;
    GrabJobUniq = 30, 0;
    JobAssignUniq = 31, 4;
    SubmitJobHighBg = 32, 3;
    SubmitJobLow = 33, 3;
    SubmitJobLowBg = 34, 3;
    SubmitJobSched = 35, 8;
    SubmitJobEpoch = 36, 4;
    SubmitReduceJob = 37, 4;
    SubmitReduceJobBackground = 38, 4;
    GrabJobAll = 39, 0;
    JobAssignAll = 40, 5;
    GetStatusUnique = 41, 1;
    StatusResUnique = 42, 6;
}

impl std::fmt::Display for PacketType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One binary packet with its arguments split out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub magic: Magic,
    pub ptype: PacketType,
    pub args: Vec<Bytes>,
}

impl Packet {
    /// A request packet (`\0REQ`).
    pub fn req<I, A>(ptype: PacketType, args: I) -> Packet
    where
        I: IntoIterator<Item = A>,
        A: Into<Bytes>,
    {
        Packet {
            magic: Magic::Req,
            ptype,
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// A response packet (`\0RES`).
    pub fn res<I, A>(ptype: PacketType, args: I) -> Packet
    where
        I: IntoIterator<Item = A>,
        A: Into<Bytes>,
    {
        Packet {
            magic: Magic::Res,
            ptype,
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// An `ERROR` response with a code word and a human-readable text.
    pub fn error(code: &str, text: &str) -> Packet {
        Packet::res(
            PacketType::Error,
            [
                Bytes::copy_from_slice(code.as_bytes()),
                Bytes::copy_from_slice(text.as_bytes()),
            ],
        )
    }

    /// The argument at `i`, or an empty slice if it is absent.
    pub fn arg(&self, i: usize) -> &[u8] {
        self.args.get(i).map(|b| &b[..]).unwrap_or(&[])
    }

    /// Length of the body (arguments and their separators) on the wire.
    pub fn body_len(&self) -> usize {
        let data: usize = self.args.iter().map(Bytes::len).sum();
        data + self.args.len().saturating_sub(1)
    }

    /// Appends the wire form of this packet to `dst`.
    pub fn encode_into(&self, dst: &mut BytesMut) {
        let body = self.body_len();
        dst.reserve(HEADER_LEN + body);
        dst.put_slice(self.magic.as_bytes());
        dst.put_u32(self.ptype as u32);
        dst.put_u32(body as u32);
        for (i, a) in self.args.iter().enumerate() {
            if i > 0 {
                dst.put_u8(0);
            }
            dst.put_slice(a);
        }
    }

    /// The wire form of this packet.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode_into(&mut b);
        b.freeze()
    }
}

/// Splits a packet body into exactly `count` arguments: the first `count - 1` end at a NUL, the
/// last takes the rest (NULs included). Returns `None` if there are too few separators.
pub fn split_args(body: Bytes, count: usize) -> Option<Vec<Bytes>> {
    if count == 0 {
        return if body.is_empty() {
            Some(Vec::new())
        } else {
            None
        };
    }
    let mut args = Vec::with_capacity(count);
    let mut rest = body;
    for _ in 0..count - 1 {
        let nul = rest.iter().position(|&b| b == 0)?;
        let arg = rest.split_to(nul);
        rest.advance_one();
        args.push(arg);
    }
    args.push(rest);
    Some(args)
}

trait AdvanceOne {
    fn advance_one(&mut self);
}

impl AdvanceOne for Bytes {
    fn advance_one(&mut self) {
        bytes::Buf::advance(self, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for code in 0..64 {
            if let Some(t) = PacketType::from_code(code) {
                assert_eq!(t as u32, code);
                assert!(t.name().chars().all(|c| c.is_ascii_uppercase() || c == '_'));
            }
        }
        assert_eq!(PacketType::from_code(5), None);
        assert_eq!(PacketType::SubmitJobHighBg.name(), "SUBMIT_JOB_HIGH_BG");
    }

    #[test]
    fn last_argument_keeps_its_nuls() {
        let args = split_args(Bytes::from_static(b"f\0u\0a\0b"), 3).unwrap();
        assert_eq!(args, vec!["f", "u", "a\0b"]);
    }

    #[test]
    fn too_few_separators_is_an_error() {
        assert!(split_args(Bytes::from_static(b"only"), 3).is_none());
        assert!(split_args(Bytes::from_static(b"x"), 0).is_none());
        assert_eq!(split_args(Bytes::new(), 1).unwrap(), vec![Bytes::new()]);
    }

    #[test]
    fn encode_matches_the_wire_layout() {
        let p = Packet::req(PacketType::SubmitJob, ["rev", "", "hello"]);
        assert_eq!(&p.to_bytes()[..], b"\0REQ\0\0\0\x07\0\0\0\x0arev\0\0hello");
    }
}
