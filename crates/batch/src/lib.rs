//! # lambda-batch
//!
//! The batch layer: DataFusion SQL, generated from the feature definition, over the Parquet history.
//! This crate currently provides the SQL generation entry points and the UDAF that lets DataFusion
//! compute `approx_count_distinct` with the core HyperLogLog (so batch and speed produce identical
//! sketches). The nightly job, incremental states and upload land with the batch-layer issue.

use std::hash::Hash;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BinaryArray};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{DataFusionError, Result as DfResult, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use lambda_core::agg::DistinctKey;
use lambda_core::codec::{Reader, Writer};
use lambda_core::decode::value_at;
use lambda_core::hll::Hll;
use lambda_core::sql::APPROX_DISTINCT_UDAF;

pub mod job;
pub mod schedule;
pub mod states;
pub mod storage;

/// A DataFusion session configured for lambda's SQL: strings stay `Utf8` (not `Utf8View`, so the
/// output types are exactly the documented ones whatever the input format), and the lambda
/// functions are registered.
pub fn session() -> SessionContext {
    let mut config = SessionConfig::new();
    config.options_mut().sql_parser.map_string_types_to_utf8view = false;
    config
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = false;
    let ctx = SessionContext::new_with_config(config);
    register_functions(&ctx);
    ctx
}

/// Registers every function the generated SQL needs on a DataFusion session.
pub fn register_functions(ctx: &SessionContext) {
    ctx.register_udaf(AggregateUDF::from(ApproxDistinct::new()));
}

/// `lambda_approx_distinct(x)`: approximate count-distinct with the core HyperLogLog (BIGINT).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ApproxDistinct {
    signature: Signature,
}

impl ApproxDistinct {
    /// The UDAF, accepting one argument of any type.
    pub fn new() -> Self {
        ApproxDistinct {
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl Default for ApproxDistinct {
    fn default() -> Self {
        Self::new()
    }
}

impl AggregateUDFImpl for ApproxDistinct {
    fn name(&self) -> &str {
        APPROX_DISTINCT_UDAF
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Int64)
    }
    fn is_nullable(&self) -> bool {
        false
    }
    fn accumulator(&self, _args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(HllAccumulator(Hll::default())))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[hll]", args.name),
            DataType::Binary,
            true,
        ))])
    }
    fn default_value(&self, _data_type: &DataType) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Int64(Some(0)))
    }
}

#[derive(Debug)]
struct HllAccumulator(Hll);

impl Accumulator for HllAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let arr = &values[0];
        for i in 0..arr.len() {
            let v = value_at(arr.as_ref(), i)
                .map_err(|e| DataFusionError::Execution(format!("{APPROX_DISTINCT_UDAF}: {e}")))?;
            if let Some(h) = DistinctKey::hash64(&v) {
                self.0.add_hash(h);
            }
        }
        Ok(())
    }
    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Int64(Some(self.0.estimate() as i64)))
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self)
            + match &self.0 {
                Hll::Sparse(v) => v.capacity() * 4,
                Hll::Dense(r) => r.len(),
            }
    }
    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        let mut w = Writer::default();
        self.0.encode(&mut w);
        Ok(vec![ScalarValue::Binary(Some(w.buf))])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let arr = states[0]
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or_else(|| DataFusionError::Internal("HLL state is not Binary".into()))?;
        for i in 0..arr.len() {
            if arr.is_null(i) {
                continue;
            }
            let other = Hll::decode(&mut Reader::new(arr.value(i)))
                .map_err(|e| DataFusionError::Execution(format!("{APPROX_DISTINCT_UDAF}: {e}")))?;
            self.0.merge(&other);
        }
        Ok(())
    }
}
