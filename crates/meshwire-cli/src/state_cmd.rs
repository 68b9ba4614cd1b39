//! `meshwire state ...`: maintenance of a client's saved mesh state.

use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

/// `meshwire state` subcommands.
#[derive(Subcommand)]
pub enum StateCommand {
    /// Forget a saved state (e.g. a corrupt one) so that the agent starts
    /// over with the same identity: fresh pre-keys, peers KNOCK again. The
    /// identity file is not touched.
    Reset {
        /// The agent's store (`<state dir>/<did>.db`), or the JSON state
        /// file of an older meshwire (`<state dir>/<did>.session.json`).
        #[arg(long)]
        state: PathBuf,
    },
}

/// Runs a `meshwire state` subcommand.
pub fn run(command: StateCommand) -> ExitCode {
    match command {
        StateCommand::Reset { state } if state.extension().is_some_and(|e| e == "db") => {
            let reset = meshwire::SqliteStore::open(&state).and_then(|store| {
                use meshwire::Persistence;
                store.reset_mesh()
            });
            match reset {
                Ok(()) => {
                    println!(
                        "reset the sessions and pre-keys in {}; the agent starts over with the same identity on its \
                         next start (unacknowledged messages and unsent frames are kept)",
                        state.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        StateCommand::Reset { state } => match meshwire::store::reset_state_file(&state) {
            Ok(true) => {
                println!(
                    "removed {}; the agent starts over with the same identity on its next start",
                    state.display()
                );
                ExitCode::SUCCESS
            }
            Ok(false) => {
                println!("{}: no saved state, nothing to reset", state.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
