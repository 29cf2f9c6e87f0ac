//! The `lockenv` request, defined once in `testenv-proto`.

pub use testenv_proto::request::*;
pub use testenv_proto::LOCKENV;
