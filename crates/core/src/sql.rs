//! Batch SQL generated from the feature definition (DataFusion dialect).
//!
//! The generated SQL implements exactly the rules of [`crate::time`] and [`crate::agg`]: the served
//! range of each window comes from [`served_range`], filters are rendered by
//! [`Filter::to_sql`](crate::filter::Filter::to_sql) with the same three-valued logic, duplicates
//! of an event id are dropped (the earliest event time is kept; duplicates are identical by
//! contract), and every feature is cast to its documented output type.
//!
//! `approx_count_distinct` is computed by the UDAF [`APPROX_DISTINCT_UDAF`], which the batch layer
//! registers from this crate's own HyperLogLog so both paths produce the same sketch.

use crate::agg::{AggFunction, Aggregation};
use crate::filter::quote_ident;
use crate::spec::FeatureView;
use crate::time::{Span, format_ts, served_range};
use crate::types::ColumnType;

/// Name of the UDAF that computes `approx_count_distinct` with the core HyperLogLog.
pub const APPROX_DISTINCT_UDAF: &str = "lambda_approx_distinct";

/// A timestamp literal for an epoch-millisecond instant.
pub fn ts_literal(t_ms: i64) -> String {
    format!("TIMESTAMP '{}'", format_ts(t_ms))
}

/// The SQL expression that assigns a row to its tile: DataFusion's `date_bin` with the epoch as
/// origin, which must agree with [`crate::time::tile_start`] (a test in `lambda-batch` checks it).
pub fn tile_expr(view: &FeatureView, width: Span) -> String {
    format!(
        "date_bin(INTERVAL '{} milliseconds', {}, TIMESTAMP '1970-01-01T00:00:00Z')",
        width.millis(),
        quote_ident(&view.source.columns[view.source.event_time].name)
    )
}

/// The aggregate call of `agg` restricted to rows where `extra` (a SQL condition) holds, cast to
/// its output type.
pub fn aggregate_expr(view: &FeatureView, agg: &Aggregation, extra: Option<&str>) -> String {
    let cols = view.source.name_types();
    let input = agg.input.map(|i| quote_ident(&view.source.columns[i].name));
    let arg = input.clone().unwrap_or_else(|| "*".into());
    let ts = quote_ident(&view.source.columns[view.source.event_time].name);
    let id = quote_ident(&view.source.columns[view.source.event_id].name);
    let call = match agg.function {
        AggFunction::Count => format!("count({arg})"),
        AggFunction::Sum => format!("sum({arg})"),
        AggFunction::Avg => format!("avg({arg})"),
        AggFunction::Min => format!("min({arg})"),
        AggFunction::Max => format!("max({arg})"),
        AggFunction::VarSamp => format!("var_samp({arg})"),
        AggFunction::VarPop => format!("var_pop({arg})"),
        AggFunction::StddevSamp => format!("stddev_samp({arg})"),
        AggFunction::StddevPop => format!("stddev_pop({arg})"),
        AggFunction::CountDistinct => format!("count(DISTINCT {arg})"),
        AggFunction::ApproxCountDistinct => format!("{APPROX_DISTINCT_UDAF}({arg})"),
        AggFunction::LastValue => format!("last_value({arg} ORDER BY {ts} ASC, {id} ASC)"),
    };
    let mut conds: Vec<String> = Vec::new();
    if let Some(e) = extra {
        conds.push(e.to_string());
    }
    if let Some(f) = &agg.filter {
        conds.push(f.to_sql(&cols));
    }
    if agg.function == AggFunction::LastValue
        && let Some(i) = &input
    {
        conds.push(format!("{i} IS NOT NULL"));
    }
    let filtered = if conds.is_empty() {
        call
    } else {
        format!("{call} FILTER (WHERE {})", conds.join(" AND "))
    };
    if agg.output_type == ColumnType::Timestamp {
        // min/max/last_value of a timestamp already return the column's Timestamp(ms, "UTC");
        // a SQL `CAST(.. AS TIMESTAMP)` would turn it into zone-less nanoseconds.
        filtered
    } else {
        format!("CAST({filtered} AS {})", agg.output_type.sql_type())
    }
}

/// The deduplicated events with event time in `[start, end)`, as a subquery body.
///
/// Deliveries of one event are identical rows (the contract), so `SELECT DISTINCT *` keeps exactly
/// one of each — and is several times cheaper than `DISTINCT ON (event_id)`, which DataFusion
/// plans as a `first_value` per column. [`conflicting_duplicates`] finds rows that break the
/// contract (same event id, different content); the batch job fails on them.
pub fn dedup_events(view: &FeatureView, table: &str, start_ms: i64, end_ms: i64) -> String {
    dedup_between(view, table, &ts_literal(start_ms), &ts_literal(end_ms))
}

/// [`dedup_events`] between two SQL timestamp expressions.
fn dedup_between(view: &FeatureView, table: &str, start: &str, end: &str) -> String {
    let ts = quote_ident(&view.source.columns[view.source.event_time].name);
    format!(
        "SELECT DISTINCT * FROM {table}\n  WHERE {ts} >= {start} AND {ts} < {end}",
        table = quote_ident(table),
    )
}

/// The placeholder for the cutoff instant in hand-written batch SQL (see [`features_template`]).
pub const CUTOFF_PLACEHOLDER: &str = "{{cutoff}}";

/// A SQL interval literal for a span, in the largest whole unit.
pub fn interval_literal(span: Span) -> String {
    let ms = span.millis();
    let (n, unit) = [
        (86_400_000, "days"),
        (3_600_000, "hours"),
        (60_000, "minutes"),
        (1_000, "seconds"),
    ]
    .into_iter()
    .find(|(u, _)| ms % u == 0)
    .map_or((ms, "milliseconds"), |(u, name)| (ms / u, name));
    let unit = if n == 1 {
        unit.trim_end_matches('s')
    } else {
        unit
    };
    format!("INTERVAL '{n} {unit}'")
}

/// The features query as a template for hand-written SQL: like [`features_as_of`], with the
/// instant written as [`CUTOFF_PLACEHOLDER`] and each window's start as `{{cutoff}} - INTERVAL …`.
/// Rendered by [`render_template`] at a cutoff that is a multiple of every window's hop (the
/// nightly cutoff is), it computes exactly what [`features_as_of`] computes.
pub fn features_template(view: &FeatureView, table: &str) -> String {
    let start_of = |w| format!("{CUTOFF_PLACEHOLDER} - {}", interval_literal(w));
    let longest = view
        .features()
        .iter()
        .map(|f| f.window)
        .max_by_key(|w| w.millis())
        .map_or_else(|| CUTOFF_PLACEHOLDER.to_string(), start_of);
    features_query(
        view,
        table,
        "as of {{cutoff}}",
        (&longest, CUTOFF_PLACEHOLDER),
        start_of,
    )
}

/// Substitutes the cutoff into a hand-written SQL template.
pub fn render_template(text: &str, cutoff_ms: i64) -> String {
    text.replace(CUTOFF_PLACEHOLDER, &ts_literal(cutoff_ms))
}

/// Point-in-time features: one row per entity with every feature of the view as served at
/// `as_of` (each window over [`served_range`]`(as_of, window)`), columns `entity` then the
/// features in [`FeatureView::features`] order.
pub fn features_as_of(view: &FeatureView, table: &str, as_of_ms: i64) -> String {
    let earliest = view
        .features()
        .iter()
        .map(|f| served_range(as_of_ms, f.window).0)
        .min()
        .unwrap_or(as_of_ms);
    features_query(
        view,
        table,
        &format!("as of {}", format_ts(as_of_ms)),
        (&ts_literal(earliest), &ts_literal(as_of_ms)),
        |w| ts_literal(served_range(as_of_ms, w).0),
    )
}

/// The features query over events in `[earliest, as_of)`, window starts `start_of(window)`; all
/// three SQL timestamp expressions.
fn features_query(
    view: &FeatureView,
    table: &str,
    label: &str,
    (earliest, as_of): (&str, &str),
    start_of: impl Fn(Span) -> String,
) -> String {
    let ts = quote_ident(&view.source.columns[view.source.event_time].name);
    let entity = quote_ident(&view.entity_column().name);
    let features = view.features();
    let mut select = vec![format!("{entity} AS \"entity\"")];
    for f in &features {
        let agg = &view.aggregations[f.aggregation].aggregation;
        let range = format!("{ts} >= {}", start_of(f.window));
        select.push(format!(
            "{} AS {}",
            aggregate_expr(view, agg, Some(&range)),
            quote_ident(&f.name)
        ));
    }
    format!(
        "-- features of view `{view}` {label} (generated by lambda from the feature definition)\n\
         SELECT\n  {cols}\nFROM (\n  {events}\n) AS events\nGROUP BY {entity}\nORDER BY {entity}",
        view = view.name,
        cols = select.join(",\n  "),
        events = dedup_between(view, table, earliest, as_of),
    )
}

/// Per-(entity, bucket) partial states of every aggregation over events in `[start, end)`,
/// buckets of `width` aligned like tiles. Columns: `entity`, `bucket` (timestamp), then one
/// `Binary` column per aggregation (the core encoding of its state), named after it. Needs the
/// state functions `lambda_state_<view>_<aggregation>` (registered by `lambda-batch`).
pub fn partial_states(
    view: &FeatureView,
    table: &str,
    width: Span,
    start_ms: i64,
    end_ms: i64,
) -> String {
    partial_states_over(
        view,
        width,
        start_ms,
        end_ms,
        &dedup_events(view, table, start_ms, end_ms),
    )
}

/// [`partial_states`] over a table that is already deduplicated (the rows of
/// [`dedup_events`], materialized once and shared by several queries).
pub fn partial_states_of_distinct(
    view: &FeatureView,
    table: &str,
    width: Span,
    start_ms: i64,
    end_ms: i64,
) -> String {
    let ts = quote_ident(&view.source.columns[view.source.event_time].name);
    let events = format!(
        "SELECT * FROM {table}\n  WHERE {ts} >= {} AND {ts} < {}",
        ts_literal(start_ms),
        ts_literal(end_ms),
        table = quote_ident(table),
    );
    partial_states_over(view, width, start_ms, end_ms, &events)
}

/// Event ids with two or more rows in an already deduplicated table (see
/// [`conflicting_duplicates`]), up to 5.
pub fn conflicting_ids_of_distinct(view: &FeatureView, table: &str) -> String {
    let id = quote_ident(&view.source.columns[view.source.event_id].name);
    format!(
        "SELECT {id} FROM {table} GROUP BY {id} HAVING count(*) > 1 ORDER BY {id} LIMIT 5",
        table = quote_ident(table)
    )
}

fn partial_states_over(
    view: &FeatureView,
    width: Span,
    start_ms: i64,
    end_ms: i64,
    events: &str,
) -> String {
    let ts = quote_ident(&view.source.columns[view.source.event_time].name);
    let id = quote_ident(&view.source.columns[view.source.event_id].name);
    let entity = quote_ident(&view.entity_column().name);
    let bucket = tile_expr(view, width);
    let cols = view.source.name_types();
    let mut select = vec![
        format!("{entity} AS \"entity\""),
        format!("{bucket} AS \"bucket\""),
    ];
    for a in &view.aggregations {
        let agg = &a.aggregation;
        let mut args: Vec<String> = agg
            .input
            .map(|i| quote_ident(&view.source.columns[i].name))
            .into_iter()
            .collect();
        args.push(ts.clone());
        args.push(id.clone());
        let call = format!(
            "lambda_state_{}_{}({})",
            view.name,
            agg.name,
            args.join(", ")
        );
        let call = match &agg.filter {
            Some(f) => format!("{call} FILTER (WHERE {})", f.to_sql(&cols)),
            None => call,
        };
        select.push(format!("{call} AS {}", quote_ident(&agg.name)));
    }
    format!(
        "-- partial states of view `{view}` per entity and {width} bucket, events in [{start}, {end})\n\
         SELECT\n  {cols}\nFROM (\n  {events}\n) AS events\nGROUP BY {entity}, {bucket}",
        view = view.name,
        start = format_ts(start_ms),
        end = format_ts(end_ms),
        cols = select.join(",\n  "),
    )
}

/// Up to 5 event ids in `[start, end)` that have two or more *different* rows: deliveries that
/// break the "duplicates are identical" contract, which both paths rely on.
pub fn conflicting_duplicates(
    view: &FeatureView,
    table: &str,
    start_ms: i64,
    end_ms: i64,
) -> String {
    let id = quote_ident(&view.source.columns[view.source.event_id].name);
    format!(
        "SELECT {id} FROM (\n  {events}\n) AS events GROUP BY {id} HAVING count(*) > 1 ORDER BY {id} LIMIT 5",
        events = dedup_events(view, table, start_ms, end_ms)
    )
}
