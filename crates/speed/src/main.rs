//! `lambda-speed`: the speed layer's command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lambda_core::time::format_ts;
use lambda_core::{FeatureView, Span};
use lambda_speed::consumer::{ConsumerConfig, Metrics, run_all};
use lambda_speed::kinesis::{KinesisConfig, KinesisSource};
use lambda_speed::source::{FileSource, Source};
use lambda_store::OnlineStore;

/// The speed layer: consumes a stream of events and keeps every entity's 5-minute event-time
/// tiles in the online store, fresh within about a second, exact through crashes and replays.
#[derive(Debug, Parser)]
#[command(name = "lambda-speed", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume the stream until stopped (ctrl-c / SIGTERM flush, checkpoint and exit cleanly).
    ///
    /// Example (embedded default): lambda-speed run --view examples/fraud/features.toml
    ///   --source data/demo/stream/events.jsonl --store data/demo/online.redb --exit-at-end
    Run(Box<RunArgs>),
    /// Print the live tiles the store holds for some entities.
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
        /// Show at most this many of each entity's newest tiles.
        #[arg(long, default_value_t = 5)]
        last: usize,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The feature definition (TOML).
    #[arg(long)]
    view: PathBuf,
    /// The stream: `kinesis://STREAM`, or (embedded default) a JSON-lines file (one shard) or a
    /// directory of `*.jsonl` files (a shard each); read from the last checkpoint on.
    #[arg(long)]
    source: String,
    /// Custom Kinesis endpoint (an emulator such as kinesis-mock); unset for AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL_KINESIS")]
    kinesis_endpoint: Option<String>,
    /// The online store: a redb file path (embedded default) or `dynamodb://TABLE`.
    #[arg(long, default_value = "data/online.redb")]
    store: String,
    /// AWS region for `dynamodb://` stores.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    region: String,
    /// Custom DynamoDB endpoint (an emulator); unset for AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL_DYNAMODB")]
    endpoint: Option<String>,
    /// How often changed tiles are written (freshness), e.g. 1s, 250ms.
    #[arg(long, default_value = "1s")]
    flush_interval: Span,
    /// How long tile items live after their tile ends (must exceed the batch view's reach).
    #[arg(long, default_value = "3d")]
    tile_ttl: Span,
    /// Records per read.
    #[arg(long, default_value_t = 10_000)]
    batch_size: usize,
    /// Where records that fail to decode are kept (JSON lines per shard, with the reason).
    #[arg(long, default_value = "data/dead-letter")]
    dead_letter_dir: PathBuf,
    /// Where late events are written as Parquet in the history layout (point it at the batch
    /// history so the next nightly run picks them up). Default: the view's local history.
    #[arg(long)]
    late_dir: Option<PathBuf>,
    /// Exit once every shard is read to its end (replays of finite files, demos, tests).
    #[arg(long)]
    exit_at_end: bool,
    /// Share the shards with other `lambda-speed` processes through leases in this DynamoDB
    /// table (`dynamodb://TABLE`, the template's lease table). Without it, this process reads
    /// every shard.
    #[arg(long, conflicts_with = "exit_at_end")]
    leases: Option<String>,
    /// Lease length: a dead process's shards are taken over this long after its last renewal.
    #[arg(long, default_value = "10s")]
    lease_ttl: Span,
    /// This process's name in the lease table (default: host:pid).
    #[arg(long)]
    worker_id: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9898).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds between progress/metrics log lines.
    #[arg(long, default_value_t = 10)]
    report_every: u64,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lambda-speed: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => run_consumer(*args),
        Command::Show {
            view,
            store,
            entities,
            last,
        } => show(view, store, entities, last),
    }
}

async fn open_store(
    text: &str,
    region: &str,
    endpoint: Option<&str>,
) -> anyhow::Result<Arc<dyn OnlineStore>> {
    lambda_store::open(text, region, endpoint)
        .await
        .with_context(|| format!("opening the online store {text}"))
}

fn report(m: &Metrics, started: std::time::Instant) -> String {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let n = get(&m.records_in);
    format!(
        "{n} records ({:.0}/s): {} applied, {} duplicates, {} replayed, {} late, {} dead-lettered; {} flushes, {} tiles written, {} store retries; freshness p50 {} ms, p99 {} ms, max {} ms; event-time lag {} s; behind the stream head {} ms",
        n as f64 / started.elapsed().as_secs_f64().max(1e-9),
        get(&m.applied),
        get(&m.duplicates),
        get(&m.replayed),
        get(&m.late),
        get(&m.dead_lettered),
        get(&m.flushes),
        get(&m.items_written),
        get(&m.store_retries),
        m.freshness_percentile(50.0).unwrap_or(0),
        m.freshness_percentile(99.0).unwrap_or(0),
        get(&m.freshness_ms_max),
        m.event_lag_ms.load(Ordering::Relaxed) / 1000,
        m.millis_behind.load(Ordering::Relaxed),
    )
}

fn run_consumer(args: RunArgs) -> anyhow::Result<ExitCode> {
    let view = Arc::new(FeatureView::load(&args.view)?);
    let late_dir = match &args.late_dir {
        Some(d) => d.clone(),
        None => match view.batch.history.strip_prefix("file://") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from("data/late"),
        },
    };
    let config = Arc::new(ConsumerConfig {
        flush_interval: Duration::from_millis(args.flush_interval.millis().max(1) as u64),
        batch_size: args.batch_size.max(1),
        tile_ttl_ms: args.tile_ttl.millis(),
        exit_at_end: args.exit_at_end,
        dead_letter_dir: args.dead_letter_dir.clone(),
        late_dir,
        ..ConsumerConfig::default()
    });
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let source: Arc<dyn Source> = match args.source.strip_prefix("kinesis://") {
            Some(stream) => Arc::new(
                KinesisSource::connect(&KinesisConfig {
                    stream: stream.to_string(),
                    region: args.region.clone(),
                    endpoint: args.kinesis_endpoint.clone(),
                    static_credentials: None,
                })
                .await,
            ),
            None => Arc::new(FileSource::new(&args.source)),
        };
        let store = open_store(&args.store, &args.region, args.endpoint.as_deref()).await?;
        let metrics = Arc::new(Metrics::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // ctrl-c or SIGTERM: stop reading, flush, checkpoint, exit 0.
        tokio::spawn(async move {
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing the SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Stopping: flushing tiles and checkpointing.");
            let _ = stop_tx.send(true);
        });
        if let Some(addr) = args.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-addr {addr}"))?;
            tracing::info!(%addr, "Serving metrics at /metrics.");
            let (m, name) = (metrics.clone(), view.name.clone());
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                while let Ok((mut conn, _)) = listener.accept().await {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let body = m.render(&name);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                }
            });
        }
        let started = std::time::Instant::now();
        let m = metrics.clone();
        let every = Duration::from_secs(args.report_every.max(1));
        let reporter = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                tracing::info!("{}", report(&m, started));
            }
        });
        let result = match &args.leases {
            None => run_all(view, source, store, config, metrics.clone(), stop_rx).await,
            Some(text) => {
                if !text.starts_with("dynamodb://") {
                    anyhow::bail!(
                        "--leases `{text}`: leases must be shared by every process, use dynamodb://TABLE (a local file is opened by one process only)"
                    );
                }
                let leases = open_store(text, &args.region, args.endpoint.as_deref()).await?;
                let worker = args
                    .worker_id
                    .clone()
                    .unwrap_or_else(lambda_store::lease::default_owner);
                let lease_ms = args.lease_ttl.millis().max(1_000);
                lambda_speed::consumer::run_leased(
                    view,
                    source,
                    store,
                    leases,
                    config,
                    metrics.clone(),
                    lambda_speed::consumer::LeaseConfig {
                        worker,
                        lease_ms,
                        every: Duration::from_millis((lease_ms / 4) as u64),
                    },
                    stop_rx,
                )
                .await
            }
        };
        reporter.abort();
        eprintln!("lambda-speed: {}", report(&metrics, started));
        result.context("consuming the stream")?;
        Ok(ExitCode::SUCCESS)
    })
}

fn show(
    view: PathBuf,
    store: PathBuf,
    entities: Vec<String>,
    last: usize,
) -> anyhow::Result<ExitCode> {
    use lambda_speed::tiler::decode_tile;
    let v = FeatureView::load(&view)?;
    let aggs = v.aggs();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let s = lambda_store::embedded::EmbeddedStore::open(&store)?;
    for e in &entities {
        let pk = lambda_store::ItemKey::partition(&v.name, e);
        let items = rt.block_on(s.query(&pk, "tile#", "tile#~"))?;
        if items.is_empty() {
            // Normal for an entity without recent events: serving uses its batch row alone.
            println!("{e}: no live tiles");
            continue;
        }
        println!(
            "{e}: {} live tiles (newest {} shown)",
            items.len(),
            last.min(items.len())
        );
        for item in items.iter().rev().take(last).rev() {
            let (states, ids) =
                decode_tile(&aggs, &item.data).with_context(|| format!("decoding {}", item.key))?;
            let mut parts = item.key.sk.splitn(3, '#').skip(1);
            let start: i64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
            let shard = parts.next().unwrap_or("");
            let values: Vec<String> = aggs
                .iter()
                .zip(&states)
                .map(|(a, st)| match a.finalize(st) {
                    Ok(lambda_core::Value::Null) => format!("{}=NULL", a.name),
                    Ok(lambda_core::Value::Decimal(d)) => match a.output_type {
                        lambda_core::ColumnType::Decimal { scale, .. } => {
                            format!(
                                "{}={}",
                                a.name,
                                lambda_core::types::format_decimal(d, scale)
                            )
                        }
                        _ => format!("{}={d}", a.name),
                    },
                    Ok(lambda_core::Value::Float(x)) => format!("{}={x:.4}", a.name),
                    Ok(lambda_core::Value::Int(x)) => format!("{}={x}", a.name),
                    Ok(other) => format!("{}={other:?}", a.name),
                    Err(err) => format!("{}=<{err}>", a.name),
                })
                .collect();
            println!(
                "  tile {} shard {shard}: {} events; {}",
                format_ts(start),
                ids.len(),
                values.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
