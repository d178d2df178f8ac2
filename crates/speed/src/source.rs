//! Event sources: a stream of shards, each an ordered log of records with sequence numbers.
//!
//! [`FileSource`] is the embedded default: JSON-lines files, one shard per file, the byte offset
//! as the position (a record's sequence number is its line's offset + 1). Kinesis implements the
//! same trait.

use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::tiler::Seq;

/// One record of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the shard; strictly increasing.
    pub seq: Seq,
    /// The raw payload (one JSON event).
    pub data: Vec<u8>,
}

/// What one read returned.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The records, in shard order.
    pub records: Vec<Record>,
    /// The position after the last record (resume here); unchanged if no records.
    pub position: Option<String>,
    /// Nothing more to read right now.
    pub caught_up: bool,
    /// How far behind the shard's newest record this read is, if the source knows.
    pub millis_behind: Option<i64>,
    /// The shard is closed (split or merged) and read to its end: it will never have more.
    pub closed: bool,
}

/// A shard and the shards it was split or merged from (read those to their end first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The shard id.
    pub id: String,
    /// Parent shard ids (none for an original shard).
    pub parents: Vec<String>,
}

/// Errors of a source, naming the shard or file.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stored position is not valid for this source.
    #[error("shard {shard}: bad checkpoint position `{position}`")]
    BadPosition {
        /// The shard.
        shard: String,
        /// The position.
        position: String,
    },
    /// The shard does not exist.
    #[error("no shard `{0}`")]
    NoShard(String),
    /// Kinesis failed (after the SDK's retries).
    #[error("Kinesis {operation} on stream {stream}: {message}")]
    Kinesis {
        /// The API call.
        operation: &'static str,
        /// The stream.
        stream: String,
        /// The SDK's message.
        message: String,
    },
}

/// A stream: its shards and a reader for each.
#[async_trait]
pub trait Source: Send + Sync {
    /// A stable name (part of checkpoint keys).
    fn name(&self) -> String;
    /// The shards, with their parents.
    async fn shards(&self) -> Result<Vec<ShardInfo>, SourceError>;
    /// A reader of `shard` starting after `position` (from the start if `None`).
    async fn open(
        &self,
        shard: &str,
        position: Option<&str>,
    ) -> Result<Box<dyn ShardReader>, SourceError>;
}

/// Reads one shard in order.
#[async_trait]
pub trait ShardReader: Send {
    /// Up to `max` records.
    async fn next(&mut self, max: usize) -> Result<Batch, SourceError>;
}

/// JSON-lines files as a stream: a file is one shard (named by its file name), a directory's
/// `*.jsonl` files are its shards.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    /// A file or a directory of `*.jsonl` files.
    pub fn new(path: impl Into<PathBuf>) -> FileSource {
        FileSource { path: path.into() }
    }

    fn file_of(&self, shard: &str) -> PathBuf {
        if self.path.is_dir() {
            self.path.join(shard)
        } else {
            self.path.clone()
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[async_trait]
impl Source for FileSource {
    fn name(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        if !self.path.is_dir() {
            let name = self
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| SourceError::NoShard(self.path.display().to_string()))?;
            if !self.path.exists() {
                return Err(io(&self.path)(std::io::ErrorKind::NotFound.into()));
            }
            return Ok(vec![ShardInfo {
                id: name.to_string(),
                parents: Vec::new(),
            }]);
        }
        let mut out: Vec<String> = std::fs::read_dir(&self.path)
            .map_err(io(&self.path))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| n.ends_with(".jsonl"))
            .collect();
        out.sort();
        Ok(out
            .into_iter()
            .map(|id| ShardInfo {
                id,
                parents: Vec::new(),
            })
            .collect())
    }

    async fn open(
        &self,
        shard: &str,
        position: Option<&str>,
    ) -> Result<Box<dyn ShardReader>, SourceError> {
        let path = self.file_of(shard);
        let offset = match position {
            None => 0,
            Some(p) => p.parse::<u64>().map_err(|_| SourceError::BadPosition {
                shard: shard.into(),
                position: p.into(),
            })?,
        };
        let mut file = std::fs::File::open(&path).map_err(io(&path))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .map_err(io(&path))?;
        Ok(Box::new(FileReader {
            reader: std::io::BufReader::with_capacity(1 << 20, file),
            path,
            offset,
            line: Vec::new(),
        }))
    }
}

struct FileReader {
    reader: std::io::BufReader<std::fs::File>,
    path: PathBuf,
    offset: u64,
    line: Vec<u8>,
}

impl FileReader {
    fn read(&mut self, max: usize) -> Result<Batch, SourceError> {
        let mut batch = Batch::default();
        while batch.records.len() < max {
            self.line.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.line)
                .map_err(io(&self.path))?;
            if n == 0 {
                batch.caught_up = true;
                break;
            }
            if self.line.last() != Some(&b'\n') {
                // A line still being written: read it again once complete.
                let back = -(n as i64);
                self.reader.seek_relative(back).map_err(io(&self.path))?;
                batch.caught_up = true;
                break;
            }
            let start = self.offset;
            self.offset += n as u64;
            let body = self.line[..n - 1]
                .strip_suffix(b"\r")
                .unwrap_or(&self.line[..n - 1]);
            if body.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            batch.records.push(Record {
                seq: Seq::from(u128::from(start) + 1),
                data: body.to_vec(),
            });
        }
        if !batch.records.is_empty() || self.offset > 0 {
            batch.position = Some(self.offset.to_string());
        }
        Ok(batch)
    }
}

#[async_trait]
impl ShardReader for FileReader {
    async fn next(&mut self, max: usize) -> Result<Batch, SourceError> {
        tokio::task::block_in_place(|| self.read(max))
    }
}
