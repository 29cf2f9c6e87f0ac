//! Test harness shared by the workspace's integration tests (a dev-dependency only):
//!
//! - [`require_program`] / [`find_program`]: where a peer program is installed;
//! - [`free_port`]: a loopback port that was free a moment ago;
//! - [`PeerServer`]: gearmand or PyPI gear's geard on 127.0.0.1, killed (and reaped) on drop;
//! - [`LoggedChild`]: a child process whose output goes to a temp file, killed on drop;
//! - [`KillOnDrop`]: a bare child process killed on drop;
//! - [`Pki`]: a CA and certificates for 127.0.0.1/localhost, by common name;
//! - [`wait_until`]: wait for an observable event with a deadline;
//! - [`admin`], [`parse_status`], [`stat`]: admin commands and their answers.
//!
//! Missing peers are a broken environment, not a reason to skip: the helpers panic and say to
//! run `scripts/install-peers.sh`.

mod admin;
mod peer;
mod pki;
pub mod postgres;
mod process;
mod wait;

pub use admin::{admin, answers_with_list, parse_status, stat, StatusRow};
pub use peer::{free_port, Peer, PeerServer};
pub use pki::{Files, Pki};
pub use process::{find_program, require_program, run_with_timeout, KillOnDrop, LoggedChild};
pub use wait::{block_on_within, wait_until, wait_until_within, wait_until_within_or_none, TIMEOUT};
