//! Aggregation states computed inside DataFusion with the core code, so the batch path's partial
//! states are the speed path's by construction.
//!
//! For each aggregation `a` of a view, [`StateUdaf`] registers `lambda_state_<view>_<a>(input?,
//! ts, event_id)`: a UDAF whose accumulator is the core [`AggState`], whose intermediate state and
//! result are the core's versioned encoding (`Binary`), and whose rows arrive already filtered by
//! the SQL `FILTER (WHERE …)` rendered from the same definition.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{DataFusionError, Result as DfResult, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use lambda_core::agg::{AggState, decode_states, encode_states};
use lambda_core::decode::value_at;
use lambda_core::{Aggregation, FeatureView, Value};

/// The UDAF computing one aggregation's state.
#[derive(Debug)]
pub struct StateUdaf {
    name: String,
    /// The aggregation, with its input remapped to position 0 of a one-value row.
    agg: Aggregation,
    signature: Signature,
}

impl PartialEq for StateUdaf {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for StateUdaf {}
impl Hash for StateUdaf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state)
    }
}

/// The SQL name of the state function of `agg` in `view`.
pub fn state_function_name(view: &FeatureView, agg: &Aggregation) -> String {
    format!("lambda_state_{}_{}", view.name, agg.name)
}

impl StateUdaf {
    /// The UDAF for one aggregation of a view.
    pub fn new(view: &FeatureView, agg: &Aggregation) -> Self {
        let mut local = agg.clone();
        local.input = agg.input.map(|_| 0);
        local.filter = None; // applied by the SQL FILTER clause
        StateUdaf {
            name: state_function_name(view, agg),
            agg: local,
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

/// Registers the state functions of every aggregation of `view`.
pub fn register_state_functions(ctx: &SessionContext, view: &FeatureView) {
    for a in &view.aggregations {
        ctx.register_udaf(AggregateUDF::from(StateUdaf::new(view, &a.aggregation)));
    }
}

impl AggregateUDFImpl for StateUdaf {
    fn name(&self) -> &str {
        &self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Binary)
    }
    fn is_nullable(&self) -> bool {
        false
    }
    fn accumulator(&self, _args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(StateAccumulator {
            state: self.agg.empty(),
            agg: self.agg.clone(),
            row: Vec::with_capacity(1),
        }))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[state]", args.name),
            DataType::Binary,
            true,
        ))])
    }
    fn default_value(&self, _data_type: &DataType) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Binary(Some(encode_states(
            std::slice::from_ref(&self.agg),
            &[self.agg.empty()],
        ))))
    }
}

#[derive(Debug)]
struct StateAccumulator {
    agg: Aggregation,
    state: AggState,
    row: Vec<Value>,
}

fn exec(e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Execution(format!("lambda state function: {e}"))
}

impl Accumulator for StateAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let has_input = self.agg.input.is_some();
        let base = has_input as usize;
        if values.len() != base + 2 {
            return Err(exec(format!(
                "`{}` takes {}(event time, event id) arguments, got {}",
                self.agg.name,
                if has_input { "input, " } else { "" },
                values.len()
            )));
        }
        // Fast path: millisecond timestamps and Utf8 ids read in place, no allocation per row.
        if let (Some(ts_arr), Some(id_arr)) = (
            values[base]
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>(),
            values[base + 1].as_any().downcast_ref::<StringArray>(),
        ) {
            for i in 0..ts_arr.len() {
                if ts_arr.is_null(i) || id_arr.is_null(i) {
                    return Err(exec("NULL event time or event id"));
                }
                self.row.clear();
                if has_input {
                    self.row
                        .push(value_at(values[0].as_ref(), i).map_err(exec)?);
                }
                self.agg
                    .apply(&mut self.state, &self.row, ts_arr.value(i), id_arr.value(i));
            }
            return Ok(());
        }
        for i in 0..values[base].len() {
            let Value::Timestamp(ts) = value_at(values[base].as_ref(), i).map_err(exec)? else {
                return Err(exec("event time is not a timestamp"));
            };
            let Value::Str(id) = value_at(values[base + 1].as_ref(), i).map_err(exec)? else {
                return Err(exec("event id is not a string"));
            };
            self.row.clear();
            if has_input {
                self.row
                    .push(value_at(values[0].as_ref(), i).map_err(exec)?);
            }
            self.agg.apply(&mut self.state, &self.row, ts, &id);
        }
        Ok(())
    }
    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Binary(Some(encode_states(
            std::slice::from_ref(&self.agg),
            std::slice::from_ref(&self.state),
        ))))
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self) + 64
    }
    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let arr = states[0]
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or_else(|| DataFusionError::Internal("state is not Binary".into()))?;
        for i in 0..arr.len() {
            if arr.is_null(i) {
                continue;
            }
            let other =
                decode_states(std::slice::from_ref(&self.agg), arr.value(i)).map_err(exec)?;
            self.agg.merge(&mut self.state, &other[0]);
        }
        Ok(())
    }
}
