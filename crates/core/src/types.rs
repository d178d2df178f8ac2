//! Column types, typed values and exact decimal arithmetic.
//!
//! Every value that flows through the pipeline is one of the [`ColumnType`]s below. Decimals are
//! kept as a scaled `i128` (the same representation as Arrow's `Decimal128`), so sums over money are
//! exact and never pass through `f64`.

use std::cmp::Ordering;
use std::fmt;

use arrow_schema::{DataType, TimeUnit};

/// The largest precision of a `decimal(p, s)` column (Arrow's `Decimal128`).
pub const MAX_DECIMAL_PRECISION: u8 = 38;

/// The type of a source column, as written in a feature definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// UTF-8 text.
    String,
    /// 64-bit signed integer.
    Int64,
    /// 64-bit IEEE float.
    Float64,
    /// Exact decimal with `precision` digits, `scale` of them after the point.
    Decimal {
        /// Total number of digits (1..=38).
        precision: u8,
        /// Digits after the decimal point (0..=precision).
        scale: u8,
    },
    /// true / false.
    Bool,
    /// An instant in UTC, millisecond precision.
    Timestamp,
}

impl ColumnType {
    /// Parses a type name as written in a feature definition: `string`, `int64`, `float64`,
    /// `decimal(p,s)`, `bool`, `timestamp`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase();
        let simple = match t.as_str() {
            "string" => Some(ColumnType::String),
            "int64" => Some(ColumnType::Int64),
            "float64" => Some(ColumnType::Float64),
            "bool" => Some(ColumnType::Bool),
            "timestamp" => Some(ColumnType::Timestamp),
            _ => None,
        };
        if let Some(s) = simple {
            return Ok(s);
        }
        let inner = t
            .strip_prefix("decimal(")
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| {
                format!(
                    "unknown type `{text}` (expected string, int64, float64, decimal(p,s), bool or timestamp)"
                )
            })?;
        let (p, s) = inner.split_once(',').ok_or_else(|| {
            format!("`{text}`: decimal needs a precision and a scale, e.g. decimal(10,2)")
        })?;
        let precision: u8 = p
            .trim()
            .parse()
            .map_err(|_| format!("`{text}`: precision `{}` is not a number", p.trim()))?;
        let scale: u8 = s
            .trim()
            .parse()
            .map_err(|_| format!("`{text}`: scale `{}` is not a number", s.trim()))?;
        if precision == 0 || precision > MAX_DECIMAL_PRECISION {
            return Err(format!("`{text}`: precision must be between 1 and 38"));
        }
        if scale > precision {
            return Err(format!("`{text}`: scale must not exceed the precision"));
        }
        Ok(ColumnType::Decimal { precision, scale })
    }

    /// The Arrow data type this column is stored as.
    pub fn arrow_type(&self) -> DataType {
        match self {
            ColumnType::String => DataType::Utf8,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Decimal { precision, scale } => {
                DataType::Decimal128(*precision, *scale as i8)
            }
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Timestamp => timestamp_type(),
        }
    }

    /// The SQL type name (DataFusion dialect).
    pub fn sql_type(&self) -> String {
        match self {
            ColumnType::String => "VARCHAR".into(),
            ColumnType::Int64 => "BIGINT".into(),
            ColumnType::Float64 => "DOUBLE".into(),
            ColumnType::Decimal { precision, scale } => format!("DECIMAL({precision}, {scale})"),
            ColumnType::Bool => "BOOLEAN".into(),
            ColumnType::Timestamp => "TIMESTAMP".into(),
        }
    }

    /// True for int64, float64 and decimal.
    pub fn is_numeric(&self) -> bool {
        matches!(
            self,
            ColumnType::Int64 | ColumnType::Float64 | ColumnType::Decimal { .. }
        )
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::String => f.write_str("string"),
            ColumnType::Int64 => f.write_str("int64"),
            ColumnType::Float64 => f.write_str("float64"),
            ColumnType::Decimal { precision, scale } => write!(f, "decimal({precision},{scale})"),
            ColumnType::Bool => f.write_str("bool"),
            ColumnType::Timestamp => f.write_str("timestamp"),
        }
    }
}

/// The Arrow type of every timestamp in the pipeline: milliseconds, UTC.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// A typed scalar, the unit every aggregation consumes and produces.
///
/// Decimals carry their unscaled value; the scale comes from the column type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A string.
    Str(String),
    /// An int64.
    Int(i64),
    /// A float64.
    Float(f64),
    /// A decimal's unscaled value (`12.34` at scale 2 is `1234`).
    Decimal(i128),
    /// A bool.
    Bool(bool),
    /// Milliseconds since the Unix epoch, UTC.
    Timestamp(i64),
}

impl Value {
    /// True for [`Value::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The value as f64 for floating-point aggregations (variance, stddev, float avg).
    /// `scale` is the decimal scale of the column (ignored for other types).
    pub fn as_f64(&self, scale: u8) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Decimal(d) => Some(decimal_to_f64(*d, scale)),
            _ => None,
        }
    }

    /// Total order used by min / max: NULL is never compared (callers skip it); floats use IEEE
    /// total order, so NaN sorts above +inf (as in DataFusion and Arrow).
    pub fn total_cmp(&self, other: &Value) -> Ordering {
        match (self, other) {
            (Value::Str(a), Value::Str(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::Decimal(a), Value::Decimal(b)) => a.cmp(b),
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Timestamp(a), Value::Timestamp(b)) => a.cmp(b),
            (a, b) => discriminant(a).cmp(&discriminant(b)),
        }
    }
}

fn discriminant(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Str(_) => 1,
        Value::Int(_) => 2,
        Value::Float(_) => 3,
        Value::Decimal(_) => 4,
        Value::Bool(_) => 5,
        Value::Timestamp(_) => 6,
    }
}

/// `10^exp` as i128 (exp ≤ 38).
pub fn pow10(exp: u8) -> i128 {
    10i128.pow(exp as u32)
}

/// The largest unscaled value that fits `precision` digits.
pub fn max_unscaled(precision: u8) -> i128 {
    pow10(precision) - 1
}

/// Converts an unscaled decimal to f64 (the same conversion Arrow's cast performs).
pub fn decimal_to_f64(unscaled: i128, scale: u8) -> f64 {
    unscaled as f64 / 10f64.powi(scale as i32)
}

/// Why a decimal literal could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalParseError {
    /// Not a decimal number at all.
    #[error("`{0}` is not a decimal number")]
    Syntax(String),
    /// More digits after the point than the scale allows (we never round silently).
    #[error("`{text}` has more than {scale} digits after the decimal point")]
    TooManyFractionDigits {
        /// The input.
        text: String,
        /// The column's scale.
        scale: u8,
    },
    /// Does not fit the precision.
    #[error("`{text}` does not fit decimal({precision},{scale})")]
    Overflow {
        /// The input.
        text: String,
        /// The column's precision.
        precision: u8,
        /// The column's scale.
        scale: u8,
    },
}

/// Parses decimal text (`-12.5`, `3`, `1e2`, `0.10`) exactly into an unscaled i128 at `scale`.
///
/// Trailing zeros beyond the scale are accepted (`1.230` at scale 2); other extra fraction digits
/// are an error rather than a silent rounding.
pub fn parse_decimal(text: &str, precision: u8, scale: u8) -> Result<i128, DecimalParseError> {
    let syntax = || DecimalParseError::Syntax(text.to_string());
    let s = text.trim();
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], s[i + 1..].parse::<i32>().map_err(|_| syntax())?),
        None => (s, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((a, b)) => (a, b),
        None => (mantissa, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(syntax());
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(syntax());
    }
    // digits * 10^(exp - frac_len) is the number; we need it * 10^scale.
    let shift = exp as i64 - frac_part.len() as i64 + scale as i64;
    let total = int_part.len() + frac_part.len();
    let digits = || int_part.bytes().chain(frac_part.bytes());
    let overflow = || DecimalParseError::Overflow {
        text: text.to_string(),
        precision,
        scale,
    };
    // Digits beyond `keep` would land below the scale: they must all be zero (no silent rounding).
    let keep = if shift >= 0 {
        total
    } else {
        total.saturating_sub((-shift) as usize)
    };
    if digits().skip(keep).any(|d| d != b'0') {
        return Err(DecimalParseError::TooManyFractionDigits {
            text: text.to_string(),
            scale,
        });
    }
    let mut acc: i128 = 0;
    for d in digits().take(keep) {
        acc = acc
            .checked_mul(10)
            .and_then(|a| a.checked_add((d - b'0') as i128))
            .ok_or_else(overflow)?;
    }
    if shift > 0 {
        if shift > 38 && acc != 0 {
            return Err(overflow());
        }
        if acc != 0 {
            acc = acc.checked_mul(pow10(shift as u8)).ok_or_else(overflow)?;
        }
    }
    if acc > max_unscaled(precision) {
        return Err(overflow());
    }
    Ok(if neg { -acc } else { acc })
}

/// Formats an unscaled decimal at `scale` (`1234`, 2 → `12.34`).
pub fn format_decimal(unscaled: i128, scale: u8) -> String {
    let neg = unscaled < 0;
    let digits = unscaled.unsigned_abs().to_string();
    let scale = scale as usize;
    let body = if scale == 0 {
        digits
    } else if digits.len() > scale {
        format!(
            "{}.{}",
            &digits[..digits.len() - scale],
            &digits[digits.len() - scale..]
        )
    } else {
        format!("0.{}{}", "0".repeat(scale - digits.len()), digits)
    };
    if neg { format!("-{body}") } else { body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_types() {
        assert_eq!(ColumnType::parse("int64"), Ok(ColumnType::Int64));
        assert_eq!(
            ColumnType::parse("Decimal(10, 2)"),
            Ok(ColumnType::Decimal {
                precision: 10,
                scale: 2
            })
        );
        assert!(
            ColumnType::parse("decimal(39,2)")
                .unwrap_err()
                .contains("precision")
        );
        assert!(
            ColumnType::parse("decimal(4,5)")
                .unwrap_err()
                .contains("scale")
        );
        assert!(
            ColumnType::parse("varchar")
                .unwrap_err()
                .contains("unknown type")
        );
    }

    #[test]
    fn decimal_text_round_trips_exactly() {
        assert_eq!(parse_decimal("12.34", 10, 2), Ok(1234));
        assert_eq!(parse_decimal("-0.05", 10, 2), Ok(-5));
        assert_eq!(parse_decimal("7", 10, 2), Ok(700));
        assert_eq!(parse_decimal("1.230", 10, 2), Ok(123));
        assert_eq!(parse_decimal("1.5e2", 10, 2), Ok(15000));
        assert_eq!(parse_decimal("125e-2", 10, 2), Ok(125));
        assert!(matches!(
            parse_decimal("1.234", 10, 2),
            Err(DecimalParseError::TooManyFractionDigits { .. })
        ));
        assert!(matches!(
            parse_decimal("123456789", 10, 2),
            Err(DecimalParseError::Overflow { .. })
        ));
        assert!(matches!(
            parse_decimal("1.2.3", 10, 2),
            Err(DecimalParseError::Syntax(_))
        ));
        assert!(matches!(
            parse_decimal("", 10, 2),
            Err(DecimalParseError::Syntax(_))
        ));
        assert_eq!(format_decimal(1234, 2), "12.34");
        assert_eq!(format_decimal(-5, 2), "-0.05");
        assert_eq!(format_decimal(7, 0), "7");
    }
}
