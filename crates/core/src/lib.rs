//! # lambda-core
//!
//! The one feature definition every layer of lambda derives from, with no AWS and no async runtime:
//!
//! * [`spec`]: the feature-view TOML, validated into a [`FeatureView`];
//! * [`types`] and [`decode`]: column types, typed values, JSON events into rows and Arrow batches;
//! * [`time`]: tiles, served windows, watermark and lateness, each rule in one function;
//! * [`agg`] (with [`hll`] and [`codec`]): mergeable, versioned aggregation states;
//! * [`filter`]: row filters evaluated natively and rendered as SQL;
//! * [`sql`]: the batch SQL generated from the definition.

pub mod agg;
pub mod codec;
pub mod decode;
pub mod filter;
pub mod hll;
pub mod merge;
pub mod spec;
pub mod sql;
pub mod time;
pub mod types;

pub use agg::{AggFunction, AggState, Aggregation};
pub use decode::{DecodeError, EventDecoder, Row};
pub use spec::{FeatureView, SpecError};
pub use time::Span;
pub use types::{ColumnType, Value};
