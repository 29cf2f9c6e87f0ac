use clap::Parser;
use testenv::worker::{run, WorkerArgs};

fn main() {
    let args = WorkerArgs::parse();
    testenv::init_logging(if args.debug { "debug" } else { "info" });
    testenv::agent_main("testenv-worker", async { run(args).await.map(|()| 0) })
}
