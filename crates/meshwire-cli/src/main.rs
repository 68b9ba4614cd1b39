//! `meshwire`: the command-line front of meshwire.

mod agent;
mod interop_peer;
mod paths;
mod serve_addr;
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
    Serve {
        /// Address to listen on: HOST:PORT, or a bare PORT for 127.0.0.1:PORT.
        #[arg(long, default_value = "127.0.0.1:8765")]
        listen: String,
        /// Accept connect frames without proof of possession (legacy npm 4.0.0 clients; insecure).
        #[arg(long)]
        allow_unauthenticated_did: bool,
        /// Accept npm 4.0.0 registrations without proof of possession (insecure).
        #[arg(long)]
        legacy_registration: bool,
        /// Shared secret connect frames must carry in `token`.
        #[arg(long)]
        relay_token: Option<String>,
        /// How far (seconds) a signed timestamp may be from the server clock; each proof is accepted once within it.
        #[arg(long, default_value_t = 300)]
        replay_window_secs: u64,
        /// Refuse timestamp proofs: only challenge-bound proofs (docs/specs/MESHWIRE-CHALLENGE-AUTH.md); AGT clients cannot connect.
        #[arg(long)]
        require_challenge: bool,
        /// Public origin (e.g. https://mesh.example.com) challenge proofs may name, behind a proxy; repeatable.
        #[arg(long = "public-origin")]
        public_origins: Vec<String>,
        /// Pre-key bundle fetches per minute per requester (DID, or IP; loopback not limited); 0 disables.
        #[arg(long, default_value_t = 30)]
        bundle_fetches_per_minute: u32,
    },
}

#[derive(Subcommand)]
enum VectorsCommand {
    /// Replay vector files (or directories of them) and compare every output.
    Verify {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
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
            let runtime = match tokio::runtime::Runtime::new() {
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
        Command::Serve {
            listen,
            allow_unauthenticated_did,
            legacy_registration,
            relay_token,
            replay_window_secs,
            require_challenge,
            public_origins,
            bundle_fetches_per_minute,
        } => serve(
            &listen,
            meshwire_server::ServerConfig {
                allow_unauthenticated_did,
                legacy_registration,
                relay_token,
                replay_window: std::time::Duration::from_secs(replay_window_secs),
                require_challenge,
                public_origins,
                bundle_fetches_per_minute,
                ..Default::default()
            },
        ),
        Command::Vectors {
            command: VectorsCommand::Verify { paths },
        } => verify(&paths),
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

fn verify(paths: &[PathBuf]) -> ExitCode {
    let (mut passed, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    for path in paths {
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

fn serve(listen: &str, config: meshwire_server::ServerConfig) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        // Logs on stderr: stdout carries only the URLs to give clients.
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listen = serve_addr::bind_address(listen);
        let listen = listen.as_str();
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let server = match meshwire_server::RunningServer::spawn(config, listener, None) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (relay_url, registry_url, note) = serve_addr::client_urls(server.relay_addr());
        println!("meshwire relay    {relay_url}");
        println!("meshwire registry {registry_url}");
        if let Some(note) = note {
            println!("note: {note}");
        }
        let _ = tokio::signal::ctrl_c().await;
        server.shutdown().await;
        ExitCode::SUCCESS
    })
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
