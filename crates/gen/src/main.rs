//! `lambda-gen`: writes a deterministic fraud-style data set (Parquet history + JSON stream).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use lambda_gen::{GenConfig, generate};

/// Generate fraud-style card events: a Parquet history (Hive-partitioned by date) and the same
/// events in arrival order as JSON lines, with duplicates, out-of-order and late events, NULL
/// merchants and a few malformed records. The same options always produce the same bytes.
///
/// Example: lambda-gen --events 10000000 --days 90 --out data
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Distinct events to generate (duplicates and malformed lines come on top).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Days of history ending at --end.
    #[arg(long, default_value_t = 90)]
    days: u32,
    /// End of the history (exclusive), a UTC date. Fixed by default so data sets are reproducible.
    #[arg(long, default_value = "2026-01-01")]
    end: String,
    /// Seed of the pseudo-random generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Distinct users (0 = one per 100 events, at least 1000).
    #[arg(long, default_value_t = 0)]
    users: u32,
    /// Output directory: writes <out>/history/date=YYYY-MM-DD/*.parquet and <out>/stream/events.jsonl
    /// (both replaced if present).
    #[arg(long, default_value = "data")]
    out: PathBuf,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("lambda-gen: error: {e:#}");
        std::process::exit(2);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let end = chrono::NaiveDate::parse_from_str(&args.end, "%Y-%m-%d")
        .with_context(|| format!("--end `{}` is not a date like 2026-01-01", args.end))?;
    let end_ms = end
        .and_hms_opt(0, 0, 0)
        .context("midnight")?
        .and_utc()
        .timestamp_millis();
    let cfg = GenConfig {
        events: args.events,
        days: args.days,
        end_ms,
        seed: args.seed,
        users: args.users,
        ..GenConfig::default()
    };
    let started = Instant::now();
    tracing::info!(events = cfg.events, days = cfg.days, users = cfg.effective_users(), out = %args.out.display(), "Generating.");
    let s = generate(&cfg, &args.out, |done| {
        tracing::info!(
            done,
            total = cfg.events,
            elapsed_s = started.elapsed().as_secs_f64(),
            "Progress."
        );
    })
    .with_context(|| format!("generating into {}", args.out.display()))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "generated {} events (+{} duplicates, {} out of order, {} late, {} malformed lines) in {:.1} s ({:.2} M events/s)",
        s.events,
        s.duplicates,
        s.out_of_order,
        s.late,
        s.malformed,
        secs,
        s.events as f64 / secs / 1e6
    );
    println!(
        "  history: {}/history  ({} Parquet files, {} rows)\n  stream:  {}/stream/events.jsonl  ({} lines)\n  bytes:   {:.1} MB",
        args.out.display(),
        s.parquet_files,
        s.parquet_rows,
        args.out.display(),
        s.json_lines,
        s.bytes as f64 / 1e6
    );
    Ok(())
}
