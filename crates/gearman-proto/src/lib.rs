//! The Gearman wire protocol, with no I/O.
//!
//! * [`packet`]: the binary packet types and their argument layout.
//! * [`codec`]: framing of a byte stream into [`Frame`]s (binary packets and admin text lines
//!   share one port), usable directly or as a `tokio_util::codec` codec.
//! * [`admin`]: the admin text commands (`status`, `workers`, ...) and their replies.

pub mod admin;
pub mod codec;
pub mod packet;

pub use admin::{AdminCommand, AdminError};
pub use codec::{Codec, DecodeError, Frame, DEFAULT_MAX_ADMIN_LINE, DEFAULT_MAX_FRAME};
pub use packet::{Magic, Packet, PacketType, HEADER_LEN};
