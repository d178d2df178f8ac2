//! Row filters of aggregations (`event_type = 'view'`): a small SQL-like expression language,
//! evaluated natively by the speed path and rendered as SQL for the batch path, with the same
//! three-valued logic (a row passes only when the filter is TRUE; NULL compares as unknown).
//!
//! Grammar (keywords case-insensitive):
//!
//! ```text
//! expr    := and ("OR" and)*
//! and     := not ("AND" not)*
//! not     := "NOT" not | atom
//! atom    := "(" expr ")" | column [op literal | "IS" ["NOT"] "NULL" | ["NOT"] "IN" "(" literal, … ")"]
//! op      := = | != | <> | < | <= | > | >=
//! literal := 'text' | number | true | false
//! ```
//!
//! A bare column must be a bool column. Literals must fit the column's type exactly (a decimal
//! literal with more fraction digits than the column's scale is an error, never rounded).

use std::cmp::Ordering;

use crate::types::{ColumnType, Value, format_decimal, parse_decimal};

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `!=` or `<>`
    NotEq,
    /// `<`
    Lt,
    /// `<=`
    LtEq,
    /// `>`
    Gt,
    /// `>=`
    GtEq,
}

impl CmpOp {
    fn sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::NotEq => "<>",
            CmpOp::Lt => "<",
            CmpOp::LtEq => "<=",
            CmpOp::Gt => ">",
            CmpOp::GtEq => ">=",
        }
    }
    fn test(self, ord: Ordering) -> bool {
        match self {
            CmpOp::Eq => ord == Ordering::Equal,
            CmpOp::NotEq => ord != Ordering::Equal,
            CmpOp::Lt => ord == Ordering::Less,
            CmpOp::LtEq => ord != Ordering::Greater,
            CmpOp::Gt => ord == Ordering::Greater,
            CmpOp::GtEq => ord != Ordering::Less,
        }
    }
}

/// A parsed, type-checked filter; column references are indexes into the source schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// A bool column used as a predicate.
    Column(usize),
    /// `column op literal`.
    Compare {
        /// Column index.
        column: usize,
        /// Operator.
        op: CmpOp,
        /// Literal, typed like the column.
        literal: Value,
    },
    /// `column [NOT] IN (literal, …)`.
    InList {
        /// Column index.
        column: usize,
        /// Literals, typed like the column.
        list: Vec<Value>,
        /// `NOT IN`.
        negated: bool,
    },
    /// `column IS [NOT] NULL`.
    IsNull {
        /// Column index.
        column: usize,
        /// `IS NOT NULL`.
        negated: bool,
    },
    /// `a AND b`.
    And(Box<Filter>, Box<Filter>),
    /// `a OR b`.
    Or(Box<Filter>, Box<Filter>),
    /// `NOT a`.
    Not(Box<Filter>),
}

/// The columns a filter may reference: (name, type) in schema order.
pub type Columns<'a> = &'a [(String, ColumnType)];

impl Filter {
    /// Parses and type-checks `text` against `columns`. The error says what is wrong and where.
    pub fn parse(text: &str, columns: Columns<'_>) -> Result<Filter, String> {
        let tokens = lex(text)?;
        let mut p = Parser {
            tokens,
            pos: 0,
            columns,
        };
        let f = p.expr()?;
        if p.pos < p.tokens.len() {
            return Err(format!(
                "unexpected {} after the end of the expression",
                p.tokens[p.pos].describe()
            ));
        }
        Ok(f)
    }

    /// Evaluates the filter on a row with SQL three-valued logic: `None` is unknown (NULL).
    pub fn eval(&self, row: &[Value]) -> Option<bool> {
        match self {
            Filter::Column(c) => match &row[*c] {
                Value::Bool(b) => Some(*b),
                _ => None,
            },
            Filter::Compare {
                column,
                op,
                literal,
            } => {
                let v = &row[*column];
                if v.is_null() {
                    None
                } else if let (Value::Float(a), Value::Float(b)) = (v, literal) {
                    // SQL float comparison: NaN compares unequal (partial_cmp); keep IEEE semantics.
                    a.partial_cmp(b)
                        .map(|o| op.test(o))
                        .or(Some(*op == CmpOp::NotEq))
                } else {
                    Some(op.test(v.total_cmp(literal)))
                }
            }
            Filter::InList {
                column,
                list,
                negated,
            } => {
                let v = &row[*column];
                if v.is_null() {
                    return None;
                }
                let found = list.iter().any(|l| v.total_cmp(l) == Ordering::Equal);
                Some(found != *negated)
            }
            Filter::IsNull { column, negated } => Some(row[*column].is_null() != *negated),
            Filter::And(a, b) => match (a.eval(row), b.eval(row)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Filter::Or(a, b) => match (a.eval(row), b.eval(row)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Filter::Not(a) => a.eval(row).map(|b| !b),
        }
    }

    /// True if the row passes (the filter is TRUE, not FALSE or unknown).
    pub fn passes(&self, row: &[Value]) -> bool {
        self.eval(row) == Some(true)
    }

    /// Renders the filter as a SQL boolean expression with the same semantics.
    pub fn to_sql(&self, columns: Columns<'_>) -> String {
        let col = |c: &usize| quote_ident(&columns[*c].0);
        let lit = |c: &usize, v: &Value| sql_literal(v, columns[*c].1);
        match self {
            Filter::Column(c) => col(c),
            Filter::Compare {
                column,
                op,
                literal,
            } => {
                format!("{} {} {}", col(column), op.sql(), lit(column, literal))
            }
            Filter::InList {
                column,
                list,
                negated,
            } => format!(
                "{} {}IN ({})",
                col(column),
                if *negated { "NOT " } else { "" },
                list.iter()
                    .map(|v| lit(column, v))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Filter::IsNull { column, negated } => {
                format!(
                    "{} IS {}NULL",
                    col(column),
                    if *negated { "NOT " } else { "" }
                )
            }
            Filter::And(a, b) => format!("({} AND {})", a.to_sql(columns), b.to_sql(columns)),
            Filter::Or(a, b) => format!("({} OR {})", a.to_sql(columns), b.to_sql(columns)),
            Filter::Not(a) => format!("(NOT {})", a.to_sql(columns)),
        }
    }
}

/// Quotes a SQL identifier (`"name"`), doubling embedded quotes.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Renders a typed literal as SQL for a column of type `ty`.
pub fn sql_literal(v: &Value, ty: ColumnType) -> String {
    match (v, ty) {
        (Value::Null, _) => "NULL".into(),
        (Value::Str(s), _) => format!("'{}'", s.replace('\'', "''")),
        (Value::Int(i), _) => i.to_string(),
        (Value::Float(f), _) => format!("{f:?}"),
        (Value::Decimal(d), ColumnType::Decimal { precision, scale }) => {
            format!(
                "CAST('{}' AS DECIMAL({precision}, {scale}))",
                format_decimal(*d, scale)
            )
        }
        (Value::Decimal(d), _) => d.to_string(),
        (Value::Bool(b), _) => b.to_string(),
        (Value::Timestamp(t), _) => format!("TIMESTAMP '{}'", crate::time::format_ts(*t)),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Str(s) => format!("string '{s}'"),
            Tok::Num(s) => format!("number {s}"),
            Tok::Op(s) => format!("`{s}`"),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::Comma => "`,`".into(),
        }
    }
    fn is_kw(&self, kw: &str) -> bool {
        matches!(self, Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
    }
}

fn lex(text: &str) -> Result<Vec<Tok>, String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push(Tok::LParen);
                i += 1
            }
            b')' => {
                out.push(Tok::RParen);
                i += 1
            }
            b',' => {
                out.push(Tok::Comma);
                i += 1
            }
            b'\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => {
                            return Err(format!("unterminated string starting at offset {}", i));
                        }
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                            s.push('\'');
                            i += 2
                        }
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(_) => {
                            let ch = text[i..].chars().next().unwrap_or('\u{fffd}');
                            s.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                }
                out.push(Tok::Str(s));
            }
            b'"' => {
                let end = text[i + 1..]
                    .find('"')
                    .ok_or_else(|| format!("unterminated quoted identifier at offset {i}"))?;
                out.push(Tok::Ident(text[i + 1..i + 1 + end].to_string()));
                i += end + 2;
            }
            b'=' => {
                out.push(Tok::Op("="));
                i += 1
            }
            b'!' if b.get(i + 1) == Some(&b'=') => {
                out.push(Tok::Op("!="));
                i += 2
            }
            b'<' => {
                let (op, n) = match b.get(i + 1) {
                    Some(b'=') => ("<=", 2),
                    Some(b'>') => ("<>", 2),
                    _ => ("<", 1),
                };
                out.push(Tok::Op(op));
                i += n
            }
            b'>' => {
                let (op, n) = if b.get(i + 1) == Some(&b'=') {
                    (">=", 2)
                } else {
                    (">", 1)
                };
                out.push(Tok::Op(op));
                i += n
            }
            b'-' | b'+' | b'.' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < b.len()
                    && (b[i].is_ascii_digit()
                        || b[i] == b'.'
                        || b[i] == b'e'
                        || b[i] == b'E'
                        || ((b[i] == b'-' || b[i] == b'+') && matches!(b[i - 1], b'e' | b'E')))
                {
                    i += 1;
                }
                out.push(Tok::Num(text[start..i].to_string()));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(Tok::Ident(text[start..i].to_string()));
            }
            _ => {
                let ch = text[i..].chars().next().unwrap_or('?');
                return Err(format!("unexpected character `{ch}` at offset {i}"));
            }
        }
    }
    Ok(out)
}

struct Parser<'a> {
    tokens: Vec<Tok>,
    pos: usize,
    columns: Columns<'a>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.peek().is_some_and(|t| t.is_kw(kw)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expr(&mut self) -> Result<Filter, String> {
        let mut left = self.and()?;
        while self.eat_kw("or") {
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Filter, String> {
        let mut left = self.not()?;
        while self.eat_kw("and") {
            left = Filter::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }
    fn not(&mut self) -> Result<Filter, String> {
        if self.eat_kw("not") {
            return Ok(Filter::Not(Box::new(self.not()?)));
        }
        self.atom()
    }
    fn atom(&mut self) -> Result<Filter, String> {
        match self.next() {
            Some(Tok::LParen) => {
                let e = self.expr()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    Some(t) => Err(format!("expected `)` but found {}", t.describe())),
                    None => Err("missing `)` at the end of the expression".into()),
                }
            }
            Some(Tok::Ident(name)) if is_reserved(&name) => {
                Err(format!("expected a column name but found keyword `{name}`"))
            }
            Some(Tok::Ident(name)) => {
                let column = self
                    .columns
                    .iter()
                    .position(|(n, _)| *n == name)
                    .ok_or_else(|| {
                        format!(
                            "unknown column `{name}` (the source has: {})",
                            self.columns
                                .iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?;
                let ty = self.columns[column].1;
                self.predicate(column, &name, ty)
            }
            Some(t) => Err(format!(
                "expected a column name or `(` but found {}",
                t.describe()
            )),
            None => Err("the expression is empty or ends too early".into()),
        }
    }
    fn predicate(&mut self, column: usize, name: &str, ty: ColumnType) -> Result<Filter, String> {
        if self.eat_kw("is") {
            let negated = self.eat_kw("not");
            if !self.eat_kw("null") {
                return Err(format!("expected NULL after `{name} IS`"));
            }
            return Ok(Filter::IsNull { column, negated });
        }
        let negated_in = if self.peek().is_some_and(|t| t.is_kw("not"))
            && self.tokens.get(self.pos + 1).is_some_and(|t| t.is_kw("in"))
        {
            self.pos += 1;
            true
        } else {
            false
        };
        if self.eat_kw("in") {
            if self.next() != Some(Tok::LParen) {
                return Err(format!("expected `(` after `{name} IN`"));
            }
            let mut list = Vec::new();
            loop {
                list.push(self.literal(name, ty)?);
                match self.next() {
                    Some(Tok::Comma) => continue,
                    Some(Tok::RParen) => break,
                    _ => return Err(format!("expected `,` or `)` in the IN list of `{name}`")),
                }
            }
            return Ok(Filter::InList {
                column,
                list,
                negated: negated_in,
            });
        }
        match self.peek() {
            Some(Tok::Op(op)) => {
                let op = match *op {
                    "=" => CmpOp::Eq,
                    "!=" | "<>" => CmpOp::NotEq,
                    "<" => CmpOp::Lt,
                    "<=" => CmpOp::LtEq,
                    ">" => CmpOp::Gt,
                    _ => CmpOp::GtEq,
                };
                self.pos += 1;
                let literal = self.literal(name, ty)?;
                if matches!(ty, ColumnType::Bool) && !matches!(op, CmpOp::Eq | CmpOp::NotEq) {
                    return Err(format!(
                        "bool column `{name}` can only be compared with = or <>"
                    ));
                }
                Ok(Filter::Compare {
                    column,
                    op,
                    literal,
                })
            }
            _ if ty == ColumnType::Bool => Ok(Filter::Column(column)),
            Some(t) => Err(format!(
                "expected an operator after `{name}` but found {}",
                t.describe()
            )),
            None => Err(format!(
                "`{name}` is a {ty} column, not bool: compare it with a value (e.g. `{name} = …`)"
            )),
        }
    }
    fn literal(&mut self, name: &str, ty: ColumnType) -> Result<Value, String> {
        let tok = self
            .next()
            .ok_or_else(|| format!("expected a value to compare `{name}` with"))?;
        let mismatch = |t: &Tok| {
            format!(
                "`{name}` is a {ty} column but is compared with {}",
                t.describe()
            )
        };
        match (&tok, ty) {
            (Tok::Ident(k), _) if k.eq_ignore_ascii_case("null") => Err(format!(
                "comparing `{name}` with NULL is never true; use `{name} IS NULL`"
            )),
            (Tok::Str(s), ColumnType::String) => Ok(Value::Str(s.clone())),
            (Tok::Str(s), ColumnType::Timestamp) => crate::time::parse_rfc3339_ms(s)
                .map(Value::Timestamp)
                .map_err(|e| format!("`{name}`: {e}")),
            (Tok::Num(n), ColumnType::Int64) => n
                .parse::<i64>()
                .map(Value::Int)
                .map_err(|_| format!("`{name}` is int64 but `{n}` is not an integer")),
            (Tok::Num(n), ColumnType::Float64) => n
                .parse::<f64>()
                .map(Value::Float)
                .map_err(|_| format!("`{name}`: `{n}` is not a number")),
            (Tok::Num(n), ColumnType::Decimal { precision, scale }) => {
                parse_decimal(n, precision, scale)
                    .map(Value::Decimal)
                    .map_err(|e| format!("`{name}`: {e}"))
            }
            (Tok::Ident(k), ColumnType::Bool) if k.eq_ignore_ascii_case("true") => {
                Ok(Value::Bool(true))
            }
            (Tok::Ident(k), ColumnType::Bool) if k.eq_ignore_ascii_case("false") => {
                Ok(Value::Bool(false))
            }
            (t, _) => Err(mismatch(t)),
        }
    }
}

fn is_reserved(s: &str) -> bool {
    ["and", "or", "not", "is", "null", "in", "true", "false"]
        .iter()
        .any(|k| s.eq_ignore_ascii_case(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Vec<(String, ColumnType)> {
        vec![
            ("event_type".into(), ColumnType::String),
            (
                "amount".into(),
                ColumnType::Decimal {
                    precision: 10,
                    scale: 2,
                },
            ),
            ("n".into(), ColumnType::Int64),
            ("card_present".into(), ColumnType::Bool),
        ]
    }

    fn row(t: Option<&str>, amount: Option<i128>, flag: Option<bool>) -> Vec<Value> {
        vec![
            t.map_or(Value::Null, |s| Value::Str(s.into())),
            amount.map_or(Value::Null, Value::Decimal),
            Value::Int(3),
            flag.map_or(Value::Null, Value::Bool),
        ]
    }

    #[test]
    fn evaluates_with_three_valued_logic() {
        let c = cols();
        let f = Filter::parse("event_type = 'view' AND amount >= 10.5", &c).unwrap();
        assert!(f.passes(&row(Some("view"), Some(1050), None)));
        assert!(!f.passes(&row(Some("view"), Some(1049), None)));
        assert_eq!(f.eval(&row(None, Some(2000), None)), None);
        let f = Filter::parse("NOT (event_type = 'view')", &c).unwrap();
        assert_eq!(f.eval(&row(None, None, None)), None);
        let f = Filter::parse("event_type = 'x' OR amount IS NULL", &c).unwrap();
        assert!(f.passes(&row(None, None, None)));
        let f = Filter::parse("event_type NOT IN ('a', 'b') and card_present", &c).unwrap();
        assert!(f.passes(&row(Some("c"), None, Some(true))));
        assert!(!f.passes(&row(Some("a"), None, Some(true))));
        assert_eq!(
            f.to_sql(&c),
            "(\"event_type\" NOT IN ('a', 'b') AND \"card_present\")"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let c = cols();
        let e = |s: &str| Filter::parse(s, &c).unwrap_err();
        assert!(e("merchant = 'x'").contains("unknown column `merchant`"));
        assert!(e("amount > 'x'").contains("decimal(10,2) column but is compared with string"));
        assert!(e("amount > 1.005").contains("more than 2 digits"));
        assert!(e("n = 1.5").contains("not an integer"));
        assert!(e("event_type = NULL").contains("IS NULL"));
        assert!(e("event_type = 'a' AND").contains("ends too early"));
        assert!(e("(event_type = 'a'").contains("missing `)`"));
        assert!(e("event_type").contains("not bool"));
        assert!(e("event_type = 'a' event_type").contains("unexpected"));
        assert!(e("event_type = 'a").contains("unterminated"));
        assert!(e("card_present > true").contains("only be compared"));
        assert!(e("n # 3").contains("unexpected character"));
    }
}
