//! A fault-injecting HTTP proxy for AWS-API endpoints: put it between a client and DynamoDB Local
//! (or any emulator) to see how the real SDK and our retry code behave when the service throttles,
//! fails or hangs up. Used by the tests ("a throttled table does not lose data"); usable for game
//! days against a local stack.
//!
//! Every request is forwarded unchanged unless the [`Policy`] answers otherwise for it. Requests
//! are identified by their `X-Amz-Target` header (e.g. `DynamoDB_20120810.BatchWriteItem`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Forward it to the service.
    Forward,
    /// Answer HTTP 400 `ProvisionedThroughputExceededException`, as a throttled table does.
    Throttle,
    /// Answer HTTP 500 `InternalServerError`.
    ServerError,
}

/// Decides per request: `(operation, n)` where `operation` is the `X-Amz-Target` suffix
/// (`BatchWriteItem`) and `n` counts that operation's requests from 0.
pub type Policy = Arc<dyn Fn(&str, u64) -> Action + Send + Sync>;

/// Counts of what the proxy did.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests forwarded.
    pub forwarded: AtomicU64,
    /// Requests answered with a throttling error.
    pub throttled: AtomicU64,
    /// Requests answered with a server error.
    pub failed: AtomicU64,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`, to use as the client's endpoint.
    pub endpoint: String,
    /// What it did so far.
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy on a free 127.0.0.1 port in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: &str, policy: Policy) -> std::io::Result<FaultProxy> {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let counters = Arc::new(Counters::default());
        let per_op: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>> = Arc::default();
        let c = counters.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (policy, c, per_op) = (policy.clone(), c.clone(), per_op.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (policy, c, per_op) = (policy.clone(), c.clone(), per_op.clone());
                        async move {
                            Ok::<_, Infallible>(handle(req, upstream, &policy, &c, &per_op).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FaultProxy {
            endpoint,
            counters,
            task,
        })
    }
}

fn error_response(status: StatusCode, kind: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "{{\"__type\":\"com.amazonaws.dynamodb.v20120810#{kind}\",\"message\":\"{message}\"}}"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amzn-requestid", "chaos-proxy")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

async fn handle(
    req: Request<Incoming>,
    upstream: SocketAddr,
    policy: &Policy,
    c: &Counters,
    per_op: &std::sync::Mutex<std::collections::HashMap<String, u64>>,
) -> Response<Full<Bytes>> {
    let op = req
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("")
        .to_string();
    let n = {
        let mut m = per_op.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(op.clone()).or_insert(0);
        *e += 1;
        *e - 1
    };
    match policy(&op, n) {
        Action::Throttle => {
            c.throttled.fetch_add(1, Ordering::Relaxed);
            // The SDK reads the body before retrying; drain the request first.
            let _ = req.into_body().collect().await;
            error_response(
                StatusCode::BAD_REQUEST,
                "ProvisionedThroughputExceededException",
                "The level of configured provisioned throughput for the table was exceeded (chaos proxy)",
            )
        }
        Action::ServerError => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            let _ = req.into_body().collect().await;
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "Internal server error (chaos proxy)",
            )
        }
        Action::Forward => {
            c.forwarded.fetch_add(1, Ordering::Relaxed);
            match forward(req, upstream).await {
                Ok(r) => r,
                Err(e) => error_response(
                    StatusCode::BAD_GATEWAY,
                    "InternalServerError",
                    &format!("chaos proxy could not reach the service: {e}"),
                ),
            }
        }
    }
}

async fn forward(
    req: Request<Incoming>,
    upstream: SocketAddr,
) -> Result<Response<Full<Bytes>>, Box<dyn std::error::Error + Send + Sync>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let stream = TcpStream::connect(upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
