//! Scheduling with an injected clock: catch-up after downtime (bounded), the job lock, run records,
//! and config errors naming the field.

use std::path::Path;

use lambda_batch::schedule::{Job, RunRecord, State, retry_backoff_ms};
use lambda_store::OnlineStore;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
// 2026-01-10T00:00:00Z
const T0: i64 = 1_768_003_200_000;

fn job(dir: &Path, extra: &str) -> Job {
    let f = dir.join("nightly.toml");
    std::fs::write(
        &f,
        format!("name = \"nightly\"\ncron = \"0 30 1 * * *\"\nview = \"v.toml\"\noffline = \"off\"\nstore = \"s.redb\"\n{extra}"),
    )
    .unwrap();
    Job::load(&f).unwrap()
}

#[test]
fn due_runs_and_bounded_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let j = job(dir.path(), "catch-up = 2\n");
    assert_eq!(j.view, dir.path().join("v.toml"));
    // Never ran, at 01:00: nothing due yet today; yesterday's 01:30 is within the last day.
    let d = j.due(None, T0 + HOUR);
    assert_eq!(d.runs, vec![T0 - DAY + HOUR + HOUR / 2]);
    // Ran yesterday; at 01:30 exactly today's run is due.
    assert_eq!(
        j.due(Some(T0 - DAY + 90 * 60_000), T0 + 90 * 60_000).runs,
        vec![T0 + 90 * 60_000]
    );
    // Down for five days: only the latest two missed runs are caught up, the rest reported skipped.
    let d = j.due(Some(T0 + 90 * 60_000), T0 + 5 * DAY + 2 * HOUR);
    assert_eq!(
        d.runs,
        vec![T0 + 4 * DAY + 90 * 60_000, T0 + 5 * DAY + 90 * 60_000]
    );
    assert_eq!(d.skipped.len(), 3);
    // Up to date: nothing due; the next run is tomorrow 01:30.
    let last = T0 + 5 * DAY + 90 * 60_000;
    assert!(j.due(Some(last), last + HOUR).runs.is_empty());
    assert_eq!(j.next_after(last + HOUR), Some(last + DAY));
}

#[test]
fn one_copy_of_a_job_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let a = State::open(dir.path()).unwrap();
    let b = State::open(dir.path()).unwrap(); // another process / machine sharing the directory
    let held = a.try_lock("nightly", T0, HOUR).unwrap().expect("free lock");
    assert!(
        b.try_lock("nightly", T0 + 1, HOUR).unwrap().is_none(),
        "second copy must not run"
    );
    assert!(
        b.try_lock("other-job", T0, HOUR).unwrap().is_some(),
        "other jobs are independent"
    );
    drop(held);
    let again = b.try_lock("nightly", T0 + 2, HOUR).unwrap();
    assert!(again.is_some(), "released on drop");
    // A crashed holder: its lock expires after the lease and is taken over.
    std::mem::forget(again);
    assert!(
        a.try_lock("nightly", T0 + HOUR - 1, HOUR)
            .unwrap()
            .is_none()
    );
    assert!(
        a.try_lock("nightly", T0 + HOUR + 3, HOUR)
            .unwrap()
            .is_some()
    );
}

#[test]
fn run_records_drive_the_next_due_run() {
    let dir = tempfile::tempdir().unwrap();
    let s = State::open(dir.path()).unwrap();
    assert_eq!(s.last_success("nightly").unwrap(), None);
    let rec = |scheduled_ms, outcome: &str| RunRecord {
        job: "nightly".into(),
        scheduled_ms,
        started_ms: scheduled_ms + 1,
        ended_ms: scheduled_ms + 2,
        attempts: 1,
        outcome: outcome.into(),
        rows: 10,
        bytes: 100,
    };
    s.record(&rec(T0, "ok")).unwrap();
    s.record(&rec(T0 + DAY, "error: bucket unreachable"))
        .unwrap();
    assert_eq!(
        s.last_success("nightly").unwrap(),
        Some(T0),
        "a failed run is due again"
    );
    assert_eq!(s.records().unwrap().len(), 2);
    assert_eq!(retry_backoff_ms(1), 30_000);
    assert_eq!(retry_backoff_ms(3), 120_000);
    assert_eq!(retry_backoff_ms(30), 30 * 60_000);
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        "name = \"x\"\ncron = \"every night\"\nview = \"v\"\noffline = \"o\"\nstore = \"s\"\n",
    )
    .unwrap();
    let e = Job::load(&f).unwrap_err().to_string();
    assert!(
        e.contains("bad.toml: field `cron`") && e.contains("every night"),
        "{e}"
    );
    std::fs::write(&f, "name = \"x\"\ncron = \"0 0 1 * * *\"\nview = \"v\"\noffline = \"o\"\nstore = \"s\"\ncolour = 1\n").unwrap();
    let e = Job::load(&f).unwrap_err().to_string();
    assert!(e.contains("unknown field `colour`"), "{e}");
}

#[test]
fn the_shipped_schedules_are_valid() {
    let jobs = Job::load_dir(&Path::new(&manifest_dir()).join("../../schedules")).unwrap();
    assert!(!jobs.is_empty());
    for j in jobs {
        assert!(
            j.view.exists(),
            "{}: view {} does not exist",
            j.name,
            j.view.display()
        );
    }
}

/// `lambda-batch schedule --once` end to end: the due run happens and is recorded, a second call
/// finds nothing due, and a held lock keeps a second copy from running.
#[test]
fn schedule_once_runs_records_and_respects_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let sched = nightly_job_dir(dir.path());
    let state = dir.path().join("state");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_lambda-batch"))
            .args(["schedule", "--once", "--dir"])
            .arg(&sched)
            .arg("--state")
            .arg(&state)
            .output()
            .unwrap()
    };
    // A copy elsewhere holds the lock: nothing runs.
    let s = State::open(&state).unwrap();
    let held = s.try_lock("job", chrono_now(), HOUR).unwrap().unwrap();
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.records().unwrap().is_empty(), "a locked job must not run");
    drop(held);
    // Free: the due run (last midnight) runs and is recorded.
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = s.records().unwrap();
    assert_eq!(recs.len(), 1, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(recs[0].outcome, "ok");
    assert_eq!(recs[0].scheduled_ms % DAY, 0);
    // Up to date: a second call runs nothing.
    assert!(run().status.success());
    assert_eq!(s.records().unwrap().len(), 1);
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `schedule --once --lock dynamodb://TABLE` on DynamoDB Local: a lease held by another machine
/// keeps the job from running; once free the run happens, and a second machine (another state
/// directory) sees the shared last success and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_once_with_a_dynamodb_lock_across_machines() {
    use lambda_store::dynamo::{DynamoConfig, DynamoStore};
    use lambda_store::{ItemKey, SystemClock, lease};
    let endpoint = std::env::var("LAMBDA_TEST_DYNAMODB_ENDPOINT").expect(
        "LAMBDA_TEST_DYNAMODB_ENDPOINT is not set: run `make test` (it starts DynamoDB Local)",
    );
    let table = format!("lambda-scheduler-{}", std::process::id());
    let mut cfg = DynamoConfig::new(&table, "us-east-1");
    cfg.endpoint = Some(endpoint.clone());
    cfg.static_credentials = Some(("test".into(), "test".into()));
    let dynamo = DynamoStore::connect(cfg).await;
    dynamo.create_table().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let sched = nightly_job_dir(dir.path());
    let run = |state: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lambda-batch"))
            .args(["schedule", "--once", "--dir"])
            .arg(&sched)
            .arg("--state")
            .arg(state)
            .arg("--lock")
            .arg(format!("dynamodb://{table}"))
            .env("AWS_ENDPOINT_URL_DYNAMODB", &endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap()
    };
    let (state_a, state_b) = (dir.path().join("state-a"), dir.path().join("state-b"));
    let records = |p: &Path| State::open(p).unwrap().records().unwrap();
    // Another machine holds the job's lease.
    let held = lease::try_acquire(
        &dynamo,
        &SystemClock,
        ItemKey::new("scheduler#job", "lock"),
        "other-machine:1",
        HOUR,
    )
    .await
    .unwrap()
    .unwrap();
    let out = run(&state_a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        records(&state_a).is_empty(),
        "a job locked elsewhere must not run"
    );
    lease::release(&dynamo, &SystemClock, &held).await.unwrap();
    // Free: machine A runs it and records the success in the table.
    let out = run(&state_a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = records(&state_a);
    assert_eq!(recs.len(), 1, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(recs[0].outcome, "ok");
    let last = dynamo
        .get(&ItemKey::new("scheduler#job", "last-success"))
        .await
        .unwrap()
        .expect("last success in the table");
    assert_eq!(last.data, recs[0].scheduled_ms.to_string().into_bytes());
    // The lock was given back.
    assert_eq!(
        lease::holder(&dynamo, &ItemKey::new("scheduler#job", "lock"))
            .await
            .unwrap(),
        None
    );
    // Machine B (its own state directory) finds nothing due.
    let out = run(&state_b);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        records(&state_b).is_empty(),
        "machine B must not rerun the night"
    );
    dynamo.delete_table().await.unwrap();
}

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}

/// `<root>/schedules/job.toml`: the fraud view nightly at midnight over an empty
/// `<root>/history`, offline store and redb file beside it; returns the schedules directory.
fn nightly_job_dir(root: &Path) -> std::path::PathBuf {
    let sched = root.join("schedules");
    std::fs::create_dir_all(root.join("history")).unwrap();
    std::fs::create_dir_all(&sched).unwrap();
    let view = Path::new(&manifest_dir()).join("../../examples/fraud/features.toml");
    std::fs::write(
        sched.join("job.toml"),
        format!(
            "name = \"job\"\ncron = \"0 0 0 * * *\"\nview = \"{}\"\nhistory = \"../history\"\noffline = \"../offline\"\nstore = \"../online.redb\"\n",
            view.display()
        ),
    )
    .unwrap();
    sched
}
