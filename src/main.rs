use std::process::ExitCode;

use clap::Parser;
use kameleoon_cohort_operator::cli::{Cli, Command};
use kameleoon_cohort_operator::{crd, failure_chain, operator, telemetry};

fn print_crds(output_dir: Option<&std::path::Path>) -> Result<(), Box<dyn std::error::Error>> {
    let Some(dir) = output_dir else {
        print!("{}", crd::definitions_yaml()?);
        return Ok(());
    };
    std::fs::create_dir_all(dir)?;
    for (name, yaml) in crd::definition_files()? {
        std::fs::write(dir.join(name), yaml)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { output_dir } => match print_crds(output_dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: cannot write the CRDs: {error}");
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
