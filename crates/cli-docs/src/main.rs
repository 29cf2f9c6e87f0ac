//! `cli-docs OUTDIR`: the man pages (OUTDIR/man/NAME.1, one more page per subcommand, e.g.
//! tebroker-serve.1) and the bash, zsh and fish completions (OUTDIR/completions/SHELL/) of
//! every binary in [`BINARIES`], generated from the same clap definitions the binaries parse,
//! so the documentation cannot drift from the flags.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Command, CommandFactory};
use clap_complete::Shell;

/// An installed binary's name and its command line.
type Binary = (&'static str, fn() -> Command);

/// Every installed binary. A new binary is one more entry.
const BINARIES: &[Binary] = &[
    ("tebroker", tebroker::cli::Cli::command),
    ("testenv-client", testenv::client::ClientArgs::command),
    ("testenv-worker", testenv::worker::WorkerArgs::command),
    ("testenv-agent", testenv_agent::cli::Args::command),
];

const SHELLS: &[Shell] = &[Shell::Bash, Shell::Zsh, Shell::Fish];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        anyhow::bail!("usage: cli-docs OUTDIR");
    };
    for path in write_all(Path::new(&out))? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes every page and completion file under `out`; returns their paths.
fn write_all(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (name, command) in BINARIES {
        let mut command = command().name(*name);
        // Subcommand pages and completions need the tree finished (help, version, globals).
        command.build();
        written.extend(man_pages(&command, name, &out.join("man"))?);
        for shell in SHELLS {
            let dir = out.join("completions").join(shell.to_string());
            std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
            let path = clap_complete::generate_to(*shell, &mut command.clone(), *name, &dir)
                .with_context(|| format!("{name} {shell} completions in {}", dir.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// NAME.1 and, for each subcommand, NAME-SUB.1 (as git does), so every flag is documented.
fn man_pages(command: &Command, name: &str, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let mut written = Vec::new();
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    // Built subcommands carry the display name "tebroker-serve" and the bin name
    // "tebroker serve" the page's NAME and SYNOPSIS show.
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .with_context(|| format!("man page of {name}"))?;
    std::fs::write(&path, page).with_context(|| format!("{}", path.display()))?;
    written.push(path);
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        let sub_name = format!("{name}-{}", sub.get_name());
        written.extend(man_pages(sub, &sub_name, dir)?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_binary_gets_a_page_per_command_and_three_completions() {
        let out = tempfile::tempdir().unwrap();
        let written = write_all(out.path()).unwrap();
        for file in [
            "man/tebroker.1",
            "man/tebroker-serve.1",
            "man/tebroker-check-config.1",
            "man/testenv-client.1",
            "man/testenv-worker.1",
            "man/testenv-agent.1",
            "man/testenv-agent-check-config.1",
            "man/testenv-agent-ctl-drain.1",
            "completions/bash/testenv-agent.bash",
            "completions/bash/testenv-worker.bash",
            "completions/zsh/_tebroker",
            "completions/fish/testenv-client.fish",
        ] {
            assert!(
                written.contains(&out.path().join(file)),
                "{file} missing from {written:?}"
            );
        }
        let serve = std::fs::read_to_string(out.path().join("man/tebroker-serve.1")).unwrap();
        assert!(serve.contains("shutdown\\-timeout"), "{serve}");
        let bash =
            std::fs::read_to_string(out.path().join("completions/bash/tebroker.bash")).unwrap();
        assert!(bash.contains("check-config"), "{bash}");
        let agent =
            std::fs::read_to_string(out.path().join("man/testenv-agent-ctl-hold.1")).unwrap();
        assert!(agent.contains("\\-\\-for"), "{agent}");
    }
}
