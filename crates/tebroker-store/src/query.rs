//! What the API asks the store, and the SQL both backends share.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::record::{EnvStateChange, LeaseRecord, Millis, Outcome, WaitRecord};

/// Largest history page; a bigger `limit` is cut to this.
pub const MAX_PAGE: u32 = 1000;
/// The page size when none is given.
pub const DEFAULT_PAGE: u32 = 50;

/// A filtered page of ended leases, newest first (`ended_ms` descending, then the row id).
/// `since` and `until` bound `ended_ms` (`since <= ended_ms < until`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    pub env: Option<String>,
    pub job: Option<String>,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    pub outcome: Option<Outcome>,
    /// Page size: 0 means [`DEFAULT_PAGE`], anything above [`MAX_PAGE`] is cut to it.
    pub limit: u32,
    /// Continue after this cursor (the previous page's `next`).
    pub after: Option<Cursor>,
}

impl HistoryQuery {
    pub fn page_size(&self) -> u32 {
        match self.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        }
    }
}

/// Where a history page ends: the last lease's `ended_ms` and row id. Keyset paging, so pages
/// do not shift when new leases arrive. Written as `ENDED.ID` (both decimal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub ended_ms: Millis,
    pub id: i64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.ended_ms, self.id)
    }
}

/// A cursor string that is not `ENDED.ID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad history cursor {0:?}: expected the `next` value of a previous page (ENDED.ID)")]
pub struct BadCursor(pub String);

impl FromStr for Cursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Cursor, BadCursor> {
        let bad = || BadCursor(s.chars().take(64).collect());
        let (ended, id) = s.split_once('.').ok_or_else(bad)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(ended) || !digits(id) {
            return Err(bad());
        }
        Ok(Cursor {
            ended_ms: ended.parse().map_err(|_| bad())?,
            id: id.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An ended lease as stored, with its row id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredLease {
    pub id: i64,
    #[serde(flatten)]
    pub lease: LeaseRecord,
}

impl StoredLease {
    pub fn cursor(&self) -> Cursor {
        Cursor {
            ended_ms: self.lease.ended_ms,
            id: self.id,
        }
    }
}

/// One page of history; `next` is set when there may be more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryPage {
    pub leases: Vec<StoredLease>,
    pub next: Option<Cursor>,
}

/// What the inventory reports per TE besides its latest state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InventoryQuery {
    /// How many of the latest outcomes to list per TE.
    pub last_outcomes: u32,
    /// The failure rate counts leases that ended at or after this time.
    pub window_start_ms: Millis,
}

/// A TE as the inventory shows it: its latest state and how its leases went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnvSummary {
    /// The TE's newest state change.
    #[serde(flatten)]
    pub latest: EnvStateChange,
    /// Newest first.
    pub last_outcomes: Vec<Outcome>,
    /// Leases that ended in the window, and how many of them failed.
    pub window_leases: u64,
    pub window_failures: u64,
}

impl EnvSummary {
    /// Failed leases / leases in the window; `None` when there were none.
    pub fn failure_rate(&self) -> Option<f64> {
        (self.window_leases > 0).then(|| self.window_failures as f64 / self.window_leases as f64)
    }
}

/// Ended waits, newest end first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaitQuery {
    pub function: Option<String>,
    /// Only waits that ended at or after this time.
    pub since: Option<Millis>,
    /// Only granted ones (abandoned waits say nothing about how long a grant takes).
    pub granted_only: bool,
    /// 0 means [`DEFAULT_PAGE`]; cut to [`MAX_PAGE`].
    pub limit: u32,
}

/// How long recent grants waited, for a waiting client's estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WaitEstimate {
    pub median_ms: Millis,
    pub samples: usize,
}

impl WaitEstimate {
    /// The median of `waits` (the lower middle one for an even count); `None` when empty.
    pub fn from_waits(waits: &[WaitRecord]) -> Option<WaitEstimate> {
        let mut ms: Vec<Millis> = waits.iter().map(WaitRecord::waited_ms).collect();
        if ms.is_empty() {
            return None;
        }
        ms.sort_unstable();
        Some(WaitEstimate {
            median_ms: ms[(ms.len() - 1) / 2],
            samples: ms.len(),
        })
    }
}

/// How many records a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PurgeCounts {
    pub leases: u64,
    pub env_states: u64,
    pub waits: u64,
}

/// The retention cutoff: `days` days before `now_ms` (saturating: a huge `days` purges nothing
/// rather than overflowing).
pub(crate) fn cutoff(days: u32, now_ms: Millis) -> Millis {
    now_ms.saturating_sub(i64::from(days).saturating_mul(86_400_000))
}

/// A bound SQL value (the two drivers bind them their own way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Param {
    Int(i64),
    Text(String),
}

pub(crate) const LEASE_COLUMNS: &str = "id, broker, lockenv_handle, env, worker_id, callback, \
     job_identifier, tenant, priority, started_ms, ended_ms, outcome";

/// The history page's SQL and parameters; `ph(n)` writes the n-th (1-based) placeholder.
/// Asks for one row more than the page to learn whether there is a next page.
pub(crate) fn history_sql(q: &HistoryQuery, ph: impl Fn(usize) -> String) -> (String, Vec<Param>) {
    let mut params = Vec::new();
    let mut conds = Vec::new();
    let push = |params: &mut Vec<Param>, p: Param| {
        params.push(p);
        ph(params.len())
    };
    if let Some(env) = &q.env {
        conds.push(format!(
            "env = {}",
            push(&mut params, Param::Text(env.clone()))
        ));
    }
    if let Some(job) = &q.job {
        conds.push(format!(
            "job_identifier = {}",
            push(&mut params, Param::Text(job.clone()))
        ));
    }
    if let Some(o) = &q.outcome {
        conds.push(format!(
            "outcome = {}",
            push(&mut params, Param::Text(o.as_str().to_string()))
        ));
    }
    if let Some(since) = q.since {
        conds.push(format!(
            "ended_ms >= {}",
            push(&mut params, Param::Int(since))
        ));
    }
    if let Some(until) = q.until {
        conds.push(format!(
            "ended_ms < {}",
            push(&mut params, Param::Int(until))
        ));
    }
    if let Some(c) = q.after {
        let e = push(&mut params, Param::Int(c.ended_ms));
        let i = push(&mut params, Param::Int(c.id));
        conds.push(format!("(ended_ms, id) < ({e}, {i})"));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let sql = format!(
        "SELECT {LEASE_COLUMNS} FROM leases{filter} ORDER BY ended_ms DESC, id DESC LIMIT {}",
        u64::from(q.page_size()) + 1
    );
    (sql, params)
}

/// Turns the rows of [`history_sql`] (up to page size + 1) into a page.
pub(crate) fn into_page(mut leases: Vec<StoredLease>, q: &HistoryQuery) -> HistoryPage {
    let size = q.page_size() as usize;
    let next = if leases.len() > size {
        leases.truncate(size);
        leases.last().map(StoredLease::cursor)
    } else {
        None
    };
    HistoryPage { leases, next }
}

/// The wait query's SQL and parameters (see [`history_sql`]).
pub(crate) fn waits_sql(q: &WaitQuery, ph: impl Fn(usize) -> String) -> (String, Vec<Param>) {
    let mut params = Vec::new();
    let mut conds = Vec::new();
    if let Some(f) = &q.function {
        params.push(Param::Text(f.clone()));
        conds.push(format!("function = {}", ph(params.len())));
    }
    if q.granted_only {
        conds.push("outcome = 'granted'".to_string());
    }
    if let Some(since) = q.since {
        params.push(Param::Int(since));
        conds.push(format!("ended_ms >= {}", ph(params.len())));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let limit = match q.limit {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let sql = format!(
        "SELECT job_identifier, tenant, priority, function, queued_ms, ended_ms, outcome, env \
         FROM waits{filter} ORDER BY ended_ms DESC, id DESC LIMIT {limit}"
    );
    (sql, params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Priority, WaitEnd};

    #[test]
    fn cursor_round_trips_and_rejects_anything_else() {
        let c = Cursor {
            ended_ms: 1_700_000_000_123,
            id: 42,
        };
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c));
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "-1.2",
            "1.2.3",
            "a.b",
            "1 .2",
            "99999999999999999999.1",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn page_size_defaults_and_is_capped() {
        let mut q = HistoryQuery::default();
        assert_eq!(q.page_size(), DEFAULT_PAGE);
        q.limit = 5_000;
        assert_eq!(q.page_size(), MAX_PAGE);
    }

    #[test]
    fn median_of_waits() {
        let w = |q: Millis, g: Millis| WaitRecord {
            job_identifier: String::new(),
            tenant: String::new(),
            priority: Priority::Normal,
            function: "lockenv".into(),
            queued_ms: q,
            end: WaitEnd::Granted {
                at_ms: g,
                env: "te1".into(),
            },
        };
        assert_eq!(WaitEstimate::from_waits(&[]), None);
        let e = WaitEstimate::from_waits(&[w(0, 30), w(0, 10), w(5, 25), w(0, 1000)]).unwrap();
        assert_eq!((e.median_ms, e.samples), (20, 4));
    }
}
