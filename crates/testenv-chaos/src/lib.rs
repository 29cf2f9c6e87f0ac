//! The chaos runner of issue 8: real tebrokers, testenv-workers and testenv-clients under
//! random faults, and a checker of what the leases did meanwhile.
//!
//! The pure parts (the seeded fault schedule, the hold log, the checker) are unit-tested on
//! synthetic runs; `run` is the edge that starts and kills processes.

pub mod check;
pub mod clock;
pub mod fleet;
pub mod holdlog;
pub mod netns;
pub mod run;
pub mod schedule;
