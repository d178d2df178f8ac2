//! The laws of the aggregation states, as property tests (Summingbird's monoid laws):
//! merge is associative and commutative, the empty state is its identity, and merging the states
//! of any split of the events equals aggregating all of them — exactly for counts, integers,
//! decimals, min/max, distinct sets, sketches and last values; for floating-point results within a
//! relative error of 1e-9 (the documented bound for sums and moments of at most a few hundred
//! values of magnitude ≤ 1e6).
//!
//! Encoding is checked too: decode(encode(s)) == s, equal exact states encode to equal bytes, and
//! merging straight from the bytes (the batch job's path) equals decoding and merging.

use lambda_core::agg::{AggState, DistinctRef, decode_states, encode_states};
use lambda_core::codec::Reader;
use lambda_core::filter::Filter;
use lambda_core::{AggFunction, Aggregation, ColumnType, Value};
use proptest::prelude::*;

const DEC: ColumnType = ColumnType::Decimal {
    precision: 10,
    scale: 2,
};

#[derive(Debug, Clone)]
struct Ev {
    row: Vec<Value>,
    ts: i64,
    id: String,
}

fn value_strategy(ty: ColumnType) -> BoxedStrategy<Value> {
    let v: BoxedStrategy<Value> = match ty {
        ColumnType::Int64 => (-1_000_000i64..1_000_000).prop_map(Value::Int).boxed(),
        ColumnType::Float64 => (-1.0e6f64..1.0e6).prop_map(Value::Float).boxed(),
        ColumnType::Decimal { .. } => (-100_000_000i128..100_000_000)
            .prop_map(Value::Decimal)
            .boxed(),
        ColumnType::String => "[a-e]{0,2}".prop_map(Value::Str).boxed(),
        ColumnType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        ColumnType::Timestamp => (0i64..1_000_000).prop_map(Value::Timestamp).boxed(),
    };
    prop_oneof![1 => Just(Value::Null), 6 => v].boxed()
}

fn events(ty: ColumnType) -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec(
        (
            value_strategy(ty),
            prop::option::of(any::<bool>()),
            0i64..20,
        ),
        0..60,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (x, flag, ts))| Ev {
                row: vec![x, flag.map_or(Value::Null, Value::Bool)],
                ts,
                id: format!("e{i:03}"),
            })
            .collect()
    })
}

fn cases() -> Vec<(AggFunction, Option<ColumnType>)> {
    use AggFunction::*;
    use ColumnType::*;
    let mut v = vec![(Count, None)];
    for ty in [Int64, Float64, DEC] {
        for f in [
            Count,
            Sum,
            Avg,
            Min,
            Max,
            VarSamp,
            VarPop,
            StddevSamp,
            StddevPop,
            CountDistinct,
            ApproxCountDistinct,
            LastValue,
        ] {
            v.push((f, Some(ty)));
        }
    }
    for ty in [String, Bool, Timestamp] {
        for f in [
            Count,
            Min,
            Max,
            CountDistinct,
            ApproxCountDistinct,
            LastValue,
        ] {
            v.push((f, Some(ty)));
        }
    }
    v
}

fn aggregation(f: AggFunction, ty: Option<ColumnType>, filtered: bool) -> Aggregation {
    let cols = vec![
        ("x".to_string(), ty.unwrap_or(ColumnType::Int64)),
        ("flag".to_string(), ColumnType::Bool),
    ];
    Aggregation {
        name: format!("{f}"),
        function: f,
        input: ty.map(|_| 0),
        input_type: ty,
        output_type: f.output_type(ty).unwrap(),
        filter: filtered.then(|| Filter::parse("flag", &cols).unwrap()),
    }
}

fn aggregate(a: &Aggregation, evs: &[Ev]) -> AggState {
    let mut s = a.empty();
    for e in evs {
        a.update(&mut s, &e.row, e.ts, &e.id);
    }
    s
}

fn merged(a: &Aggregation, x: &AggState, y: &AggState) -> AggState {
    let mut s = x.clone();
    a.merge(&mut s, y);
    s
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Same feature value: exact, except float results within the documented bound.
fn assert_same(a: &Aggregation, x: &AggState, y: &AggState) -> Result<(), TestCaseError> {
    let (fx, fy) = (a.finalize(x).unwrap(), a.finalize(y).unwrap());
    match (&fx, &fy) {
        (Value::Float(p), Value::Float(q))
            if a.output_type == ColumnType::Float64
                && a.function != AggFunction::Min
                && a.function != AggFunction::Max
                && a.function != AggFunction::LastValue =>
        {
            prop_assert!(close(*p, *q), "{}: {p} vs {q}", a.name)
        }
        _ => prop_assert_eq!(&fx, &fy, "{}", a.name),
    }
    let exact = !matches!(x, AggState::SumFloat { .. } | AggState::Moments { .. });
    if exact {
        let aggs = std::slice::from_ref(a);
        prop_assert_eq!(
            encode_states(aggs, std::slice::from_ref(x)),
            encode_states(aggs, std::slice::from_ref(y)),
            "{}: equal states must encode equally",
            a.name
        );
    }
    Ok(())
}

fn check_laws(
    evs: &[Ev],
    cut1: usize,
    cut2: usize,
    filtered: bool,
    types: &[ColumnType],
) -> Result<(), TestCaseError> {
    let n = evs.len();
    let (i, j) = (cut1.min(n), cut2.min(n));
    let (i, j) = (i.min(j), i.max(j));
    for (f, ty) in cases() {
        if let Some(t) = ty
            && !types.contains(&t)
        {
            continue;
        }
        let a = aggregation(f, ty, filtered);
        let whole = aggregate(&a, evs);
        // A string input applied borrowed (the batch job's state functions) is the same state.
        if ty == Some(ColumnType::String) {
            let mut borrowed = a.empty();
            for e in evs {
                if a.filter.as_ref().is_none_or(|f| f.passes(&e.row)) {
                    let v = match &e.row[0] {
                        Value::Str(s) => Some(s.as_str()),
                        _ => None,
                    };
                    a.apply_str(&mut borrowed, v, e.ts, &e.id);
                }
            }
            prop_assert_eq!(&borrowed, &whole, "{}: applied borrowed", a.name);
        }
        let (p, q, r) = (
            aggregate(&a, &evs[..i]),
            aggregate(&a, &evs[i..j]),
            aggregate(&a, &evs[j..]),
        );
        // Split law: merging the parts equals the whole.
        assert_same(&a, &merged(&a, &merged(&a, &p, &q), &r), &whole)?;
        // Associativity.
        assert_same(
            &a,
            &merged(&a, &merged(&a, &p, &q), &r),
            &merged(&a, &p, &merged(&a, &q, &r)),
        )?;
        // Commutativity (also of a scrambled split).
        assert_same(&a, &merged(&a, &p, &r), &merged(&a, &r, &p))?;
        let mut scrambled = merged(&a, &r, &p);
        a.merge(&mut scrambled, &q);
        assert_same(&a, &scrambled, &whole)?;
        // Identity, on both sides, exactly.
        prop_assert_eq!(&merged(&a, &a.empty(), &whole), &whole);
        prop_assert_eq!(&merged(&a, &whole, &a.empty()), &whole);
        // Round trip through the versioned encoding.
        let aggs = std::slice::from_ref(&a);
        let bytes = encode_states(aggs, std::slice::from_ref(&whole));
        let back = decode_states(aggs, &bytes).unwrap();
        assert_same(&a, &back[0], &whole)?;
        prop_assert_eq!(encode_states(aggs, &back), bytes);
        // Merging straight from the encoding equals decoding and merging.
        let mut from_bytes = merged(&a, &p, &q);
        let r_bytes = encode_states(aggs, std::slice::from_ref(&r));
        let mut reader = Reader::new(&r_bytes[1..]);
        a.merge_encoded(&mut from_bytes, &mut reader).unwrap();
        prop_assert!(reader.is_empty());
        prop_assert_eq!(&from_bytes, &merged(&a, &merged(&a, &p, &q), &r));
        // The borrowed distinct set counts the same values.
        if let AggState::Distinct(set) = &whole {
            let parts: Vec<Vec<u8>> = [&p, &q, &r]
                .iter()
                .map(|part| encode_states(aggs, std::slice::from_ref(*part)))
                .collect();
            let mut borrowed = DistinctRef::default();
            for b in &parts {
                borrowed
                    .merge_encoded(&a, &mut Reader::new(&b[1..]))
                    .unwrap();
            }
            prop_assert_eq!(borrowed.len(), set.len());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn laws_int(evs in events(ColumnType::Int64), c1 in 0usize..60, c2 in 0usize..60, filt in any::<bool>()) {
        check_laws(&evs, c1, c2, filt, &[ColumnType::Int64])?;
    }

    #[test]
    fn laws_float(evs in events(ColumnType::Float64), c1 in 0usize..60, c2 in 0usize..60, filt in any::<bool>()) {
        check_laws(&evs, c1, c2, filt, &[ColumnType::Float64])?;
    }

    #[test]
    fn laws_decimal(evs in events(DEC), c1 in 0usize..60, c2 in 0usize..60, filt in any::<bool>()) {
        check_laws(&evs, c1, c2, filt, &[DEC])?;
    }

    #[test]
    fn laws_string(evs in events(ColumnType::String), c1 in 0usize..60, c2 in 0usize..60, filt in any::<bool>()) {
        check_laws(&evs, c1, c2, filt, &[ColumnType::String])?;
    }

    #[test]
    fn laws_bool_and_timestamp(evs in events(ColumnType::Bool), tevs in events(ColumnType::Timestamp), c1 in 0usize..60, c2 in 0usize..60) {
        check_laws(&evs, c1, c2, false, &[ColumnType::Bool])?;
        check_laws(&tevs, c1, c2, true, &[ColumnType::Timestamp])?;
    }

    /// The variance family over decimals is exact: merged in any split it gives the same bits,
    /// and it equals a two-pass computation over the values (mean first, then deviations).
    #[test]
    fn decimal_variance_is_exact(xs in prop::collection::vec(-99_999_999i128..99_999_999, 2..200), cut in 0usize..200) {
        let var = aggregation(AggFunction::VarSamp, Some(DEC), false);
        let evs: Vec<Ev> = xs.iter().enumerate().map(|(i, x)| Ev { row: vec![Value::Decimal(*x), Value::Null], ts: 0, id: i.to_string() }).collect();
        let whole = aggregate(&var, &evs);
        let cut = cut.min(evs.len());
        let mut split = aggregate(&var, &evs[cut..]);
        var.merge(&mut split, &aggregate(&var, &evs[..cut]));
        prop_assert_eq!(&split, &whole);
        let n = xs.len() as f64;
        let mean = xs.iter().map(|x| *x as f64).sum::<f64>() / n;
        let want = xs.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0) / 1e4;
        let got = var.finalize(&whole).unwrap();
        prop_assert!(matches!(got, Value::Float(g) if (g - want).abs() <= 1e-9 * want.max(1e-9)), "{got:?} vs {want}");
    }

    /// Decimal sums and averages are exact integer arithmetic: compare with an independent i128 sum.
    #[test]
    fn decimal_sum_and_avg_are_exact(xs in prop::collection::vec(-99_999_999i128..99_999_999, 1..200)) {
        let sum_agg = aggregation(AggFunction::Sum, Some(DEC), false);
        let avg_agg = aggregation(AggFunction::Avg, Some(DEC), false);
        let evs: Vec<Ev> = xs.iter().enumerate().map(|(i, x)| Ev { row: vec![Value::Decimal(*x), Value::Null], ts: 0, id: i.to_string() }).collect();
        let total: i128 = xs.iter().sum();
        prop_assert_eq!(sum_agg.finalize(&aggregate(&sum_agg, &evs)).unwrap(), Value::Decimal(total));
        // avg at scale 2+4 = 6, truncated toward zero.
        prop_assert_eq!(avg_agg.finalize(&aggregate(&avg_agg, &evs)).unwrap(), Value::Decimal(total * 10_000 / xs.len() as i128));
    }
}

#[test]
fn finalize_edge_cases() {
    let var = aggregation(AggFunction::VarSamp, Some(ColumnType::Float64), false);
    let one = vec![Ev {
        row: vec![Value::Float(3.0), Value::Null],
        ts: 0,
        id: "a".into(),
    }];
    assert_eq!(var.finalize(&aggregate(&var, &one)).unwrap(), Value::Null);
    let pop = aggregation(AggFunction::VarPop, Some(ColumnType::Float64), false);
    assert_eq!(
        pop.finalize(&aggregate(&pop, &one)).unwrap(),
        Value::Float(0.0)
    );
    let sum = aggregation(AggFunction::Sum, Some(ColumnType::Int64), false);
    assert_eq!(sum.finalize(&sum.empty()).unwrap(), Value::Null);
    let big: Vec<Ev> = (0..3)
        .map(|i| Ev {
            row: vec![Value::Int(i64::MAX), Value::Null],
            ts: 0,
            id: i.to_string(),
        })
        .collect();
    assert!(
        sum.finalize(&aggregate(&sum, &big))
            .unwrap_err()
            .to_string()
            .contains("overflows")
    );
    let avg = aggregation(AggFunction::Avg, Some(DEC), false);
    let thirds: Vec<Ev> = [1i128, 1, 0]
        .iter()
        .enumerate()
        .map(|(i, x)| Ev {
            row: vec![Value::Decimal(*x), Value::Null],
            ts: 0,
            id: i.to_string(),
        })
        .collect();
    // 0.02 / 3 = 0.006666.. -> 0.006666 (truncated, scale 6)
    assert_eq!(
        avg.finalize(&aggregate(&avg, &thirds)).unwrap(),
        Value::Decimal(6666)
    );
    let last = aggregation(AggFunction::LastValue, Some(ColumnType::String), false);
    let evs = vec![
        Ev {
            row: vec![Value::Str("late-id".into()), Value::Null],
            ts: 5,
            id: "b".into(),
        },
        Ev {
            row: vec![Value::Str("early-id".into()), Value::Null],
            ts: 5,
            id: "a".into(),
        },
        Ev {
            row: vec![Value::Null, Value::Null],
            ts: 9,
            id: "c".into(),
        },
    ];
    assert_eq!(
        last.finalize(&aggregate(&last, &evs)).unwrap(),
        Value::Str("late-id".into())
    );
}

#[test]
fn corrupt_and_foreign_bytes_are_errors() {
    let a = aggregation(AggFunction::Sum, Some(DEC), false);
    let b = aggregation(AggFunction::Count, None, false);
    let bytes = encode_states(std::slice::from_ref(&a), &[a.empty()]);
    assert!(
        decode_states(std::slice::from_ref(&b), &bytes)
            .unwrap_err()
            .to_string()
            .contains("state")
    );
    assert!(decode_states(std::slice::from_ref(&a), &bytes[..bytes.len() - 1]).is_err());
    let mut future = bytes.clone();
    future[0] = 99;
    assert!(
        decode_states(std::slice::from_ref(&a), &future)
            .unwrap_err()
            .to_string()
            .contains("version 99")
    );
    let mut trailing = bytes;
    trailing.push(0);
    assert!(decode_states(std::slice::from_ref(&a), &trailing).is_err());
}

#[test]
fn merging_foreign_or_truncated_bytes_in_place_is_an_error_naming_the_aggregation() {
    // A sum's bytes merged into a count (the fixed-size fast path reads the tag first).
    let sum = aggregation(AggFunction::Sum, Some(DEC), false);
    let count = aggregation(AggFunction::Count, None, false);
    let bytes = encode_states(std::slice::from_ref(&sum), &[sum.empty()]);
    let mut state = count.empty();
    let err = count
        .merge_encoded(&mut state, &mut Reader::new(&bytes[1..]))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&count.name), "{err}");
    assert!(err.contains("`d` state but `c` was expected"), "{err}");
    // Nothing to read where the tag should be; and a sum cut short.
    assert!(
        count
            .merge_encoded(&mut state, &mut Reader::new(&[]))
            .is_err()
    );
    let mut s = sum.empty();
    assert!(
        sum.merge_encoded(&mut s, &mut Reader::new(&bytes[1..bytes.len() - 1]))
            .is_err()
    );
    assert_eq!(state, count.empty());
}
