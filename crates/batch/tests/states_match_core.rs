//! The partial states DataFusion computes with the core state functions equal, per entity and
//! bucket, the states the core computes directly (the speed path's code): same bytes for exact
//! aggregations, same finalized value (floats within 1e-9 relative) for the rest.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use common::{all_functions_view, close, examples, generated, rows_of, synthetic};
use datafusion::arrow::array::RecordBatch;
use datafusion::datasource::MemTable;
use lambda_core::agg::{AggState, decode_states};
use lambda_core::time::tile_start;
use lambda_core::{FeatureView, Span, Value, sql};

type States = BTreeMap<(String, i64), Vec<AggState>>;

fn core_states(
    view: &FeatureView,
    rows: &[Vec<Value>],
    width: Span,
    start: i64,
    end: i64,
) -> States {
    let aggs = view.aggs();
    let src = &view.source;
    let mut seen = HashSet::new();
    let mut out = States::new();
    for r in rows {
        let (Value::Str(id), Value::Timestamp(ts), Value::Str(e)) =
            (&r[src.event_id], &r[src.event_time], &r[src.entity])
        else {
            panic!("keys")
        };
        if *ts < start || *ts >= end || !seen.insert(id.clone()) {
            continue;
        }
        let states = out
            .entry((e.clone(), tile_start(*ts, width)))
            .or_insert_with(|| lambda_core::agg::empty_states(&aggs));
        lambda_core::agg::update_all(&aggs, states, r, *ts, id);
    }
    out
}

async fn sql_states(
    view: &FeatureView,
    batch: RecordBatch,
    width: Span,
    start: i64,
    end: i64,
) -> States {
    let ctx = lambda_batch::session();
    lambda_batch::states::register_state_functions(&ctx, view);
    ctx.register_table(
        view.source.name.as_str(),
        Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let text = sql::partial_states(view, &view.source.name, width, start, end);
    let out = ctx
        .sql(&text)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .collect()
        .await
        .unwrap();
    let aggs = view.aggs();
    // Binary columns: read them directly.
    let mut states = States::new();
    for b in &out {
        let entity = b.column(0);
        let bucket = b.column(1);
        for i in 0..b.num_rows() {
            let (Value::Str(e), Value::Timestamp(t)) = (
                lambda_core::decode::value_at(entity.as_ref(), i).unwrap(),
                lambda_core::decode::value_at(bucket.as_ref(), i).unwrap(),
            ) else {
                panic!("row {i}")
            };
            let mut row = Vec::new();
            for (k, a) in aggs.iter().enumerate() {
                let col = b
                    .column(2 + k)
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::BinaryArray>()
                    .unwrap();
                row.push(
                    decode_states(std::slice::from_ref(a), col.value(i))
                        .unwrap()
                        .remove(0),
                );
            }
            states.insert((e, t), row);
        }
    }
    states
}

async fn assert_states_match(
    view: &FeatureView,
    batch: RecordBatch,
    width: Span,
    start: i64,
    end: i64,
) -> usize {
    let want = core_states(view, &rows_of(&batch), width, start, end);
    let got = sql_states(view, batch, width, start, end).await;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "(entity, bucket) keys differ"
    );
    let aggs = view.aggs();
    let mut n = 0;
    for (k, w) in &want {
        for (i, a) in aggs.iter().enumerate() {
            let (gs, ws) = (&got[k][i], &w[i]);
            let exact = !matches!(ws, AggState::SumFloat { .. } | AggState::Moments { .. });
            if exact {
                assert_eq!(
                    lambda_core::agg::encode_states(
                        std::slice::from_ref(a),
                        std::slice::from_ref(gs)
                    ),
                    lambda_core::agg::encode_states(
                        std::slice::from_ref(a),
                        std::slice::from_ref(ws)
                    ),
                    "{k:?} {}",
                    a.name
                );
            } else {
                match (a.finalize(gs).unwrap(), a.finalize(ws).unwrap()) {
                    (Value::Float(x), Value::Float(y)) => {
                        assert!(close(x, y), "{k:?} {}: {x} vs {y}", a.name)
                    }
                    (x, y) => assert_eq!(x, y, "{k:?} {}", a.name),
                }
            }
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn daily_and_tile_states_of_the_fraud_view_match_core() {
    let view = FeatureView::load(examples().join("features.toml")).unwrap();
    let (batch, end) = generated(&view);
    let day = 86_400_000;
    assert!(
        assert_states_match(&view, batch.clone(), Span::days(1), end - 3 * day, end).await > 1000
    );
    assert!(assert_states_match(&view, batch.clone(), Span::hours(1), end - day, end).await > 1000);
    assert!(
        assert_states_match(&view, batch, Span::minutes(5), end - 2 * 3_600_000, end).await > 100
    );
}

#[tokio::test]
async fn states_of_every_function_on_every_type_match_core() {
    let view = all_functions_view();
    let day = 86_400_000;
    let batch = synthetic(&view, 6_000, 100 * day, 40 * day);
    assert_states_match(&view, batch.clone(), Span::days(1), 100 * day, 140 * day).await;
    assert_states_match(&view, batch, Span::hours(1), 130 * day, 131 * day + 7).await;
}
