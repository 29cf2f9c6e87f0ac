//! `tebroker admin`: send one admin command to a broker and print its answer, like gearadmin
//! but for every command tebroker knows (`leases`, `envs`, `drain TE`, `stats`, `acl ...`
//! included).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The broker, host[:port].
    #[arg(short = 'b', long, default_value = "127.0.0.1:4730")]
    pub broker: String,
    /// The command and its arguments, e.g. `status`, `leases`, `envs`, `drain TE`,
    /// `cancel job H:host:12`.
    #[arg(required = true, trailing_var_arg = true)]
    pub command: Vec<String>,
}

/// Commands whose answer is a list ending with a line holding only `.`.
fn is_listing(command: &str) -> bool {
    let words: Vec<&str> = command.split_whitespace().collect();
    matches!(
        words.as_slice(),
        ["status", ..]
            | ["workers", ..]
            | ["prioritystatus", ..]
            | ["show", ..]
            | ["leases", ..]
            | ["envs", ..]
            | ["stats", ..]
            | ["acl", "list", ..]
    )
}

/// Runs the command; returns the process exit status (1 if the broker answered `ERR`).
pub fn run(args: AdminArgs) -> anyhow::Result<i32> {
    let addr = if args
        .broker
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !args.broker.ends_with(']')
    {
        args.broker.clone()
    } else {
        format!("{}:4730", args.broker)
    };
    let command = args.command.join(" ");
    let mut stream =
        TcpStream::connect(&addr).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let listing = is_listing(&command);
    let mut out = std::io::stdout().lock();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).context("reading the answer")? == 0 {
            break;
        }
        let text = line.trim_end_matches(['\r', '\n']);
        if text.starts_with("ERR ") {
            eprintln!("{}", text.replace('+', " "));
            return Ok(1);
        }
        if listing && text == "." {
            break;
        }
        writeln!(out, "{text}")?;
        if !listing {
            break;
        }
    }
    Ok(0)
}
