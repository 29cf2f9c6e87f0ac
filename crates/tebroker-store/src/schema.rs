//! The schema, as ordered migrations. A migration is never edited once released: a change is a
//! new migration at the end. Both backends run the same list; only the row-id column differs.

/// The SQL dialect a migration is rendered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// `{ID}` in a migration becomes the dialect's auto-increment primary key.
const MIGRATIONS: &[&str] = &[
    // 1: leases, TE state changes (history and latest per TE) and waits.
    "CREATE TABLE leases (
        id {ID},
        origin BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        broker TEXT NOT NULL,
        lockenv_handle TEXT NOT NULL,
        env TEXT NOT NULL,
        worker_id TEXT NOT NULL,
        callback TEXT NOT NULL,
        job_identifier TEXT NOT NULL,
        tenant TEXT NOT NULL,
        priority TEXT NOT NULL,
        started_ms BIGINT NOT NULL,
        ended_ms BIGINT NOT NULL,
        outcome TEXT NOT NULL,
        UNIQUE (origin, seq)
    );
    CREATE INDEX leases_by_ended ON leases (ended_ms, id);
    CREATE INDEX leases_by_env ON leases (env, ended_ms, id);
    CREATE INDEX leases_by_job ON leases (job_identifier, ended_ms, id);
    CREATE INDEX leases_by_outcome ON leases (outcome, ended_ms, id);
    CREATE TABLE env_states (
        id {ID},
        origin BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        env TEXT NOT NULL,
        agent TEXT NOT NULL,
        labels TEXT NOT NULL,
        state TEXT NOT NULL,
        since_ms BIGINT NOT NULL,
        detail TEXT NOT NULL,
        holder TEXT,
        UNIQUE (origin, seq)
    );
    CREATE INDEX env_states_by_env ON env_states (env, since_ms, id);
    CREATE INDEX env_states_by_since ON env_states (since_ms);
    CREATE TABLE envs (
        env TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        labels TEXT NOT NULL,
        state TEXT NOT NULL,
        since_ms BIGINT NOT NULL,
        detail TEXT NOT NULL,
        holder TEXT,
        origin BIGINT NOT NULL,
        seq BIGINT NOT NULL
    );
    CREATE TABLE waits (
        id {ID},
        origin BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        job_identifier TEXT NOT NULL,
        tenant TEXT NOT NULL,
        priority TEXT NOT NULL,
        function TEXT NOT NULL,
        queued_ms BIGINT NOT NULL,
        ended_ms BIGINT NOT NULL,
        outcome TEXT NOT NULL,
        env TEXT,
        UNIQUE (origin, seq)
    );
    CREATE INDEX waits_by_function ON waits (function, outcome, ended_ms, id);
    CREATE INDEX waits_by_ended ON waits (ended_ms, id);",
    // 2: plain TEs a broker drained or held (current state, one row per broker and TE).
    "CREATE TABLE pauses (
        broker TEXT NOT NULL,
        env TEXT NOT NULL,
        kind TEXT NOT NULL,
        since_ms BIGINT NOT NULL,
        until_ms BIGINT,
        PRIMARY KEY (broker, env)
    );",
];

/// The schema version this code writes (the number of migrations).
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// The table that records which migrations ran.
pub(crate) const VERSION_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_ms BIGINT NOT NULL)";

/// Migrations after `current`, as (version, SQL) for `dialect`.
pub(crate) fn pending(dialect: Dialect, current: u32) -> Vec<(u32, String)> {
    let id = match dialect {
        Dialect::Sqlite => "INTEGER PRIMARY KEY",
        Dialect::Postgres => "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    };
    MIGRATIONS
        .iter()
        .enumerate()
        .map(|(i, sql)| (i as u32 + 1, sql.replace("{ID}", id)))
        .filter(|(v, _)| *v > current)
        .collect()
}
