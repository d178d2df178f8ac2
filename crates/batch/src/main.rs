//! `lambda-batch`: the batch layer's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lambda_core::time::{format_ts, last_midnight, parse_rfc3339_ms};
use lambda_core::{FeatureView, sql};

/// mimalloc: the job allocates and frees millions of small states from several threads, where
/// glibc's allocator spent a fifth of the time (`malloc_consolidate`, `_int_free`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The batch layer of lambda: DataFusion SQL over the Parquet history, generated from a feature
/// definition (see examples/fraud/features.toml).
///
/// `run` is the nightly job (Parquet history in a directory or on S3), `schedule`
/// runs the jobs of schedules/ on their cron, `show` prints entities' batch view, `check` and
/// `sql` validate a definition and print the SQL generated from it.
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
    /// With --template the instant is the placeholder `{{cutoff}}`: save it, edit it, and point
    /// the view's `batch.sql` at the file; the job then writes the offline features from it (the
    /// batch view for serving still comes from the definition's states, and the job reports how
    /// many entities drifted).
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
        /// Print a template for hand-written SQL (`{{cutoff}}` instead of a fixed instant).
        #[arg(long, conflicts_with = "as_of")]
        template: bool,
    },
    /// Validate a feature definition and list the features it serves.
    Check {
        /// The feature definition (TOML).
        #[arg(long)]
        view: PathBuf,
    },
    /// Run the batch job for one cutoff: partial states of the new days (incremental), the offline
    /// store, and one batch row per entity uploaded to the online store.
    ///
    /// Example (embedded default): lambda-batch run --view examples/fraud/features.toml
    ///   --history data/demo/history --offline data/demo/offline --store data/demo/online.redb
    ///   --cutoff 2026-01-01
    Run(RunArgs),
    /// Print entities' batch view: the features their stored batch row gives at its cutoff.
    Show {
        /// The feature definition (TOML).
        #[arg(long)]
        view: PathBuf,
        /// The online store (a redb file path).
        #[arg(long, default_value = "data/online.redb")]
        store: PathBuf,
        /// Entities to show (repeatable).
        #[arg(long = "entity", required = true)]
        entities: Vec<String>,
    },
    /// Run the cron schedules of `--dir` (default schedules/): runs what is due, catches up missed
    /// runs after downtime (bounded per job), never runs two copies of a job at once, records
    /// every run, retries failures with backoff, and waits for the next run (ctrl-c stops).
    ///
    /// Example: lambda-batch schedule --dry-run
    Schedule {
        /// Directory of `*.toml` schedules.
        #[arg(long, default_value = "schedules")]
        dir: PathBuf,
        /// Directory of run records (and of the lock files without --lock).
        #[arg(long, default_value = "data/scheduler")]
        state: PathBuf,
        /// Keep job locks and last successes in a DynamoDB table (`dynamodb://TABLE`, the
        /// template's scheduler table) so copies on several machines never run a job twice.
        /// Default: lock files in --state (one machine).
        #[arg(long)]
        lock: Option<String>,
        /// Run what is due now, then exit.
        #[arg(long)]
        once: bool,
        /// Show what is due and when each job runs next; run nothing.
        #[arg(long)]
        dry_run: bool,
    },
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

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The feature definition (TOML).
    #[arg(long)]
    view: PathBuf,
    /// The Parquet history: a directory, `file://` or `s3://bucket/prefix` URL holding
    /// `date=YYYY-MM-DD/` partitions. Default: the view's `batch.history`.
    #[arg(long)]
    history: Option<String>,
    /// The offline store (partial states and finalized features, Parquet): a directory or
    /// `s3://bucket/prefix`.
    #[arg(long, default_value = "data/offline")]
    offline: String,
    /// The online store: a redb file path (embedded default; its batch rows live in the
    /// directory `<path>.values` beside it) or `dynamodb://TABLE`.
    #[arg(long, default_value = "data/online.redb")]
    store: String,
    /// AWS region for `dynamodb://` stores.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    region: String,
    /// Custom DynamoDB endpoint (an emulator such as DynamoDB Local); unset for AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL_DYNAMODB")]
    endpoint: Option<String>,
    /// Custom S3 endpoint for `s3://` locations (an emulator); unset for AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL_S3")]
    s3_endpoint: Option<String>,
    /// The cutoff, a UTC date (events before its midnight are included); default: the last midnight.
    #[arg(long)]
    cutoff: Option<String>,
    /// Recompute every day's partial states instead of reusing the stored ones.
    #[arg(long)]
    full: bool,
    /// Backfill: run every night from this UTC date up to --cutoff, in order (offline features
    /// for each cutoff, for training sets; the online store ends with the last night's rows).
    #[arg(long)]
    from: Option<String>,
    /// Days a batch row stays in the online store after its newest data has left every window
    /// (its TTL is the cutoff + the longest window + these days). Rows of entities whose data did
    /// not change are not rewritten: they stay exact until then.
    #[arg(long, default_value_t = 7)]
    row_ttl_days: i64,
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
        Command::Sql {
            view,
            as_of,
            table,
            template,
        } => {
            let v = FeatureView::load(&view)?;
            let as_of_ms = match as_of {
                Some(t) => parse_rfc3339_ms(&t)
                    .map_err(anyhow::Error::msg)
                    .context("--as-of")?,
                None => last_midnight(chrono::Utc::now().timestamp_millis()),
            };
            let table = table.unwrap_or_else(|| v.source.name.clone());
            let text = if template {
                sql::features_template(&v, &table)
            } else {
                sql::features_as_of(&v, &table, as_of_ms)
            };
            print_stdout(&format!("{text};\n"))?;
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
        Command::Run(args) => run_job(args),
        Command::Show {
            view,
            store,
            entities,
        } => show(view, store, entities),
        Command::Schedule {
            dir,
            state,
            lock,
            once,
            dry_run,
        } => schedule(dir, state, lock, once, dry_run),
    }
}

fn run_job(args: RunArgs) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;

    use lambda_batch::job::{RunOptions, run};
    use lambda_batch::storage::{Location, S3Options};

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let view = FeatureView::load(&args.view)?;
    let history = args
        .history
        .clone()
        .unwrap_or_else(|| view.batch.history.clone());
    let s3 = S3Options {
        region: Some(args.region.clone()),
        endpoint: args.s3_endpoint.clone(),
        static_credentials: None,
    };
    let history = Location::parse(&history, &s3).context("--history")?;
    let offline = Location::parse(&args.offline, &s3).context("--offline")?;
    let date = |flag: &str, d: &str| -> anyhow::Result<i64> {
        Ok(chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
            .with_context(|| format!("{flag} `{d}` is not a date like 2026-01-01"))?
            .and_hms_opt(0, 0, 0)
            .context("midnight")?
            .and_utc()
            .timestamp_millis()
            + view.batch.cutoff_offset.millis())
    };
    let last_cutoff = match &args.cutoff {
        Some(d) => date("--cutoff", d)?,
        None => {
            last_midnight(chrono::Utc::now().timestamp_millis()) + view.batch.cutoff_offset.millis()
        }
    };
    let first_cutoff = match &args.from {
        Some(d) => date("--from", d)?,
        None => last_cutoff,
    };
    if first_cutoff > last_cutoff {
        anyhow::bail!(
            "--from {} is after the cutoff {}",
            format_ts(first_cutoff),
            format_ts(last_cutoff)
        );
    }
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let outcome = rt.block_on(async {
        let store = open_store(&args.store, &args.region, args.endpoint.as_deref()).await?;
        history.check().await.context("--history")?;
        offline.check().await.context("--offline")?;
        let mut opts = RunOptions {
            view: view.clone(),
            history,
            offline,
            cutoff_ms: first_cutoff,
            full: args.full,
            row_ttl_days: args.row_ttl_days,
            compact_over: lambda_batch::job::COMPACT_OVER,
        };
        let tty = std::io::stderr().is_terminal();
        while opts.cutoff_ms <= last_cutoff {
            let started = std::time::Instant::now();
            let summary = run(&opts, store.as_ref(), |p| show_progress(p, tty)).await?;
            if tty {
                eprintln!();
            }
            print_summary(&view, opts.cutoff_ms, &summary, started.elapsed());
            // Later nights of a backfill reuse what the first computed.
            opts.full = false;
            opts.cutoff_ms += lambda_core::time::DAY_MS;
        }
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    });
    // Everything is written and the store is closed (dropped inside the block): the runtime's
    // idle threads are not waited for.
    rt.shutdown_background();
    outcome
}

/// One due run of a scheduled job, under its lock `held`: retried with backoff up to the job's
/// retries, stopped if the lock is lost, recorded, and reported on stdout. Returns whether it
/// succeeded.
async fn run_scheduled(
    coord: &lambda_batch::schedule::Coordinator,
    mut held: lambda_batch::schedule::Held,
    j: &lambda_batch::schedule::Job,
    scheduled: i64,
) -> anyhow::Result<bool> {
    use lambda_batch::job::{RunOptions, run};
    use lambda_batch::schedule::{RunRecord, retry_backoff_ms};
    use lambda_batch::storage::{Location, S3Options};

    let now = || chrono::Utc::now().timestamp_millis();
    let view = FeatureView::load(&j.view)?;
    let s3 = S3Options::default();
    let history = j
        .history
        .clone()
        .unwrap_or_else(|| view.batch.history.clone());
    let opts = RunOptions {
        history: Location::parse(&history, &s3)
            .with_context(|| format!("job {}: history", j.name))?,
        offline: Location::parse(&j.offline, &s3)
            .with_context(|| format!("job {}: offline", j.name))?,
        cutoff_ms: last_midnight(scheduled) + view.batch.cutoff_offset.millis(),
        full: false,
        row_ttl_days: 7,
        compact_over: lambda_batch::job::COMPACT_OVER,
        view,
    };
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
    let endpoint = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").ok();
    let store = open_store(&j.store, &region, endpoint.as_deref()).await?;
    let started = now();
    let mut attempts = 0;
    let attempt_all = async {
        loop {
            attempts += 1;
            tracing::info!(
                job = %j.name,
                scheduled = %format_ts(scheduled),
                cutoff = %format_ts(opts.cutoff_ms),
                attempts,
                "Running."
            );
            match run(&opts, store.as_ref(), |_| {}).await {
                Ok(s) => break Ok(s),
                Err(e) if attempts <= j.retries => {
                    let wait = retry_backoff_ms(attempts);
                    tracing::warn!(
                        job = %j.name,
                        error = %format!("{e:#}"),
                        wait_s = wait / 1000,
                        "Run failed; retrying."
                    );
                    let pause = tokio::time::sleep(std::time::Duration::from_millis(wait as u64));
                    tokio::select! {
                        _ = pause => {}
                        _ = tokio::signal::ctrl_c() => break Err(anyhow::anyhow!("interrupted")),
                    }
                }
                Err(e) => break Err(anyhow::Error::new(e)),
            }
        }
    };
    let outcome = tokio::select! {
        o = attempt_all => o,
        lost = coord.keep(&mut held) => Err(anyhow::Error::new(lost)
            .context("the job lock was lost (another copy took it over); stopped")),
    };
    coord.unlock(held).await?;
    let (rows, bytes, text) = match &outcome {
        Ok(s) => (s.rows_in, s.bytes_in, "ok".to_string()),
        Err(e) => (0, 0, format!("error: {e:#}")),
    };
    let record = RunRecord {
        job: j.name.clone(),
        scheduled_ms: scheduled,
        started_ms: started,
        ended_ms: now(),
        attempts,
        outcome: text.clone(),
        rows,
        bytes,
    };
    coord.record(&record).await?;
    println!(
        "{} {}: {text} ({rows} rows, {:.1} MB, {:.1} s)",
        j.name,
        format_ts(scheduled),
        bytes as f64 / 1e6,
        (now() - started) as f64 / 1000.0
    );
    Ok(outcome.is_ok())
}

/// One progress line of a run: redrawn in place on a terminal (`tty`), one line each otherwise.
fn show_progress(p: lambda_batch::job::Progress, tty: bool) {
    use lambda_batch::job::Progress;
    let line = match p {
        Progress::Day {
            date,
            rows,
            bytes,
            done,
            total,
        } => format!(
            "[{done}/{total}] computed {date}: {rows} rows, {:.1} MB of history read so far",
            bytes as f64 / 1e6
        ),
        Progress::Upload { done, total } => format!("uploading batch rows: {done}/{total}"),
    };
    if tty {
        eprint!("\r\x1b[2K{line}");
    } else {
        eprintln!("{line}");
    }
}

/// The summary of one night of a run (stdout).
fn print_summary(
    view: &FeatureView,
    cutoff_ms: i64,
    summary: &lambda_batch::job::RunSummary,
    took: std::time::Duration,
) {
    let which = match &summary.rebuild {
        Some(why) => format!("every entity: {why}"),
        None => "entities with new or changed days".into(),
    };
    println!(
        "view {} cutoff {}: {} batch rows written ({which}), {} feature rows, \
         {} days computed, {} reused, {} rows / {:.1} MB read, {:.1} MB of batch rows, {:.1} s",
        view.name,
        format_ts(cutoff_ms),
        summary.entities,
        summary.features_written,
        summary.days_computed,
        summary.days_reused,
        summary.rows_in,
        summary.bytes_in as f64 / 1e6,
        summary.row_bytes as f64 / 1e6,
        took.as_secs_f64()
    );
    if let Some(n) = summary.sql_drift {
        let file = view.batch.sql.as_ref().map(|p| p.display().to_string());
        println!(
            "offline features from the hand-written SQL {}: \
             {n} entities differ from the feature definition{}",
            file.unwrap_or_default(),
            if n > 0 {
                " (run the parity checker)"
            } else {
                ""
            }
        );
    }
}

/// Opens the online store: a redb file path or `dynamodb://TABLE` (checked to be reachable).
async fn open_store(
    text: &str,
    region: &str,
    endpoint: Option<&str>,
) -> anyhow::Result<std::sync::Arc<dyn lambda_store::OnlineStore>> {
    lambda_store::open(text, region, endpoint)
        .await
        .with_context(|| format!("opening the online store {text}"))
}

fn show(view: PathBuf, store: PathBuf, entities: Vec<String>) -> anyhow::Result<ExitCode> {
    use lambda_core::merge::{BatchRow, features_at};
    use lambda_store::{ItemKey, OnlineStore};

    let v = FeatureView::load(&view)?;
    let aggs = v.aggs();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let s = lambda_store::embedded::EmbeddedStore::open(&store)?;
    let keys: Vec<ItemKey> = entities
        .iter()
        .map(|e| ItemKey::batch(&v.name, e))
        .collect();
    let items = rt.block_on(s.batch_get(&keys))?;
    let mut missing = false;
    for (e, item) in entities.iter().zip(items) {
        let Some(item) = item else {
            println!("{e}: no batch row");
            missing = true;
            continue;
        };
        let row = BatchRow::decode(&aggs, &item.data)?;
        let values = features_at(&v, Some(&row), &[], row.cutoff_ms)?;
        println!(
            "{e} (batch row: cutoff {}, {} buckets, {} bytes)",
            format_ts(row.cutoff_ms),
            row.tiers.iter().map(|t| t.buckets.len()).sum::<usize>(),
            item.data.len()
        );
        for (f, val) in v.features().iter().zip(values) {
            let shown = match (&val, v.aggregations[f.aggregation].aggregation.output_type) {
                (
                    lambda_core::Value::Decimal(d),
                    lambda_core::ColumnType::Decimal { scale, .. },
                ) => lambda_core::types::format_decimal(*d, scale),
                (lambda_core::Value::Null, _) => "NULL".into(),
                (lambda_core::Value::Int(i), _) => i.to_string(),
                (lambda_core::Value::Float(x), _) => format!("{x:.4}"),
                (lambda_core::Value::Str(x), _) => x.clone(),
                (other, _) => format!("{other:?}"),
            };
            println!("  {:<26} {shown}", f.name);
        }
    }
    Ok(if missing {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn schedule(
    dir: PathBuf,
    state_dir: PathBuf,
    lock: Option<String>,
    once: bool,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    use lambda_batch::schedule::{Coordinator, Job, State};

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let jobs = Job::load_dir(&dir)?;
    let state = State::open(&state_dir)
        .with_context(|| format!("opening the scheduler state {}", state_dir.display()))?;
    let now = || chrono::Utc::now().timestamp_millis();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let coord = match lock.as_deref() {
        None => Coordinator::Files(state),
        Some(text) => {
            if !text.starts_with("dynamodb://") {
                anyhow::bail!("--lock `{text}`: expected dynamodb://TABLE");
            }
            let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
            let endpoint = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").ok();
            let store = rt.block_on(open_store(text, &region, endpoint.as_deref()))?;
            Coordinator::Store {
                store,
                state,
                clock: std::sync::Arc::new(lambda_store::SystemClock),
                owner: lambda_store::lease::default_owner(),
            }
        }
    };
    if dry_run {
        for j in &jobs {
            let last = rt.block_on(coord.last_success(&j.name))?;
            let due = j.due(last, now());
            println!("{} [{}]", j.name, j.cron_text);
            println!(
                "  last success: {}",
                last.map(format_ts).unwrap_or_else(|| "never".into())
            );
            for r in &due.runs {
                println!("  due now:      {}", format_ts(*r));
            }
            if !due.skipped.is_empty() {
                println!(
                    "  skipped (beyond catch-up {}): {} missed runs",
                    j.catch_up,
                    due.skipped.len()
                );
            }
            if let Some(n) = j.next_after(now()) {
                println!("  next:         {}", format_ts(n));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    rt.block_on(async {
        let mut failed = false;
        loop {
            for j in &jobs {
                let due = j.due(coord.last_success(&j.name).await?, now());
                if !due.skipped.is_empty() {
                    tracing::warn!(
                        job = %j.name,
                        skipped = due.skipped.len(),
                        catch_up = j.catch_up,
                        "Missed runs beyond the catch-up bound are skipped."
                    );
                }
                for scheduled in due.runs {
                    let Some(held) = coord.try_lock(&j.name, now()).await? else {
                        tracing::info!(job = %j.name, "Another copy holds the lock; not running.");
                        continue;
                    };
                    failed |= !run_scheduled(&coord, held, j, scheduled).await?;
                }
            }
            if once {
                return Ok(if failed {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                });
            }
            let next = jobs.iter().filter_map(|j| j.next_after(now())).min();
            let wait = next.map_or(60_000, |n| (n - now()).clamp(1_000, 3_600_000));
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(wait as u64)) => {}
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("Stopping.");
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
    })
}
