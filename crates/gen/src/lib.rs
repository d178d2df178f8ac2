//! # lambda-gen
//!
//! A deterministic generator of fraud-style card events (same seed and options, same bytes):
//! Zipf-skewed users, merchants and products, decimal amounts, about 0.5 % duplicated events,
//! about 1 % arriving out of order by up to a few minutes, a few very late events, some NULL
//! merchants, and a few malformed records in the JSON stream.
//!
//! It writes the history as Parquet, Hive-partitioned by `date=YYYY-MM-DD` of the event time, and
//! the same events in arrival order as JSON lines (the stream the speed layer replays). The schema
//! is the `transactions` source of `examples/fraud/features.toml`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Decimal128Builder, StringBuilder, TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

/// Generator options.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// Number of distinct events (duplicates come on top).
    pub events: u64,
    /// Days of history, ending at `end_ms`.
    pub days: u32,
    /// Exclusive end of the event times (epoch ms, UTC).
    pub end_ms: i64,
    /// PRNG seed.
    pub seed: u64,
    /// Distinct users (Zipf s = 1.1).
    pub users: u32,
    /// Distinct merchants (Zipf s = 1.0).
    pub merchants: u32,
    /// Distinct products (Zipf s = 0.9).
    pub products: u32,
    /// Fraction of events delivered twice.
    pub duplicate_fraction: f64,
    /// Fraction of events delayed by up to `max_disorder_ms`.
    pub out_of_order_fraction: f64,
    /// The largest out-of-order delay.
    pub max_disorder_ms: i64,
    /// Fraction of events delayed by 2–3 hours (beyond the speed layer's allowed lateness).
    pub late_fraction: f64,
    /// Fraction of malformed lines added to the JSON stream.
    pub malformed_fraction: f64,
    /// Fraction of purchases with a NULL merchant.
    pub null_merchant_fraction: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            events: 1_000_000,
            days: 90,
            end_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            seed: 42,
            users: 0,
            merchants: 5_000,
            products: 20_000,
            duplicate_fraction: 0.005,
            out_of_order_fraction: 0.01,
            max_disorder_ms: 3 * 60_000,
            late_fraction: 0.000_1,
            malformed_fraction: 0.000_1,
            null_merchant_fraction: 0.02,
        }
    }
}

impl GenConfig {
    /// Users actually used: `users`, or one per 100 events (at least 1 000) when 0.
    pub fn effective_users(&self) -> u32 {
        if self.users > 0 {
            self.users
        } else {
            ((self.events / 100).max(1_000)).min(u32::MAX as u64) as u32
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenSummary {
    /// Distinct events.
    pub events: u64,
    /// Extra copies of events (in both outputs).
    pub duplicates: u64,
    /// Events delivered out of order in the stream.
    pub out_of_order: u64,
    /// Events delayed beyond the allowed lateness.
    pub late: u64,
    /// Malformed lines in the stream.
    pub malformed: u64,
    /// Rows written to Parquet (events + duplicates).
    pub parquet_rows: u64,
    /// Lines written to the JSON stream (events + duplicates + malformed).
    pub json_lines: u64,
    /// Parquet files written.
    pub parquet_files: u64,
    /// Bytes written (Parquet + JSON).
    pub bytes: u64,
}

/// Errors of the generator.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// File system trouble, naming the path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Parquet encoding failed.
    #[error("writing Parquet {path}: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// Bad options.
    #[error("invalid option: {0}")]
    Config(String),
}

/// SplitMix64: small, fast, and stable forever (the data set must not change with a crate bump).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.f64().max(f64::MIN_POSITIVE);
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Zipf sampler over `1..=n` by inverse CDF; ranks are scattered over ids by a fixed permutation
/// so the heaviest key is not always id 0.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// A sampler over `n` keys with exponent `s`.
    pub fn new(n: u32, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in cdf.iter_mut() {
            *c /= acc;
        }
        Zipf { cdf }
    }
    /// A key id in `0..n`.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        let u = rng.f64();
        let rank = self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) as u64;
        let n = self.cdf.len() as u64;
        ((rank * 2_654_435_761) % n) as u32
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    id: u64,
    user: u32,
    merchant: Option<u32>,
    product: u32,
    kind: u8, // 0 purchase, 1 view, 2 refund
    amount_cents: Option<i64>,
    card_present: Option<bool>,
    ts: i64,
}

const KINDS: [&str; 3] = ["purchase", "view", "refund"];
const DAY_MS: i64 = 86_400_000;

/// The Arrow schema of the generated events (the `transactions` source).
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("merchant_id", DataType::Utf8, true),
        Field::new("product_id", DataType::Utf8, false),
        Field::new("event_type", DataType::Utf8, false),
        Field::new("amount", DataType::Decimal128(10, 2), true),
        Field::new("card_present", DataType::Boolean, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
}

struct Batch {
    id: StringBuilder,
    user: StringBuilder,
    merchant: StringBuilder,
    product: StringBuilder,
    kind: StringBuilder,
    amount: Decimal128Builder,
    card: BooleanBuilder,
    ts: TimestampMillisecondBuilder,
    len: usize,
}

impl Batch {
    fn new() -> Self {
        Batch {
            id: StringBuilder::new(),
            user: StringBuilder::new(),
            merchant: StringBuilder::new(),
            product: StringBuilder::new(),
            kind: StringBuilder::new(),
            amount: Decimal128Builder::new().with_data_type(DataType::Decimal128(10, 2)),
            card: BooleanBuilder::new(),
            ts: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            len: 0,
        }
    }
    fn push(&mut self, e: &Event) {
        // Writing into a string builder and then appending "" completes the value without allocating.
        let _ = write!(self.id, "e{:012}", e.id);
        self.id.append_value("");
        let _ = write!(self.user, "u{:07}", e.user);
        self.user.append_value("");
        match e.merchant {
            Some(m) => {
                let _ = write!(self.merchant, "m{m:05}");
                self.merchant.append_value("");
            }
            None => self.merchant.append_null(),
        }
        let _ = write!(self.product, "p{:06}", e.product);
        self.product.append_value("");
        self.kind.append_value(KINDS[e.kind as usize]);
        self.amount.append_option(e.amount_cents.map(|c| c as i128));
        self.card.append_option(e.card_present);
        self.ts.append_value(e.ts);
        self.len += 1;
    }
    fn finish(&mut self) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.id.finish()),
            Arc::new(self.user.finish()),
            Arc::new(self.merchant.finish()),
            Arc::new(self.product.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.amount.finish()),
            Arc::new(self.card.finish()),
            Arc::new(self.ts.finish()),
        ];
        self.len = 0;
        RecordBatch::try_new(schema(), cols).expect("generator columns match the schema")
    }
}

struct ParquetSink {
    dir: PathBuf,
    current: Option<(i64, PathBuf, ArrowWriter<File>)>,
    batch: Batch,
    files: u64,
    rows: u64,
    bytes: u64,
}

impl ParquetSink {
    fn push(&mut self, e: &Event) -> Result<(), GenError> {
        let day = e.ts.div_euclid(DAY_MS);
        if self.current.as_ref().map(|c| c.0) != Some(day) {
            self.close()?;
            let date = chrono::DateTime::from_timestamp_millis(day * DAY_MS)
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default();
            let dir = self.dir.join(format!("date={date}"));
            fs::create_dir_all(&dir).map_err(|source| GenError::Io {
                path: dir.clone(),
                source,
            })?;
            let path = dir.join("part-00000.parquet");
            let file = File::create(&path).map_err(|source| GenError::Io {
                path: path.clone(),
                source,
            })?;
            let props = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_max_row_group_row_count(Some(256 * 1024))
                .build();
            let w = ArrowWriter::try_new(file, schema(), Some(props)).map_err(|source| {
                GenError::Parquet {
                    path: path.clone(),
                    source,
                }
            })?;
            self.current = Some((day, path, w));
            self.files += 1;
        }
        self.batch.push(e);
        self.rows += 1;
        if self.batch.len >= 64 * 1024 {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), GenError> {
        if self.batch.len == 0 {
            return Ok(());
        }
        let b = self.batch.finish();
        if let Some((_, path, w)) = &mut self.current {
            w.write(&b).map_err(|source| GenError::Parquet {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
    fn close(&mut self) -> Result<(), GenError> {
        self.flush()?;
        if let Some((_, path, w)) = self.current.take() {
            w.close().map_err(|source| GenError::Parquet {
                path: path.clone(),
                source,
            })?;
            self.bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        }
        Ok(())
    }
}

fn write_json(out: &mut impl Write, e: &Event, rng_bits: u64) -> std::io::Result<()> {
    write!(
        out,
        "{{\"event_id\":\"e{:012}\",\"user_id\":\"u{:07}\",",
        e.id, e.user
    )?;
    match e.merchant {
        Some(m) => write!(out, "\"merchant_id\":\"m{m:05}\",")?,
        None => write!(out, "\"merchant_id\":null,")?,
    }
    write!(
        out,
        "\"product_id\":\"p{:06}\",\"event_type\":\"{}\",",
        e.product, KINDS[e.kind as usize]
    )?;
    match e.amount_cents {
        // Mostly strings (what careful producers send), sometimes bare JSON numbers.
        Some(c) if rng_bits.is_multiple_of(4) => {
            write!(out, "\"amount\":{}.{:02},", c / 100, c % 100)?
        }
        Some(c) => write!(out, "\"amount\":\"{}.{:02}\",", c / 100, c % 100)?,
        None => write!(out, "\"amount\":null,")?,
    }
    // An absent field is NULL.
    if let Some(b) = e.card_present {
        write!(out, "\"card_present\":{b},")?
    }
    // Timestamps: mostly RFC 3339 UTC, some with a +02:00 offset, some epoch milliseconds.
    let ts = chrono::DateTime::from_timestamp_millis(e.ts).unwrap_or_default();
    match (rng_bits >> 8) % 10 {
        0 => write!(out, "\"ts\":{}", e.ts)?,
        1 => {
            let local =
                ts.with_timezone(&chrono::FixedOffset::east_opt(7200).expect("valid offset"));
            write!(
                out,
                "\"ts\":\"{}\"",
                local.format("%Y-%m-%dT%H:%M:%S%.3f%:z")
            )?
        }
        _ => write!(out, "\"ts\":\"{}\"", ts.format("%Y-%m-%dT%H:%M:%S%.3fZ"))?,
    }
    out.write_all(b"}\n")
}

fn write_malformed(out: &mut impl Write, e: &Event, which: u64) -> std::io::Result<()> {
    match which % 5 {
        0 => writeln!(
            out,
            "{{\"event_id\":\"bad{:012}\",\"user_id\":\"u{:07}\",\"amo",
            e.id, e.user
        ),
        1 => writeln!(
            out,
            "{{\"event_id\":\"bad{:012}\",\"user_id\":\"u{:07}\",\"product_id\":\"p1\",\"event_type\":\"purchase\",\"amount\":\"12,50\",\"ts\":{}}}",
            e.id, e.user, e.ts
        ),
        2 => writeln!(
            out,
            "{{\"event_id\":\"bad{:012}\",\"product_id\":\"p1\",\"event_type\":\"purchase\",\"amount\":\"1.00\",\"ts\":{}}}",
            e.id, e.ts
        ),
        3 => writeln!(
            out,
            "{{\"event_id\":\"bad{:012}\",\"user_id\":\"u{:07}\",\"product_id\":\"p1\",\"event_type\":\"view\",\"ts\":\"last tuesday\"}}",
            e.id, e.user
        ),
        _ => writeln!(out, "not json at all: {}", e.id),
    }
}

/// Generates the data set: Parquet under `out/history`, JSON lines at `out/stream/events.jsonl`.
/// `progress` is called every million events with the number done.
pub fn generate(
    cfg: &GenConfig,
    out: &Path,
    mut progress: impl FnMut(u64),
) -> Result<GenSummary, GenError> {
    if cfg.events == 0 || cfg.days == 0 {
        return Err(GenError::Config(
            "--events and --days must be positive".into(),
        ));
    }
    let history = out.join("history");
    let stream_dir = out.join("stream");
    for d in [&history, &stream_dir] {
        if d.exists() {
            fs::remove_dir_all(d).map_err(|source| GenError::Io {
                path: d.clone(),
                source,
            })?;
        }
        fs::create_dir_all(d).map_err(|source| GenError::Io {
            path: d.clone(),
            source,
        })?;
    }
    let json_path = stream_dir.join("events.jsonl");
    let io = |source| GenError::Io {
        path: json_path.clone(),
        source,
    };
    let mut json = BufWriter::with_capacity(1 << 20, File::create(&json_path).map_err(io)?);
    let mut parquet = ParquetSink {
        dir: history,
        current: None,
        batch: Batch::new(),
        files: 0,
        rows: 0,
        bytes: 0,
    };
    let mut rng = Rng::new(cfg.seed);
    let users = Zipf::new(cfg.effective_users(), 1.1);
    let merchants = Zipf::new(cfg.merchants.max(1), 1.0);
    let products = Zipf::new(cfg.products.max(1), 0.9);
    let start = cfg.end_ms - cfg.days as i64 * DAY_MS;
    let span = (cfg.end_ms - start) as f64;
    let mut summary = GenSummary {
        events: cfg.events,
        ..Default::default()
    };
    // Events waiting for their (delayed) arrival: (arrival time, sequence, event).
    let mut delayed: BinaryHeap<Reverse<(i64, u64, EventOrd)>> = BinaryHeap::new();
    let mut seq = 0u64;
    for i in 0..cfg.events {
        // Event times increase with i; jitter inside the slot keeps them unique-ish and sorted.
        let ts = start + ((i as f64 + rng.f64() * 0.999) * span / cfg.events as f64) as i64;
        let kind = match rng.below(100) {
            0..=69 => 0u8,
            70..=96 => 1,
            _ => 2,
        };
        let amount_cents = match kind {
            1 => None,
            _ => {
                Some(((3.2 + 1.1 * rng.normal()).exp() * 100.0).clamp(1.0, 9_999_999_999.0) as i64)
            }
        };
        let e = Event {
            id: i,
            user: users.sample(&mut rng),
            merchant: if rng.f64() < cfg.null_merchant_fraction {
                None
            } else {
                Some(merchants.sample(&mut rng))
            },
            product: products.sample(&mut rng),
            kind,
            amount_cents,
            card_present: if rng.below(20) == 0 {
                None
            } else {
                Some(rng.below(3) != 0)
            },
            ts,
        };
        // Release everything due before this event arrives.
        while let Some(Reverse((at, _, _))) = delayed.peek() {
            if *at > ts {
                break;
            }
            let Some(Reverse((_, _, EventOrd(d)))) = delayed.pop() else {
                break;
            };
            write_json(&mut json, &d, d.id.wrapping_mul(0x9e37)).map_err(io)?;
            summary.json_lines += 1;
        }
        parquet.push(&e)?;
        let bits = rng.next_u64();
        let r = rng.f64();
        if r < cfg.late_fraction {
            summary.late += 1;
            let at = ts + 2 * 3_600_000 + rng.below(3_600_000) as i64;
            delayed.push(Reverse((at, seq, EventOrd(e.clone()))));
            seq += 1;
        } else if r < cfg.late_fraction + cfg.out_of_order_fraction {
            summary.out_of_order += 1;
            let at = ts + 1 + rng.below(cfg.max_disorder_ms.max(1) as u64) as i64;
            delayed.push(Reverse((at, seq, EventOrd(e.clone()))));
            seq += 1;
        } else {
            write_json(&mut json, &e, bits).map_err(io)?;
            summary.json_lines += 1;
        }
        if rng.f64() < cfg.duplicate_fraction {
            // At-least-once delivery: the same event again, in both the history and the stream.
            summary.duplicates += 1;
            parquet.push(&e)?;
            write_json(&mut json, &e, bits).map_err(io)?;
            summary.json_lines += 1;
        }
        if rng.f64() < cfg.malformed_fraction {
            summary.malformed += 1;
            write_malformed(&mut json, &e, bits).map_err(io)?;
            summary.json_lines += 1;
        }
        if (i + 1) % 1_000_000 == 0 {
            progress(i + 1);
        }
    }
    while let Some(Reverse((_, _, EventOrd(d)))) = delayed.pop() {
        write_json(&mut json, &d, d.id.wrapping_mul(0x9e37)).map_err(io)?;
        summary.json_lines += 1;
    }
    parquet.close()?;
    json.flush().map_err(io)?;
    summary.parquet_rows = parquet.rows;
    summary.parquet_files = parquet.files;
    summary.bytes = parquet.bytes + fs::metadata(&json_path).map(|m| m.len()).unwrap_or(0);
    Ok(summary)
}

/// Orders delayed events by nothing but their id (the heap key carries the order).
#[derive(Debug, Clone, PartialEq, Eq)]
struct EventOrd(Event);

impl PartialOrd for EventOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for EventOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}
