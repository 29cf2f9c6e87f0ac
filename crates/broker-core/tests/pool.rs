//! The broker's side of the TE pool, driven through the core's entry points: the inventory
//! (agents' reports, TEs inferred from lockenv traffic), control commands forwarded to agents
//! or applied to plain testenv-workers, and their ACL.

mod sim;

use broker_core::acl::Acl;
use broker_core::{
    Action, ConnId, ControlOutcome, ControlTarget, EnvInfo, EnvSource, EnvStatus, Security,
    AGENT_FORGET_SECS, CONTROL_REPLY_TIMEOUT_MS, GONE_KEEP_SECS, REPORT_FUNCTION,
    REPORT_STALE_SECS,
};
use gearman_proto::PacketType as T;
use sim::{s, Sim};
use testenv_proto::agent::{
    AgentReport, ControlCommand, ControlOp, ControlReply, EnvReport, EnvState, CONTROL_PREFIX,
};

fn lock_request(callback: &str, job: &str) -> String {
    format!(
        r#"{{"callback_name":"{callback}","timeout":"3600","job_identifier":"{job}","ssh_key":"SECRET-KEY"}}"#
    )
}

/// `client` asks for a TE: a foreground lockenv job calling back `callback`.
fn submit_lock(sim: &mut Sim, client: ConnId, callback: &str, job: &str) {
    sim.submit(
        client,
        T::SubmitJob,
        "lockenv",
        "",
        &lock_request(callback, job),
    );
}

/// `agent` serves the control function of agent `host1`.
fn serve_control(sim: &mut Sim, agent: ConnId) {
    let ctl = format!("{CONTROL_PREFIX}host1");
    sim.send(agent, T::CanDo, &[ctl.as_bytes()]);
}

fn env<'a>(sim: &Sim, name: &str, envs: &'a [EnvInfo]) -> &'a EnvInfo {
    envs.iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{name} not in {:?} at {:?}", envs, sim.now))
}

/// A plain testenv-worker: client id, lockenv and a label, asleep.
fn plain_worker(sim: &mut Sim, id: u64, name: &str) -> ConnId {
    let w = sim.conn(id);
    sim.send(w, T::SetClientId, &[name.as_bytes()]);
    sim.send(w, T::CanDo, &[b"lockenv"]);
    sim.send(w, T::CanDo, &[b"lockenv:ovb"]);
    sim.send(w, T::PreSleep, &[]);
    w
}

fn report(agent: &str, envs: &[(&str, EnvState)]) -> AgentReport {
    AgentReport {
        agent: agent.into(),
        host: format!("{agent}.example"),
        version: "testenv-agent 0.1.0".into(),
        sent_ms: 1,
        envs: envs
            .iter()
            .map(|&(name, state)| EnvReport {
                name: name.into(),
                state,
                since_ms: 1_700_000_000_000,
                labels: vec!["ovb".into()],
                holder: None,
                detail: None,
                failed_leases: 0,
                failed_rebuilds: 0,
            })
            .collect(),
    }
}

/// Connection `c` sends agent `agent`'s report of `envs`.
fn send_report(sim: &mut Sim, c: ConnId, agent: &str, envs: &[(&str, EnvState)]) {
    let r = report(agent, envs);
    sim.submit(c, T::SubmitJobBg, REPORT_FUNCTION, "", &r.to_json());
}

#[test]
fn a_plain_worker_is_a_te_ready_leased_then_gone() {
    let mut sim = Sim::new();
    let w = plain_worker(&mut sim, 2, "testenv-worker-te1");
    let envs = sim.broker.envs(sim.now);
    let te = env(&sim, "testenv-worker-te1", &envs);
    assert_eq!(te.source, EnvSource::Worker);
    assert_eq!(te.state, EnvStatus::State(EnvState::Ready));
    assert_eq!(te.labels, vec!["ovb".to_string()]);
    assert_eq!((te.holder.clone(), te.failure_rate), (None, None));

    let client = sim.conn(1);
    submit_lock(&mut sim, client, "callback_7", "job-7");
    assert_eq!(sim.types(w), vec![T::Noop]);
    let (handle, ..) = sim.grab(w).expect("the lock request");
    sim.advance(5_000);
    let envs = sim.broker.envs(sim.now);
    let te = env(&sim, "testenv-worker-te1", &envs);
    assert_eq!(te.state, EnvStatus::State(EnvState::Leased));
    assert_eq!(te.holder.as_deref(), Some("job-7"));
    assert!(
        te.admin_line(sim.now)
            .starts_with("testenv-worker-te1\tleased\t5\tjob-7\t\t127.0.0.1\tovb\t\t"),
        "{}",
        te.admin_line(sim.now)
    );
    let text = sim.admin(client, "envs");
    assert!(!text.contains("SECRET"), "{text}");
    assert!(text.ends_with("\n.\n"), "{text}");

    sim.send(w, T::WorkComplete, &[&handle, b""]);
    let envs = sim.broker.envs(sim.now);
    let te = env(&sim, "testenv-worker-te1", &envs);
    assert_eq!(te.state, EnvStatus::State(EnvState::Ready));
    assert_eq!(te.last_outcomes, vec!["released"]);
    assert_eq!(te.failure_rate, Some(0.0));

    // The next lease is lost with its worker: gone, and the outcome counts as a failure.
    submit_lock(&mut sim, client, "callback_8", "job-8");
    sim.grab(w).expect("the second request");
    sim.drop_conn(w);
    let envs = sim.broker.envs(sim.now);
    let te = env(&sim, "testenv-worker-te1", &envs);
    assert_eq!(te.state, EnvStatus::Gone);
    assert_eq!(te.last_outcomes, vec!["worker lost", "released"]);
    assert_eq!(te.failure_rate, Some(0.5));
    assert!(te.connections.is_empty());

    sim.advance(GONE_KEEP_SECS * 1000 + 1);
    assert!(sim.broker.envs(sim.now).is_empty());
}

#[test]
fn a_worker_without_a_client_id_is_named_by_its_connection_and_clients_are_not_tes() {
    let mut sim = Sim::new();
    let w = sim.conn(9);
    sim.send(w, T::CanDo, &[b"lockenv"]);
    let c = sim.conn(1);
    sim.send(c, T::CanDo, &[b"callback_1"]);
    let names: Vec<String> = sim
        .broker
        .envs(sim.now)
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["conn-9".to_string()]);
    // Its lease outcomes are its own too.
    submit_lock(&mut sim, c, "callback_1", "j");
    let (handle, ..) = sim.grab(w).unwrap();
    sim.send(w, T::WorkFail, &[&handle]);
    let envs = sim.broker.envs(sim.now);
    assert_eq!(envs[0].last_outcomes, vec!["failed"]);
    assert_eq!(envs[0].failure_rate, Some(1.0));
}

#[test]
fn agent_reports_are_consumed_replaced_refused_and_go_stale() {
    let mut sim = Sim::new();
    let agent = sim.conn(3);
    send_report(
        &mut sim,
        agent,
        "host1",
        &[("te1", EnvState::Ready), ("te2", EnvState::Unhealthy)],
    );
    // Consumed: no job, no function.
    assert_eq!(sim.broker.job_count(), 0);
    assert!(!sim.admin(agent, "status").contains(REPORT_FUNCTION));
    let envs = sim.broker.envs(sim.now);
    assert_eq!(envs.len(), 2);
    let te1 = env(&sim, "te1", &envs);
    assert_eq!(
        (te1.source, te1.agent.as_deref(), te1.host.as_str()),
        (EnvSource::Agent, Some("host1"), "host1.example")
    );
    assert_eq!(
        env(&sim, "te2", &envs).state,
        EnvStatus::State(EnvState::Unhealthy)
    );

    // The next report replaces the previous one as a whole.
    send_report(&mut sim, agent, "host1", &[("te1", EnvState::Drained)]);
    let envs = sim.broker.envs(sim.now);
    assert_eq!(envs.len(), 1);
    assert_eq!(envs[0].state, EnvStatus::State(EnvState::Drained));

    // A bad report is refused with an error, counted, and changes nothing.
    sim.send(
        agent,
        T::SubmitJobBg,
        &[REPORT_FUNCTION.as_bytes(), b"", b"{\"agent\":1}"],
    );
    let got = sim.take(agent);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ptype, T::Error);
    assert_eq!(s(&got[0].args[0]), "INVALID_REPORT");
    assert_eq!(sim.broker.stats().agent_reports_refused, 1);
    assert_eq!(sim.broker.stats().agent_reports, 2);
    assert_eq!(sim.broker.envs(sim.now).len(), 1);

    // A foreground submitter is answered at once.
    sim.send(
        agent,
        T::SubmitJob,
        &[
            REPORT_FUNCTION.as_bytes(),
            b"",
            report("host1", &[]).to_json().as_bytes(),
        ],
    );
    assert_eq!(sim.types(agent), vec![T::JobCreated, T::WorkComplete]);
    send_report(&mut sim, agent, "host1", &[("te1", EnvState::Ready)]);

    sim.advance(REPORT_STALE_SECS * 1000 + 1);
    let envs = sim.broker.envs(sim.now);
    assert_eq!(envs[0].state, EnvStatus::Unknown);
    assert!(envs[0].detail.as_deref().unwrap().contains("no report"));
    sim.advance(AGENT_FORGET_SECS * 1000);
    assert!(sim.broker.envs(sim.now).is_empty());
}

#[test]
fn an_agents_own_worker_connections_are_not_listed_twice() {
    let mut sim = Sim::new();
    let agent = sim.conn(3);
    serve_control(&mut sim, agent);
    sim.send(agent, T::CanDo, &[b"lockenv"]);
    let te_conn = plain_worker(&mut sim, 4, "te1");
    send_report(&mut sim, agent, "host1", &[("te1", EnvState::Ready)]);
    let envs = sim.broker.envs(sim.now);
    assert_eq!(envs.len(), 1, "{envs:?}");
    assert_eq!(envs[0].connections, vec![te_conn.0]);
}

/// The agent completes control job `handle` with its reply.
fn answer(sim: &mut Sim, agent: ConnId, handle: &[u8], ok: bool, message: &str) {
    let reply = ControlReply {
        ok,
        message: message.into(),
        report: None,
    };
    sim.send(
        agent,
        T::WorkComplete,
        &[handle, reply.to_json().as_bytes()],
    );
}

/// An agent `host1` reporting te1 and te2, serving its control function, asleep.
fn agent_with_control(sim: &mut Sim, id: u64) -> ConnId {
    let agent = sim.conn(id);
    send_report(
        sim,
        agent,
        "host1",
        &[("te1", EnvState::Ready), ("te2", EnvState::Ready)],
    );
    serve_control(sim, agent);
    sim.send(agent, T::PreSleep, &[]);
    agent
}

#[test]
fn an_agents_refusal_and_failure_reach_the_admin_and_answers_keep_their_order() {
    let mut sim = Sim::new();
    let admin = sim.conn(1);
    let agent = agent_with_control(&mut sim, 3);
    // Pipelined: the later answers wait behind the control command's.
    assert_eq!(sim.admin(admin, "release te1"), "");
    assert_eq!(sim.admin(admin, "version"), "");
    assert_eq!(sim.admin(admin, "drain te2"), "");
    let (first, ..) = sim.grab(agent).expect("release");
    let (second, ..) = sim.grab(agent).expect("drain");
    // The second is answered first: still nothing, the first waits.
    sim.send(agent, T::WorkFail, &[&second]);
    assert_eq!(sim.texts(admin), "");
    answer(&mut sim, agent, &first, false, "te1 is not held");
    assert_eq!(
        sim.texts(admin),
        "ERR refused agent+host1:+te1+is+not+held\r\n\
         OK test\n\
         ERR agent_failed agent+host1:+its+worker+failed+the+job\r\n"
    );
    // Nothing waits any more: answers go out at once again.
    assert_eq!(sim.admin(admin, "version"), "OK test\n");

    // An answer that is not a reply is a failure, told as such; its text is one line.
    assert_eq!(sim.admin(admin, "drain te1"), "");
    let (h, ..) = sim.grab(agent).expect("drain");
    sim.send(agent, T::WorkComplete, &[&h, b"done\nreally"]);
    let text = sim.texts(admin);
    assert!(
        text.starts_with("ERR agent_failed agent+host1:+its+answer+is+not+a+control+reply"),
        "{text}"
    );
    assert_eq!(text.matches('\n').count(), 1, "{text}");
}

#[test]
fn a_control_command_nobody_answers_times_out_and_is_withdrawn_if_not_taken() {
    let mut sim = Sim::new();
    let admin = sim.conn(1);
    let agent = agent_with_control(&mut sim, 3);
    // Taken but never answered: the agent may still act, and the admin is told so.
    assert_eq!(sim.admin(admin, "drain te1"), "");
    let (_taken, ..) = sim.grab(agent).expect("drain");
    let due = sim
        .broker
        .next_deadline(sim.now)
        .expect("the reply deadline");
    assert!(due <= sim.now.mono + CONTROL_REPLY_TIMEOUT_MS, "{due}");
    sim.advance(CONTROL_REPLY_TIMEOUT_MS - 1);
    assert_eq!(sim.texts(admin), "");
    sim.advance(1);
    let text = sim.texts(admin);
    assert!(
        text.starts_with("ERR agent_timeout agent+host1+took+the+command"),
        "{text}"
    );
    assert!(text.contains("may+still+carry+it+out"), "{text}");
    assert_eq!(
        sim.broker.job_count(),
        1,
        "the running command stays the agent's"
    );

    // Queued, never taken (the agent's worker is asleep and stays so): withdrawn at the deadline.
    let edge = broker_core::ControlWaiter::Edge(7);
    let target = sim
        .broker
        .control_env_awaiting(
            ControlOp::Hold,
            "te2",
            Some(60),
            "api",
            edge,
            sim.now,
            &mut sim.out,
        )
        .unwrap();
    assert!(matches!(target, ControlTarget::Agent { .. }), "{target:?}");
    assert_eq!(sim.broker.job_count(), 2);
    sim.advance(CONTROL_REPLY_TIMEOUT_MS);
    let done: Vec<_> = sim
        .out
        .iter()
        .filter_map(|a| match a {
            Action::ControlDone(token, outcome) => Some((*token, outcome.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        done,
        vec![(
            7,
            ControlOutcome::TimedOut {
                agent: "host1".into(),
                delivered: false
            }
        )]
    );
    assert_eq!(sim.broker.job_count(), 1, "the withdrawn command is gone");
    assert_eq!(sim.grab(agent), None);
}

#[test]
fn control_commands_reach_the_agent_that_reported_the_te() {
    let mut sim = Sim::new();
    let admin = sim.conn(1);
    let agent = sim.conn(3);
    send_report(&mut sim, agent, "host1", &[("te1", EnvState::Ready)]);
    // The agent serves no control function yet: nothing is queued for nobody.
    assert!(sim
        .admin(admin, "drain te1")
        .starts_with("ERR agent_unreachable"));
    assert_eq!(sim.broker.job_count(), 0);

    serve_control(&mut sim, agent);
    sim.send(agent, T::PreSleep, &[]);
    // The answer is the agent's reply, once it comes.
    assert_eq!(sim.admin(admin, "hold te1 600"), "");
    assert_eq!(sim.types(agent), vec![T::Noop]);
    let (handle, function, _, data) = sim.grab(agent).expect("the control job");
    assert_eq!(function, format!("{CONTROL_PREFIX}host1"));
    let cmd = ControlCommand::parse(data.as_bytes()).unwrap();
    assert_eq!(cmd.op, ControlOp::Hold);
    assert_eq!(cmd.env, "te1");
    assert_eq!(cmd.hold_secs, Some(600));
    assert_eq!(cmd.requested_by.as_deref(), Some("tebroker admin"));
    answer(&mut sim, agent, &handle, true, "hold te1");
    assert_eq!(sim.texts(admin), "OK hold te1: agent host1: hold te1\n");

    assert_eq!(sim.admin(admin, "rebuild host1/te1"), "");
    let (handle, ..) = sim.grab(agent).expect("the rebuild command");
    answer(&mut sim, agent, &handle, true, "rebuild te1");
    assert!(sim
        .texts(admin)
        .starts_with("OK rebuild host1/te1: agent host1: "));
    let unknown = sim.admin(admin, "drain te9");
    assert!(unknown.starts_with("ERR unknown_te "), "{unknown}");
    assert!(sim
        .admin(admin, "drain host2/te1")
        .starts_with("ERR unknown_te"));
    assert!(sim
        .admin(admin, "drain")
        .starts_with("ERR INVALID_ARGUMENTS"));

    // Two agents with a te1 each: the bare name is ambiguous.
    let other = sim.conn(5);
    send_report(&mut sim, other, "host2", &[("te1", EnvState::Ready)]);
    assert!(sim
        .admin(admin, "drain te1")
        .starts_with("ERR ambiguous_te"));
    assert_eq!(sim.broker.stats().env_controls, 2);
}

#[test]
fn a_drained_plain_worker_gets_no_lock_requests_until_undrained() {
    let mut sim = Sim::new();
    let admin = sim.conn(1);
    let te1 = plain_worker(&mut sim, 2, "testenv-worker-te1");
    let te2 = plain_worker(&mut sim, 3, "testenv-worker-te2");
    let reply = sim.admin(admin, "drain testenv-worker-te1");
    assert!(reply.starts_with("OK drain testenv-worker-te1"), "{reply}");
    let envs = sim.broker.envs(sim.now);
    assert_eq!(
        env(&sim, "testenv-worker-te1", &envs).state,
        EnvStatus::State(EnvState::Drained)
    );

    // te2 is the one woken, and te2 stays busy: the request waits rather than going to te1.
    let client = sim.conn(4);
    submit_lock(&mut sim, client, "callback_1", "a");
    assert_eq!(sim.types(te2), vec![T::Noop]);
    assert!(sim.take(te1).is_empty());
    sim.grab(te2).expect("te2 serves it");
    submit_lock(&mut sim, client, "callback_2", "b");
    assert_eq!(sim.grab(te1), None, "a drained TE gets NO_JOB");
    // Going back to sleep with the request still queued: no NOOP loop.
    sim.send(te1, T::PreSleep, &[]);
    sim.advance(1_000);
    assert!(sim.take(te1).is_empty());
    assert_eq!(sim.broker.queue_position(b"H:t:2"), Some((1, 1)));

    // Other functions of the drained worker still work.
    sim.send(te1, T::CanDo, &[b"other"]);
    sim.submit(client, T::SubmitJobBg, "other", "", "x");
    assert_eq!(sim.types(te1), vec![T::Noop]);
    assert_eq!(sim.grab(te1).map(|j| j.1), Some("other".to_string()));
    sim.send(te1, T::PreSleep, &[]);

    let reply = sim.admin(admin, "undrain testenv-worker-te1");
    assert!(reply.starts_with("OK undrain"), "{reply}");
    assert_eq!(sim.types(te1), vec![T::Noop]);
    let (_, function, ..) = sim.grab(te1).expect("back in rotation");
    assert_eq!(function, "lockenv");
}

#[test]
fn a_broker_side_hold_ends_by_itself() {
    let mut sim = Sim::new();
    let admin = sim.conn(1);
    let te1 = plain_worker(&mut sim, 2, "te1");
    assert!(sim.admin(admin, "hold te1 30").starts_with("OK hold te1"));
    let client = sim.conn(4);
    submit_lock(&mut sim, client, "callback_1", "a");
    assert!(sim.take(te1).is_empty());
    let envs = sim.broker.envs(sim.now);
    assert_eq!(
        env(&sim, "te1", &envs).state,
        EnvStatus::State(EnvState::Held)
    );
    assert_eq!(
        sim.broker.next_deadline(sim.now),
        Some(sim.now.mono + 30_000)
    );
    sim.advance(29_999);
    assert!(sim.take(te1).is_empty());
    sim.advance(1);
    assert_eq!(sim.types(te1), vec![T::Noop]);
    assert!(sim.grab(te1).is_some());
    assert!(sim
        .admin(admin, "rebuild te1")
        .starts_with("ERR not_supported"));
}

#[test]
fn with_acls_te_control_needs_permission() {
    let acl = Acl::parse(
        "[operator]\ngrant = true\n\n[ops-agent]\ninvoke = testenv-agent:ctl:host1\n\n[agent]\ninvoke = tebroker:te-report\nregister = testenv-agent:ctl:\n",
    )
    .unwrap();
    let mut sim = Sim::with_security(Security {
        acl: Some(acl),
        ..Security::default()
    });
    let anon = sim.conn_as(1, "127.0.0.1", None);
    let operator = sim.conn_as(2, "127.0.0.1", Some("operator"));
    let ops_agent = sim.conn_as(3, "127.0.0.1", Some("ops-agent"));
    let agent = sim.conn_as(4, "127.0.0.1", Some("agent"));
    let anon_worker = sim.conn_as(5, "127.0.0.1", None);
    sim.send(anon_worker, T::SetClientId, &[b"te9"]);
    // Registering is ignored for anon; use an operator-less plain TE name the broker remembers.
    send_report(&mut sim, agent, "host1", &[("te1", EnvState::Ready)]);
    serve_control(&mut sim, agent);

    assert_eq!(sim.admin(anon, "drain te1"), "ERR PERMISSION_DENIED\r\n");
    assert_eq!(
        sim.admin(operator, "drain te1"),
        "ERR PERMISSION_DENIED\r\n"
    );
    // Allowed: forwarded (the answer is the agent's reply, later).
    assert_eq!(sim.admin(ops_agent, "drain te1"), "");
    assert_eq!(sim.broker.job_count(), 1);
    let (h, ..) = sim.grab(agent).expect("the drain command");
    answer(&mut sim, agent, &h, true, "drain te1");
    assert!(sim
        .texts(ops_agent)
        .starts_with("OK drain te1: agent host1"));
    // A plain TE (or an unknown name) needs grant.
    assert_eq!(
        sim.admin(ops_agent, "drain te9"),
        "ERR PERMISSION_DENIED\r\n"
    );
    assert!(sim
        .admin(operator, "drain te9")
        .starts_with("ERR unknown_te"));
    assert_eq!(sim.broker.stats().acl_admin_denied, 3);
    // Reading the inventory stays open, as `status` does.
    assert!(sim.admin(anon, "envs").starts_with("te1\tready"));
}

#[test]
fn the_history_keeps_how_long_a_request_waited_and_its_tenant() {
    let mut sim = Sim::new();
    let client = sim.conn(1);
    sim.submit(
        client,
        T::SubmitJob,
        "lockenv",
        "",
        r#"{"callback_name":"callback_1","job_identifier":"j1","tenant":" proj-a "}"#,
    );
    sim.advance(2_500);
    let w = plain_worker(&mut sim, 2, "te1");
    assert_eq!(sim.types(w), vec![T::Noop]);
    let (handle, ..) = sim.grab(w).unwrap();
    assert_eq!(sim.broker.leases(sim.now)[0].tenant, "proj-a");
    sim.advance(1_000);
    sim.send(w, T::WorkComplete, &[&handle, b""]);
    let ended = &sim.broker.lease_history()[0];
    assert_eq!((ended.waited_ms, ended.tenant.as_str()), (2_500, "proj-a"));
}

#[test]
fn state_changes_and_ended_waits_are_handed_out_once() {
    let mut sim = Sim::new();
    let w = plain_worker(&mut sim, 2, "te1");
    let agent = sim.conn(3);
    send_report(&mut sim, agent, "host1", &[("ovb1", EnvState::Ready)]);
    let first: Vec<(String, EnvStatus)> = sim
        .broker
        .take_env_changes(sim.now)
        .into_iter()
        .map(|e| (e.name, e.state))
        .collect();
    assert_eq!(
        first,
        vec![
            ("ovb1".to_string(), EnvStatus::State(EnvState::Ready)),
            ("te1".to_string(), EnvStatus::State(EnvState::Ready)),
        ]
    );
    assert!(sim.broker.take_env_changes(sim.now).is_empty());

    // One request granted te1 after 700 ms, one abandoned by its client.
    let client = sim.conn(1);
    submit_lock(&mut sim, client, "callback_1", "granted");
    let quitter = sim.conn(4);
    sim.submit(
        quitter,
        T::SubmitJobHigh,
        "lockenv",
        "",
        &lock_request("callback_2", "gave-up"),
    );
    sim.advance(700);
    sim.drop_conn(quitter);
    sim.grab(w).unwrap();
    let changes = sim.broker.take_env_changes(sim.now);
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (
            changes[0].name.as_str(),
            changes[0].state,
            changes[0].holder.as_deref()
        ),
        ("te1", EnvStatus::State(EnvState::Leased), Some("granted"))
    );
    let waits = sim.broker.take_ended_waits();
    let seen: Vec<(&str, &str, u64, Option<&str>)> = waits
        .iter()
        .map(|w| {
            (
                w.job_identifier.as_str(),
                w.priority,
                w.waited_ms,
                w.granted_env.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("gave-up", "high", 700, None),
            ("granted", "normal", 700, Some("te1"))
        ]
    );
    assert!(sim.broker.take_ended_waits().is_empty());
    // Non-lock jobs are no waits.
    sim.send(w, T::CanDo, &[b"busy"]);
    sim.submit(client, T::SubmitJobBg, "busy", "", "x");
    sim.grab(w).unwrap();
    assert!(sim.broker.take_ended_waits().is_empty());
}

#[test]
fn a_hold_and_a_reply_deadline_count_from_the_time_passed_in_not_the_last_event() {
    let mut sim = Sim::new();
    plain_worker(&mut sim, 2, "testenv-worker-te1");
    let agent = agent_with_control(&mut sim, 3);
    // Nothing happened for 5 s (no event, no tick): the core's own time is 5 s old.
    let later = broker_core::Now {
        mono: sim.now.mono + 5_000,
        wall: sim.now.wall + 5_000,
    };
    let edge = broker_core::ControlWaiter::Edge(1);
    sim.broker
        .control_env_awaiting(
            ControlOp::Hold,
            "testenv-worker-te1",
            Some(60),
            "api",
            edge,
            later,
            &mut sim.out,
        )
        .unwrap();
    let envs = sim.broker.envs(later);
    let detail = env(&sim, "testenv-worker-te1", &envs).detail.clone();
    assert_eq!(detail.as_deref(), Some("held by the broker for 60s more"));
    sim.broker
        .control_env_awaiting(
            ControlOp::Drain,
            "te1",
            None,
            "api",
            edge,
            later,
            &mut sim.out,
        )
        .unwrap();
    assert!(sim.grab(agent).is_some());
    let early = broker_core::Now {
        mono: later.mono + CONTROL_REPLY_TIMEOUT_MS - 1,
        wall: later.wall + CONTROL_REPLY_TIMEOUT_MS - 1,
    };
    sim.broker.tick(early, &mut sim.out);
    assert!(
        !sim.out.iter().any(|a| matches!(a, Action::ControlDone(..))),
        "timed out before its deadline"
    );
}

/// A plain TE is ready since it registered `lockenv`, even when that is the broker's first
/// event or comes long after the broker's last one (a fresh broker listed its first TE as ready
/// since 1970).
#[test]
fn a_plain_te_is_ready_since_it_registered_lockenv() {
    let mut sim = Sim::new();
    plain_worker(&mut sim, 2, "testenv-worker-te1");
    let envs = sim.broker.envs(sim.now);
    assert_eq!(
        env(&sim, "testenv-worker-te1", &envs).since_ms,
        sim.now.wall
    );
    // A minute with no event, then a second TE: ready since now, not since the last event.
    sim.now.mono += 60_000;
    sim.now.wall += 60_000;
    let w = sim.conn(3);
    sim.send(w, T::SetClientId, &[b"testenv-worker-te2"]);
    sim.send(w, T::CanDo, &[b"lockenv"]);
    let envs = sim.broker.envs(sim.now);
    assert_eq!(
        env(&sim, "testenv-worker-te2", &envs).since_ms,
        sim.now.wall
    );
}
