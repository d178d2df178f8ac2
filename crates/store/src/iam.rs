//! The API actions each binary calls, on which resource of `infra/lambda.template.json` (by
//! logical id; `X/*` means the objects of bucket `X`). A test checks that each IAM role of the
//! template grants exactly these: nothing missing, nothing more.
//!
//! The DynamoDB data-path actions come from the backend that calls them ([`crate::dynamo`]); the
//! stream, bucket, lease and scheduler actions are those the speed and batch layers are specified
//! to call, declared here so that their code and the roles are kept together.

use std::collections::BTreeSet;

use crate::dynamo::{DATA_ACTIONS_READ, DATA_ACTIONS_WRITE, HEALTHCHECK_ACTIONS};

/// A binary with an IAM role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Binary {
    /// `lambda-batch`.
    Batch,
    /// `lambda-speed`.
    Speed,
    /// `lambda-serve`.
    Serving,
}

impl Binary {
    /// All binaries with a role.
    pub const ALL: [Binary; 3] = [Binary::Batch, Binary::Speed, Binary::Serving];
    /// The logical id of its role in the template.
    pub fn role(self) -> &'static str {
        match self {
            Binary::Batch => "BatchRole",
            Binary::Speed => "SpeedRole",
            Binary::Serving => "ServingRole",
        }
    }
}

/// Kinesis actions of the speed layer's consumer (list shards, iterate, read).
pub const KINESIS_CONSUMER_ACTIONS: &[&str] = &[
    "kinesis:DescribeStreamSummary",
    "kinesis:ListShards",
    "kinesis:GetShardIterator",
    "kinesis:GetRecords",
];
/// Lease-table actions of the speed layer (list workers and leases, take, renew, release).
pub const LEASE_ACTIONS: &[&str] = &[
    "dynamodb:Query",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:DeleteItem",
];
/// Scheduler-table actions of the batch layer (cross-machine job lock, run records).
pub const SCHEDULER_ACTIONS: &[&str] = &[
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:DeleteItem",
    "dynamodb:Query",
];

fn add(set: &mut BTreeSet<(String, String)>, actions: &[&str], resource: &str) {
    for a in actions {
        set.insert((a.to_string(), resource.to_string()));
    }
}

/// The (action, resource) pairs `binary` needs, exactly.
pub fn required(binary: Binary) -> BTreeSet<(String, String)> {
    let mut s = BTreeSet::new();
    match binary {
        Binary::Serving => {
            add(&mut s, DATA_ACTIONS_READ, "FeatureTable");
            add(&mut s, HEALTHCHECK_ACTIONS, "FeatureTable");
        }
        Binary::Speed => {
            add(&mut s, KINESIS_CONSUMER_ACTIONS, "EventStream");
            add(&mut s, DATA_ACTIONS_READ, "FeatureTable");
            add(&mut s, DATA_ACTIONS_WRITE, "FeatureTable");
            add(&mut s, HEALTHCHECK_ACTIONS, "FeatureTable");
            add(&mut s, LEASE_ACTIONS, "LeaseTable");
            add(&mut s, HEALTHCHECK_ACTIONS, "LeaseTable");
            add(&mut s, &["s3:PutObject"], "SinkBucket/*");
        }
        Binary::Batch => {
            add(&mut s, &["s3:GetObject"], "HistoryBucket/*");
            add(&mut s, &["s3:ListBucket"], "HistoryBucket");
            add(&mut s, &["s3:GetObject"], "SinkBucket/*");
            add(&mut s, &["s3:ListBucket"], "SinkBucket");
            add(
                &mut s,
                &["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                "OfflineBucket/*",
            );
            add(&mut s, &["s3:ListBucket"], "OfflineBucket");
            add(&mut s, &["dynamodb:BatchWriteItem"], "FeatureTable");
            add(&mut s, HEALTHCHECK_ACTIONS, "FeatureTable");
            add(&mut s, SCHEDULER_ACTIONS, "SchedulerTable");
            add(&mut s, HEALTHCHECK_ACTIONS, "SchedulerTable");
        }
    }
    s
}

/// True for actions that change data.
pub fn is_write(action: &str) -> bool {
    let name = action.split(':').nth(1).unwrap_or(action);
    [
        "Put",
        "Delete",
        "Update",
        "BatchWrite",
        "Create",
        "TransactWrite",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}
