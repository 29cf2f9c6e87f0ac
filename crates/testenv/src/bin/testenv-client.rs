use clap::Parser;
use testenv::client::{run, ClientArgs};
use testenv::guard::Guard;

fn main() {
    let args = ClientArgs::parse();
    testenv::init_logging(if args.debug { "debug" } else { "info" });
    // Before the runtime starts any thread (see guard.rs).
    let guard = Guard::fork(args.command.clone(), args.kill_grace).unwrap_or_else(|e| {
        eprintln!("testenv-client: cannot start the guard process: {e}");
        std::process::exit(1)
    });
    testenv::agent_main("testenv-client", run(args, guard))
}
