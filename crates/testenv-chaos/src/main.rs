use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use testenv_chaos::check::Bounds;
use testenv_chaos::run::{run, NetnsMode, Options};
use testenv_chaos::schedule::FaultKind;

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (e.g. 120s, 10m, 1h)"))
}

/// `--faults`: one value holding a list, so clap does not split it into several arguments.
#[derive(Clone)]
struct FaultList(Vec<FaultKind>);

fn faults(text: &str) -> Result<FaultList, String> {
    if text == "all" {
        return Ok(FaultList(FaultKind::ALL.to_vec()));
    }
    text.split(',')
        .map(|k| k.trim().parse())
        .collect::<Result<_, _>>()
        .map(FaultList)
}

#[derive(Parser)]
#[command(
    name = "testenv-chaos",
    version,
    about = "Run real tebrokers, testenv-workers and testenv-clients under random faults (kill -9, \
             SIGSTOP, restarts, a network cut) and check the leases: no two holders of a TE at \
             once, TEs free again after their holder died, clients exit with COMMAND's status \
             or a documented code, leases survive a broker kill. Exits 1 on any violation.",
    after_help = "Example: testenv-chaos --duration 10m --seed 42 --agent-flag=--holder-grace=15"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// How long faults are injected (120s, 10m, 1h); the drain comes after.
    #[arg(long, default_value = "120s", value_parser = duration)]
    duration: Duration,
    /// The seed of the fault schedule and the clients' hold times (default: random; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Test environments, one testenv-worker each.
    #[arg(long, default_value_t = 20)]
    tes: usize,
    /// Client loops, each running testenv-client after testenv-client.
    #[arg(long, default_value_t = 60)]
    clients: usize,
    /// Brokers; every agent is given all of them.
    #[arg(long, default_value_t = 2)]
    brokers: usize,
    /// `auto`: put broker b in a network namespace for the network cut (skipped, with a line,
    /// where namespaces are not allowed); `off`: no namespace, no cut.
    #[arg(long, default_value = "auto", value_parser = ["auto", "off"])]
    netns: String,
    /// Fault kinds, comma-separated, or `all`: kill-client, kill-worker, kill-broker,
    /// stop-client, stop-worker, stop-broker, cut-network.
    #[arg(long, default_value = "all", value_parser = faults)]
    faults: FaultList,
    /// Mean time between two faults.
    #[arg(long, default_value = "3s", value_parser = duration)]
    fault_every: Duration,
    /// Shortest hold of a TE by one client (each hold is drawn between this and --hold-max).
    #[arg(long, default_value = "1s", value_parser = duration)]
    hold_min: Duration,
    /// Longest hold of a TE by one client.
    #[arg(long, default_value = "20s", value_parser = duration)]
    hold_max: Duration,
    /// A flag for every testenv-worker (repeatable; `--agent-flag=--holder-grace=15`).
    #[arg(long, allow_hyphen_values = true)]
    agent_flag: Vec<String>,
    /// A flag for every testenv-client (repeatable; `--client-flag=--kill-grace=5`).
    #[arg(long, allow_hyphen_values = true)]
    client_flag: Vec<String>,
    /// Where tebroker, testenv-worker and testenv-client are.
    #[arg(long, default_value = "target/debug")]
    bin: PathBuf,
    /// Where every log goes (default: a new directory under the temp dir, printed).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Longest time from a holder's death to its TE's next lease, with no other fault near.
    #[arg(long, default_value = "10s", value_parser = duration)]
    reclaim_bound: Duration,
    /// Longest a TE may stay away when its worker or a broker was hit near its holder's death,
    /// and longest the TEs may take to be free at the end: a restarted worker's holder grace
    /// plus resume grace, and a margin.
    #[arg(long, default_value = "150s", value_parser = duration)]
    quarantine_bound: Duration,
    /// Print every fault as it is injected and undone (always in OUT/faults.log).
    #[arg(short, long)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// The COMMAND of every chaos lease (internal): log `start`, hold, log `end`, exit CODE.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        client: String,
        #[arg(long)]
        ms: u64,
        #[arg(long)]
        exit: i32,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Some(Cmd::Hold {
        log,
        client,
        ms,
        exit,
    }) = &cli.cmd
    {
        let code = testenv_chaos::holdlog::hold(log, client, Duration::from_millis(*ms), *exit);
        std::process::exit(code);
    }
    let seed = cli.seed.unwrap_or_else(|| fastrand::u64(..));
    let out = cli.out.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("testenv-chaos-{}-{seed}", std::process::id()))
    });
    // Every COMMAND appends to OUT/holds.log from wherever its client runs it.
    let out = std::path::absolute(&out).unwrap_or(out);
    let faults: Vec<FaultKind> = {
        let mut k = cli.faults.0.clone();
        k.sort();
        k.dedup();
        k
    };
    let options = Options {
        duration: cli.duration,
        seed,
        tes: cli.tes,
        clients: cli.clients,
        brokers: cli.brokers,
        netns: if cli.netns == "off" {
            NetnsMode::Off
        } else {
            NetnsMode::Auto
        },
        faults,
        mean_gap: cli.fault_every,
        hold: (cli.hold_min, cli.hold_max.max(cli.hold_min)),
        agent_flags: cli.agent_flag.clone(),
        client_flags: cli.client_flag.clone(),
        bin: cli.bin.clone(),
        out: out.clone(),
        bounds: Bounds {
            reclaim_ms: cli.reclaim_bound.as_millis() as u64,
            disturbed_reclaim_ms: cli.quarantine_bound.as_millis() as u64,
            ..Bounds::default()
        },
        verbose: cli.verbose,
    };
    match run(&options) {
        Ok(outcome) => {
            let text = format!("{}\n{}", outcome.header, outcome.report);
            let _ = std::fs::write(out.join("report.txt"), &text);
            let _ = std::fs::write(
                out.join("report.json"),
                outcome.report.summary_json().to_string(),
            );
            println!("{}", outcome.report);
            if outcome.report.ok() {
                println!(
                    "testenv-chaos: PASSED (seed {seed}; logs in {})",
                    out.display()
                );
            } else {
                println!(
                    "testenv-chaos: FAILED with {} violations (seed {seed}; logs in {})",
                    outcome.report.violations.len(),
                    out.display()
                );
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!(
                "testenv-chaos: {e:#} (seed {seed}; logs in {})",
                out.display()
            );
            std::process::exit(if testenv_chaos::run::interrupted() {
                130
            } else {
                2
            });
        }
    }
}
