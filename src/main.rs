use std::process::ExitCode;

use clap::Parser;
use kameleoon_cohort_operator::cli::{Cli, Command};
use kameleoon_cohort_operator::{crd, failure_chain, operator, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => match crd::definitions_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: cannot render the CRDs: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            telemetry::init(args.log_format, &args.log_level);
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                "Starting kameleoon-cohort-operator"
            );
            match operator::run(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(error = %failure_chain(&error), "Operator stopped with an error");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
