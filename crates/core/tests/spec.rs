//! Loading the shipped examples and one test per validation error.

use std::path::Path;

use lambda_core::spec::SpecError;
use lambda_core::{AggFunction, ColumnType, FeatureView, Span};

fn examples() -> std::path::PathBuf {
    Path::new(&manifest_dir()).join("../../examples/fraud")
}

#[test]
fn shipped_fraud_view_loads() {
    let v = FeatureView::load(examples().join("features.toml")).unwrap();
    assert_eq!(v.name, "fraud_user");
    assert_eq!(v.aggregations.len(), 7);
    assert_eq!(v.features().len(), 35);
    assert_eq!(v.features()[0].name, "txn_count_5m");
    assert_eq!(v.max_window(), Span::days(90));
    let avg = &v.aggregations[2].aggregation;
    assert_eq!(avg.function, AggFunction::Avg);
    assert_eq!(
        avg.output_type,
        ColumnType::Decimal {
            precision: 14,
            scale: 6
        }
    );
    assert_eq!(v.speed.tile, Span::minutes(5));
    let p = FeatureView::load(examples().join("product_views.toml")).unwrap();
    assert_eq!(
        p.aggregations[0].aggregation.function,
        AggFunction::ApproxCountDistinct
    );
}

const BASE: &str = r#"
name = "v"
windows = ["5m", "1h"]
[source]
name = "s"
entity = "user"
event-time = "ts"
event-id = "id"
columns = [
  { name = "id", type = "string" },
  { name = "user", type = "string" },
  { name = "amount", type = "decimal(10,2)", nullable = true },
  { name = "kind", type = "string" },
  { name = "flag", type = "bool", nullable = true },
  { name = "ts", type = "timestamp" },
]
[[aggregation]]
name = "total"
function = "sum"
input = "amount"
filter = "kind = 'buy'"
"#;

fn parse(text: &str) -> Result<FeatureView, SpecError> {
    FeatureView::parse(text, Path::new("views/v.toml"))
}

/// Applies a textual replacement to BASE and returns the error, checking the file name is in it.
fn invalid(from: &str, to: &str) -> SpecError {
    assert!(BASE.contains(from), "test bug: `{from}` not in BASE");
    let e = parse(&BASE.replacen(from, to, 1)).unwrap_err();
    assert!(e.to_string().starts_with("views/v.toml: "), "{e}");
    e
}

fn assert_invalid(from: &str, to: &str, field: &str, words: &str) {
    let e = invalid(from, to);
    assert_eq!(e.field(), Some(field), "{e}");
    assert!(
        e.to_string().contains(words),
        "`{e}` should contain `{words}`"
    );
}

#[test]
fn base_is_valid() {
    let v = parse(BASE).unwrap();
    assert_eq!(
        v.features()
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>(),
        ["total_5m", "total_1h"]
    );
}

#[test]
fn syntax_and_unknown_fields_point_at_the_line() {
    let e = invalid("name = \"v\"", "name = \"v\"\ncolour = \"red\"");
    assert!(matches!(e, SpecError::Syntax { .. }));
    assert!(e.to_string().contains("colour"), "{e}");
    assert!(e.to_string().contains("line 3"), "{e}");
    let e = invalid(
        "function = \"sum\"",
        "function = \"sum\"\nwindow = [\"5m\"]",
    );
    assert!(e.to_string().contains("unknown field `window`"), "{e}");
    let e = parse("name = ").unwrap_err();
    assert!(matches!(e, SpecError::Syntax { .. }));
}

#[test]
fn unknown_columns() {
    assert_invalid(
        "input = \"amount\"",
        "input = \"amout\"",
        "aggregation[0].input",
        "unknown column `amout`",
    );
    assert_invalid(
        "entity = \"user\"",
        "entity = \"usr\"",
        "source.entity",
        "unknown column `usr`",
    );
    assert_invalid(
        "event-time = \"ts\"",
        "event-time = \"time\"",
        "source.event-time",
        "unknown column",
    );
    assert_invalid(
        "event-id = \"id\"",
        "event-id = \"eid\"",
        "source.event-id",
        "unknown column",
    );
}

#[test]
fn key_columns_have_the_right_types() {
    assert_invalid(
        "event-time = \"ts\"",
        "event-time = \"id\"",
        "source.event-time",
        "must be a non-nullable timestamp",
    );
    assert_invalid(
        "entity = \"user\"",
        "entity = \"amount\"",
        "source.entity",
        "non-nullable string or int64",
    );
    assert_invalid(
        "event-id = \"id\"",
        "event-id = \"flag\"",
        "source.event-id",
        "non-nullable string",
    );
}

#[test]
fn bad_column_types() {
    assert_invalid(
        "\"decimal(10,2)\"",
        "\"decimal(40,2)\"",
        "source.columns[2].type",
        "precision",
    );
    assert_invalid(
        "type = \"bool\"",
        "type = \"boolean\"",
        "source.columns[4].type",
        "unknown type `boolean`",
    );
    assert_invalid(
        "{ name = \"kind\", type = \"string\" }",
        "{ name = \"user\", type = \"string\" }",
        "source.columns[3].name",
        "duplicate column `user`",
    );
}

#[test]
fn filter_that_does_not_parse() {
    assert_invalid(
        "kind = 'buy'",
        "kind = 'buy' AND",
        "aggregation[0].filter",
        "ends too early",
    );
    assert_invalid(
        "kind = 'buy'",
        "knd = 'buy'",
        "aggregation[0].filter",
        "unknown column `knd`",
    );
    assert_invalid(
        "kind = 'buy'",
        "amount = 'buy'",
        "aggregation[0].filter",
        "compared with string",
    );
}

#[test]
fn windows_must_fit_the_tile() {
    assert_invalid(
        "windows = [\"5m\", \"1h\"]",
        "windows = [\"5m\", \"7m\"]",
        "windows[1]",
        "not a multiple of the tile",
    );
    assert_invalid(
        "windows = [\"5m\", \"1h\"]",
        "windows = [\"5m\", \"5x\"]",
        "windows[1]",
        "unknown unit",
    );
    assert_invalid(
        "windows = [\"5m\", \"1h\"]",
        "windows = []",
        "windows",
        "empty",
    );
    assert_invalid(
        "windows = [\"5m\", \"1h\"]",
        "windows = [\"1h\", \"1h\"]",
        "windows[1]",
        "listed twice",
    );
    assert_invalid(
        "windows = [\"5m\", \"1h\"]",
        "windows = [\"0m\"]",
        "windows[0]",
        "longer than zero",
    );
    // A 10-minute tile cannot serve a window whose hop is 5 minutes.
    let text =
        format!("{BASE}\n[speed]\ntile = \"10m\"\n").replace("[\"5m\", \"1h\"]", "[\"20m\"]");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.field(), Some("windows[0]"), "{e}");
    assert!(e.to_string().contains("hops of 5m"), "{e}");
    let text = format!("{BASE}\n[speed]\ntile = \"7m\"\n");
    assert_eq!(parse(&text).unwrap_err().field(), Some("speed.tile"));
}

#[test]
fn aggregation_must_be_valid_for_the_column_type() {
    assert_invalid(
        "input = \"amount\"",
        "input = \"kind\"",
        "aggregation[0].function",
        "not valid for a string column",
    );
    assert_invalid(
        "function = \"sum\"",
        "function = \"median\"",
        "aggregation[0].function",
        "unknown function `median`",
    );
    assert_invalid(
        "input = \"amount\"\n",
        "\n",
        "aggregation[0].input",
        "needs an input column",
    );
}

#[test]
fn names_are_checked() {
    assert_invalid(
        "name = \"total\"",
        "name = \"Total\"",
        "aggregation[0].name",
        "lower_snake_case",
    );
    assert_invalid(
        "name = \"v\"",
        "name = \"my-view\"",
        "name",
        "lower_snake_case",
    );
    let dup = format!("{BASE}\n[[aggregation]]\nname = \"total\"\nfunction = \"count\"\n");
    assert_eq!(
        parse(&dup).unwrap_err().field(),
        Some("aggregation[1].name")
    );
    let clash = format!(
        "{BASE}\n[[aggregation]]\nname = \"total_5\"\nfunction = \"count\"\nwindows = [\"1h\"]\n"
    )
    .replace("name = \"total\"", "name = \"total_5\"\nwindows = [\"1h\"]");
    let e = parse(&clash).unwrap_err();
    assert!(
        e.to_string().contains("duplicate aggregation name") || e.to_string().contains("clashes"),
        "{e}"
    );
}

#[test]
fn batch_settings() {
    let text = format!("{BASE}\n[batch]\nhistory = \"hdfs://x\"\n");
    assert_eq!(parse(&text).unwrap_err().field(), Some("batch.history"));
    let text = format!("{BASE}\n[batch]\ncutoff-offset = \"25h\"\n");
    assert_eq!(
        parse(&text).unwrap_err().field(),
        Some("batch.cutoff-offset")
    );
}

#[test]
fn missing_file_names_the_file() {
    let e = FeatureView::load("/nonexistent/features.toml").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/features.toml"), "{e}");
}

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
