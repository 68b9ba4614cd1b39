//! `meshwire`: the command-line front of meshwire.

mod interop_peer;

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
    /// Golden vectors (schema agentmesh-golden/1).
    Vectors {
        #[command(subcommand)]
        command: VectorsCommand,
    },
    /// Interop peer: the line protocol of interop/PROTOCOL.md on stdin/stdout.
    InteropPeer,
    /// Run the embedded relay (WebSocket /ws) and registry (HTTP /v1) on one port.
    Serve {
        /// Address to listen on.
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
        } => serve(&listen, allow_unauthenticated_did, legacy_registration, relay_token),
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

fn serve(
    listen: &str,
    allow_unauthenticated_did: bool,
    legacy_registration: bool,
    relay_token: Option<String>,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let config = meshwire_server::ServerConfig {
            allow_unauthenticated_did,
            legacy_registration,
            relay_token,
            ..Default::default()
        };
        let server = match meshwire_server::RunningServer::spawn(config, listener, None) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("meshwire relay    {}/ws", server.relay_url());
        println!("meshwire registry {}", server.registry_url());
        let _ = tokio::signal::ctrl_c().await;
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}
