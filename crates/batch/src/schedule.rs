//! Scheduling of batch jobs: cron expressions (UTC) in `schedules/*.toml`, catch-up of missed runs
//! after downtime (bounded), a lock so two copies of one job never run at once, run records, and
//! retries with backoff. Time is injected (`now_ms`), so tests need no sleeps.
//!
//! ```toml
//! name = "fraud-user-nightly"
//! cron = "0 30 0 * * *"              # sec min hour day-of-month month day-of-week, UTC
//! view = "../examples/fraud/features.toml"
//! history = "../data/demo/history"
//! offline = "../data/demo/offline"
//! store = "../data/demo/online.redb"
//! catch-up = 3                       # at most this many missed runs are run after downtime
//! retries = 2                        # extra attempts of a failed run, with exponential backoff
//! ```

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A schedule file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Unreadable file.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Invalid TOML or unknown field.
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A field with an invalid value.
    #[error("{file}: field `{field}`: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawJob {
    name: String,
    cron: String,
    view: PathBuf,
    history: Option<String>,
    offline: String,
    store: String,
    #[serde(default = "default_catch_up")]
    catch_up: u32,
    #[serde(default = "default_retries")]
    retries: u32,
}

fn default_catch_up() -> u32 {
    3
}
fn default_retries() -> u32 {
    2
}

/// A validated scheduled job; paths are resolved relative to the schedule file.
#[derive(Debug, Clone)]
pub struct Job {
    /// Unique job name (the lock and the run records are keyed by it).
    pub name: String,
    /// When it runs (UTC).
    pub cron: cron::Schedule,
    /// The cron text, for display.
    pub cron_text: String,
    /// Feature definition.
    pub view: PathBuf,
    /// History location, a directory or `s3://bucket/prefix` (default: the view's `batch.history`).
    pub history: Option<String>,
    /// Offline store location, a directory or `s3://bucket/prefix`.
    pub offline: String,
    /// Online store: a redb file or `dynamodb://TABLE`.
    pub store: String,
    /// Most missed runs to catch up.
    pub catch_up: u32,
    /// Extra attempts of a failed run.
    pub retries: u32,
}

/// A location relative to the schedule file's directory, unless it is a URL or absolute.
fn resolve(base: &Path, text: &str) -> String {
    if text.contains("://") {
        text.to_string()
    } else {
        base.join(text).display().to_string()
    }
}

impl Job {
    /// Loads and validates one schedule file.
    pub fn load(file: &Path) -> Result<Job, ScheduleError> {
        let text = std::fs::read_to_string(file).map_err(|source| ScheduleError::Io {
            file: file.into(),
            source,
        })?;
        let raw: RawJob = toml::from_str(&text).map_err(|e| ScheduleError::Syntax {
            file: file.into(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |field, message: String| ScheduleError::Invalid {
            file: file.into(),
            field,
            message,
        };
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "name",
                format!("`{}` must be letters, digits, - or _", raw.name),
            ));
        }
        let cron = cron::Schedule::from_str(&raw.cron).map_err(|e| {
            invalid(
                "cron",
                format!(
                    "`{}` is not a cron expression (sec min hour dom mon dow): {e}",
                    raw.cron
                ),
            )
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        Ok(Job {
            name: raw.name,
            cron,
            cron_text: raw.cron,
            view: base.join(raw.view),
            history: raw.history.map(|h| resolve(base, &h)),
            offline: resolve(base, &raw.offline),
            store: resolve(base, &raw.store),
            catch_up: raw.catch_up,
            retries: raw.retries,
        })
    }

    /// Every `*.toml` of a directory, sorted by file name; names must be unique.
    pub fn load_dir(dir: &Path) -> Result<Vec<Job>, ScheduleError> {
        let io = |source| ScheduleError::Io {
            file: dir.into(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("toml"))
            .collect();
        files.sort();
        let mut jobs: Vec<Job> = Vec::new();
        for f in files {
            let j = Job::load(&f)?;
            if jobs.iter().any(|o| o.name == j.name) {
                return Err(ScheduleError::Invalid {
                    file: f,
                    field: "name",
                    message: format!("job `{}` is defined twice", j.name),
                });
            }
            jobs.push(j);
        }
        Ok(jobs)
    }

    /// The runs due at `now`: scheduled instants after `last` (the last instant already run, or
    /// `now` minus one day when the job never ran) and not after `now`, keeping only the latest
    /// `catch_up` of them (older missed runs are skipped, and reported).
    pub fn due(&self, last_ms: Option<i64>, now_ms: i64) -> Due {
        let from = last_ms.unwrap_or(now_ms - 86_400_000);
        let Some(start) = chrono::DateTime::from_timestamp_millis(from) else {
            return Due::default();
        };
        let mut all: Vec<i64> = Vec::new();
        for t in self.cron.after(&start) {
            let ms = t.timestamp_millis();
            if ms > now_ms {
                break;
            }
            all.push(ms);
            if all.len() > 10_000 {
                break;
            }
        }
        let keep = all.len().saturating_sub(self.catch_up.max(1) as usize);
        Due {
            skipped: all[..keep].to_vec(),
            runs: all[keep..].to_vec(),
        }
    }

    /// The next scheduled instant after `now`.
    pub fn next_after(&self, now_ms: i64) -> Option<i64> {
        let now = chrono::DateTime::from_timestamp_millis(now_ms)?;
        self.cron.after(&now).next().map(|t| t.timestamp_millis())
    }
}

/// What is due now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Due {
    /// Scheduled instants to run, oldest first.
    pub runs: Vec<i64>,
    /// Missed instants beyond the catch-up bound (not run).
    pub skipped: Vec<i64>,
}

/// One run's record (a JSON line in `<state>/runs.jsonl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Job name.
    pub job: String,
    /// The scheduled instant this run is for.
    pub scheduled_ms: i64,
    /// Start and end, epoch ms.
    pub started_ms: i64,
    /// End.
    pub ended_ms: i64,
    /// Attempts made.
    pub attempts: u32,
    /// `ok` or the error.
    pub outcome: String,
    /// History rows read.
    pub rows: u64,
    /// History bytes read.
    pub bytes: u64,
}

/// Run records and locks of the scheduler, in a state directory.
#[derive(Debug, Clone)]
pub struct State {
    dir: PathBuf,
}

/// A held job lock; released on drop.
#[derive(Debug)]
pub struct LockGuard {
    path: PathBuf,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl State {
    /// The state in `dir` (created if needed).
    pub fn open(dir: &Path) -> std::io::Result<State> {
        std::fs::create_dir_all(dir)?;
        Ok(State {
            dir: dir.to_path_buf(),
        })
    }

    /// Takes the job's lock, or `None` if another process holds it. The lock is a file created
    /// with `create_new` (atomic on local and NFSv3+ file systems) holding its owner and expiry;
    /// a lock older than `lease_ms` is considered abandoned (its owner crashed) and taken over.
    pub fn try_lock(
        &self,
        job: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> std::io::Result<Option<LockGuard>> {
        let path = self.dir.join(format!("{job}.lock"));
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    writeln!(f, "{} {}", std::process::id(), now_ms + lease_ms)?;
                    return Ok(Some(LockGuard { path }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let expires: i64 = text
                        .split_whitespace()
                        .nth(1)
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(i64::MAX);
                    if expires > now_ms {
                        return Ok(None);
                    }
                    tracing::warn!(job, lock = %path.display(), "Taking over an expired lock.");
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Appends a run record.
    pub fn record(&self, r: &RunRecord) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("runs.jsonl"))?;
        writeln!(
            f,
            "{}",
            serde_json::to_string(r).map_err(std::io::Error::other)?
        )
    }

    /// All run records, oldest first (unreadable lines are skipped with a warning).
    pub fn records(&self) -> std::io::Result<Vec<RunRecord>> {
        let text = match std::fs::read_to_string(self.dir.join("runs.jsonl")) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(text
            .lines()
            .filter_map(|l| match serde_json::from_str(l) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(%e, "Skipping an unreadable run record.");
                    None
                }
            })
            .collect())
    }

    /// The last scheduled instant of `job` that succeeded.
    pub fn last_success(&self, job: &str) -> std::io::Result<Option<i64>> {
        Ok(self
            .records()?
            .iter()
            .filter(|r| r.job == job && r.outcome == "ok")
            .map(|r| r.scheduled_ms)
            .max())
    }
}

/// Backoff before attempt `n` (1-based) of a failed run: 30 s · 2^(n−1), at most 30 minutes.
pub fn retry_backoff_ms(attempt: u32) -> i64 {
    (30_000i64 << (attempt.saturating_sub(1)).min(6)).min(30 * 60_000)
}

/// Lease of a job lock taken through the online store; renewed every third of it while the job
/// runs.
pub const STORE_LEASE_MS: i64 = 10 * 60_000;

/// Where the scheduler keeps its lock and last successes: files in the state directory (one
/// machine, the embedded default) or a DynamoDB table (any number of machines). Run records are
/// always appended to the state directory's `runs.jsonl` too.
pub enum Coordinator {
    /// A file lock and the local run records.
    Files(State),
    /// Leases and last-success items in an online store (the scheduler table on AWS).
    Store {
        /// The table.
        store: std::sync::Arc<dyn lambda_store::OnlineStore>,
        /// The local run log.
        state: State,
        /// The clock of lease expiry.
        clock: std::sync::Arc<dyn lambda_store::Clock>,
        /// Who we are, shown to other copies (`host:pid`).
        owner: String,
    },
}

/// A held job lock.
pub enum Held {
    /// A lock file (removed on drop).
    File(LockGuard),
    /// A lease in the online store.
    Lease(lambda_store::lease::Lease),
}

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The state directory.
    #[error("scheduler state: {0}")]
    Io(#[from] std::io::Error),
    /// The lock table.
    #[error("scheduler table")]
    Store(#[from] lambda_store::StoreError),
}

fn lock_key(job: &str) -> lambda_store::ItemKey {
    lambda_store::ItemKey::new(format!("scheduler#{job}"), "lock")
}

fn success_key(job: &str) -> lambda_store::ItemKey {
    lambda_store::ItemKey::new(format!("scheduler#{job}"), "last-success")
}

impl Coordinator {
    fn state(&self) -> &State {
        match self {
            Coordinator::Files(s) | Coordinator::Store { state: s, .. } => s,
        }
    }

    /// Takes the job's lock, or `None` if another copy holds it.
    pub async fn try_lock(&self, job: &str, now_ms: i64) -> Result<Option<Held>, CoordinatorError> {
        match self {
            Coordinator::Files(s) => Ok(s.try_lock(job, now_ms, 6 * 3_600_000)?.map(Held::File)),
            Coordinator::Store {
                store,
                clock,
                owner,
                ..
            } => Ok(lambda_store::lease::try_acquire(
                store.as_ref(),
                clock.as_ref(),
                lock_key(job),
                owner,
                STORE_LEASE_MS,
            )
            .await?
            .map(Held::Lease)),
        }
    }

    /// Keeps a held lock alive; returns when it is lost (never, for a file lock). Run it beside
    /// the job and stop the job when it returns.
    pub async fn keep(&self, held: &mut Held) -> lambda_store::StoreError {
        let (Coordinator::Store { store, clock, .. }, Held::Lease(lease)) = (self, held) else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(STORE_LEASE_MS as u64 / 3)).await;
            match lambda_store::lease::renew(store.as_ref(), clock.as_ref(), lease, STORE_LEASE_MS)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    return lambda_store::StoreError::ConditionFailed {
                        key: lease.key.clone(),
                    };
                }
                Err(e) => tracing::warn!(error = %e, "Renewing the job lock failed; retrying."),
            }
        }
    }

    /// Gives the lock up.
    pub async fn unlock(&self, held: Held) -> Result<(), CoordinatorError> {
        match (self, held) {
            (_, Held::File(g)) => drop(g),
            (Coordinator::Store { store, clock, .. }, Held::Lease(l)) => {
                lambda_store::lease::release(store.as_ref(), clock.as_ref(), &l).await?
            }
            (Coordinator::Files(_), Held::Lease(_)) => {}
        }
        Ok(())
    }

    /// The last scheduled instant of `job` that succeeded.
    pub async fn last_success(&self, job: &str) -> Result<Option<i64>, CoordinatorError> {
        match self {
            Coordinator::Files(s) => Ok(s.last_success(job)?),
            Coordinator::Store { store, .. } => Ok(store
                .get(&success_key(job))
                .await?
                .and_then(|i| std::str::from_utf8(&i.data).ok()?.parse().ok())),
        }
    }

    /// Records a run (and, if it succeeded, the job's last success).
    pub async fn record(&self, r: &RunRecord) -> Result<(), CoordinatorError> {
        self.state().record(r)?;
        if let (Coordinator::Store { store, .. }, "ok") = (self, r.outcome.as_str()) {
            let item = lambda_store::Item {
                key: success_key(&r.job),
                data: r.scheduled_ms.to_string().into_bytes(),
                guard: Some(lambda_store::Guard::from_u128(r.scheduled_ms.max(0) as u128)),
                expires_at: None,
            };
            // Never move the last success backwards (a late catch-up run finishing last).
            match store
                .put(&item, lambda_store::Condition::GuardAdvances)
                .await
            {
                Ok(()) | Err(lambda_store::StoreError::ConditionFailed { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
