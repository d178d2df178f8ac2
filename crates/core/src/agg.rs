//! Mergeable aggregation states: the one implementation of every aggregation function.
//!
//! An [`Aggregation`] (from the feature definition) creates empty [`AggState`]s, updates them with
//! rows, merges two of them, finalizes one into the feature value, and encodes it into compact,
//! versioned bytes. The speed layer keeps one state per (entity, tile); the batch layer keeps one
//! per (entity, day); serving merges them. Every merge is associative and commutative, the empty
//! state is its identity, and merging the states of any split of the events equals aggregating all
//! of them (exactly for integers and decimals; within floating-point rounding for floats).
//!
//! # Output types (decided once; the generated SQL casts to exactly these)
//!
//! | function | input | output | empty / all NULL |
//! |---|---|---|---|
//! | `count` | none (rows) or any column (non-NULL values) | int64 | 0 |
//! | `sum` | int64 / float64 / decimal(p,s) | int64 / float64 / decimal(min(38,p+10), s) | NULL |
//! | `avg` | int64 / float64 / decimal(p,s) | float64 / float64 / decimal(min(38,p+4), min(38,s+4)), truncated toward zero | NULL |
//! | `min`, `max` | any | the input type | NULL |
//! | `var_samp`, `stddev_samp` | numeric | float64 | NULL below 2 values |
//! | `var_pop`, `stddev_pop` | numeric | float64 | NULL below 1 value |
//! | `count_distinct` | any | int64 (NULL not counted) | 0 |
//! | `approx_count_distinct` | any | int64 (HyperLogLog p=12, ≈1.6 % error) | 0 |
//! | `last_value` | any | the input type: the non-NULL value with the greatest (event time, event id) | NULL |
//!
//! Decimal sums and averages are exact integer arithmetic on the unscaled values (`avg` divides
//! with truncation toward zero, as DataFusion does). Float inputs to variance use Welford's update
//! and Chan's merge; decimals convert to f64 as Arrow's cast does (`unscaled / 10^scale`).
//! Overflow (an int64 sum beyond i64, a decimal beyond its output precision) is an error, never a
//! wrapped value.

use std::collections::HashSet;
use std::fmt;

use crate::codec::{CodecError, Reader, Writer};
use crate::filter::Filter;
use crate::hll::Hll;
use crate::types::{ColumnType, MAX_DECIMAL_PRECISION, Value, max_unscaled, pow10};

/// The version byte every encoded state starts with.
pub const STATE_FORMAT_VERSION: u8 = 1;

/// An aggregation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AggFunction {
    /// Number of rows (no input) or of non-NULL input values.
    Count,
    /// Sum.
    Sum,
    /// Arithmetic mean.
    Avg,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Sample variance.
    VarSamp,
    /// Population variance.
    VarPop,
    /// Sample standard deviation.
    StddevSamp,
    /// Population standard deviation.
    StddevPop,
    /// Exact number of distinct non-NULL values.
    CountDistinct,
    /// Approximate number of distinct non-NULL values (HyperLogLog).
    ApproxCountDistinct,
    /// The latest non-NULL value by event time (ties broken by event id).
    LastValue,
}

impl AggFunction {
    /// Every function, in documentation order.
    pub const ALL: [AggFunction; 12] = [
        AggFunction::Count,
        AggFunction::Sum,
        AggFunction::Avg,
        AggFunction::Min,
        AggFunction::Max,
        AggFunction::VarSamp,
        AggFunction::VarPop,
        AggFunction::StddevSamp,
        AggFunction::StddevPop,
        AggFunction::CountDistinct,
        AggFunction::ApproxCountDistinct,
        AggFunction::LastValue,
    ];

    /// The name used in feature definitions.
    pub fn name(self) -> &'static str {
        match self {
            AggFunction::Count => "count",
            AggFunction::Sum => "sum",
            AggFunction::Avg => "avg",
            AggFunction::Min => "min",
            AggFunction::Max => "max",
            AggFunction::VarSamp => "var_samp",
            AggFunction::VarPop => "var_pop",
            AggFunction::StddevSamp => "stddev_samp",
            AggFunction::StddevPop => "stddev_pop",
            AggFunction::CountDistinct => "count_distinct",
            AggFunction::ApproxCountDistinct => "approx_count_distinct",
            AggFunction::LastValue => "last_value",
        }
    }

    /// Parses a function name.
    pub fn parse(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown function `{name}` (expected one of: {})",
                    Self::ALL.map(|f| f.name()).join(", ")
                )
            })
    }

    /// The output type for an input column type (`None` = no input column), or why the
    /// combination is invalid.
    pub fn output_type(self, input: Option<ColumnType>) -> Result<ColumnType, String> {
        use AggFunction::*;
        let Some(ty) = input else {
            return match self {
                Count => Ok(ColumnType::Int64),
                f => Err(format!("`{}` needs an input column", f.name())),
            };
        };
        let numeric_only = || {
            Err(format!(
                "`{}` is not valid for a {ty} column (it needs int64, float64 or decimal)",
                self.name()
            ))
        };
        match self {
            Count | CountDistinct | ApproxCountDistinct => Ok(ColumnType::Int64),
            Min | Max | LastValue => Ok(ty),
            Sum => match ty {
                ColumnType::Int64 | ColumnType::Float64 => Ok(ty),
                ColumnType::Decimal { precision, scale } => Ok(ColumnType::Decimal {
                    precision: (precision + 10).min(MAX_DECIMAL_PRECISION),
                    scale,
                }),
                _ => numeric_only(),
            },
            Avg => match ty {
                ColumnType::Int64 | ColumnType::Float64 => Ok(ColumnType::Float64),
                ColumnType::Decimal { precision, scale } => Ok(ColumnType::Decimal {
                    precision: (precision + 4).min(MAX_DECIMAL_PRECISION),
                    scale: (scale + 4).min(MAX_DECIMAL_PRECISION),
                }),
                _ => numeric_only(),
            },
            VarSamp | VarPop | StddevSamp | StddevPop => {
                if ty.is_numeric() {
                    Ok(ColumnType::Float64)
                } else {
                    numeric_only()
                }
            }
        }
    }
}

impl fmt::Display for AggFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors while finalizing or decoding a state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggError {
    /// The result does not fit the output type.
    #[error("aggregation `{aggregation}` overflows its output type {output}")]
    Overflow {
        /// The aggregation's name.
        aggregation: String,
        /// Its output type.
        output: ColumnType,
    },
    /// Stored bytes could not be read.
    #[error("aggregation `{aggregation}`: {source}")]
    Codec {
        /// The aggregation's name.
        aggregation: String,
        /// What was wrong.
        #[source]
        source: CodecError,
    },
}

/// A canonical, hashable form of a non-NULL value for distinct counting.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DistinctKey {
    /// Int64, decimal (unscaled), timestamp, and float64 (canonical bits).
    Num(i128),
    /// Strings.
    Str(Box<str>),
    /// Bools.
    Bool(bool),
}

impl DistinctKey {
    /// The key of a non-NULL value (`None` for NULL). Floats: `-0.0` equals `0.0`, all NaNs are one.
    pub fn of(v: &Value) -> Option<DistinctKey> {
        Some(match v {
            Value::Null => return None,
            Value::Str(s) => DistinctKey::Str(s.as_str().into()),
            Value::Int(i) | Value::Timestamp(i) => DistinctKey::Num(*i as i128),
            Value::Decimal(d) => DistinctKey::Num(*d),
            Value::Bool(b) => DistinctKey::Bool(*b),
            Value::Float(f) => DistinctKey::Num(canonical_float_bits(*f) as i128),
        })
    }

    /// Stable 64-bit hash (XXH3) of the canonical bytes, for HyperLogLog.
    pub fn hash64(v: &Value) -> Option<u64> {
        use xxhash_rust::xxh3::xxh3_64;
        Some(match v {
            Value::Null => return None,
            Value::Str(s) => xxh3_64(s.as_bytes()),
            Value::Int(i) | Value::Timestamp(i) => xxh3_64(&(*i as i128).to_le_bytes()),
            Value::Decimal(d) => xxh3_64(&d.to_le_bytes()),
            Value::Bool(b) => xxh3_64(&[*b as u8]),
            Value::Float(f) => xxh3_64(&(canonical_float_bits(*f) as i128).to_le_bytes()),
        })
    }
}

/// The hasher of distinct sets: foldhash (fast, seeded per process, so not open to chosen
/// collisions the way an unseeded hash is).
pub type FastHash = foldhash::fast::RandomState;

/// The exact set of distinct non-NULL values of `count_distinct`, split by kind so that a string
/// already present is found without allocating.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DistinctSet {
    /// Int64, decimal (unscaled), timestamp, and float64 (canonical bits) values.
    pub nums: HashSet<i128, FastHash>,
    /// String values.
    pub strs: HashSet<Box<str>, FastHash>,
    /// Whether `false` / `true` were seen.
    pub bools: [bool; 2],
}

impl DistinctSet {
    /// Adds a value (NULL is ignored).
    #[inline]
    pub fn insert(&mut self, v: &Value) {
        match v {
            Value::Null => {}
            Value::Str(s) => self.insert_str(s),
            Value::Bool(b) => self.bools[*b as usize] = true,
            other => {
                if let Some(DistinctKey::Num(n)) = DistinctKey::of(other) {
                    self.nums.insert(n);
                }
            }
        }
    }
    /// Adds a string, allocating only when it is new.
    #[inline]
    pub fn insert_str(&mut self, s: &str) {
        if !self.strs.contains(s) {
            self.strs.insert(s.into());
        }
    }
    /// Union with `other`.
    pub fn merge(&mut self, other: &DistinctSet) {
        self.nums.extend(other.nums.iter().copied());
        for s in &other.strs {
            if !self.strs.contains(s) {
                self.strs.insert(s.clone());
            }
        }
        self.bools[0] |= other.bools[0];
        self.bools[1] |= other.bools[1];
    }
    /// Number of distinct values.
    pub fn len(&self) -> usize {
        self.nums.len() + self.strs.len() + self.bools.iter().filter(|b| **b).count()
    }
    /// True when no value was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn canonical_float_bits(f: f64) -> i64 {
    if f.is_nan() {
        f64::NAN.to_bits() as i64
    } else if f == 0.0 {
        0
    } else {
        f.to_bits() as i64
    }
}

/// The largest decimal precision whose variance family is computed exactly
/// ([`AggState::ExactMoments`]): squares of 12-digit values stay below 10^24, so 128 bits hold the
/// sum of squares of 10^14 values. Wider decimals, integers and floats use floating-point moments.
pub const EXACT_MOMENTS_DIGITS: u8 = 12;

/// The mergeable state of one aggregation over some set of events.
#[derive(Debug, Clone, PartialEq)]
pub enum AggState {
    /// `count`.
    Count(u64),
    /// Integer sum / avg: exact i128 sum and number of values.
    SumInt {
        /// Exact sum.
        sum: i128,
        /// Values summed.
        n: u64,
    },
    /// Float sum / avg.
    SumFloat {
        /// Sum.
        sum: f64,
        /// Values summed.
        n: u64,
    },
    /// Decimal sum / avg: exact unscaled sum at the input scale.
    SumDecimal {
        /// Exact unscaled sum.
        sum: i128,
        /// Values summed.
        n: u64,
    },
    /// `min` / `max`: the extreme so far.
    Extreme(Option<Value>),
    /// Variance family: count, mean and sum of squared deviations (Welford / Chan).
    Moments {
        /// Values seen.
        n: u64,
        /// Running mean.
        mean: f64,
        /// Sum of squared deviations from the mean.
        m2: f64,
    },
    /// Variance family over decimals of at most [`EXACT_MOMENTS_DIGITS`] digits: count, sum and
    /// sum of squares of the unscaled values, exact, so states merge exactly in any order (the
    /// batch and speed paths agree bit for bit).
    ExactMoments {
        /// Values seen.
        n: u64,
        /// Sum of the unscaled values.
        sum: i128,
        /// Sum of their squares.
        sumsq: u128,
    },
    /// Exact distinct set (boxed, like `Last`: the common states stay 48 bytes, and the batch
    /// job's DataFusion groups hold one state per group and aggregation).
    Distinct(Box<DistinctSet>),
    /// Approximate distinct sketch.
    Sketch(Hll),
    /// `last_value`: (event time, event id, value) of the latest non-NULL value.
    Last(Option<Box<(i64, String, Value)>>),
}

/// One validated aggregation of a feature view: what to compute over which column, for which rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregation {
    /// Name (feature names are `<name>_<window>`).
    pub name: String,
    /// The function.
    pub function: AggFunction,
    /// Index of the input column in the source schema (`None` for `count` of rows).
    pub input: Option<usize>,
    /// The input column's type.
    pub input_type: Option<ColumnType>,
    /// The output type (see the module docs).
    pub output_type: ColumnType,
    /// Optional row filter.
    pub filter: Option<Filter>,
}

impl Aggregation {
    /// The empty state: the identity of [`Aggregation::merge`].
    pub fn empty(&self) -> AggState {
        use AggFunction::*;
        match self.function {
            Count => AggState::Count(0),
            Sum | Avg => match self.input_type {
                Some(ColumnType::Float64) => AggState::SumFloat { sum: 0.0, n: 0 },
                Some(ColumnType::Decimal { .. }) => AggState::SumDecimal { sum: 0, n: 0 },
                _ => AggState::SumInt { sum: 0, n: 0 },
            },
            Min | Max => AggState::Extreme(None),
            VarSamp | VarPop | StddevSamp | StddevPop if self.exact_moments() => {
                AggState::ExactMoments {
                    n: 0,
                    sum: 0,
                    sumsq: 0,
                }
            }
            VarSamp | VarPop | StddevSamp | StddevPop => AggState::Moments {
                n: 0,
                mean: 0.0,
                m2: 0.0,
            },
            CountDistinct => AggState::Distinct(Box::default()),
            ApproxCountDistinct => AggState::Sketch(Hll::default()),
            LastValue => AggState::Last(None),
        }
    }

    /// For `min` / `max`: whether `candidate` replaces the extreme so far.
    fn beats(&self, candidate: &Value, current: Option<&Value>) -> bool {
        match current {
            None => true,
            Some(c) => self.prefers(candidate.total_cmp(c)),
        }
    }

    /// For `min` / `max`: whether a candidate that compares `ord` to the extreme so far replaces it.
    #[inline]
    fn prefers(&self, ord: std::cmp::Ordering) -> bool {
        if self.function == AggFunction::Min {
            ord.is_lt()
        } else {
            ord.is_gt()
        }
    }

    /// [`Aggregation::beats`] for a number `candidate` read from an encoded state: compared in
    /// place with a current value of the same kind (the common case), else as `beats` does.
    #[inline]
    fn beats_same_kind(&self, candidate: &Value, current: &Option<Value>) -> bool {
        let ord = match (candidate, current) {
            (_, None) => return true,
            (Value::Decimal(x), Some(Value::Decimal(y))) => x.cmp(y),
            (Value::Int(x), Some(Value::Int(y)))
            | (Value::Timestamp(x), Some(Value::Timestamp(y))) => x.cmp(y),
            (c, Some(cur)) => return self.beats(c, Some(cur)),
        };
        self.prefers(ord)
    }

    /// Whether the variance family over this input is exact ([`AggState::ExactMoments`]).
    fn exact_moments(&self) -> bool {
        matches!(self.input_type, Some(ColumnType::Decimal { precision, .. }) if precision <= EXACT_MOMENTS_DIGITS)
    }

    /// An exact moments state as floating-point `(n, mean, m2)` (for a merge with those); any
    /// other state as empty moments.
    fn float_moments(&self, state: &AggState) -> (u64, f64, f64) {
        match state {
            AggState::ExactMoments { n, sum, sumsq } if *n > 0 => {
                let scale = 10f64.powi(self.scale() as i32);
                let nf = *n as f64;
                let m2 = exact_moment_numerator(*n, *sum, *sumsq) / nf / (scale * scale);
                (*n, *sum as f64 / nf / scale, m2)
            }
            _ => (0, 0.0, 0.0),
        }
    }

    fn scale(&self) -> u8 {
        match self.input_type {
            Some(ColumnType::Decimal { scale, .. }) => scale,
            _ => 0,
        }
    }

    /// Applies one row (already decoded into schema order) to `state`, if it passes the filter.
    /// `event_time` and `event_id` order `last_value`.
    #[inline]
    pub fn update(&self, state: &mut AggState, row: &[Value], event_time: i64, event_id: &str) {
        if let Some(f) = &self.filter
            && !f.passes(row)
        {
            return;
        }
        self.apply(state, row, event_time, event_id);
    }

    /// [`Aggregation::update`] for a row already known to pass the filter.
    #[inline]
    pub fn apply(&self, state: &mut AggState, row: &[Value], event_time: i64, event_id: &str) {
        let v = match self.input {
            Some(i) => &row[i],
            None => {
                if let AggState::Count(n) = state {
                    *n += 1;
                }
                return;
            }
        };
        if v.is_null() {
            return;
        }
        match (state, v) {
            (AggState::Count(n), _) => *n += 1,
            (AggState::SumInt { sum, n }, Value::Int(i)) => {
                *sum += *i as i128;
                *n += 1;
            }
            (AggState::SumFloat { sum, n }, Value::Float(f)) => {
                *sum += *f;
                *n += 1;
            }
            (AggState::SumDecimal { sum, n }, Value::Decimal(d)) => {
                // |d| < 10^38 and n < 2^64 values: the i128 sum cannot overflow before 10^19 rows.
                *sum = sum.saturating_add(*d);
                *n += 1;
            }
            (AggState::Extreme(cur), v) if self.beats(v, cur.as_ref()) => *cur = Some(v.clone()),
            (AggState::Extreme(_), _) => {}
            (AggState::ExactMoments { n, sum, sumsq }, Value::Decimal(d)) => {
                // |d| < 10^12: its square fits, and the sums saturate only after 10^14 values.
                *n += 1;
                *sum = sum.saturating_add(*d);
                *sumsq = sumsq.saturating_add(d.unsigned_abs().saturating_mul(d.unsigned_abs()));
            }
            (AggState::ExactMoments { .. }, _) => {}
            (AggState::Moments { n, mean, m2 }, v) => {
                if let Some(x) = v.as_f64(self.scale()) {
                    *n += 1;
                    let d = x - *mean;
                    *mean += d / *n as f64;
                    *m2 += d * (x - *mean);
                }
            }
            (AggState::Distinct(set), v) => set.insert(v),
            (AggState::Sketch(h), v) => {
                if let Some(hash) = DistinctKey::hash64(v) {
                    h.add_hash(hash);
                }
            }
            (AggState::Last(cur), v) => {
                let newer = match cur {
                    None => true,
                    Some(last) => (event_time, event_id) > (last.0, last.1.as_str()),
                };
                if newer {
                    *cur = Some(Box::new((event_time, event_id.to_string(), v.clone())));
                }
            }
            // A value of another type than the column's cannot come out of the decoder.
            _ => {}
        }
    }

    /// [`Aggregation::apply`] of a row whose input is the string `v` (`None`: NULL), borrowed:
    /// a `count_distinct` or `min`/`max` state copies the string only when it keeps it (the
    /// batch job's state functions read strings straight from Arrow arrays).
    #[inline]
    pub fn apply_str(
        &self,
        state: &mut AggState,
        v: Option<&str>,
        event_time: i64,
        event_id: &str,
    ) {
        let Some(v) = v else {
            return self.apply_value(state, Value::Null, event_time, event_id);
        };
        match state {
            AggState::Distinct(set) => set.insert_str(v),
            AggState::Extreme(cur) => {
                let beats = match cur {
                    None => true,
                    Some(Value::Str(c)) => self.prefers(v.cmp(c.as_str())),
                    Some(c) => self.beats(&Value::Str(v.to_string()), Some(c)),
                };
                if beats {
                    *cur = Some(Value::Str(v.to_string()));
                }
            }
            _ => self.apply_value(state, Value::Str(v.to_string()), event_time, event_id),
        }
    }

    /// [`Aggregation::apply`] of a row whose input is `v`.
    fn apply_value(&self, state: &mut AggState, v: Value, event_time: i64, event_id: &str) {
        match self.input {
            None => self.apply(state, &[], event_time, event_id),
            Some(0) => self.apply(state, std::slice::from_ref(&v), event_time, event_id),
            Some(i) => {
                let mut row = vec![Value::Null; i + 1];
                row[i] = v;
                self.apply(state, &row, event_time, event_id);
            }
        }
    }

    /// Merges `other` into `state`. Both must come from this aggregation.
    pub fn merge(&self, state: &mut AggState, other: &AggState) {
        match (state, other) {
            (AggState::Count(a), AggState::Count(b)) => *a += b,
            (AggState::SumInt { sum, n }, AggState::SumInt { sum: s2, n: n2 })
            | (AggState::SumDecimal { sum, n }, AggState::SumDecimal { sum: s2, n: n2 }) => {
                *sum = sum.saturating_add(*s2);
                *n += n2;
            }
            (AggState::SumFloat { sum, n }, AggState::SumFloat { sum: s2, n: n2 }) => {
                merge_float_sum(sum, n, *s2, *n2)
            }
            (AggState::Extreme(a), AggState::Extreme(Some(b))) => {
                if self.beats(b, a.as_ref()) {
                    *a = Some(b.clone());
                }
            }
            (AggState::Extreme(_), AggState::Extreme(None)) => {}
            (
                AggState::Moments { n, mean, m2 },
                AggState::Moments {
                    n: nb,
                    mean: mb,
                    m2: m2b,
                },
            ) => merge_moments((n, mean, m2), (*nb, *mb, *m2b)),
            (
                AggState::ExactMoments { n, sum, sumsq },
                AggState::ExactMoments {
                    n: nb,
                    sum: sb,
                    sumsq: qb,
                },
            ) => {
                *n += nb;
                *sum = sum.saturating_add(*sb);
                *sumsq = sumsq.saturating_add(*qb);
            }
            // A floating-point state (stored before exact moments, or by an older writer) makes
            // the merge floating-point.
            (a @ AggState::ExactMoments { .. }, AggState::Moments { n, mean, m2 }) => {
                let (mut na, mut ma, mut m2a) = self.float_moments(a);
                merge_moments((&mut na, &mut ma, &mut m2a), (*n, *mean, *m2));
                *a = AggState::Moments {
                    n: na,
                    mean: ma,
                    m2: m2a,
                };
            }
            (AggState::Moments { n, mean, m2 }, b @ AggState::ExactMoments { .. }) => {
                merge_moments((n, mean, m2), self.float_moments(b))
            }
            (AggState::Distinct(a), AggState::Distinct(b)) => a.merge(b),
            (AggState::Sketch(a), AggState::Sketch(b)) => a.merge(b),
            (AggState::Last(a), AggState::Last(Some(b))) => {
                let newer = match a {
                    None => true,
                    Some(last) => (b.0, b.1.as_str()) > (last.0, last.1.as_str()),
                };
                if newer {
                    *a = Some(b.clone());
                }
            }
            (AggState::Last(_), AggState::Last(None)) => {}
            // States of different aggregations are never merged (a bug in the caller); ignore.
            _ => debug_assert!(false, "merging states of different aggregations"),
        }
    }

    /// The feature value of `state`, typed as [`Aggregation::output_type`].
    pub fn finalize(&self, state: &AggState) -> Result<Value, AggError> {
        let overflow = || AggError::Overflow {
            aggregation: self.name.clone(),
            output: self.output_type,
        };
        use AggFunction::*;
        Ok(match (self.function, state) {
            (Count, AggState::Count(n)) => Value::Int(i64::try_from(*n).map_err(|_| overflow())?),
            (
                _,
                AggState::SumInt { n: 0, .. }
                | AggState::SumFloat { n: 0, .. }
                | AggState::SumDecimal { n: 0, .. },
            ) => Value::Null,
            (Sum, AggState::SumInt { sum, .. }) => {
                Value::Int(i64::try_from(*sum).map_err(|_| overflow())?)
            }
            (Sum, AggState::SumFloat { sum, .. }) => Value::Float(*sum),
            (Sum, AggState::SumDecimal { sum, .. }) => {
                let ColumnType::Decimal { precision, .. } = self.output_type else {
                    return Err(overflow());
                };
                if sum.unsigned_abs() > max_unscaled(precision) as u128 {
                    return Err(overflow());
                }
                Value::Decimal(*sum)
            }
            (Avg, AggState::SumInt { sum, n }) => Value::Float(*sum as f64 / *n as f64),
            (Avg, AggState::SumFloat { sum, n }) => Value::Float(*sum / *n as f64),
            (Avg, AggState::SumDecimal { sum, n }) => {
                let ColumnType::Decimal {
                    precision,
                    scale: out_scale,
                } = self.output_type
                else {
                    return Err(overflow());
                };
                let mul = pow10(out_scale - self.scale());
                let scaled = sum.checked_mul(mul).ok_or_else(overflow)?;
                let v = scaled / *n as i128;
                if v.unsigned_abs() > max_unscaled(precision) as u128 {
                    return Err(overflow());
                }
                Value::Decimal(v)
            }
            (Min | Max, AggState::Extreme(v)) => v.clone().unwrap_or(Value::Null),
            (f @ (VarSamp | VarPop | StddevSamp | StddevPop), AggState::Moments { n, m2, .. }) => {
                spread(f, *n, |divisor| m2 / divisor)
            }
            (
                f @ (VarSamp | VarPop | StddevSamp | StddevPop),
                AggState::ExactMoments { n, sum, sumsq },
            ) => spread(f, *n, |divisor| {
                // n·Σx² − (Σx)², exact (it is never negative), then one division.
                let num = exact_moment_numerator(*n, *sum, *sumsq);
                num / (*n as f64 * divisor) / 10f64.powi(2 * self.scale() as i32)
            }),
            (CountDistinct, AggState::Distinct(s)) => Value::Int(s.len() as i64),
            (ApproxCountDistinct, AggState::Sketch(h)) => Value::Int(h.estimate() as i64),
            (LastValue, AggState::Last(v)) => {
                v.as_ref().map(|last| last.2.clone()).unwrap_or(Value::Null)
            }
            _ => return Err(overflow()),
        })
    }

    /// Appends the state's compact encoding (without the version byte; see [`encode_states`]).
    pub fn encode(&self, state: &AggState, w: &mut Writer) {
        match state {
            AggState::Count(n) => {
                w.u8(b'c');
                w.u64(*n);
            }
            AggState::SumInt { sum, n } => {
                w.u8(b'i');
                w.i128(*sum);
                w.u64(*n);
            }
            AggState::SumFloat { sum, n } => {
                w.u8(b'f');
                w.f64(*sum);
                w.u64(*n);
            }
            AggState::SumDecimal { sum, n } => {
                w.u8(b'd');
                w.i128(*sum);
                w.u64(*n);
            }
            AggState::Extreme(v) => {
                w.u8(b'x');
                encode_opt_value(v.as_ref(), w);
            }
            AggState::Moments { n, mean, m2 } => {
                w.u8(b'm');
                w.u64(*n);
                w.f64(*mean);
                w.f64(*m2);
            }
            AggState::ExactMoments { n, sum, sumsq } => {
                w.u8(b'v');
                w.u64(*n);
                w.i128(*sum);
                w.u128(*sumsq);
            }
            AggState::Distinct(set) => {
                w.u8(b's');
                w.u64(set.len() as u64);
                let mut nums: Vec<&i128> = set.nums.iter().collect();
                nums.sort_unstable();
                for i in nums {
                    w.u8(0);
                    w.i128(*i);
                }
                let mut strs: Vec<&Box<str>> = set.strs.iter().collect();
                strs.sort_unstable();
                for s in strs {
                    w.u8(1);
                    w.bytes(s.as_bytes());
                }
                for (b, present) in [(false, set.bools[0]), (true, set.bools[1])] {
                    if present {
                        w.u8(2);
                        w.u8(b as u8);
                    }
                }
            }
            AggState::Sketch(h) => {
                w.u8(b'h');
                h.canonical().encode(w);
            }
            AggState::Last(v) => {
                w.u8(b'l');
                match v {
                    None => w.u8(0),
                    Some(last) => {
                        let (t, id, v) = &**last;
                        w.u8(1);
                        w.i64(*t);
                        w.bytes(id.as_bytes());
                        encode_opt_value(Some(v), w);
                    }
                }
            }
        }
    }

    /// Reads a state written by [`Aggregation::encode`], checking it is this aggregation's kind.
    pub fn decode(&self, r: &mut Reader<'_>) -> Result<AggState, AggError> {
        let codec = |source| AggError::Codec {
            aggregation: self.name.clone(),
            source,
        };
        // Exact moments also read the floating-point ones an older writer stored.
        let tag = match (self.state_tag(), r.peek()) {
            (b'v', Some(b'm')) => self.read_tag(r, b'm')?,
            (expected, _) => self.read_tag(r, expected)?,
        };
        let read = |r: &mut Reader<'_>| -> Result<AggState, CodecError> {
            Ok(match tag {
                b'c' => AggState::Count(r.u64()?),
                b'i' => AggState::SumInt {
                    sum: r.i128()?,
                    n: r.u64()?,
                },
                b'f' => AggState::SumFloat {
                    sum: r.f64()?,
                    n: r.u64()?,
                },
                b'd' => AggState::SumDecimal {
                    sum: r.i128()?,
                    n: r.u64()?,
                },
                b'x' => AggState::Extreme(decode_opt_value(r, self.input_type)?),
                b'm' => AggState::Moments {
                    n: r.u64()?,
                    mean: r.f64()?,
                    m2: r.f64()?,
                },
                b'v' => AggState::ExactMoments {
                    n: r.u64()?,
                    sum: r.i128()?,
                    sumsq: r.u128()?,
                },
                b's' => {
                    let n = r.u64()? as usize;
                    let mut set = DistinctSet::default();
                    for _ in 0..n {
                        match r.u8()? {
                            0 => {
                                set.nums.insert(r.i128()?);
                            }
                            1 => {
                                set.strs.insert(r.str()?.into());
                            }
                            2 => set.bools[(r.u8()? != 0) as usize] = true,
                            t => return Err(CodecError::Corrupt(format!("distinct key tag {t}"))),
                        }
                    }
                    if set.len() != n {
                        return Err(CodecError::Corrupt(
                            "repeated value in a distinct set".into(),
                        ));
                    }
                    AggState::Distinct(Box::new(set))
                }
                b'h' => AggState::Sketch(Hll::decode(r)?),
                b'l' => match r.u8()? {
                    0 => AggState::Last(None),
                    _ => {
                        let t = r.i64()?;
                        let id = r.str()?.to_string();
                        let v = decode_opt_value(r, self.input_type)?.ok_or_else(|| {
                            CodecError::Corrupt("last_value without a value".into())
                        })?;
                        AggState::Last(Some(Box::new((t, id, v))))
                    }
                },
                t => return Err(CodecError::Corrupt(format!("unknown state tag {t}"))),
            })
        };
        read(r).map_err(codec)
    }

    /// Merges an encoded state (as [`Aggregation::decode`] reads it) into `state`: the same
    /// result as decoding it and calling [`Aggregation::merge`], but without building the other
    /// state: fixed-size states are merged straight from the bytes, and a distinct set's values
    /// are added from them (a string already present allocates nothing).
    pub fn merge_encoded(&self, state: &mut AggState, r: &mut Reader<'_>) -> Result<(), AggError> {
        let codec = |source| AggError::Codec {
            aggregation: self.name.clone(),
            source,
        };
        match state {
            AggState::Distinct(set) => read_encoded_distinct(self, r, |v| {
                match v {
                    DistinctItem::Num(n) => {
                        set.nums.insert(n);
                    }
                    DistinctItem::Str(b) => {
                        let s = std::str::from_utf8(b)
                            .map_err(|_| CodecError::Corrupt("invalid UTF-8".into()))?;
                        set.insert_str(s);
                    }
                    DistinctItem::Bool(b) => set.bools[b as usize] = true,
                }
                Ok(())
            }),
            // Variable-size states, a state of another aggregation (a caller's bug), and a stored
            // state of another kind than `state` (floating-point moments an older writer stored,
            // merged into exact ones): as decoding and merging does.
            _ if matches!(state, AggState::Sketch(_) | AggState::Last(_))
                || tag_of(state) != self.state_tag()
                || r.peek() != Some(tag_of(state)) =>
            {
                let other = self.decode(r)?;
                self.merge(state, &other);
                Ok(())
            }
            // Fixed-size states, read in place after their tag (checked by the `peek` above).
            _ => {
                let read = |r: &mut Reader<'_>, state: &mut AggState| -> Result<(), CodecError> {
                    r.u8()?;
                    match state {
                        AggState::Count(a) => *a += r.u64()?,
                        AggState::SumInt { sum, n } | AggState::SumDecimal { sum, n } => {
                            let (s2, n2) = (r.i128()?, r.u64()?);
                            *sum = sum.saturating_add(s2);
                            *n += n2;
                        }
                        AggState::SumFloat { sum, n } => {
                            let (s2, n2) = (r.f64()?, r.u64()?);
                            merge_float_sum(sum, n, s2, n2);
                        }
                        AggState::Moments { n, mean, m2 } => {
                            let other = (r.u64()?, r.f64()?, r.f64()?);
                            merge_moments((n, mean, m2), other);
                        }
                        AggState::ExactMoments { n, sum, sumsq } => {
                            *n += r.u64()?;
                            *sum = sum.saturating_add(r.i128()?);
                            *sumsq = sumsq.saturating_add(r.u128()?);
                        }
                        AggState::Extreme(a) => {
                            // Numbers are compared as read (building a `Value` per bucket was a
                            // quarter of this function's time); strings through a `Value`. The
                            // number tags are read here rather than by `decode_tagged_value`:
                            // going through it made the features bench 9% slower (2026-11-26).
                            let tag = r.u8()?;
                            let num = match (tag, self.input_type) {
                                (2, Some(ColumnType::Int64)) => Some(Value::Int(r.i64()?)),
                                (4, Some(ColumnType::Decimal { .. })) => {
                                    Some(Value::Decimal(r.i128()?))
                                }
                                (6, Some(ColumnType::Timestamp)) => {
                                    Some(Value::Timestamp(r.i64()?))
                                }
                                _ => None,
                            };
                            match num {
                                Some(b) => {
                                    if self.beats_same_kind(&b, a) {
                                        *a = Some(b);
                                    }
                                }
                                None => {
                                    if let Some(b) = decode_tagged_value(tag, r, self.input_type)?
                                        && self.beats(&b, a.as_ref())
                                    {
                                        *a = Some(b);
                                    }
                                }
                            }
                        }
                        // Handled above.
                        AggState::Distinct(_) | AggState::Sketch(_) | AggState::Last(_) => {}
                    }
                    Ok(())
                };
                read(r, state).map_err(codec)
            }
        }
    }

    /// The tag of this aggregation's encoded state (what [`Aggregation::empty`] encodes with).
    fn state_tag(&self) -> u8 {
        use AggFunction::*;
        match self.function {
            Count => b'c',
            Sum | Avg => match self.input_type {
                Some(ColumnType::Float64) => b'f',
                Some(ColumnType::Decimal { .. }) => b'd',
                _ => b'i',
            },
            Min | Max => b'x',
            VarSamp | VarPop | StddevSamp | StddevPop if self.exact_moments() => b'v',
            VarSamp | VarPop | StddevSamp | StddevPop => b'm',
            CountDistinct => b's',
            ApproxCountDistinct => b'h',
            LastValue => b'l',
        }
    }

    /// Reads a state's tag, checking it is `expected` (inlined: it runs once per merged state).
    #[inline]
    fn read_tag(&self, r: &mut Reader<'_>, expected: u8) -> Result<u8, AggError> {
        match r.u8() {
            Ok(tag) if tag == expected => Ok(tag),
            other => Err(self.tag_error(other, expected)),
        }
    }

    /// The error of a missing or unexpected tag (kept out of the hot path).
    #[cold]
    #[inline(never)]
    fn tag_error(&self, read: Result<u8, CodecError>, expected: u8) -> AggError {
        let source = match read {
            Ok(tag) => CodecError::KindMismatch {
                found: (tag as char).to_string(),
                expected: (expected as char).to_string(),
            },
            Err(e) => e,
        };
        AggError::Codec {
            aggregation: self.name.clone(),
            source,
        }
    }
}

/// Adds a float sum `(s2, n2)` to `(sum, n)`.
fn merge_float_sum(sum: &mut f64, n: &mut u64, s2: f64, n2: u64) {
    if n2 > 0 {
        *sum = if *n == 0 { s2 } else { *sum + s2 };
        *n += n2;
    }
}

/// A variance-family value from `n` values and the variance for a divisor (`n − 1` for the
/// sample functions, `n` for the population ones): NULL below 2 (sample) or 1 values.
fn spread(f: AggFunction, n: u64, var: impl FnOnce(f64) -> f64) -> Value {
    let sample = matches!(f, AggFunction::VarSamp | AggFunction::StddevSamp);
    if n < 1 + sample as u64 {
        return Value::Null;
    }
    let var = var((n - sample as u64) as f64);
    Value::Float(match f {
        AggFunction::StddevSamp | AggFunction::StddevPop => var.sqrt(),
        _ => var,
    })
}

/// `n·Σx² − (Σx)²` of exact moments, computed exactly in 256 bits and rounded once to `f64`
/// (it is `n` times the sum of squared deviations, never negative).
fn exact_moment_numerator(n: u64, sum: i128, sumsq: u128) -> f64 {
    let (a_hi, a_lo) = mul_u128(n as u128, sumsq);
    let s = sum.unsigned_abs();
    let (b_hi, b_lo) = mul_u128(s, s);
    let (lo, borrow) = a_lo.overflowing_sub(b_lo);
    let hi = a_hi.wrapping_sub(b_hi).wrapping_sub(borrow as u128);
    if hi > a_hi {
        // Saturated sums (beyond 10^14 values): not exact any more; never negative.
        return 0.0;
    }
    hi as f64 * 2f64.powi(128) + lo as f64
}

/// The 256-bit product of two `u128`, as (high, low) halves.
fn mul_u128(a: u128, b: u128) -> (u128, u128) {
    let mask = u64::MAX as u128;
    let (a1, a0, b1, b0) = (a >> 64, a & mask, b >> 64, b & mask);
    let (p00, p01, p10, p11) = (a0 * b0, a0 * b1, a1 * b0, a1 * b1);
    // The middle terms overlap the two halves.
    let (mid, mid_carry) = p01.overflowing_add(p10);
    let (lo, lo_carry) = p00.overflowing_add(mid << 64);
    let hi = p11 + (mid >> 64) + ((mid_carry as u128) << 64) + lo_carry as u128;
    (hi, lo)
}

/// Chan's parallel combination of moments `(n, mean, m2)` with `(nb, mb, m2b)`.
fn merge_moments((n, mean, m2): (&mut u64, &mut f64, &mut f64), (nb, mb, m2b): (u64, f64, f64)) {
    if nb == 0 {
        return;
    }
    if *n == 0 {
        (*n, *mean, *m2) = (nb, mb, m2b);
        return;
    }
    let na = *n as f64;
    let nbf = nb as f64;
    let total = na + nbf;
    let delta = mb - *mean;
    *mean += delta * nbf / total;
    *m2 += m2b + delta * delta * na * nbf / total;
    *n += nb;
}

/// One value of an encoded distinct state, borrowed from the encoding.
enum DistinctItem<'a> {
    Num(i128),
    /// A string's UTF-8 bytes (checked by whoever keeps it as a string).
    Str(&'a [u8]),
    Bool(bool),
}

/// Reads an encoded distinct state of `agg` (tag, count, values), handing each value to `add`.
fn read_encoded_distinct<'a>(
    agg: &Aggregation,
    r: &mut Reader<'a>,
    mut add: impl FnMut(DistinctItem<'a>) -> Result<(), CodecError>,
) -> Result<(), AggError> {
    let codec = |source| AggError::Codec {
        aggregation: agg.name.clone(),
        source,
    };
    agg.read_tag(r, b's')?;
    let mut read = || -> Result<(), CodecError> {
        let n = r.u64()? as usize;
        for _ in 0..n {
            match r.u8()? {
                0 => add(DistinctItem::Num(r.i128()?))?,
                1 => add(DistinctItem::Str(r.bytes()?))?,
                2 => add(DistinctItem::Bool(r.u8()? != 0))?,
                t => return Err(CodecError::Corrupt(format!("distinct key tag {t}"))),
            }
        }
        Ok(())
    };
    read().map_err(codec)
}

/// A distinct set that borrows its strings from encoded states (the batch job finalizes
/// `count_distinct` over a row's buckets without copying a string): the same count as merging
/// the decoded [`DistinctSet`]s.
#[derive(Debug, Default)]
pub struct DistinctRef<'a> {
    nums: HashSet<i128, FastHash>,
    /// Strings as their UTF-8 bytes (equal exactly when the strings are).
    strs: HashSet<&'a [u8], FastHash>,
    bools: [bool; 2],
}

impl<'a> DistinctRef<'a> {
    /// An empty set with room for `strings` strings.
    pub fn with_capacity(strings: usize) -> Self {
        DistinctRef {
            strs: HashSet::with_capacity_and_hasher(strings, FastHash::default()),
            ..Default::default()
        }
    }

    /// Adds the values of an encoded distinct state of aggregation `agg` (read from `r`).
    pub fn merge_encoded(&mut self, agg: &Aggregation, r: &mut Reader<'a>) -> Result<(), AggError> {
        read_encoded_distinct(agg, r, |v| {
            match v {
                DistinctItem::Num(n) => {
                    self.nums.insert(n);
                }
                DistinctItem::Str(s) => {
                    if self.strs.capacity() == 0 {
                        // Skips the first few growths of a set that is rarely tiny.
                        self.strs.reserve(16);
                    }
                    self.strs.insert(s);
                }
                DistinctItem::Bool(b) => self.bools[b as usize] = true,
            }
            Ok(())
        })
    }

    /// Number of distinct values (what `count_distinct` finalizes to).
    pub fn len(&self) -> usize {
        self.nums.len() + self.strs.len() + self.bools.iter().filter(|b| **b).count()
    }

    /// True when no value was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn tag_of(s: &AggState) -> u8 {
    match s {
        AggState::Count(_) => b'c',
        AggState::SumInt { .. } => b'i',
        AggState::SumFloat { .. } => b'f',
        AggState::SumDecimal { .. } => b'd',
        AggState::Extreme(_) => b'x',
        AggState::Moments { .. } => b'm',
        AggState::ExactMoments { .. } => b'v',
        AggState::Distinct(_) => b's',
        AggState::Sketch(_) => b'h',
        AggState::Last(_) => b'l',
    }
}

fn encode_opt_value(v: Option<&Value>, w: &mut Writer) {
    match v {
        None | Some(Value::Null) => w.u8(0),
        Some(Value::Str(s)) => {
            w.u8(1);
            w.bytes(s.as_bytes())
        }
        Some(Value::Int(i)) => {
            w.u8(2);
            w.i64(*i)
        }
        Some(Value::Float(f)) => {
            w.u8(3);
            w.f64(*f)
        }
        Some(Value::Decimal(d)) => {
            w.u8(4);
            w.i128(*d)
        }
        Some(Value::Bool(b)) => {
            w.u8(5);
            w.u8(*b as u8)
        }
        Some(Value::Timestamp(t)) => {
            w.u8(6);
            w.i64(*t)
        }
    }
}

fn decode_opt_value(
    r: &mut Reader<'_>,
    ty: Option<ColumnType>,
) -> Result<Option<Value>, CodecError> {
    let tag = r.u8()?;
    decode_tagged_value(tag, r, ty)
}

/// [`decode_opt_value`] after its tag.
fn decode_tagged_value(
    tag: u8,
    r: &mut Reader<'_>,
    ty: Option<ColumnType>,
) -> Result<Option<Value>, CodecError> {
    let v = match tag {
        0 => return Ok(None),
        1 => Value::Str(r.str()?.to_string()),
        2 => Value::Int(r.i64()?),
        3 => Value::Float(r.f64()?),
        4 => Value::Decimal(r.i128()?),
        5 => Value::Bool(r.u8()? != 0),
        6 => Value::Timestamp(r.i64()?),
        t => return Err(CodecError::Corrupt(format!("unknown value tag {t}"))),
    };
    let fits = matches!(
        (&v, ty),
        (Value::Str(_), Some(ColumnType::String))
            | (Value::Int(_), Some(ColumnType::Int64))
            | (Value::Float(_), Some(ColumnType::Float64))
            | (Value::Decimal(_), Some(ColumnType::Decimal { .. }))
            | (Value::Bool(_), Some(ColumnType::Bool))
            | (Value::Timestamp(_), Some(ColumnType::Timestamp))
    );
    if !fits {
        return Err(CodecError::Corrupt(
            "stored value has another type than the column".into(),
        ));
    }
    Ok(Some(v))
}

/// Encodes the states of all of a view's aggregations (in order) as one versioned blob.
pub fn encode_states(aggs: &[Aggregation], states: &[AggState]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(STATE_FORMAT_VERSION);
    for (a, s) in aggs.iter().zip(states) {
        a.encode(s, &mut w);
    }
    w.buf
}

/// Decodes a blob written by [`encode_states`] for the same aggregations.
pub fn decode_states(aggs: &[Aggregation], bytes: &[u8]) -> Result<Vec<AggState>, AggError> {
    read_states(bytes, |r| {
        aggs.iter()
            .map(|a| a.decode(r))
            .collect::<Result<Vec<_>, _>>()
    })
}

/// Merges a blob written by [`encode_states`] into `states` (as decoding it and [`merge_all`],
/// through [`Aggregation::merge_encoded`]: nothing is built for the blob's own states).
pub fn merge_encoded_states(
    aggs: &[Aggregation],
    states: &mut [AggState],
    bytes: &[u8],
) -> Result<(), AggError> {
    read_states(bytes, |r| {
        aggs.iter()
            .zip(states.iter_mut())
            .try_for_each(|(a, s)| a.merge_encoded(s, r))
    })
}

/// Reads a blob written by [`encode_states`]: checks its version, lets `read` take the states,
/// and checks nothing follows them.
fn read_states<T>(
    bytes: &[u8],
    read: impl FnOnce(&mut Reader<'_>) -> Result<T, AggError>,
) -> Result<T, AggError> {
    let mut r = Reader::new(bytes);
    let err = |source| AggError::Codec {
        aggregation: "(header)".into(),
        source,
    };
    let v = r.u8().map_err(err)?;
    if v != STATE_FORMAT_VERSION {
        return Err(err(CodecError::UnknownVersion(v, STATE_FORMAT_VERSION)));
    }
    let out = read(&mut r)?;
    if !r.is_empty() {
        return Err(err(CodecError::Corrupt(
            "trailing bytes after the last state".into(),
        )));
    }
    Ok(out)
}

/// Helper for the common pattern: a fresh state for every aggregation of a view.
pub fn empty_states(aggs: &[Aggregation]) -> Vec<AggState> {
    aggs.iter().map(Aggregation::empty).collect()
}

/// Applies one row to every aggregation's state. A filter shared by consecutive aggregations
/// (the common case: one filter for a whole view) is evaluated once.
#[inline]
pub fn update_all(
    aggs: &[Aggregation],
    states: &mut [AggState],
    row: &[Value],
    event_time: i64,
    event_id: &str,
) {
    let mut last: Option<(&Filter, bool)> = None;
    for (a, s) in aggs.iter().zip(states.iter_mut()) {
        let pass = match &a.filter {
            None => true,
            Some(f) => match last {
                Some((lf, r)) if std::ptr::eq(lf, f) || lf == f => r,
                _ => {
                    let r = f.passes(row);
                    last = Some((f, r));
                    r
                }
            },
        };
        if pass {
            a.apply(s, row, event_time, event_id);
        }
    }
}

/// Merges `other` into `states`, aggregation by aggregation.
pub fn merge_all(aggs: &[Aggregation], states: &mut [AggState], other: &[AggState]) {
    for ((a, s), o) in aggs.iter().zip(states.iter_mut()).zip(other) {
        a.merge(s, o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Schoolbook product over 32-bit limbs: an independent reference for `mul_u128`.
    fn mul_ref(a: u128, b: u128) -> (u128, u128) {
        let limbs = |x: u128| [0, 1, 2, 3].map(|i| (x >> (32 * i)) as u32 as u64);
        let (la, lb) = (limbs(a), limbs(b));
        let mut out = [0u64; 8];
        for i in 0..4 {
            let mut carry = 0u64;
            for j in 0..4 {
                let t = la[i] * lb[j] + out[i + j] + carry;
                out[i + j] = t & 0xffff_ffff;
                carry = t >> 32;
            }
            out[i + 4] += carry;
        }
        let half = |o: &[u64]| {
            o.iter()
                .rev()
                .fold(0u128, |acc, l| (acc << 32) | *l as u128)
        };
        (half(&out[4..]), half(&out[..4]))
    }

    #[test]
    fn the_256_bit_product_matches_a_schoolbook_reference() {
        let max = u128::MAX;
        assert_eq!(mul_u128(max, max), (max - 1, 1));
        assert_eq!(mul_u128(1 << 64, 1 << 64), (1, 0));
        let mut x: u128 = 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C834;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (a, b) = (x, x.rotate_left(61) >> (x % 97));
            assert_eq!(mul_u128(a, b), mul_ref(a, b), "{a} * {b}");
        }
    }

    /// A floating-point moments state (stored by an older writer) merges with an exact one, in
    /// either order and either encoded or decoded, into the variance of all their values.
    #[test]
    fn exact_and_floating_point_moments_merge() {
        let dec = ColumnType::Decimal {
            precision: 10,
            scale: 2,
        };
        let agg = Aggregation {
            name: "v".into(),
            function: AggFunction::VarPop,
            input: Some(0),
            input_type: Some(dec),
            output_type: ColumnType::Float64,
            filter: None,
        };
        let old = AggState::Moments {
            n: 2,
            mean: 1.0,
            m2: 2.0, // values 0.00 and 2.00
        };
        let mut exact = agg.empty();
        for d in [100i128, 300] {
            agg.apply(&mut exact, &[Value::Decimal(d)], 0, "");
        }
        // All four values 0, 2, 1, 3: population variance 1.25.
        let want = Value::Float(1.25);
        let mut a = exact.clone();
        agg.merge(&mut a, &old);
        assert_eq!(agg.finalize(&a).unwrap(), want);
        let mut b = old.clone();
        agg.merge(&mut b, &exact);
        assert_eq!(agg.finalize(&b).unwrap(), want);
        let mut w = Writer::default();
        agg.encode(&old, &mut w);
        let mut c = exact.clone();
        agg.merge_encoded(&mut c, &mut Reader::new(&w.buf)).unwrap();
        assert_eq!(agg.finalize(&c).unwrap(), want);
    }

    #[test]
    fn a_state_stays_48_bytes() {
        // The batch job's DataFusion groups hold one state per group and aggregation.
        assert_eq!(std::mem::size_of::<AggState>(), 48);
    }

    #[test]
    fn exact_moments_numerator_is_exact_for_twelve_digit_values() {
        let big = 999_999_999_999i128;
        for xs in [
            vec![big, -big, big],
            vec![big; 1000],
            vec![big, big - 1],
            vec![7],
        ] {
            let n = xs.len() as i128;
            let (sum, sumsq) = (
                xs.iter().sum::<i128>(),
                xs.iter().map(|x| x * x).sum::<i128>(),
            );
            let want = n * sumsq - sum * sum;
            let got = exact_moment_numerator(n as u64, sum, sumsq as u128);
            assert_eq!(got, want as f64, "{xs:?}");
        }
    }
}
