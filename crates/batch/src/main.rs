//! `lambda-batch`: the batch layer's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lambda_core::time::{format_ts, last_midnight, parse_rfc3339_ms};
use lambda_core::{FeatureView, sql};

/// The batch layer of lambda: DataFusion SQL over the Parquet history, generated from a feature
/// definition (see examples/fraud/features.toml).
///
/// Today it validates a definition and prints the SQL generated from it; `run` and `schedule`
/// land with the batch-layer issue and exit with an error until then.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the SQL generated from a feature definition (start here to hand-write your own).
    ///
    /// Example: lambda-batch sql --view examples/fraud/features.toml --as-of 2026-01-01T00:00:00Z
    Sql {
        /// The feature definition (TOML).
        #[arg(long)]
        view: PathBuf,
        /// Point in time the features are computed for (RFC 3339); default: the last midnight UTC.
        #[arg(long)]
        as_of: Option<String>,
        /// Table name to read from (default: the view's source name).
        #[arg(long)]
        table: Option<String>,
    },
    /// Validate a feature definition and list the features it serves.
    Check {
        /// The feature definition (TOML).
        #[arg(long)]
        view: PathBuf,
    },
    /// Run the nightly batch job (not built yet).
    Run,
    /// Run the cron schedules in schedules/ (not built yet).
    Schedule,
}

/// Writes to stdout; a closed pipe (`lambda-batch sql | head`) ends the program quietly.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => Ok(other?),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lambda-batch: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Sql { view, as_of, table } => {
            let v = FeatureView::load(&view)?;
            let as_of_ms = match as_of {
                Some(t) => parse_rfc3339_ms(&t)
                    .map_err(anyhow::Error::msg)
                    .context("--as-of")?,
                None => last_midnight(chrono::Utc::now().timestamp_millis()),
            };
            let table = table.unwrap_or_else(|| v.source.name.clone());
            print_stdout(&format!("{};\n", sql::features_as_of(&v, &table, as_of_ms)))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { view } => {
            let v = FeatureView::load(&view)?;
            println!(
                "{}: view `{}` is valid: {} aggregations, {} features, tile {}, max window {}",
                view.display(),
                v.name,
                v.aggregations.len(),
                v.features().len(),
                v.speed.tile,
                v.max_window()
            );
            for a in &v.aggregations {
                let ag = &a.aggregation;
                let input = ag
                    .input
                    .map(|i| v.source.columns[i].name.as_str())
                    .unwrap_or("*");
                let windows: Vec<String> = a.windows.iter().map(|w| w.to_string()).collect();
                println!(
                    "  {:<22} {}({input}) -> {}  windows [{}]",
                    ag.name,
                    ag.function,
                    ag.output_type,
                    windows.join(", ")
                );
            }
            println!(
                "  served at {}: see `lambda-batch sql`",
                format_ts(last_midnight(chrono::Utc::now().timestamp_millis()))
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run | Command::Schedule => {
            eprintln!(
                "lambda-batch: this command is not built yet (see the batch-layer issue); nothing was run"
            );
            Ok(ExitCode::from(2))
        }
    }
}
