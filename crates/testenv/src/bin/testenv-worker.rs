use clap::Parser;
use testenv::worker::{run, WorkerArgs};

fn main() {
    let args = WorkerArgs::parse();
    testenv::init_logging(args.debug);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("testenv-worker: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
