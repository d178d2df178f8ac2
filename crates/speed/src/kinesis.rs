//! Amazon Kinesis as a [`Source`]: shards from `ListShards` (with their parents, for resharding),
//! records from `GetShardIterator` + `GetRecords`, positions are sequence numbers.
//!
//! Throttling (`ProvisionedThroughputExceededException`, more than 5 reads/s or 2 MB/s per shard)
//! backs off and retries; an expired iterator is renewed after the last record read; a closed
//! shard read to its end reports `closed`, after which its children may be read.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::{Credentials, Region};
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_kinesis::types::ShardIteratorType;

use crate::source::{Batch, Record, ShardInfo, ShardReader, Source, SourceError};
use crate::tiler::Seq;

/// How to reach a stream.
#[derive(Debug, Clone)]
pub struct KinesisConfig {
    /// Stream name.
    pub stream: String,
    /// Region.
    pub region: String,
    /// Custom endpoint (kinesis-mock); `None` for AWS.
    pub endpoint: Option<String>,
    /// Static credentials (emulators); `None` uses the standard chain.
    pub static_credentials: Option<(String, String)>,
}

/// A Kinesis stream.
#[derive(Debug, Clone)]
pub struct KinesisSource {
    client: Client,
    stream: String,
}

fn kerr<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    operation: &'static str,
    stream: &str,
    e: aws_sdk_kinesis::error::SdkError<E, R>,
) -> SourceError {
    SourceError::Kinesis {
        operation,
        stream: stream.to_string(),
        message: format!("{}", DisplayErrorContext(&e)),
    }
}

impl KinesisSource {
    /// Connects (lazily: the first call reaches the service).
    pub async fn connect(cfg: &KinesisConfig) -> KinesisSource {
        KinesisSource {
            client: client(cfg).await,
            stream: cfg.stream.clone(),
        }
    }

    /// The SDK client (tests use it to create streams and put records).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// A Kinesis client for the config.
pub async fn client(cfg: &KinesisConfig) -> Client {
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).region(Region::new(cfg.region.clone()));
    if let Some((id, secret)) = &cfg.static_credentials {
        loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "lambda"));
    }
    let shared = loader.load().await;
    let mut b = aws_sdk_kinesis::config::Builder::from(&shared);
    if let Some(ep) = &cfg.endpoint {
        b = b.endpoint_url(ep);
    }
    Client::from_conf(b.build())
}

#[async_trait]
impl Source for KinesisSource {
    fn name(&self) -> String {
        format!("kinesis:{}", self.stream)
    }

    async fn shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self.client.list_shards();
            req = match &token {
                Some(t) => req.next_token(t),
                None => req.stream_name(&self.stream),
            };
            let page = req
                .send()
                .await
                .map_err(|e| kerr("ListShards", &self.stream, e))?;
            for s in page.shards() {
                out.push(ShardInfo {
                    id: s.shard_id().to_string(),
                    parents: s
                        .parent_shard_id()
                        .into_iter()
                        .chain(s.adjacent_parent_shard_id())
                        .map(String::from)
                        .collect(),
                });
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn open(
        &self,
        shard: &str,
        position: Option<&str>,
    ) -> Result<Box<dyn ShardReader>, SourceError> {
        let mut r = KinesisReader {
            client: self.client.clone(),
            stream: self.stream.clone(),
            shard: shard.to_string(),
            iterator: None,
            last_seq: position.map(String::from),
            ended: false,
        };
        r.renew_iterator().await?;
        Ok(Box::new(r))
    }
}

struct KinesisReader {
    client: Client,
    stream: String,
    shard: String,
    iterator: Option<String>,
    last_seq: Option<String>,
    ended: bool,
}

impl KinesisReader {
    async fn renew_iterator(&mut self) -> Result<(), SourceError> {
        let mut req = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(&self.shard);
        req = match &self.last_seq {
            Some(seq) => req
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            None => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let out = req
            .send()
            .await
            .map_err(|e| kerr("GetShardIterator", &self.stream, e))?;
        self.iterator = out.shard_iterator().map(String::from);
        self.ended = self.iterator.is_none();
        Ok(())
    }
}

#[async_trait]
impl ShardReader for KinesisReader {
    async fn next(&mut self, max: usize) -> Result<Batch, SourceError> {
        let mut wait = Duration::from_millis(200);
        loop {
            let Some(it) = self.iterator.clone() else {
                return Ok(Batch {
                    caught_up: true,
                    closed: self.ended,
                    position: self.last_seq.clone(),
                    ..Batch::default()
                });
            };
            let sent = self
                .client
                .get_records()
                .shard_iterator(it)
                .limit(max.clamp(1, 10_000) as i32)
                .send()
                .await;
            let out = match sent {
                Ok(out) => out,
                Err(e) => {
                    let service = e.as_service_error();
                    if service.is_some_and(|s| s.is_expired_iterator_exception()) {
                        self.renew_iterator().await?;
                        continue;
                    }
                    if service.is_some_and(|s| {
                        s.is_provisioned_throughput_exceeded_exception()
                            || s.is_kms_throttling_exception()
                    }) {
                        tracing::warn!(shard = %self.shard, wait_ms = wait.as_millis() as u64, "GetRecords throttled; backing off.");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    return Err(kerr("GetRecords", &self.stream, e));
                }
            };
            let mut records = Vec::with_capacity(out.records().len());
            for r in out.records() {
                let seq =
                    Seq::parse(r.sequence_number()).ok_or_else(|| SourceError::BadPosition {
                        shard: self.shard.clone(),
                        position: r.sequence_number().to_string(),
                    })?;
                records.push(Record {
                    seq,
                    data: r.data().as_ref().to_vec(),
                });
            }
            if let Some(last) = out.records().last() {
                self.last_seq = Some(last.sequence_number().to_string());
            }
            self.iterator = out.next_shard_iterator().map(String::from);
            self.ended = self.iterator.is_none();
            let behind = out.millis_behind_latest();
            return Ok(Batch {
                caught_up: records.is_empty() || behind == Some(0) || self.ended,
                closed: self.ended,
                position: self.last_seq.clone(),
                millis_behind: behind,
                records,
            });
        }
    }
}
