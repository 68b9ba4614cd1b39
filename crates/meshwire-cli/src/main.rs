//! `meshwire`: the command-line front of meshwire.

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
