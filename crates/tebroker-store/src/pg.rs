//! The shared store: PostgreSQL through the synchronous `postgres` crate (tokio-postgres with
//! its own small runtime). Several brokers write one database: records carry their own key, so
//! nothing depends on which broker wrote first, and migrations take an advisory lock.
//!
//! The connection is made again after the server restarts: an operation that finds it closed
//! fails, and the next one reconnects.

use std::collections::HashMap;
use std::time::Duration;

use postgres::config::Host;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls};

use crate::query::{self, Param, StoredLease};
use crate::record::{labels_from_text, labels_to_text, now_ms, Record};
use crate::schema::{self, Dialect};
use crate::{
    EnvState, EnvStateChange, EnvSummary, HistoryPage, HistoryQuery, InventoryQuery, LeaseRecord,
    Millis, Outcome, PauseKind, Priority, PurgeCounts, Stamped, Store, StoreError, TePause,
    WaitEnd, WaitQuery, WaitRecord,
};

/// Serialises migrations between brokers opening the same database at once ("tebroker").
const MIGRATION_LOCK: i64 = 0x7465_6272_6f6b_6572;

/// Used when the address does not say (`connect_timeout=`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn parse_config(address: &str) -> Result<Config, StoreError> {
    let mut config: Config = address
        .parse()
        .map_err(|e: postgres::Error| StoreError::BadAddress(e.to_string()))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("tebroker");
    }
    config.keepalives(true);
    Ok(config)
}

/// Host, port, database and user; never the password.
pub(crate) fn describe_config(c: &Config) -> String {
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = c.get_ports().iter().map(u16::to_string).collect();
    format!(
        "postgresql host={} port={} dbname={} user={}",
        hosts.join(","),
        ports.join(","),
        c.get_dbname().unwrap_or("(default)"),
        c.get_user().unwrap_or("(default)")
    )
}

pub struct PgStore {
    config: Config,
    client: Option<Client>,
}

impl PgStore {
    /// Connects to `address` (a `postgresql://` URL or `key=value` string) and brings the
    /// schema up to date.
    pub fn connect(address: &str) -> Result<PgStore, StoreError> {
        let mut store = PgStore {
            config: parse_config(address)?,
            client: None,
        };
        store.with_client(|_| Ok(()))?;
        Ok(store)
    }

    /// Runs `f` on a live connection (connecting and migrating first if needed); a connection
    /// found closed afterwards is dropped so the next call reconnects.
    fn with_client<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            let mut client = self.config.connect(NoTls)?;
            migrate(&mut client)?;
            self.client = Some(client);
        }
        let client = self.client.as_mut().expect("connected above");
        let result = f(client);
        if result.is_err() && client.is_closed() {
            self.client = None;
        }
        result
    }

    fn envs_where(
        &mut self,
        name: Option<&str>,
        q: &InventoryQuery,
    ) -> Result<Vec<EnvSummary>, StoreError> {
        self.with_client(|c| {
            let cols = "env, agent, labels, state, since_ms, detail, holder";
            let rows = match name {
                Some(n) => c.query(&format!("SELECT {cols} FROM envs WHERE env = $1"), &[&n])?,
                None => c.query(&format!("SELECT {cols} FROM envs ORDER BY env"), &[])?,
            };
            let failure_sql = format!(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN outcome IN ({}) THEN 1 ELSE 0 END), 0) \
                 FROM leases WHERE env = $1 AND ended_ms >= $2",
                Outcome::failure_sql_list()
            );
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let env: &str = r.get(0);
                let last_outcomes = c
                    .query(
                        "SELECT outcome FROM leases WHERE env = $1 \
                         ORDER BY ended_ms DESC, id DESC LIMIT $2",
                        &[&env, &i64::from(q.last_outcomes)],
                    )?
                    .iter()
                    .map(|r| Outcome::from_text(r.get(0)))
                    .collect();
                let counts = c.query_one(&failure_sql, &[&env, &q.window_start_ms])?;
                let (n, failed): (i64, i64) = (counts.get(0), counts.get(1));
                out.push(EnvSummary {
                    latest: state_change(&r),
                    last_outcomes,
                    window_leases: n.max(0) as u64,
                    window_failures: failed.max(0) as u64,
                });
            }
            Ok(out)
        })
    }
}

/// A row of `env, agent, labels, state, since_ms, detail, holder` (from `envs` or
/// `env_states`).
fn state_change(r: &postgres::Row) -> EnvStateChange {
    EnvStateChange {
        env: r.get(0),
        agent: r.get(1),
        labels: labels_from_text(r.get(2)),
        state: EnvState::from_text(r.get(3)),
        since_ms: r.get(4),
        detail: r.get(5),
        holder: r.get(6),
    }
}

/// Pending migrations in one transaction under an advisory lock: a second broker starting at
/// the same moment waits, then finds the schema current.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(schema::VERSION_TABLE)?;
    let current = version_of(&mut tx)?;
    if current > schema::SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: schema::SCHEMA_VERSION,
        });
    }
    for (version, sql) in schema::pending(Dialect::Postgres, current) {
        tx.batch_execute(&sql)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_ms) VALUES ($1, $2)",
            &[&(version as i32), &now_ms()],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn version_of(c: &mut impl postgres::GenericClient) -> Result<u32, StoreError> {
    let v: Option<i32> = c
        .query_one("SELECT MAX(version) FROM schema_version", &[])?
        .get(0);
    Ok(v.unwrap_or(0).max(0) as u32)
}

fn pg_params(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| match p {
            Param::Int(i) => i as &(dyn ToSql + Sync),
            Param::Text(t) => t as &(dyn ToSql + Sync),
        })
        .collect()
}

/// Column-wise copies of a batch's leases, inserted with one `UNNEST` statement (one round
/// trip per batch instead of one per lease).
#[derive(Default)]
struct LeaseColumns<'a> {
    origin: Vec<i64>,
    seq: Vec<i64>,
    text: [Vec<&'a str>; 9],
    started: Vec<i64>,
    ended: Vec<i64>,
}

#[derive(Default)]
struct WaitColumns<'a> {
    origin: Vec<i64>,
    seq: Vec<i64>,
    text: [Vec<&'a str>; 5],
    queued: Vec<i64>,
    ended: Vec<i64>,
    env: Vec<Option<&'a str>>,
}

/// A batch's state changes: all into `env_states`, and each TE's newest into `envs` (one row
/// per TE, since one upsert statement may not touch a row twice), one `UNNEST` each.
fn write_states(
    tx: &mut postgres::Transaction<'_>,
    states: &[(i64, i64, &EnvStateChange)],
) -> Result<(), StoreError> {
    fn columns<'a>(rows: &[&(i64, i64, &'a EnvStateChange)]) -> StateColumns<'a> {
        let mut c = StateColumns::default();
        for (origin, seq, e) in rows {
            c.origin.push(*origin);
            c.seq.push(*seq);
            c.env.push(e.env.as_str());
            c.agent.push(e.agent.as_str());
            c.labels.push(labels_to_text(&e.labels));
            c.state.push(e.state.as_str());
            c.since.push(e.since_ms);
            c.detail.push(e.detail.as_str());
            c.holder.push(e.holder.as_deref());
        }
        c
    }
    const UNNEST: &str = "SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], \
         $5::text[], $6::text[], $7::int8[], $8::text[], $9::text[])";
    let all: Vec<_> = states.iter().collect();
    let c = columns(&all);
    tx.execute(
        &format!(
            "INSERT INTO env_states (origin, seq, env, agent, labels, state, since_ms, detail, \
             holder) {UNNEST} ON CONFLICT (origin, seq) DO NOTHING"
        ),
        &c.params(),
    )?;
    let mut newest: HashMap<&str, &(i64, i64, &EnvStateChange)> = HashMap::new();
    for s in states {
        let key = |s: &(i64, i64, &EnvStateChange)| (s.2.since_ms, s.0, s.1);
        newest
            .entry(s.2.env.as_str())
            .and_modify(|n| {
                if key(s) > key(n) {
                    *n = s;
                }
            })
            .or_insert(s);
    }
    let latest: Vec<_> = newest.into_values().collect();
    let c = columns(&latest);
    tx.execute(
        &format!(
            "INSERT INTO envs (origin, seq, env, agent, labels, state, since_ms, detail, holder) \
             {UNNEST} ON CONFLICT (env) DO UPDATE SET agent = excluded.agent, \
             labels = excluded.labels, state = excluded.state, since_ms = excluded.since_ms, \
             detail = excluded.detail, holder = excluded.holder, origin = excluded.origin, \
             seq = excluded.seq \
             WHERE (excluded.since_ms, excluded.origin, excluded.seq) \
                 > (envs.since_ms, envs.origin, envs.seq)"
        ),
        &c.params(),
    )?;
    Ok(())
}

#[derive(Default)]
struct StateColumns<'a> {
    origin: Vec<i64>,
    seq: Vec<i64>,
    env: Vec<&'a str>,
    agent: Vec<&'a str>,
    labels: Vec<String>,
    state: Vec<&'a str>,
    since: Vec<i64>,
    detail: Vec<&'a str>,
    holder: Vec<Option<&'a str>>,
}

impl StateColumns<'_> {
    fn params(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.origin,
            &self.seq,
            &self.env,
            &self.agent,
            &self.labels,
            &self.state,
            &self.since,
            &self.detail,
            &self.holder,
        ]
    }
}

impl Store for PgStore {
    fn describe(&self) -> String {
        describe_config(&self.config)
    }

    fn schema_version(&mut self) -> Result<u32, StoreError> {
        self.with_client(version_of)
    }

    fn write(&mut self, batch: &[Stamped]) -> Result<(), StoreError> {
        let mut leases = LeaseColumns::default();
        let mut waits = WaitColumns::default();
        let mut states = Vec::new();
        let mut pauses = Vec::new();
        for s in batch {
            match s.record() {
                Record::Pause(p) => pauses.push(p),
                Record::Lease(l) => {
                    leases.origin.push(s.origin());
                    leases.seq.push(s.seq());
                    let texts = [
                        l.broker.as_str(),
                        &l.lockenv_handle,
                        &l.env,
                        &l.worker_id,
                        &l.callback,
                        &l.job_identifier,
                        &l.tenant,
                        l.priority.as_str(),
                        l.outcome.as_str(),
                    ];
                    for (col, t) in leases.text.iter_mut().zip(texts) {
                        col.push(t);
                    }
                    leases.started.push(l.started_ms);
                    leases.ended.push(l.ended_ms);
                }
                Record::Wait(w) => {
                    waits.origin.push(s.origin());
                    waits.seq.push(s.seq());
                    let (outcome, env) = match &w.end {
                        WaitEnd::Granted { env, .. } => ("granted", Some(env.as_str())),
                        WaitEnd::Abandoned { .. } => ("abandoned", None),
                    };
                    let texts = [
                        w.job_identifier.as_str(),
                        &w.tenant,
                        w.priority.as_str(),
                        &w.function,
                        outcome,
                    ];
                    for (col, t) in waits.text.iter_mut().zip(texts) {
                        col.push(t);
                    }
                    waits.queued.push(w.queued_ms);
                    waits.ended.push(w.end.at_ms());
                    waits.env.push(env);
                }
                Record::EnvState(e) => states.push((s.origin(), s.seq(), e)),
            }
        }
        self.with_client(|c| {
            let mut tx = c.transaction()?;
            if !leases.origin.is_empty() {
                let t = &leases.text;
                tx.execute(
                    "INSERT INTO leases (origin, seq, broker, lockenv_handle, env, worker_id, \
                     callback, job_identifier, tenant, priority, outcome, started_ms, ended_ms) \
                     SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], \
                     $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                     $11::text[], $12::int8[], $13::int8[]) \
                     ON CONFLICT (origin, seq) DO NOTHING",
                    &[
                        &leases.origin,
                        &leases.seq,
                        &t[0],
                        &t[1],
                        &t[2],
                        &t[3],
                        &t[4],
                        &t[5],
                        &t[6],
                        &t[7],
                        &t[8],
                        &leases.started,
                        &leases.ended,
                    ],
                )?;
            }
            if !waits.origin.is_empty() {
                let t = &waits.text;
                tx.execute(
                    "INSERT INTO waits (origin, seq, job_identifier, tenant, priority, function, \
                     outcome, queued_ms, ended_ms, env) \
                     SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], \
                     $5::text[], $6::text[], $7::text[], $8::int8[], $9::int8[], $10::text[]) \
                     ON CONFLICT (origin, seq) DO NOTHING",
                    &[
                        &waits.origin,
                        &waits.seq,
                        &t[0],
                        &t[1],
                        &t[2],
                        &t[3],
                        &t[4],
                        &waits.queued,
                        &waits.ended,
                        &waits.env,
                    ],
                )?;
            }
            if !states.is_empty() {
                write_states(&mut tx, &states)?;
            }
            // In order: the last change of a TE wins.
            for p in &pauses {
                match &p.pause {
                    Some(t) => tx.execute(
                        "INSERT INTO pauses (broker, env, kind, since_ms, until_ms) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (broker, env) DO UPDATE SET \
                         kind = excluded.kind, since_ms = excluded.since_ms, \
                         until_ms = excluded.until_ms",
                        &[
                            &p.broker,
                            &p.env,
                            &t.kind.as_str(),
                            &t.since_ms,
                            &t.until_ms,
                        ],
                    )?,
                    None => tx.execute(
                        "DELETE FROM pauses WHERE broker = $1 AND env = $2",
                        &[&p.broker, &p.env],
                    )?,
                };
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn history(&mut self, q: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        let (sql, params) = query::history_sql(q, |n| format!("${n}"));
        let rows = self.with_client(|c| Ok(c.query(&sql, &pg_params(&params))?))?;
        let leases = rows
            .iter()
            .map(|r| StoredLease {
                id: r.get(0),
                lease: LeaseRecord {
                    broker: r.get(1),
                    lockenv_handle: r.get(2),
                    env: r.get(3),
                    worker_id: r.get(4),
                    callback: r.get(5),
                    job_identifier: r.get(6),
                    tenant: r.get(7),
                    priority: Priority::from_text(r.get(8)),
                    started_ms: r.get(9),
                    ended_ms: r.get(10),
                    outcome: Outcome::from_text(r.get(11)),
                },
            })
            .collect();
        Ok(query::into_page(leases, q))
    }

    fn inventory(&mut self, q: &InventoryQuery) -> Result<Vec<EnvSummary>, StoreError> {
        self.envs_where(None, q)
    }

    fn env(&mut self, name: &str, q: &InventoryQuery) -> Result<Option<EnvSummary>, StoreError> {
        Ok(self.envs_where(Some(name), q)?.into_iter().next())
    }

    fn env_states(&mut self, name: &str, limit: u32) -> Result<Vec<EnvStateChange>, StoreError> {
        let limit = i64::from(limit.min(query::MAX_PAGE));
        let rows = self.with_client(|c| {
            Ok(c.query(
                "SELECT env, agent, labels, state, since_ms, detail, holder FROM env_states \
                 WHERE env = $1 ORDER BY since_ms DESC, id DESC LIMIT $2",
                &[&name, &limit],
            )?)
        })?;
        Ok(rows.iter().map(state_change).collect())
    }

    fn waits(&mut self, q: &WaitQuery) -> Result<Vec<WaitRecord>, StoreError> {
        let (sql, params) = query::waits_sql(q, |n| format!("${n}"));
        let rows = self.with_client(|c| Ok(c.query(&sql, &pg_params(&params))?))?;
        Ok(rows
            .iter()
            .map(|r| {
                let at_ms: Millis = r.get(5);
                let outcome: &str = r.get(6);
                let env: Option<String> = r.get(7);
                WaitRecord {
                    job_identifier: r.get(0),
                    tenant: r.get(1),
                    priority: Priority::from_text(r.get(2)),
                    function: r.get(3),
                    queued_ms: r.get(4),
                    end: match (outcome, env) {
                        ("granted", Some(env)) => WaitEnd::Granted { at_ms, env },
                        _ => WaitEnd::Abandoned { at_ms },
                    },
                }
            })
            .collect())
    }

    fn purge_older_than(&mut self, days: u32, now_ms: Millis) -> Result<PurgeCounts, StoreError> {
        let cutoff = query::cutoff(days, now_ms);
        self.with_client(|c| {
            let mut tx = c.transaction()?;
            let leases = tx.execute("DELETE FROM leases WHERE ended_ms < $1", &[&cutoff])?;
            let env_states =
                tx.execute("DELETE FROM env_states WHERE since_ms < $1", &[&cutoff])?;
            let waits = tx.execute("DELETE FROM waits WHERE ended_ms < $1", &[&cutoff])?;
            tx.commit()?;
            Ok(PurgeCounts {
                leases,
                env_states,
                waits,
            })
        })
    }

    fn pauses(&mut self, broker: &str) -> Result<Vec<(String, TePause)>, StoreError> {
        self.with_client(|c| {
            let rows = c.query(
                "SELECT env, kind, since_ms, until_ms FROM pauses WHERE broker = $1 ORDER BY env",
                &[&broker],
            )?;
            Ok(rows
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        TePause {
                            kind: PauseKind::from_text(r.get(1)),
                            since_ms: r.get(2),
                            until_ms: r.get(3),
                        },
                    )
                })
                .collect())
        })
    }
}
