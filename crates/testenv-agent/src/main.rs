//! testenv-agent: one agent per TE host that serves all its TEs (see README, "testenv-agent").

use std::path::PathBuf;
use std::rc::Rc;

use clap::Parser;
use testenv_proto::agent::{ControlCommand, ControlOp, ControlReply, ALL_ENVS};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};

mod carve;
mod config;
mod control;
mod hooks;
mod on_demand;
mod pool;

use config::Config;
use testenv_agent::cli::{Args, Command, CtlOp};

pub use testenv::worker::host_name;

fn main() {
    let args = Args::parse();
    testenv::init_logging(if args.debug { "debug" } else { "info" });
    testenv::agent_main("testenv-agent", async move {
        match &args.command {
            Some(Command::CheckConfig { file }) => {
                let config = Config::load(file)?;
                print!("{}", config.describe());
                Ok(0)
            }
            Some(Command::Ctl { socket, op }) => ctl(&args, socket.clone(), op).await,
            None => {
                let Some(file) = &args.config else {
                    anyhow::bail!("give --config FILE (or a subcommand; see --help)");
                };
                serve(Config::load(file)?).await
            }
        }
    })
}

async fn ctl(args: &Args, socket: Option<PathBuf>, op: &CtlOp) -> anyhow::Result<i32> {
    let socket = match (socket, &args.config) {
        (Some(s), _) => s,
        (None, Some(file)) => Config::load(file)?.control_socket,
        (None, None) => "/run/testenv-agent.sock".into(),
    };
    let (op_, env, hold_secs) = match op {
        CtlOp::Status { .. } => (ControlOp::Status, String::new(), None),
        CtlOp::Drain(t) => (ControlOp::Drain, t.env(), None),
        CtlOp::Undrain(t) => (ControlOp::Undrain, t.env(), None),
        CtlOp::Hold { name, for_ } => {
            let secs = match for_ {
                Some(text) => Some(
                    config::parse_duration(text)
                        .map_err(|e| anyhow::anyhow!("--for: {e}"))?
                        .as_secs(),
                ),
                None => None,
            };
            (ControlOp::Hold, name.clone(), secs)
        }
        CtlOp::Release { name } => (ControlOp::Release, name.clone(), None),
        CtlOp::Rebuild { name } => (ControlOp::Rebuild, name.clone(), None),
    };
    let cmd = ControlCommand {
        op: op_,
        env,
        hold_secs,
        requested_by: Some(format!("ctl:{}", std::env::var("USER").unwrap_or_default())),
    };
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the agent at {}: {e}", socket.display()))?;
        let (read, mut write) = stream.into_split();
        write
            .write_all(format!("{}\n", cmd.to_json()).as_bytes())
            .await?;
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await?;
        let reply: ControlReply = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("the agent's answer is not a reply: {e}"))?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(std::time::Duration::from_secs(30), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("the agent at {} did not answer", socket.display()))??;
    let mut text = String::new();
    if let CtlOp::Status { json: true } = op {
        text = serde_json::to_string_pretty(&reply.report)? + "\n";
    } else if let (CtlOp::Status { .. }, Some(report)) = (op, &reply.report) {
        use std::fmt::Write;
        let _ = writeln!(text, "agent {} on {}", report.agent, report.host);
        let _ = writeln!(
            text,
            "{:<16} {:<13} {:>8} {:<24} DETAIL",
            "TE", "STATE", "FOR", "HOLDER"
        );
        let now = testenv::journal::now_ms();
        for e in &report.envs {
            let _ = writeln!(
                text,
                "{:<16} {:<13} {:>7}s {:<24} {}",
                e.name,
                e.state.as_str(),
                now.saturating_sub(e.since_ms) / 1000,
                e.holder.as_deref().unwrap_or("-"),
                e.detail.as_deref().unwrap_or("")
            );
        }
    } else {
        text = format!("{}\n", reply.message);
    }
    // A reader that has seen enough (`| grep -q`, `| head`) closes the pipe: not an error.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e.into());
            }
        }
    }
    Ok(if reply.ok { 0 } else { 1 })
}

async fn serve(config: Config) -> anyhow::Result<i32> {
    let servers = config.tls.servers(&config.brokers.join(","))?;
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", config.state_dir.display()))?;
    if config.on_demand.is_some() {
        // The create hook writes TE data (SSH keys, passwords) there: for the agent's user only.
        use std::os::unix::fs::DirBuilderExt;
        let dir = on_demand::datafile_dir(&config.state_dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    }
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let pool = Rc::new(pool::Pool::new(
                config.agent.clone(),
                host_name(),
                config.tes.clone(),
                config.on_demand.clone(),
            ));
            control::serve_socket(pool.clone(), &config.control_socket).await?;
            let mut usr1 = signal(SignalKind::user_defined1())?;
            let mut usr2 = signal(SignalKind::user_defined2())?;
            let mut int = signal(SignalKind::interrupt())?;
            let mut term = signal(SignalKind::terminate())?;
            let rt = Rc::new(pool::TeRuntime {
                servers: servers.clone(),
                settings: Rc::new(config.lease.clone()),
                state_dir: config.state_dir.clone(),
            });
            let mut tasks = Vec::new();
            on_demand::destroy_orphans(&pool, &config.state_dir);
            for (i, te) in pool.tes.iter().enumerate() {
                tasks.push(if te.kind == config::TeKind::OnDemand {
                    tokio::task::spawn_local(on_demand::run_slot(pool.clone(), i, rt.clone()))
                } else {
                    tokio::task::spawn_local(pool::run_te(pool.clone(), i, rt.clone()))
                });
            }
            on_demand::demand_forever(pool.clone(), servers.clone());
            let ctl_worker = control::serve_gearman(pool.clone(), servers.clone());
            control::report_forever(pool.clone(), servers.clone());
            tracing::info!(agent = pool.agent, tes = pool.tes.len(), brokers = ?config.brokers, "serving");
            let whole_host = |op| ControlCommand {
                op,
                env: ALL_ENVS.into(),
                hold_secs: None,
                requested_by: Some("signal".into()),
            };
            loop {
                tokio::select! {
                    _ = usr2.recv() => { pool.apply(&whole_host(ControlOp::Drain)); }
                    _ = usr1.recv() => { pool.apply(&whole_host(ControlOp::Undrain)); }
                    _ = int.recv() => break,
                    _ = term.recv() => break,
                }
            }
            tracing::info!("stopping");
            pool.stop();
            ctl_worker.stop();
            for t in tasks {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), t).await;
            }
            let _ = std::fs::remove_file(&config.control_socket);
            anyhow::Ok(0)
        })
        .await
}
