//! End-to-end tests of on-demand TEs (`[on_demand]`): the real agent binary, real `create` and
//! `destroy` hook scripts that log every run with a timestamp and can be told to fail or to
//! block (by files in the test's dir), real testenv-clients, tebroker or gearmand. Every wait
//! has a deadline.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use test_support::run_with_timeout;
use testenv_proto::agent::{EnvReport, EnvState};

/// One line of the hooks' log: `create-start`/`create-end`/`destroy-start`/`destroy-end`, the
/// TE, the wall clock in ns, and whether the run failed.
#[derive(Debug, Clone)]
struct Event {
    what: String,
    te: String,
    at_ns: u128,
    failed: bool,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Writes the create and destroy hooks into `d`. `create` fails while `d/create-fails`
/// exists, fails once if `d/create-fails-once` exists (removing it), blocks while
/// `d/create-blocks` exists, sleeps `d/create-secs` seconds, then writes TE data naming the TE.
/// `destroy` fails while `d/destroy-fails` exists.
fn write_hooks(d: &Path) {
    let d = d.display();
    script(
        &Path::new(&d.to_string()).join("create.sh"),
        &format!(
            r#"log() {{ echo "$1 $TE_NAME $(date +%s%N) $2" >> {d}/hooks.log; }}
log create-start
echo $$ > {d}/create.pid.$TE_NAME
if [ -e {d}/create-fails ]; then log create-end failed; echo 'quota exceeded'; exit 1; fi
if [ -e {d}/create-fails-once ]; then rm {d}/create-fails-once; log create-end failed; echo 'stack timed out'; exit 1; fi
while [ -e {d}/create-blocks ]; do sleep 0.05; done
sleep $(cat {d}/create-secs 2>/dev/null || echo 0)
printf '{{"env-num":"%s","nodes":[{{}},{{}}]}}' "$TE_NAME" > "$TE_DATAFILE"
log create-end"#
        ),
    );
    script(
        &Path::new(&d.to_string()).join("destroy.sh"),
        &format!(
            r#"log() {{ echo "$1 $TE_NAME $(date +%s%N) $2" >> {d}/hooks.log; }}
log destroy-start
if [ -e {d}/destroy-fails ]; then log destroy-end failed; echo 'stack delete failed'; exit 1; fi
log destroy-end"#
        ),
    );
}

/// An agent whose only TEs are on demand, with `on_demand` as its `[on_demand]` section.
fn od_agent(broker: SocketAddr, dir: tempfile::TempDir, on_demand: &str) -> Agent {
    write_hooks(dir.path());
    Agent::start_in(
        dir,
        broker,
        &format!(
            r#"
[hooks]
create = "{{dir}}/create.sh"
destroy = "{{dir}}/destroy.sh"
timeout = "60s"
[lease]
holder_grace = "1s"
[on_demand]
{on_demand}
"#
        ),
    )
}

fn events(agent: &Agent) -> Vec<Event> {
    let text = std::fs::read_to_string(agent.path("hooks.log")).unwrap_or_default();
    let mut events: Vec<Event> = text
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some(Event {
                what: cols.first()?.to_string(),
                te: cols.get(1)?.to_string(),
                at_ns: cols.get(2)?.parse().ok()?,
                failed: cols.get(3) == Some(&"failed"),
            })
        })
        .collect();
    events.sort_by_key(|e| e.at_ns);
    events
}

fn count(events: &[Event], what: &str, failed: bool) -> usize {
    events
        .iter()
        .filter(|e| e.what == what && e.failed == failed)
        .count()
}

/// The most runs of `start`..`end` (by TE) that overlapped at any time.
fn max_overlap(events: &[Event], start: &str, end: &str) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for e in events {
        if e.what == start {
            now += 1;
            most = most.max(now);
        } else if e.what == end {
            now = now.saturating_sub(1);
        }
    }
    most
}

/// TEs that may exist by the log: create started, no successful destroy since.
fn alive(events: &[Event]) -> BTreeMap<String, bool> {
    let mut alive = BTreeMap::new();
    for e in events {
        match (e.what.as_str(), e.failed) {
            ("create-start", _) => {
                alive.insert(e.te.clone(), true);
            }
            ("destroy-end", false) => {
                alive.remove(&e.te);
            }
            _ => {}
        }
    }
    alive
}

fn max_alive(events: &[Event]) -> usize {
    let mut alive = std::collections::BTreeSet::new();
    let mut most = 0;
    for e in events {
        match (e.what.as_str(), e.failed) {
            ("create-start", _) => {
                alive.insert(e.te.clone());
            }
            ("destroy-end", false) => {
                alive.remove(&e.te);
            }
            _ => {}
        }
        most = most.max(alive.len());
    }
    most
}

/// The agent's TEs in `state` (on-demand TEs with no TE in their slot are not listed).
fn in_state(agent: &Agent, state: EnvState) -> Vec<EnvReport> {
    agent
        .status()
        .map(|r| r.envs.into_iter().filter(|e| e.state == state).collect())
        .unwrap_or_default()
}

/// Polls `f` until it returns `Some`; after [`LONG`], fails naming `what`, with the agent's log.
fn wait_for<T>(agent: &Agent, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {LONG:?} waiting for {what}; agent log:\n{}\nhooks:\n{}",
            agent.log(),
            std::fs::read_to_string(agent.path("hooks.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn record(agent: &Agent, te: &str) -> std::path::PathBuf {
    agent.path(&format!("state/on-demand/{te}.te"))
}

#[test]
fn min_ready_tes_are_created_ahead_and_each_is_destroyed_after_one_lease() {
    let broker = tebroker();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("create-secs"), "1").unwrap();
    let agent = od_agent(
        broker,
        dir,
        "max_envs = 4\nmin_ready = 2\nmax_concurrent_creates = 2",
    );
    let ready = wait_for(&agent, "2 on-demand TEs ready", || {
        let r = in_state(&agent, EnvState::Ready);
        (r.len() == 2).then_some(r)
    });
    assert!(
        ready.iter().all(|e| record(&agent, &e.name).exists()),
        "each TE is recorded in state_dir"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.path("state/on-demand"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "TE data is for the agent's user only");
    let before_client = now_ns();
    let out = finish(client(broker, &[], "cat $TE_DATAFILE"));
    assert!(out.status.success(), "{out:?}\n{}", agent.log());
    let data = String::from_utf8_lossy(&out.stdout);
    let leased = ready
        .iter()
        .find(|e| data.contains(&format!("\"env-num\":\"{}\"", e.name)))
        .unwrap_or_else(|| panic!("the client got one of the warm TEs: {data}"))
        .name
        .clone();
    // The client did not wait for a create: its TE was made before it started.
    let made = events(&agent)
        .into_iter()
        .find(|e| e.what == "create-end" && e.te == leased && !e.failed)
        .expect("its create ended");
    assert!(made.at_ns < before_client, "{made:?}");

    // Used once: destroyed, its record removed, and min_ready restored by a new create.
    wait_for(&agent, "the leased TE destroyed", || {
        events(&agent)
            .iter()
            .find(|e| e.what == "destroy-end" && e.te == leased && !e.failed)
            .map(|_| ())
    });
    let ready = wait_for(&agent, "2 TEs ready again", || {
        let status = agent.status()?;
        let busy = status.envs.iter().any(|e| e.state != EnvState::Ready);
        (status.envs.len() == 2 && !busy).then_some(status.envs)
    });
    let ev = events(&agent);
    assert_eq!(count(&ev, "create-end", false), 3, "{ev:?}");
    assert_eq!(count(&ev, "destroy-end", false), 1, "{ev:?}");
    let names: Vec<String> = ready.iter().map(|e| e.name.clone()).collect();
    assert_eq!(alive(&ev).into_keys().collect::<Vec<_>>(), names);
    // The records are those of the TEs there now (a slot's name may be used again at once).
    assert_eq!(records(&agent), names);
}

/// The names of the TEs recorded in `state_dir/on-demand`.
fn records(agent: &Agent) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(agent.path("state/on-demand"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".te").map(String::from)
        })
        .collect();
    names.sort();
    names
}

#[test]
fn creates_stay_within_max_concurrent_creates_and_max_envs_through_gearmand() {
    let server = gearmand();
    let broker = server.addr();
    let dir = tempfile::tempdir().unwrap();
    // Creates block at first, so all five requests wait while the limit holds the creates.
    std::fs::write(dir.path().join("create-blocks"), "").unwrap();
    std::fs::write(dir.path().join("create-secs"), "0.3").unwrap();
    let agent = od_agent(
        broker,
        dir,
        "max_envs = 3\nmin_ready = 0\nmax_concurrent_creates = 2",
    );
    wait_for(&agent, "the agent up", || agent.status());
    let go = agent.path("go");
    let clients: Vec<_> = (0..5)
        .map(|n| {
            client(
                broker,
                &[],
                &format!(
                    "touch {d}/started.{n}; while [ ! -e {go} ]; do sleep 0.05; done",
                    d = agent.dir.path().display(),
                    go = go.display()
                ),
            )
        })
        .collect();
    wait_for(&agent, "5 requests queued and 2 creates running", || {
        let queued = function_status(broker, "lockenv").is_some_and(|r| r.0 == 5);
        (queued && count(&events(&agent), "create-start", false) == 2).then_some(())
    });
    std::fs::remove_file(agent.path("create-blocks")).unwrap();
    let started = |agent: &Agent| {
        (0..5)
            .filter(|n| agent.path(&format!("started.{n}")).exists())
            .count()
    };
    wait_for(&agent, "3 clients holding TEs", || {
        (started(&agent) == 3).then_some(())
    });
    // max_envs: the other two wait, queued at gearmand, while the three TEs are leased.
    let status = wait_for(&agent, "2 requests queued", || {
        function_status(broker, "lockenv").filter(|r| r.0.saturating_sub(r.1) == 2)
    });
    assert_eq!(status.1, 3, "3 leases running");
    assert_eq!(in_state(&agent, EnvState::Leased).len(), 3);
    assert_eq!(started(&agent), 3, "{}", agent.log());

    std::fs::write(&go, "").unwrap();
    for c in clients {
        let out = finish(c);
        assert!(out.status.success(), "{out:?}\n{}", agent.log());
    }
    // Every TE used once and destroyed: none left with min_ready = 0.
    wait_for(&agent, "all 5 TEs destroyed", || {
        (count(&events(&agent), "destroy-end", false) == 5).then_some(())
    });
    wait_for(&agent, "no TE listed", || {
        agent.status().filter(|s| s.envs.is_empty())
    });
    let ev = events(&agent);
    assert_eq!(count(&ev, "create-end", false), 5, "{ev:?}");
    assert_eq!(
        max_overlap(&ev, "create-start", "create-end"),
        2,
        "creates overlap, never more than max_concurrent_creates: {ev:?}"
    );
    assert_eq!(max_alive(&ev), 3, "never more than max_envs: {ev:?}");
    assert!(alive(&ev).is_empty(), "{ev:?}");
}

#[test]
fn a_create_failing_every_retry_gives_the_waiting_client_failed_creating_ovb_stack() {
    let broker = tebroker();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("create-fails"), "").unwrap();
    let agent = od_agent(
        broker,
        dir,
        "max_envs = 2\nmin_ready = 0\ncreate_retries = 2",
    );
    wait_for(&agent, "the agent up", || agent.status());
    let out = finish(client(broker, &[], "echo leased"));
    assert_eq!(out.status.code(), Some(2), "{out:?}\n{}", agent.log());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Failed creating OVB stack"), "{stderr}");
    assert!(
        stderr.contains("quota exceeded"),
        "the hook's reason: {stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("leased"));
    // 1 + create_retries attempts, each half-made TE destroyed before the next.
    let ev = events(&agent);
    assert_eq!(count(&ev, "create-end", true), 3, "{ev:?}");
    assert_eq!(count(&ev, "destroy-end", false), 3, "{ev:?}");
    let kinds: Vec<&str> = ev
        .iter()
        .filter(|e| e.what.ends_with("-end"))
        .map(|e| e.what.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "create-end",
            "destroy-end",
            "create-end",
            "destroy-end",
            "create-end",
            "destroy-end"
        ]
    );
    assert!(alive(&ev).is_empty());

    // A create failing once is retried, and the client gets the TE.
    std::fs::remove_file(agent.path("create-fails")).unwrap();
    std::fs::write(agent.path("create-fails-once"), "").unwrap();
    let out = finish(client(broker, &[], "cat $TE_DATAFILE"));
    assert!(out.status.success(), "{out:?}\n{}", agent.log());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"env-num\":\"od"));
    let ev = events(&agent);
    assert_eq!(count(&ev, "create-end", true), 4, "{ev:?}");
    assert_eq!(count(&ev, "create-end", false), 1, "{ev:?}");
}

#[test]
fn a_destroy_that_keeps_failing_leaves_the_te_failed_and_recorded_until_rebuild() {
    let broker = tebroker();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("destroy-fails"), "").unwrap();
    let agent = od_agent(
        broker,
        dir,
        "max_envs = 1\nmin_ready = 1\ndestroy_retries = 1",
    );
    agent.wait_state("od1", EnvState::Ready);
    lease_ok(broker, &[], "true");
    let te = wait_for(&agent, "od1 failed", || {
        in_state(&agent, EnvState::Failed).into_iter().next()
    });
    let detail = te.detail.unwrap_or_default();
    assert!(
        detail.contains("hook destroy") && detail.contains("destroy failed 2 times"),
        "{detail}"
    );
    assert!(detail.contains("stack delete failed"), "{detail}");
    assert_eq!(count(&events(&agent), "destroy-end", true), 2);
    assert!(record(&agent, "od1").exists(), "not forgotten");
    // The failed TE still counts against max_envs: no other TE is created for min_ready.
    assert_eq!(count(&events(&agent), "create-start", false), 1);

    // An operator mends the cloud and asks for a rebuild: destroyed, then created afresh.
    std::fs::remove_file(agent.path("destroy-fails")).unwrap();
    agent.ctl_ok(&["rebuild", "od1"]);
    wait_for(&agent, "od1 destroyed", || {
        (count(&events(&agent), "destroy-end", false) == 1).then_some(())
    });
    agent.wait_state("od1", EnvState::Ready);
    assert_eq!(count(&events(&agent), "create-end", false), 2);
}

#[test]
fn after_kill_9_the_restarted_agent_destroys_every_te_left_and_leaks_none() {
    let broker = tebroker();
    let dir = tempfile::tempdir().unwrap();
    let body = "max_envs = 3\nmin_ready = 2\nmax_concurrent_creates = 2";
    let mut agent = od_agent(broker, dir, body);
    wait_for(&agent, "2 TEs ready", || {
        (in_state(&agent, EnvState::Ready).len() == 2).then_some(())
    });
    // One TE leased, one ready, one being created when the agent dies.
    std::fs::write(agent.path("create-blocks"), "").unwrap();
    let started = agent.path("started");
    let holder = client(
        broker,
        &[],
        &format!("touch {}; sleep 600", started.display()),
    );
    wait_for(&agent, "the lease started", || {
        started.exists().then_some(())
    });
    let creating = wait_for(&agent, "a third create running", || {
        let ev = events(&agent);
        (count(&ev, "create-start", false) == 3).then(|| ev.last().unwrap().te.clone())
    });
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    // The create hook outlived the agent (its own process group); stop it as a crashed host
    // would have.
    let pid: i32 = wait_for(&agent, "the create's pid", || {
        std::fs::read_to_string(agent.path(&format!("create.pid.{creating}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    // SAFETY: a signal to the hook script this test wrote; it is still blocked.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::fs::remove_file(agent.path("create-blocks")).unwrap();
    let out = finish(holder);
    assert!(!out.status.success(), "{out:?}");
    let left: Vec<String> = alive(&events(&agent)).into_keys().collect();
    assert_eq!(left.len(), 3, "{left:?}");

    let restarted_at = now_ns();
    let dir = std::mem::replace(&mut agent.dir, tempfile::tempdir().unwrap());
    drop(agent);
    // Restarted with one slot fewer: the TE in the slot that is gone is destroyed too.
    let agent = Agent::start_in(
        dir,
        broker,
        "[hooks]\ncreate = \"{dir}/create.sh\"\ndestroy = \"{dir}/destroy.sh\"\n\
         [lease]\nholder_grace = \"1s\"\n[on_demand]\nmax_envs = 2\nmin_ready = 2\n",
    );
    // Every TE the first run left is destroyed; then min_ready TEs are made afresh.
    wait_for(&agent, "the 3 TEs left destroyed", || {
        let ev = events(&agent);
        left.iter()
            .all(|te| {
                ev.iter().any(|e| {
                    e.what == "destroy-end" && &e.te == te && !e.failed && e.at_ns > restarted_at
                })
            })
            .then_some(())
    });
    assert!(
        agent
            .log()
            .contains("a previous run left this on-demand TE"),
        "{}",
        agent.log()
    );
    let ready = wait_for(&agent, "2 TEs ready after the restart", || {
        let s = agent.status()?;
        (s.envs.len() == 2 && s.envs.iter().all(|e| e.state == EnvState::Ready)).then_some(s.envs)
    });
    let ev = events(&agent);
    assert_eq!(
        alive(&ev).into_keys().collect::<Vec<_>>(),
        ready.iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
        "no leak: the TEs that may exist are the ones listed; {ev:?}"
    );
}

#[test]
fn check_config_prints_the_on_demand_settings() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let text = r#"
state_dir = "/tmp/od-state"
control_socket = "/tmp/od.sock"
[hooks]
create = "make-stack"
destroy = "delete-stack"
[on_demand]
max_envs = 4
min_ready = 2
max_concurrent_creates = 2
create_retries = 3
labels = ["ovb"]
"#;
    std::fs::write(&config, text).unwrap();
    let out = run_with_timeout(
        Command::new(AGENT_BIN).arg("check-config").arg(&config),
        LONG,
    );
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    for want in [
        "[on_demand]",
        "max_envs = 4",
        "min_ready = 2",
        "max_concurrent_creates = 2",
        "create_retries = 3",
        "destroy_retries = 3",
        "labels = [\"ovb\"]",
        "names = od1 .. od4",
        "/tmp/od-state/on-demand",
        "hooks.create = \"make-stack\"",
        "hooks.destroy = \"delete-stack\"",
    ] {
        assert!(printed.contains(want), "{want}: {printed}");
    }
    // Bad limits and a missing hook are clear errors.
    for (bad, says) in [
        ("min_ready = 2", "min_ready = 9"),
        ("destroy = \"delete-stack\"", ""),
        ("max_concurrent_creates = 2", "max_concurrent_creates = 0"),
    ] {
        std::fs::write(&config, text.replace(bad, says)).unwrap();
        let out = run_with_timeout(
            Command::new(AGENT_BIN).arg("check-config").arg(&config),
            LONG,
        );
        assert_eq!(out.status.code(), Some(1), "{says:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("on_demand"),
            "{out:?}"
        );
    }
}

#[test]
fn a_create_outliving_its_waiter_adds_a_warm_te_that_the_next_client_gets_at_once() {
    let broker = tebroker();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("create-blocks"), "").unwrap();
    let agent = od_agent(broker, dir, "max_envs = 3\nmin_ready = 0");
    wait_for(&agent, "the agent up", || agent.status());
    // A client gives up (-t) while its TE is being created.
    let impatient = std::process::Command::new(client_bin())
        .args(["-b", &broker.to_string(), "-t", "3", "--", "true"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&agent, "a create for the waiting client", || {
        (count(&events(&agent), "create-start", false) == 1).then_some(())
    });
    let out = finish(impatient);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    // The create then finishes: the TE is warm, not handed to anyone, and no other create runs
    // for the request that has gone.
    std::fs::remove_file(agent.path("create-blocks")).unwrap();
    let te = wait_for(&agent, "the TE ready", || {
        in_state(&agent, EnvState::Ready).into_iter().next()
    });
    assert_eq!(te.holder, None);
    let before_client = now_ns();
    let out = lease_ok(broker, &[], "cat $TE_DATAFILE");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("\"env-num\":\"{}\"", te.name)));
    let ev = events(&agent);
    assert_eq!(count(&ev, "create-start", false), 1, "{ev:?}");
    assert!(
        ev.iter()
            .all(|e| e.what != "create-start" || e.at_ns < before_client),
        "the second client took the warm TE without a create: {ev:?}"
    );
}

#[test]
fn draining_every_te_destroys_the_warm_ones_and_undraining_makes_them_again() {
    let broker = tebroker();
    let dir = tempfile::tempdir().unwrap();
    let agent = od_agent(broker, dir, "max_envs = 3\nmin_ready = 2");
    wait_for(&agent, "2 TEs ready", || {
        (in_state(&agent, EnvState::Ready).len() == 2).then_some(())
    });
    agent.ctl_ok(&["drain", "--all"]);
    // Drained: the warm TEs are destroyed and every slot is listed drained; none is created.
    let drained = wait_for(&agent, "every slot drained, no TE left", || {
        let s = agent.status()?;
        let ev = events(&agent);
        (s.envs.len() == 3
            && s.envs.iter().all(|e| e.state == EnvState::Drained)
            && alive(&ev).is_empty())
        .then_some(ev)
    });
    assert_eq!(count(&drained, "create-start", false), 2, "{drained:?}");
    assert!(records(&agent).is_empty());
    // A hold needs a TE: refused for an empty slot, with the reason.
    let out = agent.ctl(&["hold", "od1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not created now"),
        "{out:?}"
    );

    agent.ctl_ok(&["undrain", "--all"]);
    let ready = wait_for(&agent, "2 TEs ready again", || {
        let s = agent.status()?;
        (s.envs.len() == 2 && s.envs.iter().all(|e| e.state == EnvState::Ready)).then_some(s.envs)
    });
    let names: Vec<String> = ready.into_iter().map(|e| e.name).collect();
    assert_eq!(records(&agent), names);
    assert_eq!(count(&events(&agent), "create-start", false), 4);
}

#[test]
fn a_waiting_client_gets_a_te_created_for_it_through_geard() {
    let server = test_support::PeerServer::start(test_support::Peer::Geard, LONG);
    let broker = server.addr();
    let dir = tempfile::tempdir().unwrap();
    // No TE ahead: only the waiting request, read from geard's admin `status`, asks for one.
    let agent = od_agent(
        broker,
        dir,
        "max_envs = 2\nmin_ready = 0\nlabels = [\"ovb\"]",
    );
    wait_for(&agent, "the agent up", || agent.status());
    let out = finish(client(broker, &["--label", "ovb"], "cat $TE_DATAFILE"));
    assert!(out.status.success(), "{out:?}\n{}", agent.log());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"env-num\":\"od1\""));
    wait_for(&agent, "the TE destroyed after its lease", || {
        let ev = events(&agent);
        (count(&ev, "destroy-end", false) == 1 && alive(&ev).is_empty()).then_some(())
    });
    assert_eq!(count(&events(&agent), "create-end", false), 1);
}
