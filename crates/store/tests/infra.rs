//! infra/lambda.template.json: every role grants exactly the actions its binary calls, on exactly
//! its own resources; and the tables `DynamoStore::create_table` makes (the `init` path) match the
//! template's.

use std::collections::BTreeSet;
use std::path::Path;

use lambda_store::dynamo::{DynamoConfig, DynamoStore};
use lambda_store::iam::{Binary, is_write, required};
use serde_json::Value;

fn template() -> Value {
    let p = Path::new(&manifest_dir()).join("../../infra/lambda.template.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `{"Fn::GetAtt": [X, "Arn"]}` → `X`; `{"Fn::Sub": "${X.Arn}/*"}` → `X/*`; anything else fails.
fn resource_id(r: &Value) -> String {
    if let Some(a) = r.get("Fn::GetAtt") {
        assert_eq!(a[1], "Arn", "{r}");
        return a[0].as_str().unwrap().to_string();
    }
    if let Some(s) = r.get("Fn::Sub").and_then(Value::as_str) {
        let id = s
            .strip_prefix("${")
            .and_then(|s| s.strip_suffix(".Arn}/*"))
            .unwrap_or_else(|| panic!("{s}"));
        return format!("{id}/*");
    }
    panic!("resource {r} is not a reference to one of the template's own resources (a wildcard?)");
}

fn as_list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    }
}

fn granted(t: &Value, role: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let props = &t["Resources"][role]["Properties"];
    assert!(
        props.get("ManagedPolicyArns").is_none(),
        "{role} must not attach managed policies"
    );
    for p in props["Policies"].as_array().unwrap() {
        for st in p["PolicyDocument"]["Statement"].as_array().unwrap() {
            assert_eq!(st["Effect"], "Allow");
            assert!(st.get("NotAction").is_none() && st.get("NotResource").is_none());
            for a in as_list(&st["Action"]) {
                let a = a.as_str().unwrap();
                assert!(!a.contains('*'), "{role}: wildcard action {a}");
                for r in as_list(&st["Resource"]) {
                    out.insert((a.to_string(), resource_id(&r)));
                }
            }
        }
    }
    out
}

#[test]
fn each_role_grants_exactly_what_its_binary_calls() {
    let t = template();
    for b in Binary::ALL {
        let g = granted(&t, b.role());
        let want = required(b);
        let extra: Vec<_> = g.difference(&want).collect();
        let missing: Vec<_> = want.difference(&g).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{b:?}: extra {extra:?}, missing {missing:?}"
        );
    }
    // Every role in the template is one of ours.
    let roles: Vec<&String> = t["Resources"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::IAM::Role")
        .map(|(k, _)| k)
        .collect();
    assert_eq!(roles.len(), Binary::ALL.len());
}

#[test]
fn serving_cannot_write_and_nobody_touches_the_others_resources() {
    let t = template();
    let serving = granted(&t, "ServingRole");
    assert!(
        serving.iter().all(|(a, _)| !is_write(a)),
        "serving must be read-only: {serving:?}"
    );
    assert!(serving.iter().all(|(_, r)| r == "FeatureTable"));
    let speed = granted(&t, "SpeedRole");
    assert!(
        speed
            .iter()
            .all(|(_, r)| !r.starts_with("History") && !r.starts_with("Offline")),
        "{speed:?}"
    );
    let batch = granted(&t, "BatchRole");
    assert!(
        batch
            .iter()
            .all(|(_, r)| r != "EventStream" && r != "LeaseTable"),
        "{batch:?}"
    );
    assert!(
        !batch.contains(&("s3:PutObject".into(), "HistoryBucket/*".into())),
        "history is immutable for batch"
    );
}

#[tokio::test]
async fn init_creates_the_tables_the_template_declares() {
    let t = template();
    let endpoint = std::env::var("LAMBDA_TEST_DYNAMODB_ENDPOINT").expect(
        "LAMBDA_TEST_DYNAMODB_ENDPOINT is not set: run `make test` (it starts DynamoDB Local)",
    );
    let declared = &t["Resources"]["FeatureTable"]["Properties"];
    let name = format!("lambda-init-{}", std::process::id());
    let mut cfg = DynamoConfig::new(&name, "us-east-1");
    cfg.endpoint = Some(endpoint);
    cfg.static_credentials = Some(("test".into(), "test".into()));
    let store = DynamoStore::connect(cfg).await;
    store.create_table().await.unwrap();
    store.create_table().await.unwrap(); // idempotent
    let d = store
        .client()
        .describe_table()
        .table_name(&name)
        .send()
        .await
        .unwrap();
    let table = d.table().unwrap();
    let keys: BTreeSet<(String, String)> = table
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_string(),
                k.key_type().as_str().to_string(),
            )
        })
        .collect();
    let want_keys: BTreeSet<(String, String)> = declared["KeySchema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["AttributeName"].as_str().unwrap().into(),
                k["KeyType"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(keys, want_keys);
    let attrs: BTreeSet<(String, String)> = table
        .attribute_definitions()
        .iter()
        .map(|a| {
            (
                a.attribute_name().to_string(),
                a.attribute_type().as_str().to_string(),
            )
        })
        .collect();
    let want_attrs: BTreeSet<(String, String)> = declared["AttributeDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["AttributeName"].as_str().unwrap().into(),
                a["AttributeType"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(attrs, want_attrs);
    assert_eq!(
        table
            .billing_mode_summary()
            .and_then(|b| b.billing_mode())
            .map(|m| m.as_str()),
        declared["BillingMode"].as_str()
    );
    let ttl = store
        .client()
        .describe_time_to_live()
        .table_name(&name)
        .send()
        .await
        .unwrap();
    let ttl = ttl.time_to_live_description().unwrap();
    assert_eq!(
        ttl.attribute_name(),
        declared["TimeToLiveSpecification"]["AttributeName"].as_str()
    );
    store.delete_table().await.unwrap();
}

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
