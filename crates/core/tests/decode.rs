//! One test per decoding error, plus the happy paths (offsets, epoch millis, exact decimals).

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, TimestampMillisecondType};
use lambda_core::decode::{BatchBuilder, DecodeError, EventDecoder, decode_lines};
use lambda_core::{FeatureView, Value};

fn view() -> FeatureView {
    FeatureView::load(Path::new(&manifest_dir()).join("../../examples/fraud/features.toml"))
        .unwrap()
}

const GOOD: &str = r#"{"event_id":"e1","user_id":"u1","merchant_id":null,"product_id":"p9","event_type":"purchase","amount":"12.34","card_present":true,"ts":"2024-03-01T10:00:00.5+02:00","extra":{"ignored":[1,2]}}"#;

fn decode(json: &str) -> Result<Vec<Value>, DecodeError> {
    EventDecoder::new(&view().source).decode(json.as_bytes())
}

#[test]
fn decodes_a_good_event() {
    let row = decode(GOOD).unwrap();
    assert_eq!(row[0], Value::Str("e1".into()));
    assert_eq!(row[2], Value::Null);
    assert_eq!(row[5], Value::Decimal(1234));
    assert_eq!(row[6], Value::Bool(true));
    // 10:00:00.5+02:00 == 08:00:00.500Z
    assert_eq!(
        row[7],
        Value::Timestamp(lambda_core::time::parse_rfc3339_ms("2024-03-01T08:00:00.500Z").unwrap())
    );
}

#[test]
fn decimals_from_numbers_are_exact_and_epoch_millis_work() {
    let json = GOOD
        .replace("\"12.34\"", "0.1")
        .replace("\"2024-03-01T10:00:00.5+02:00\"", "1700000000123");
    let row = decode(&json).unwrap();
    assert_eq!(row[5], Value::Decimal(10));
    assert_eq!(row[7], Value::Timestamp(1_700_000_000_123));
    // A number f64 cannot represent exactly still decodes exactly.
    let json = GOOD.replace("\"12.34\"", "99999999.99");
    assert_eq!(decode(&json).unwrap()[5], Value::Decimal(9_999_999_999));
    let json = GOOD.replace("\"e1\"", "\"e\\u00e9\\n\"");
    assert_eq!(decode(&json).unwrap()[0], Value::Str("eé\n".into()));
}

fn err(from: &str, to: &str) -> DecodeError {
    assert!(GOOD.contains(from), "test bug: {from}");
    decode(&GOOD.replacen(from, to, 1)).unwrap_err()
}

#[test]
fn invalid_json() {
    assert!(matches!(
        decode("{\"event_id\": "),
        Err(DecodeError::Json(_))
    ));
    assert!(matches!(decode("not json"), Err(DecodeError::Json(_))));
    assert!(matches!(decode("[1,2]"), Err(DecodeError::Json(_))));
    assert!(matches!(
        decode(&format!("{GOOD} trailing")),
        Err(DecodeError::Json(_))
    ));
}

#[test]
fn missing_required_field() {
    let e = err("\"user_id\":\"u1\",", "");
    assert_eq!(
        e,
        DecodeError::Missing {
            field: "user_id".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "field `user_id`: missing or null, but the column is not nullable"
    );
    let e = err("\"user_id\":\"u1\"", "\"user_id\":null");
    assert_eq!(
        e,
        DecodeError::Missing {
            field: "user_id".into()
        }
    );
}

#[test]
fn wrong_types_name_the_field() {
    let e = err("\"user_id\":\"u1\"", "\"user_id\":17");
    assert_eq!(
        e.to_string(),
        "field `user_id`: expected a string, got number 17"
    );
    let e = err("\"amount\":\"12.34\"", "\"amount\":true");
    assert!(
        matches!(&e, DecodeError::WrongType { field, .. } if field == "amount"),
        "{e}"
    );
    let e = err("\"card_present\":true", "\"card_present\":\"yes\"");
    assert!(e.to_string().contains("expected true or false"), "{e}");
    let e = err("\"ts\":\"2024-03-01T10:00:00.5+02:00\"", "\"ts\":[1]");
    assert!(
        matches!(&e, DecodeError::WrongType { field, .. } if field == "ts"),
        "{e}"
    );
}

#[test]
fn invalid_values_name_the_field_and_reason() {
    let e = err("\"12.34\"", "\"12.345\"");
    assert_eq!(
        e.to_string(),
        "field `amount`: `12.345` has more than 2 digits after the decimal point"
    );
    let e = err("\"12.34\"", "\"abc\"");
    assert!(
        e.to_string().contains("`abc` is not a decimal number"),
        "{e}"
    );
    let e = err("\"12.34\"", "123456789012");
    assert!(e.to_string().contains("does not fit decimal(10,2)"), "{e}");
    let e = err("\"2024-03-01T10:00:00.5+02:00\"", "\"yesterday\"");
    assert!(
        matches!(&e, DecodeError::InvalidValue { field, .. } if field == "ts"),
        "{e}"
    );
    let e = err("\"2024-03-01T10:00:00.5+02:00\"", "1.5e3");
    assert!(e.to_string().contains("epoch milliseconds"), "{e}");
}

#[test]
fn duplicate_keys_are_rejected() {
    let e = err(
        "\"user_id\":\"u1\"",
        "\"user_id\":\"u1\",\"user_id\":\"u2\"",
    );
    assert_eq!(
        e,
        DecodeError::Duplicate {
            field: "user_id".into()
        }
    );
}

#[test]
fn lines_become_a_batch_and_bad_lines_are_kept() {
    let v = view();
    let text = format!("{GOOD}\n\n{{broken\n{}\n", GOOD.replace("\"e1\"", "\"e2\""));
    let (batch, bad) = decode_lines(&v.source, text.as_bytes()).unwrap();
    assert_eq!(batch.num_rows(), 2);
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].position, 3);
    assert_eq!(bad[0].raw, b"{broken");
    let amounts = batch.column(5).as_primitive::<Decimal128Type>();
    assert_eq!(amounts.value(0), 1234);
    assert_eq!(
        batch.schema().field(5).data_type().to_string(),
        "Decimal128(10, 2)"
    );
    let ts = batch.column(7).as_primitive::<TimestampMillisecondType>();
    assert_eq!(ts.timezone(), Some("UTC"));
    assert!(batch.column(2).is_null(0));
    let mut b = BatchBuilder::new(&v.source);
    assert!(b.is_empty());
    b.push(&decode(GOOD).unwrap());
    assert_eq!(b.finish().unwrap().num_rows(), 1);
}

/// A builder over arbitrary typed columns (the batch job's features file): the columns' names,
/// types and nullability make the schema, and a value of another type than its column's is NULL.
#[test]
fn a_builder_for_typed_columns_keeps_their_names_and_types() {
    use lambda_core::ColumnType;
    use lambda_core::spec::Column;
    let col = |name: &str, ty: ColumnType| Column {
        name: name.into(),
        ty,
        nullable: true,
    };
    let columns = [
        col("n_5m", ColumnType::Int64),
        col(
            "sum_5m",
            ColumnType::Decimal {
                precision: 20,
                scale: 2,
            },
        ),
        col("sd_5m", ColumnType::Float64),
    ];
    let mut b = BatchBuilder::for_columns(&columns);
    b.push(&[Value::Int(3), Value::Decimal(1234), Value::Float(0.5)]);
    b.push(&[
        Value::Null,
        Value::Str("not a decimal".into()),
        Value::Float(1.5),
    ]);
    let batch = b.finish().unwrap();
    let schema = batch.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["n_5m", "sum_5m", "sd_5m"]);
    assert_eq!(schema.field(1).data_type().to_string(), "Decimal128(20, 2)");
    assert_eq!(batch.num_rows(), 2);
    assert_eq!(
        batch.column(1).as_primitive::<Decimal128Type>().value(0),
        1234
    );
    assert!(batch.column(0).is_null(1));
    assert!(batch.column(1).is_null(1));
    assert_eq!(
        batch
            .column(2)
            .as_primitive::<arrow_array::types::Float64Type>()
            .value(1),
        1.5
    );
}

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
