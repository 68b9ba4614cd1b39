//! `meshwire`: the command-line front of meshwire.

mod agent;
mod interop_peer;
mod paths;
mod serve_addr;
mod serve_cmd;
mod state_cmd;

use clap::{Parser, Subcommand};
use meshwire_vectors::{verify_path, CaseOutcome};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "meshwire",
    version,
    about = "AgentMesh end-to-end encrypted messaging, in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Identity files: `id new [--out FILE]`, `id show [FILE]`.
    Id {
        #[command(subcommand)]
        command: agent::IdCommand,
    },
    /// Send one message (end-to-end encrypted) and exit once the relay has it.
    Send {
        #[command(flatten)]
        args: agent::SendArgs,
        #[command(flatten)]
        opts: agent::AgentOpts,
    },
    /// Print messages as they arrive, one line each (`--json`: one JSON object a line).
    Listen {
        #[command(flatten)]
        args: agent::ListenArgs,
        #[command(flatten)]
        opts: agent::AgentOpts,
    },
    /// Print the DID of the agent registered under a display name.
    Find {
        /// The display name.
        #[arg(value_name = "NAME")]
        display_name: String,
        #[command(flatten)]
        opts: agent::AgentOpts,
    },
    /// List agents with a capability (default: agents started by this CLI).
    Discover {
        /// The capability to look for (default: meshwire-cli).
        #[arg(long, value_name = "C")]
        capability: Option<String>,
        #[command(flatten)]
        opts: agent::AgentOpts,
    },
    /// Round-trip time through the mesh to an agent running `meshwire listen --echo`.
    Ping {
        /// The agent: a display name or a DID.
        to: String,
        /// How many pings.
        #[arg(long, short = 'c', default_value_t = 3)]
        count: u32,
        #[command(flatten)]
        opts: agent::AgentOpts,
    },
    /// Golden vectors (schema agentmesh-golden/1).
    Vectors {
        #[command(subcommand)]
        command: VectorsCommand,
    },
    /// Interop peer: the line protocol of interop/PROTOCOL.md on stdin/stdout.
    InteropPeer,
    /// A client's saved mesh state (`state reset --state PATH`).
    State {
        #[command(subcommand)]
        command: state_cmd::StateCommand,
    },
    /// Run the embedded relay (WebSocket /ws) and registry (HTTP /v1) on one port.
    Serve(Box<serve_cmd::ServeArgs>),
}

#[derive(Subcommand)]
enum VectorsCommand {
    /// Replay vector files (or directories of them) and compare every output.
    Verify {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// A PATH that does not exist is reported and counted as skipped
        /// instead of failed (for `../shared/vectors`, which a clone may lack).
        #[arg(long)]
        skip_missing: bool,
    },
    /// Write meshwire's own vectors into DIR.
    Generate { dir: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Id { command } => agent_result(agent::id(command)),
        Command::Send { args, opts } => agent_result(agent::send(opts, args)),
        Command::Listen { args, opts } => agent_result(agent::listen(opts, args)),
        Command::Find { display_name, opts } => agent_result(agent::find(opts, display_name)),
        Command::Discover { capability, opts } => agent_result(agent::discover(opts, capability)),
        Command::Ping { to, count, opts } => agent_result(agent::ping(opts, to, count)),
        Command::State { command } => state_cmd::run(command),
        Command::InteropPeer => {
            // One thread, like the reference agents: a send's frame is
            // written by the connection task as soon as the sending task
            // yields, instead of waking a second worker thread for it (on
            // the 2-core development VM that wake-up was 57 µs at p50 and
            // 200 µs at p90 of a message's path; the figures with the AGT
            // relay, two runs each: p50 1.10-1.12 ms against 1.28-1.33,
            // 9,300-9,800 msg/s against 6,200-8,400).
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(interop_peer::run()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve(args) => serve_cmd::run(*args),
        Command::Vectors {
            command: VectorsCommand::Verify { paths, skip_missing },
        } => verify(&paths, skip_missing),
        Command::Vectors {
            command: VectorsCommand::Generate { dir },
        } => match meshwire_vectors::generate::write_all(&dir) {
            Ok(files) => {
                for file in files {
                    println!("wrote {}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Prints an agent command's error (its `Display`) and picks the exit code.
fn agent_result(result: agent::CliResult<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn verify(paths: &[PathBuf], skip_missing: bool) -> ExitCode {
    let (mut passed, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    for path in paths {
        if skip_missing && !path.exists() {
            println!("SKIP {}: no such file or folder", path.display());
            skipped += 1;
            continue;
        }
        match verify_path(path) {
            Ok(results) => {
                for result in results {
                    println!("{result}");
                    match result.outcome {
                        CaseOutcome::Passed => passed += 1,
                        CaseOutcome::Failed(_) => failed += 1,
                        CaseOutcome::Skipped(_) => skipped += 1,
                    }
                }
            }
            Err(e) => {
                println!("FAIL {e}");
                failed += 1;
            }
        }
    }
    if skipped > 0 {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    /// Every subcommand's arguments are consistent (clap's own checks).
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// Every argument of the agent commands has help text.
    #[test]
    fn every_argument_has_help() {
        use clap::CommandFactory;
        let cli = super::Cli::command();
        for name in ["id", "send", "listen", "find", "discover", "ping", "serve"] {
            let command = cli.find_subcommand(name).unwrap_or_else(|| unreachable!("{name}"));
            let mut commands = vec![command.clone()];
            commands.extend(command.get_subcommands().cloned());
            for c in commands {
                for arg in c.get_arguments() {
                    assert!(
                        arg.get_help().is_some(),
                        "{name} {}: --{} has no help",
                        c.get_name(),
                        arg.get_id()
                    );
                }
            }
        }
    }
}
