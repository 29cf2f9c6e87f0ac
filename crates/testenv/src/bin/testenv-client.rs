use clap::Parser;
use testenv::client::{run, ClientArgs};
use testenv::guard;

fn main() {
    // The client re-runs itself as the guard process that supervises COMMAND.
    if std::env::var_os(guard::GUARD_ENV).is_some() {
        guard::run(std::env::args_os().skip(1).collect());
    }
    let args = ClientArgs::parse();
    testenv::init_logging(args.debug);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("testenv-client: {e:#}");
            1
        }
    };
    // Do not wait for background tasks (reconnecting links) to wind down.
    std::process::exit(code);
}
