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
    Array, ArrayRef, BinaryArray, BooleanArray, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{DataFusionError, Result as DfResult, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
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

impl StateUdaf {
    fn groups(&self) -> StateGroups {
        StateGroups::new(&self.agg)
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
        Ok(Box::new(StateAccumulator(self.groups())))
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
    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> DfResult<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(self.groups()))
    }
}

/// Groups per chunk of [`StateGroups`].
const CHUNK: usize = 4096;

/// One core state per group, updated from whole batches (DataFusion's fast path for GROUP BY;
/// the FILTER clause arrives as `opt_filter`). The states live in chunks of [`CHUNK`]: adding
/// groups never moves the states already there, as a doubling `Vec` would (copying them into
/// fresh pages at every doubling: a night's hour query has 40 k groups).
struct StateGroups {
    agg: Aggregation,
    chunks: Vec<Vec<AggState>>,
    /// Groups (states in `chunks`).
    len: usize,
    row: Vec<Value>,
}

impl StateGroups {
    fn new(agg: &Aggregation) -> Self {
        StateGroups {
            agg: agg.clone(),
            chunks: Vec::new(),
            len: 0,
            row: Vec::with_capacity(1),
        }
    }
    fn grow(&mut self, total: usize) {
        while self.len < total {
            let empty = self.agg.empty();
            self.push(empty);
        }
    }
    /// Adds a group's state after the last, in a new chunk when the last is full.
    fn push(&mut self, state: AggState) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => last.push(state),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(state);
                self.chunks.push(chunk);
            }
        }
        self.len += 1;
    }
    fn emit(&mut self, emit_to: EmitTo) -> ArrayRef {
        let n = match emit_to {
            EmitTo::All => self.len,
            EmitTo::First(n) => n.min(self.len),
        };
        let mut b = datafusion::arrow::array::BinaryBuilder::with_capacity(n, n * 16);
        for st in self.chunks.iter().flatten().take(n) {
            b.append_value(encode_states(
                std::slice::from_ref(&self.agg),
                std::slice::from_ref(st),
            ));
        }
        // The groups after the first `n` are renumbered from 0 (rare: emitting early).
        let rest: Vec<AggState> = std::mem::take(&mut self.chunks)
            .into_iter()
            .flatten()
            .skip(n)
            .collect();
        self.len = 0;
        for st in rest {
            self.push(st);
        }
        Arc::new(b.finish())
    }
}

fn selected(filter: Option<&BooleanArray>, i: usize) -> bool {
    filter.is_none_or(|f| f.is_valid(i) && f.value(i))
}

impl GroupsAccumulator for StateGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.grow(total_num_groups);
        let has_input = self.agg.input.is_some();
        let base = has_input as usize;
        if values.len() != base + 2 {
            return Err(exec(format!(
                "`{}` got {} arguments",
                self.agg.name,
                values.len()
            )));
        }
        let ts_arr = values[base]
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>();
        let id_arr = values[base + 1].as_any().downcast_ref::<StringArray>();
        let strs = match has_input {
            true => values[0].as_any().downcast_ref::<StringArray>(),
            false => None,
        };
        for (i, g) in group_indices.iter().enumerate() {
            if !selected(opt_filter, i) {
                continue;
            }
            let owned;
            let (ts, id): (i64, &str) = match (ts_arr, id_arr) {
                (Some(t), Some(d)) if t.is_valid(i) && d.is_valid(i) => (t.value(i), d.value(i)),
                _ => {
                    let (Value::Timestamp(t), Value::Str(d)) = (
                        value_at(values[base].as_ref(), i).map_err(exec)?,
                        value_at(values[base + 1].as_ref(), i).map_err(exec)?,
                    ) else {
                        return Err(exec("event time or event id is NULL or of the wrong type"));
                    };
                    owned = d;
                    (t, owned.as_str())
                }
            };
            let state = &mut self.chunks[*g / CHUNK][*g % CHUNK];
            if let Some(strs) = strs {
                // Strings borrowed from the array (copied only into a state that keeps one).
                let v = strs.is_valid(i).then(|| strs.value(i));
                self.agg.apply_str(state, v, ts, id);
                continue;
            }
            self.row.clear();
            if has_input {
                self.row
                    .push(value_at(values[0].as_ref(), i).map_err(exec)?);
            }
            self.agg.apply(state, &self.row, ts, id);
        }
        Ok(())
    }
    fn evaluate(&mut self, emit_to: EmitTo) -> DfResult<ArrayRef> {
        Ok(self.emit(emit_to))
    }
    fn state(&mut self, emit_to: EmitTo) -> DfResult<Vec<ArrayRef>> {
        Ok(vec![self.emit(emit_to)])
    }
    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.grow(total_num_groups);
        let arr = values[0]
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or_else(|| DataFusionError::Internal("state is not Binary".into()))?;
        for (i, g) in group_indices.iter().enumerate() {
            if arr.is_null(i) {
                continue;
            }
            let other =
                decode_states(std::slice::from_ref(&self.agg), arr.value(i)).map_err(exec)?;
            self.agg
                .merge(&mut self.chunks[*g / CHUNK][*g % CHUNK], &other[0]);
        }
        Ok(())
    }
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> DfResult<Vec<ArrayRef>> {
        // Each row becomes its own state (used when pre-aggregation does not reduce the rows).
        let n = values.first().map_or(0, |a| a.len());
        let mut one = StateGroups::new(&self.agg);
        let groups: Vec<usize> = (0..n).collect();
        one.update_batch(values, &groups, opt_filter, n)?;
        Ok(vec![one.emit(EmitTo::All)])
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self)
            + self.chunks.len() * CHUNK * std::mem::size_of::<AggState>() * 2
    }
}

/// The ungrouped accumulator (no GROUP BY): one group of [`StateGroups`].
struct StateAccumulator(StateGroups);

impl std::fmt::Debug for StateAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateAccumulator")
            .field("aggregation", &self.0.agg.name)
            .finish()
    }
}

fn exec(e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Execution(format!("lambda state function: {e}"))
}

impl Accumulator for StateAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let n = values.first().map_or(0, |a| a.len());
        self.0.update_batch(values, &vec![0; n], None, 1)
    }
    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        self.0.grow(1);
        Ok(ScalarValue::Binary(Some(encode_states(
            std::slice::from_ref(&self.0.agg),
            std::slice::from_ref(&self.0.chunks[0][0]),
        ))))
    }
    fn size(&self) -> usize {
        GroupsAccumulator::size(&self.0)
    }
    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let n = states.first().map_or(0, |a| a.len());
        self.0.merge_batch(states, &vec![0; n], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::TimestampMillisecondArray;

    /// Counts per group across several chunks, emitted first in part (the rest renumbered from
    /// 0), then in full.
    #[test]
    fn groups_span_chunks_and_emit_in_parts() {
        let agg = lambda_core::Aggregation {
            name: "n".into(),
            function: lambda_core::AggFunction::Count,
            input: None,
            input_type: None,
            output_type: lambda_core::ColumnType::Int64,
            filter: None,
        };
        let mut g = StateGroups::new(&agg);
        let total = 2 * CHUNK + 10;
        // Group i gets i % 3 + 1 rows.
        let groups: Vec<usize> = (0..total).flat_map(|i| vec![i; i % 3 + 1]).collect();
        let ts: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![0; groups.len()]));
        let ids: ArrayRef = Arc::new(StringArray::from(vec!["e"; groups.len()]));
        g.update_batch(&[ts, ids], &groups, None, total).unwrap();
        let count = |a: &ArrayRef, i: usize| {
            let b = a.as_any().downcast_ref::<BinaryArray>().unwrap();
            match &decode_states(std::slice::from_ref(&agg), b.value(i)).unwrap()[0] {
                AggState::Count(n) => *n as usize,
                other => panic!("{other:?}"),
            }
        };
        let first = g.emit(EmitTo::First(CHUNK + 5));
        assert_eq!(first.len(), CHUNK + 5);
        assert!((0..first.len()).all(|i| count(&first, i) == i % 3 + 1));
        let rest = g.emit(EmitTo::All);
        assert_eq!(rest.len(), total - CHUNK - 5);
        assert!((0..rest.len()).all(|i| count(&rest, i) == (i + CHUNK + 5) % 3 + 1));
    }
}
