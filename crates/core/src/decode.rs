//! Event decoding: JSON objects (as they come off a stream) into typed rows and Arrow batches.
//!
//! * timestamps: RFC 3339 strings with any offset (normalized to UTC) or integer epoch milliseconds;
//! * decimals: JSON numbers or strings, parsed from their text without loss (never through f64);
//! * unknown keys are ignored (producers may add fields); a missing or `null` field is NULL, which
//!   is an error for a non-nullable column.
//!
//! A bad record yields a [`DecodeError`] naming the field and the reason; nothing panics and nothing
//! silently becomes a default value.

use std::fmt;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Decimal128Builder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, Field, Schema, SchemaRef};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::spec::{Column, Source};
use crate::types::{ColumnType, Value, parse_decimal};

/// Why one record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a JSON object at all.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// A required field is absent or null.
    #[error("field `{field}`: missing or null, but the column is not nullable")]
    Missing {
        /// The field.
        field: String,
    },
    /// A field's value does not fit its column type.
    #[error("field `{field}`: expected {expected}, got {got}")]
    WrongType {
        /// The field.
        field: String,
        /// The column type.
        expected: String,
        /// What was there (abbreviated).
        got: String,
    },
    /// A field's value has the right JSON type but an invalid value.
    #[error("field `{field}`: {reason}")]
    InvalidValue {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// The same key twice in one object.
    #[error("field `{field}`: appears twice in the object")]
    Duplicate {
        /// The field.
        field: String,
    },
}

impl DecodeError {
    /// A short, bounded label for metrics (never the record's content).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "json",
            DecodeError::Missing { .. } => "missing",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::InvalidValue { .. } => "invalid_value",
            DecodeError::Duplicate { .. } => "duplicate",
        }
    }
}

/// A decoded event: its values in schema order.
pub type Row = Vec<Value>;

/// Decodes JSON records for one source schema. Cheap to clone; holds no per-record state.
#[derive(Debug, Clone)]
pub struct EventDecoder {
    names: Vec<String>,
    types: Vec<ColumnType>,
    nullable: Vec<bool>,
}

impl EventDecoder {
    /// A decoder for `source`'s columns.
    pub fn new(source: &Source) -> Self {
        EventDecoder {
            names: source.columns.iter().map(|c| c.name.clone()).collect(),
            types: source.columns.iter().map(|c| c.ty).collect(),
            nullable: source.columns.iter().map(|c| c.nullable).collect(),
        }
    }

    /// Decodes one JSON object into `row` (cleared and refilled, so callers can reuse it).
    pub fn decode_into(&self, json: &[u8], row: &mut Row) -> Result<(), DecodeError> {
        // Reuse the row's string buffers: a decoded row of the same schema is overwritten in place.
        if row.len() != self.names.len() {
            row.clear();
            row.resize(self.names.len(), Value::Null);
        }
        let mut seen_buf = [false; 32];
        let mut seen_vec;
        let seen: &mut [bool] = if self.names.len() <= 32 {
            &mut seen_buf[..self.names.len()]
        } else {
            seen_vec = vec![false; self.names.len()];
            &mut seen_vec
        };
        let mut failure: Option<DecodeError> = None;
        let mut de = serde_json::Deserializer::from_slice(json);
        let result = RecordSeed {
            dec: self,
            row,
            seen,
            failure: &mut failure,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end());
        if let Some(f) = failure {
            return Err(f);
        }
        result.map_err(|e| DecodeError::Json(e.to_string()))?;
        for (i, v) in row.iter_mut().enumerate() {
            if !seen[i] {
                *v = Value::Null;
            }
            if v.is_null() && !self.nullable[i] {
                return Err(DecodeError::Missing {
                    field: self.names[i].clone(),
                });
            }
        }
        Ok(())
    }

    /// Decodes one JSON object into a new row.
    pub fn decode(&self, json: &[u8]) -> Result<Row, DecodeError> {
        let mut row = Vec::with_capacity(self.names.len());
        self.decode_into(json, &mut row)?;
        Ok(row)
    }

    fn column(&self, key: &str) -> Option<usize> {
        self.names.iter().position(|n| n == key)
    }
}

struct RecordSeed<'a> {
    dec: &'a EventDecoder,
    row: &'a mut Row,
    seen: &'a mut [bool],
    failure: &'a mut Option<DecodeError>,
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object (one event)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(KeySeed(self.dec))? {
            let Some(i) = key else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let field = &self.dec.names[i];
            if std::mem::replace(&mut self.seen[i], true) {
                *self.failure = Some(DecodeError::Duplicate {
                    field: field.clone(),
                });
                return Err(de::Error::custom("duplicate field"));
            }
            let ty = self.dec.types[i];
            let raw: &RawValue = map.next_value()?;
            match convert_into(raw.get(), ty, &mut self.row[i]) {
                Ok(()) => {}
                Err(e) => {
                    *self.failure = Some(e.into_error(field, ty));
                    return Err(de::Error::custom("bad field"));
                }
            }
        }
        Ok(())
    }
}

struct KeySeed<'a>(&'a EventDecoder);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.column(v))
    }
}

enum Bad {
    Type(String),
    Value(String),
}

impl Bad {
    fn into_error(self, field: &str, ty: ColumnType) -> DecodeError {
        match self {
            Bad::Type(got) => DecodeError::WrongType {
                field: field.to_string(),
                expected: expected_text(ty),
                got,
            },
            Bad::Value(reason) => DecodeError::InvalidValue {
                field: field.to_string(),
                reason,
            },
        }
    }
}

fn expected_text(ty: ColumnType) -> String {
    match ty {
        ColumnType::String => "a string".into(),
        ColumnType::Int64 => "an integer (int64)".into(),
        ColumnType::Float64 => "a number (float64)".into(),
        ColumnType::Decimal { .. } => format!("a {ty} as a JSON number or string"),
        ColumnType::Bool => "true or false".into(),
        ColumnType::Timestamp => "an RFC 3339 string or epoch milliseconds".into(),
    }
}

fn describe(raw: &str) -> String {
    let kind = match raw.as_bytes().first() {
        Some(b'"') => "string",
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b't' | b'f') => "bool",
        Some(b'n') => "null",
        _ => "number",
    };
    let shown: String = raw.chars().take(40).collect();
    let ell = if raw.chars().count() > 40 { "…" } else { "" };
    format!("{kind} {shown}{ell}")
}

/// Converts one raw JSON value into `slot`, reusing the slot's string buffer when it has one.
fn convert_into(raw: &str, ty: ColumnType, slot: &mut Value) -> Result<(), Bad> {
    if ty == ColumnType::String
        && raw.len() >= 2
        && raw.as_bytes()[0] == b'"'
        && !raw.contains('\\')
    {
        let text = &raw[1..raw.len() - 1];
        if let Value::Str(buf) = slot {
            buf.clear();
            buf.push_str(text);
        } else {
            *slot = Value::Str(text.to_string());
        }
        return Ok(());
    }
    *slot = convert(raw, ty)?;
    Ok(())
}

/// Converts one raw JSON value (already validated JSON) into a typed value.
fn convert(raw: &str, ty: ColumnType) -> Result<Value, Bad> {
    let b = raw.as_bytes();
    if raw == "null" {
        return Ok(Value::Null);
    }
    let is_str = b.first() == Some(&b'"');
    let is_num = matches!(b.first(), Some(b'-' | b'0'..=b'9'));
    let unquote = || -> Result<String, Bad> {
        if raw.contains('\\') {
            serde_json::from_str::<String>(raw).map_err(|e| Bad::Value(e.to_string()))
        } else {
            Ok(raw[1..raw.len() - 1].to_string())
        }
    };
    match ty {
        ColumnType::String if is_str => Ok(Value::Str(unquote()?)),
        ColumnType::Int64 if is_num => raw.parse::<i64>().map(Value::Int).map_err(|_| {
            if raw.contains(['.', 'e', 'E']) {
                Bad::Value(format!("`{raw}` is not an integer"))
            } else {
                Bad::Value(format!("`{raw}` is out of the int64 range"))
            }
        }),
        ColumnType::Float64 if is_num => raw
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| Bad::Value(format!("`{raw}` is not a float64"))),
        ColumnType::Decimal { precision, scale } if is_num || is_str => {
            let text = if is_str { unquote()? } else { raw.to_string() };
            parse_decimal(&text, precision, scale)
                .map(Value::Decimal)
                .map_err(|e| Bad::Value(e.to_string()))
        }
        ColumnType::Bool if raw == "true" => Ok(Value::Bool(true)),
        ColumnType::Bool if raw == "false" => Ok(Value::Bool(false)),
        ColumnType::Timestamp if is_str => crate::time::parse_rfc3339_ms(&unquote()?)
            .map(Value::Timestamp)
            .map_err(Bad::Value),
        ColumnType::Timestamp if is_num => raw.parse::<i64>().map(Value::Timestamp).map_err(|_| {
            Bad::Value(format!(
                "`{raw}` is not an integer number of epoch milliseconds"
            ))
        }),
        _ => Err(Bad::Type(describe(raw))),
    }
}

/// The Arrow schema of a source (timestamps as `Timestamp(ms, "UTC")`).
pub fn arrow_schema(source: &Source) -> SchemaRef {
    columns_schema(&source.columns)
}

/// The Arrow schema of typed columns, in order.
fn columns_schema(columns: &[Column]) -> SchemaRef {
    Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow_type(), c.nullable))
            .collect::<Vec<_>>(),
    ))
}

enum ColBuilder {
    Str(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Dec(Decimal128Builder),
    Bool(BooleanBuilder),
    Ts(TimestampMillisecondBuilder),
}

/// Accumulates decoded rows into an Arrow [`RecordBatch`].
pub struct BatchBuilder {
    schema: SchemaRef,
    cols: Vec<ColBuilder>,
    len: usize,
}

impl BatchBuilder {
    /// A builder for `source`'s schema.
    pub fn new(source: &Source) -> Self {
        Self::for_columns(&source.columns)
    }

    /// A builder for any list of typed columns (e.g. finalized features), in that order.
    pub fn for_columns(columns: &[Column]) -> Self {
        let schema = columns_schema(columns);
        let cols = columns
            .iter()
            .map(|c| match c.ty {
                ColumnType::String => ColBuilder::Str(StringBuilder::new()),
                ColumnType::Int64 => ColBuilder::Int(Int64Builder::new()),
                ColumnType::Float64 => ColBuilder::Float(Float64Builder::new()),
                ColumnType::Decimal { .. } => {
                    ColBuilder::Dec(Decimal128Builder::new().with_data_type(c.ty.arrow_type()))
                }
                ColumnType::Bool => ColBuilder::Bool(BooleanBuilder::new()),
                ColumnType::Timestamp => {
                    ColBuilder::Ts(TimestampMillisecondBuilder::new().with_timezone("UTC"))
                }
            })
            .collect();
        BatchBuilder {
            schema,
            cols,
            len: 0,
        }
    }

    /// Rows appended since the last [`BatchBuilder::finish`].
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no rows are buffered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a row decoded for the same source. Values of another type than the column's are
    /// appended as NULL (the decoder never produces them).
    pub fn push(&mut self, row: &[Value]) {
        for (b, v) in self.cols.iter_mut().zip(row) {
            match (b, v) {
                (ColBuilder::Str(b), Value::Str(s)) => b.append_value(s),
                (ColBuilder::Str(b), _) => b.append_null(),
                (ColBuilder::Int(b), Value::Int(i)) => b.append_value(*i),
                (ColBuilder::Int(b), _) => b.append_null(),
                (ColBuilder::Float(b), Value::Float(f)) => b.append_value(*f),
                (ColBuilder::Float(b), _) => b.append_null(),
                (ColBuilder::Dec(b), Value::Decimal(d)) => b.append_value(*d),
                (ColBuilder::Dec(b), _) => b.append_null(),
                (ColBuilder::Bool(b), Value::Bool(x)) => b.append_value(*x),
                (ColBuilder::Bool(b), _) => b.append_null(),
                (ColBuilder::Ts(b), Value::Timestamp(t)) => b.append_value(*t),
                (ColBuilder::Ts(b), _) => b.append_null(),
            }
        }
        self.len += 1;
    }

    /// The buffered rows as a batch; the builder is empty afterwards.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let arrays: Vec<ArrayRef> = self
            .cols
            .iter_mut()
            .map(|b| -> ArrayRef {
                match b {
                    ColBuilder::Str(b) => Arc::new(b.finish()),
                    ColBuilder::Int(b) => Arc::new(b.finish()),
                    ColBuilder::Float(b) => Arc::new(b.finish()),
                    ColBuilder::Dec(b) => Arc::new(b.finish()),
                    ColBuilder::Bool(b) => Arc::new(b.finish()),
                    ColBuilder::Ts(b) => Arc::new(b.finish()),
                }
            })
            .collect();
        self.len = 0;
        RecordBatch::try_new(self.schema.clone(), arrays)
    }
}

/// A record that failed to decode, kept for the dead-letter sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Position of the record in its input (line number from 1, or sequence).
    pub position: u64,
    /// The raw bytes, unchanged.
    pub raw: Vec<u8>,
    /// Why it failed.
    pub error: DecodeError,
}

/// Decodes JSON lines into one batch plus the records that failed (blank lines are skipped).
pub fn decode_lines(
    source: &Source,
    text: &[u8],
) -> Result<(RecordBatch, Vec<BadRecord>), ArrowError> {
    let dec = EventDecoder::new(source);
    let mut builder = BatchBuilder::new(source);
    let mut bad = Vec::new();
    let mut row = Vec::new();
    for (n, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match dec.decode_into(line, &mut row) {
            Ok(()) => builder.push(&row),
            Err(error) => bad.push(BadRecord {
                position: n as u64 + 1,
                raw: line.to_vec(),
                error,
            }),
        }
    }
    Ok((builder.finish()?, bad))
}

/// Reads row `i` of an Arrow array as a typed [`Value`] (the inverse of [`BatchBuilder`]).
///
/// Accepts the representations engines produce for our column types: Utf8, LargeUtf8 and
/// Utf8View strings; Int64; Float64; Decimal128 (unscaled, at the array's own scale); Boolean;
/// Timestamp in milliseconds (other units are converted, truncating toward −∞).
pub fn value_at(array: &dyn arrow_array::Array, i: usize) -> Result<Value, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    use arrow_schema::{DataType as D, TimeUnit};
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match array.data_type() {
        D::Utf8 => Value::Str(array.as_string::<i32>().value(i).to_string()),
        D::LargeUtf8 => Value::Str(array.as_string::<i64>().value(i).to_string()),
        D::Utf8View => Value::Str(array.as_string_view().value(i).to_string()),
        D::Int64 => Value::Int(array.as_primitive::<Int64Type>().value(i)),
        D::Float64 => Value::Float(array.as_primitive::<Float64Type>().value(i)),
        D::Decimal128(_, _) => Value::Decimal(array.as_primitive::<Decimal128Type>().value(i)),
        D::Boolean => Value::Bool(array.as_boolean().value(i)),
        D::Timestamp(unit, _) => Value::Timestamp(match unit {
            TimeUnit::Second => array.as_primitive::<TimestampSecondType>().value(i) * 1000,
            TimeUnit::Millisecond => array.as_primitive::<TimestampMillisecondType>().value(i),
            TimeUnit::Microsecond => array
                .as_primitive::<TimestampMicrosecondType>()
                .value(i)
                .div_euclid(1000),
            TimeUnit::Nanosecond => array
                .as_primitive::<TimestampNanosecondType>()
                .value(i)
                .div_euclid(1_000_000),
        }),
        other => return Err(format!("unsupported Arrow type {other}")),
    })
}
