//! The generated batch SQL, run by DataFusion, produces exactly the documented output type of every
//! aggregation and the same values as the core states (floats within 1e-9 relative), for the
//! shipped views over generated events and for a synthetic view using every function on every
//! type. Also: DataFusion's `date_bin` agrees with `time::tile_start`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use common::{all_functions_view, close, examples, generated, rows_of, synthetic};
use datafusion::arrow::array::RecordBatch;
use datafusion::datasource::MemTable;
use lambda_core::decode::arrow_schema;
use lambda_core::time::{Span, served_range, tile_start};
use lambda_core::{FeatureView, Value, sql};

type Features = BTreeMap<String, Vec<Value>>;

/// The reference: the core states over the same events, deduplicated by event id.
fn reference(view: &FeatureView, rows: &[Vec<Value>], as_of: i64) -> Features {
    let src = &view.source;
    let mut seen = HashMap::new();
    let mut events: Vec<&Vec<Value>> = Vec::new();
    for r in rows {
        let Value::Str(id) = &r[src.event_id] else {
            panic!("event id")
        };
        if seen.insert(id.clone(), ()).is_none() {
            events.push(r);
        }
    }
    let mut by_entity: BTreeMap<String, Vec<&Vec<Value>>> = BTreeMap::new();
    let earliest = view
        .features()
        .iter()
        .map(|f| served_range(as_of, f.window).0)
        .min()
        .unwrap();
    for r in events {
        let Value::Timestamp(ts) = r[src.event_time] else {
            panic!("ts")
        };
        if ts >= earliest && ts < as_of {
            let Value::Str(e) = &r[src.entity] else {
                panic!("entity")
            };
            by_entity.entry(e.clone()).or_default().push(r);
        }
    }
    by_entity
        .into_iter()
        .map(|(entity, evs)| {
            let values = view
                .features()
                .iter()
                .map(|f| {
                    let agg = &view.aggregations[f.aggregation].aggregation;
                    let (start, end) = served_range(as_of, f.window);
                    let mut state = agg.empty();
                    for r in &evs {
                        let Value::Timestamp(ts) = r[src.event_time] else {
                            unreachable!()
                        };
                        let Value::Str(id) = &r[src.event_id] else {
                            unreachable!()
                        };
                        if ts >= start && ts < end {
                            agg.update(&mut state, r, ts, id);
                        }
                    }
                    agg.finalize(&state).unwrap()
                })
                .collect();
            (entity, values)
        })
        .collect()
}

async fn run_sql(view: &FeatureView, batch: RecordBatch, as_of: i64) -> (Vec<RecordBatch>, String) {
    let ctx = lambda_batch::session();
    let table = MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap();
    ctx.register_table(view.source.name.as_str(), Arc::new(table))
        .unwrap();
    let text = sql::features_as_of(view, &view.source.name, as_of);
    let df = ctx
        .sql(&text)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    (
        df.collect().await.unwrap_or_else(|e| panic!("{e}\n{text}")),
        text,
    )
}

async fn assert_sql_matches_core(view: &FeatureView, batch: RecordBatch, as_of: i64) -> usize {
    let expected = reference(view, &rows_of(&batch), as_of);
    let (out, text) = run_sql(view, batch, as_of).await;
    let features = view.features();
    // Exactly the documented output types.
    let schema = out[0].schema();
    assert_eq!(schema.field(0).name(), "entity");
    for (i, f) in features.iter().enumerate() {
        let agg = &view.aggregations[f.aggregation].aggregation;
        assert_eq!(
            schema.field(i + 1).data_type(),
            &agg.output_type.arrow_type(),
            "type of {} ({}); SQL:\n{text}",
            f.name,
            agg.function
        );
    }
    let mut got = Features::new();
    for b in &out {
        for r in rows_of(b) {
            let Value::Str(e) = &r[0] else {
                panic!("entity")
            };
            got.insert(e.clone(), r[1..].to_vec());
        }
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "entities differ"
    );
    let mut compared = 0;
    for (entity, want) in &expected {
        for (i, f) in features.iter().enumerate() {
            let (g, w) = (&got[entity][i], &want[i]);
            let ok = match (g, w) {
                (Value::Float(a), Value::Float(b)) => close(*a, *b),
                _ => g == w,
            };
            assert!(
                ok,
                "entity {entity}, feature {}: SQL gave {g:?}, core gave {w:?}",
                f.name
            );
            compared += 1;
        }
    }
    compared
}

#[tokio::test]
async fn fraud_view_sql_matches_core() {
    let view = FeatureView::load(examples().join("features.toml")).unwrap();
    let (batch, end) = generated(&view);
    // As of the end of the data, and mid-day (partial hop tails).
    for as_of in [end, end - 7 * 3_600_000 - 17 * 60_000] {
        let n = assert_sql_matches_core(&view, batch.clone(), as_of).await;
        assert!(n > 150 * 30, "compared {n} values");
    }
}

#[tokio::test]
async fn product_view_sql_matches_core_including_the_sketch() {
    let view = FeatureView::load(examples().join("product_views.toml")).unwrap();
    let (batch, end) = generated(&view);
    assert_sql_matches_core(&view, batch, end).await;
}

#[tokio::test]
async fn every_function_on_every_type_matches_core() {
    let view = all_functions_view();
    assert!(view.aggregations.len() > 40);
    let day = 86_400_000;
    let batch = synthetic(&view, 6_000, 100 * day, 40 * day);
    for as_of in [140 * day, 139 * day + 3 * 3_600_000 + 7 * 60_000 + 11] {
        assert_sql_matches_core(&view, batch.clone(), as_of).await;
    }
    assert_eq!(batch.schema(), arrow_schema(&view.source));
}

#[tokio::test]
async fn date_bin_agrees_with_tile_start() {
    let view = all_functions_view();
    let batch = synthetic(&view, 3_000, -5 * 86_400_000, 10 * 86_400_000); // spans 1970, negatives too
    let ctx = lambda_batch::session();
    ctx.register_table(
        "events",
        Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    for width in [Span::minutes(5), Span::hours(1), Span::days(1)] {
        let q = format!(
            "SELECT \"ts\", {} AS tile FROM events",
            sql::tile_expr(&view, width)
        );
        let out = ctx.sql(&q).await.unwrap().collect().await.unwrap();
        let mut checked = 0;
        for b in &out {
            for r in rows_of(b) {
                let (Value::Timestamp(ts), Value::Timestamp(tile)) = (&r[0], &r[1]) else {
                    panic!("{r:?}")
                };
                assert_eq!(*tile, tile_start(*ts, width), "ts {ts} width {width}");
                checked += 1;
            }
        }
        assert_eq!(checked, 3_000);
    }
}
