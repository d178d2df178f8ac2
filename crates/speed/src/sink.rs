//! Where records that are not applied go, so nothing is lost:
//!
//! * the **dead-letter sink**: records that fail to decode, as JSON lines
//!   `{"shard", "seq", "reason", "record"}` in `<dir>/<shard>.jsonl`;
//! * the **late sink**: events later than the allowed lateness, as Parquet in the history layout
//!   (`<dir>/date=YYYY-MM-DD/late-<shard>-<first seq>.parquet`): point it at the batch history and
//!   the next nightly run recomputes those days (it notices new files in a day).
//!
//! Both are made durable before the checkpoint that covers their records moves. After a crash a
//! replay may write a record again; rows are identical, and the batch job deduplicates by id.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use lambda_core::decode::BatchBuilder;
use lambda_core::spec::Source;
use lambda_core::time::DAY_MS;
use lambda_core::{Row, Value};

use crate::tiler::Seq;

/// A sink failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// File system.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Parquet encoding.
    #[error("{path}: {message}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Dead letters of one shard.
#[derive(Debug)]
pub struct DeadLetters {
    path: PathBuf,
    shard: String,
    pending: Vec<u8>,
}

impl DeadLetters {
    /// Dead letters of `shard` in `dir`.
    pub fn new(dir: &Path, shard: &str) -> DeadLetters {
        DeadLetters {
            path: dir.join(format!("{}.jsonl", shard.replace(['/', '\\'], "_"))),
            shard: shard.to_string(),
            pending: Vec::new(),
        }
    }

    /// Keeps a record that could not be used, with the reason.
    pub fn push(&mut self, seq: Seq, reason: &str, record: &[u8]) {
        let line = serde_json::json!({
            "shard": self.shard,
            "seq": seq.to_string(),
            "reason": reason,
            "record": String::from_utf8_lossy(record),
        });
        self.pending.extend_from_slice(line.to_string().as_bytes());
        self.pending.push(b'\n');
    }

    /// Appends what was pushed and syncs it to disk.
    pub fn flush(&mut self) -> Result<(), SinkError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io(&self.path))?;
        f.write_all(&self.pending).map_err(io(&self.path))?;
        f.sync_data().map_err(io(&self.path))?;
        self.pending.clear();
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Late events of one shard, written as history Parquet.
#[derive(Debug)]
pub struct LateEvents {
    dir: PathBuf,
    shard: String,
    source: Source,
    /// Per day: first sequence number and rows.
    pending: BTreeMap<i64, (Seq, Vec<Row>)>,
}

impl LateEvents {
    /// Late events of `shard` into the history directory `dir`.
    pub fn new(dir: &Path, shard: &str, source: &Source) -> LateEvents {
        LateEvents {
            dir: dir.to_path_buf(),
            shard: shard.replace(['/', '\\', '.'], "_"),
            source: source.clone(),
            pending: BTreeMap::new(),
        }
    }

    /// Keeps a late event.
    pub fn push(&mut self, seq: Seq, event_time: i64, row: Row) {
        let day = event_time - event_time.rem_euclid(DAY_MS);
        self.pending
            .entry(day)
            .or_insert_with(|| (seq, Vec::new()))
            .1
            .push(row);
    }

    /// Writes the pending events (one file per day, temporary name then rename); returns the
    /// files written.
    pub fn flush(&mut self) -> Result<Vec<PathBuf>, SinkError> {
        let mut written = Vec::new();
        for (day, (seq, rows)) in std::mem::take(&mut self.pending) {
            let date = lambda_core::time::format_ts(day)[..10].to_string();
            let dir = self.dir.join(format!("date={date}"));
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let seq = format!("{:0>56}", seq.to_string());
            let path = dir.join(format!("late-{}-{seq}.parquet", self.shard));
            let tmp = dir.join(format!(".tmp-late-{}-{seq}", self.shard));
            let perr = |e: &dyn std::fmt::Display| SinkError::Parquet {
                path: path.clone(),
                message: e.to_string(),
            };
            let mut b = BatchBuilder::new(&self.source);
            for r in &rows {
                b.push(r);
            }
            let batch = b.finish().map_err(|e| perr(&e))?;
            let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None)
                .map_err(|e| perr(&e))?;
            w.write(&batch).map_err(|e| perr(&e))?;
            let f = w.into_inner().map_err(|e| perr(&e))?;
            f.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
            written.push(path);
        }
        Ok(written)
    }
}

/// The event time of a decoded row (`None` if not a timestamp).
pub fn event_time(source: &Source, row: &[Value]) -> Option<i64> {
    match row.get(source.event_time) {
        Some(Value::Timestamp(t)) => Some(*t),
        _ => None,
    }
}
