//! Counters of what the network edge enforces or meets (refused connections, failed TLS
//! handshakes, history-file write errors), kept in atomics so counting never takes the broker
//! lock. They are copied into the core's `Stats` when someone reads them.

use std::sync::atomic::{AtomicU64, Ordering};

use broker_core::{Action, ConnId, Stats};

#[derive(Debug, Default)]
pub struct EdgeCounters {
    pub connections_refused: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// Failed appends to the lease history file (the lines are kept and retried).
    pub history_write_errors: AtomicU64,
    /// The durable store, whose writer counts what it recorded, wrote, dropped and failed.
    pub store: std::sync::OnceLock<std::sync::Arc<crate::server_store::StoreLink>>,
}

impl EdgeCounters {
    pub fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Copies the counters the core has fields for (the core never counts these itself).
    pub fn copy_into(&self, stats: &mut Stats) {
        stats.connections_refused = self.connections_refused.load(Ordering::Relaxed);
        stats.tls_handshake_failures = self.tls_handshake_failures.load(Ordering::Relaxed);
    }

    /// Counters the core has no field for, as (name, value, help), for `stats` and `/metrics`.
    pub fn extra(&self) -> Vec<(&'static str, u64, &'static str)> {
        let mut v = vec![(
            "history_write_errors",
            self.history_write_errors.load(Ordering::Relaxed),
            "Failed appends to the lease history file (the lines are kept and retried)",
        )];
        if let Some(store) = self.store.get() {
            let w = store.stats();
            v.extend([
                (
                    "store_records",
                    w.recorded,
                    "Records (leases, waits, TE states) queued for the store",
                ),
                ("store_written", w.written, "Records committed to the store"),
                (
                    "store_dropped",
                    w.dropped,
                    "Records lost: the store's queue was full, or still unwritten at shutdown",
                ),
                (
                    "store_errors",
                    w.errors,
                    "Failed store writes and failed attempts to open it (retried)",
                ),
            ]);
        }
        v
    }

    /// Adds [`EdgeCounters::extra`] to the core's answer to the `stats` admin command.
    pub fn annotate_stats(&self, line: &str, conn: ConnId, actions: &mut [Action]) {
        if !line.split_whitespace().eq(["stats"]) {
            return;
        }
        for action in actions.iter_mut().rev() {
            let Action::Text(c, text) = action else {
                continue;
            };
            if *c != conn {
                continue;
            }
            // Only the listing (an ACL refusal is one ERR line).
            let Some(body) = text.strip_suffix(".\n") else {
                return;
            };
            if !(body.is_empty() || body.ends_with('\n')) {
                return;
            }
            let mut annotated = body.to_string();
            for (name, value, _) in self.extra() {
                annotated.push_str(&format!("{name}\t{value}\n"));
            }
            annotated.push_str(".\n");
            *text = annotated;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_listing_gets_the_edge_counters() {
        let edge = EdgeCounters::default();
        edge.count(&edge.history_write_errors);
        let mut actions = vec![Action::Text(ConnId(1), "jobs\t3\n.\n".into())];
        edge.annotate_stats("stats", ConnId(1), &mut actions);
        assert_eq!(
            actions,
            vec![Action::Text(
                ConnId(1),
                "jobs\t3\nhistory_write_errors\t1\n.\n".into()
            )]
        );
        // A refusal and other commands are left alone.
        let mut refused = vec![Action::Text(ConnId(1), "ERR permission denied.\n".into())];
        edge.annotate_stats("stats", ConnId(1), &mut refused);
        assert_eq!(
            refused,
            vec![Action::Text(ConnId(1), "ERR permission denied.\n".into())]
        );
        let mut status = vec![Action::Text(ConnId(1), ".\n".into())];
        edge.annotate_stats("status", ConnId(1), &mut status);
        assert_eq!(status, vec![Action::Text(ConnId(1), ".\n".into())]);
    }
}
