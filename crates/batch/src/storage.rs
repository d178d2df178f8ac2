//! Where the batch job's files live: a local directory (the embedded default) or an S3 prefix,
//! both through `object_store`, so one code path serves both.
//!
//! A [`Location`] is parsed from `file://…`, `s3://bucket/prefix` or a plain path. Writes are
//! single-object puts, which are atomic on both backends (the local store writes a temporary file
//! and renames it; S3 makes an object visible only once its upload completes), so a crash never
//! leaves a half-written file visible under its final name.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

/// Errors reaching or reading a location; each names the object.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The location text cannot be used.
    #[error("`{location}`: {message}")]
    BadLocation {
        /// What was given.
        location: String,
        /// Why it is refused.
        message: String,
    },
    /// The object store failed (unreachable bucket, missing permission, I/O).
    #[error("{url}: {message}")]
    Object {
        /// The object or prefix.
        url: String,
        /// What the store said (one line; S3's XML error reduced to its code and message).
        message: String,
    },
}

/// S3 connection settings; credentials come from the usual `AWS_*` environment variables.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Region (default: `AWS_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// Custom endpoint (an emulator); path-style requests are used then. Default:
    /// `AWS_ENDPOINT_URL_S3` if set.
    pub endpoint: Option<String>,
    /// Fixed (access key, secret) instead of the environment's credentials (tests, emulators).
    pub static_credentials: Option<(String, String)>,
}

/// A root directory or prefix and the object store that holds it.
#[derive(Debug, Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    /// `file:///abs/dir` or `s3://bucket/prefix`, without a trailing slash.
    url: String,
    /// The root inside the store.
    root: ObjPath,
    /// `s3://bucket`, to register with DataFusion (`None` for local files).
    base: Option<url::Url>,
}

impl Location {
    /// Parses `s3://bucket/prefix`, `file:///dir` or a plain (relative or absolute) path.
    pub fn parse(text: &str, s3: &S3Options) -> Result<Location, StorageError> {
        let bad = |message: &str| StorageError::BadLocation {
            location: text.to_string(),
            message: message.to_string(),
        };
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket name after s3://"));
            }
            let region = s3
                .region
                .clone()
                .or_else(|| std::env::var("AWS_REGION").ok())
                .unwrap_or_else(|| "us-east-1".into());
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_region(region)
                .with_retry(RetryConfig {
                    max_retries: 4,
                    retry_timeout: std::time::Duration::from_secs(60),
                    ..RetryConfig::default()
                });
            if let Some((key, secret)) = &s3.static_credentials {
                b = b.with_access_key_id(key).with_secret_access_key(secret);
            }
            let endpoint = s3
                .endpoint
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok());
            if let Some(e) = &endpoint {
                b = b
                    .with_endpoint(e)
                    .with_allow_http(e.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
            }
            let store = b.build().map_err(|e| bad(&e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            let root = ObjPath::parse(prefix).map_err(|e| bad(&e.to_string()))?;
            let base =
                url::Url::parse(&format!("s3://{bucket}")).map_err(|e| bad(&e.to_string()))?;
            let url = if prefix.is_empty() {
                format!("s3://{bucket}")
            } else {
                format!("s3://{bucket}/{prefix}")
            };
            return Ok(Location {
                store: Arc::new(store),
                url,
                root,
                base: Some(base),
            });
        }
        if text.contains("://") && !text.starts_with("file://") {
            return Err(bad("only file:// and s3:// locations are supported"));
        }
        let path = text.strip_prefix("file://").unwrap_or(text);
        let abs = std::path::absolute(path).map_err(|e| bad(&e.to_string()))?;
        // Resolve `..` lexically (object paths cannot hold it; the directory may not exist yet).
        let mut clean = std::path::PathBuf::new();
        for c in abs.components() {
            match c {
                std::path::Component::ParentDir => {
                    clean.pop();
                }
                std::path::Component::CurDir => {}
                c => clean.push(c),
            }
        }
        let abs = clean;
        let root = ObjPath::from_absolute_path(&abs).map_err(|e| bad(&e.to_string()))?;
        Ok(Location {
            store: Arc::new(LocalFileSystem::new()),
            url: format!("file:///{root}"),
            root,
            base: None,
        })
    }

    /// Whether this is an S3 location.
    pub fn is_s3(&self) -> bool {
        self.base.is_some()
    }

    /// The location's URL (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of `rel` below the root (for messages and DataFusion tables).
    pub fn url_of(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.url.clone()
        } else {
            format!("{}/{}", self.url, rel.trim_matches('/'))
        }
    }

    /// The store and the object path of `rel` (for readers that take both).
    pub fn object(&self, rel: &str) -> (Arc<dyn ObjectStore>, ObjPath) {
        (self.store.clone(), self.path(rel))
    }

    fn path(&self, rel: &str) -> ObjPath {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.root.clone(), |p, part| p.join(part))
    }

    fn err(&self, rel: &str) -> impl Fn(object_store::Error) -> StorageError + '_ {
        let url = self.url_of(rel);
        move |source| StorageError::Object {
            url: url.clone(),
            message: one_line(&source.to_string()),
        }
    }

    /// Makes the store known to DataFusion so `ListingTable`s can read this location.
    pub fn register(&self, ctx: &SessionContext) {
        if let Some(base) = &self.base {
            ctx.register_object_store(base, self.store.clone());
        }
    }

    /// The objects under the directory `rel`, sorted by path. A missing directory is empty.
    pub async fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let prefix = self.path(rel);
        let mut out: Vec<ObjectMeta> = match self.store.list(Some(&prefix)).try_collect().await {
            Ok(v) => v,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(self.err(rel)(e)),
        };
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }

    /// The object `rel`, or `None` if it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>, StorageError> {
        match self.store.get(&self.path(rel)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(self.err(rel))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(rel)(e)),
        }
    }

    /// Bytes `range` of the object `rel`.
    pub async fn get_range(
        &self,
        rel: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StorageError> {
        self.store
            .get_range(&self.path(rel), range)
            .await
            .map_err(self.err(rel))
    }

    /// Whether the object `rel` exists.
    pub async fn exists(&self, rel: &str) -> Result<bool, StorageError> {
        match self.store.head(&self.path(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(rel)(e)),
        }
    }

    /// Writes the object `rel` in one atomic put.
    pub async fn put(&self, rel: &str, data: Vec<u8>) -> Result<(), StorageError> {
        self.store
            .put(&self.path(rel), PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(self.err(rel))
    }

    /// Deletes the object `rel` (absent is fine).
    pub async fn delete(&self, rel: &str) -> Result<(), StorageError> {
        match self.store.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(rel)(e)),
        }
    }

    /// Checks the location can be listed (reachable, permitted).
    pub async fn check(&self) -> Result<(), StorageError> {
        self.store
            .list_with_delimiter(Some(&self.root))
            .await
            .map(|_| ())
            .or_else(|e| match e {
                object_store::Error::NotFound { .. } => Ok(()),
                e => Err(self.err("")(e)),
            })
    }
}

/// object_store's messages repeat their causes and carry S3's whole XML body: keep the first
/// request line and the S3 error code and message.
fn one_line(text: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&format!("</{name}>"))? + start;
        Some(text[start..end].to_string())
    };
    let head = text.split(": <?xml").next().unwrap_or(text);
    let head = head.lines().next().unwrap_or(head);
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(msg)) => format!("{head}: {code}: {msg}"),
        _ => head.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn s3_errors_are_reduced_to_one_line() {
        let raw = "Generic S3 error: Error performing GET http://h/b in 4ms - Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?>\n<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>: again";
        assert_eq!(
            one_line(raw),
            "Generic S3 error: Error performing GET http://h/b in 4ms - Server returned non-2xx status code: 404 Not Found: NoSuchBucket: The specified bucket does not exist"
        );
        assert_eq!(one_line("plain\nsecond"), "plain");
    }
}
