//! The feature definition: one TOML file per feature view, parsed and validated into a
//! [`FeatureView`] that every layer derives from.
//!
//! ```toml
//! name = "fraud_user"
//! windows = ["5m", "1h", "1d", "30d", "90d"]      # default windows of every aggregation
//!
//! [source]
//! name = "transactions"
//! entity = "user_id"
//! event-time = "ts"
//! event-id = "event_id"
//! columns = [
//!   { name = "event_id", type = "string" },
//!   { name = "user_id", type = "string" },
//!   { name = "amount", type = "decimal(10,2)", nullable = true },
//!   { name = "ts", type = "timestamp" },
//! ]
//!
//! [[aggregation]]
//! name = "amount_sum"
//! function = "sum"
//! input = "amount"
//! filter = "amount > 0"
//!
//! [speed]
//! tile = "5m"
//! out-of-orderness = "30s"
//! allowed-lateness = "1h"
//!
//! [batch]
//! history = "file://data/history"
//! ```
//!
//! Every validation error names the file, the field (`aggregation[2].windows[1]`) and the problem.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::agg::{AggFunction, Aggregation};
use crate::filter::Filter;
use crate::time::{Span, hop};
use crate::types::ColumnType;

/// A feature definition could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("{file}: cannot read the feature definition: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or fields of the wrong shape / unknown fields.
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The TOML parser's message, with line and column.
        message: String,
    },
    /// Well-formed, but not a valid feature view.
    #[error("{file}: field `{field}`: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Path of the offending field, e.g. `aggregation[2].filter`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl SpecError {
    /// The offending field path, for `Invalid` errors.
    pub fn field(&self) -> Option<&str> {
        match self {
            SpecError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawView {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    windows: Option<Vec<String>>,
    source: RawSource,
    #[serde(rename = "aggregation")]
    aggregations: Vec<RawAggregation>,
    #[serde(default)]
    speed: RawSpeed,
    #[serde(default)]
    batch: RawBatch,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawSource {
    name: String,
    entity: String,
    event_time: String,
    event_id: String,
    columns: Vec<RawColumn>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawColumn {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    nullable: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawAggregation {
    name: String,
    function: String,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    windows: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawSpeed {
    tile: Option<String>,
    out_of_orderness: Option<String>,
    allowed_lateness: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawBatch {
    history: Option<String>,
    cutoff_offset: Option<String>,
    sql: Option<String>,
}

/// One column of the source schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Column name (JSON key, Parquet column).
    pub name: String,
    /// Its type.
    pub ty: ColumnType,
    /// Whether it may be NULL or missing.
    pub nullable: bool,
}

/// The event source of a view.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Source name (table name in SQL, stream name by default).
    pub name: String,
    /// Columns in schema order.
    pub columns: Vec<Column>,
    /// Index of the entity key column.
    pub entity: usize,
    /// Index of the event-time column (a timestamp).
    pub event_time: usize,
    /// Index of the event-id column (deduplication key).
    pub event_id: usize,
}

impl Source {
    /// (name, type) pairs, the form filters are checked against.
    pub fn name_types(&self) -> Vec<(String, ColumnType)> {
        self.columns
            .iter()
            .map(|c| (c.name.clone(), c.ty))
            .collect()
    }
    /// Index of a column by name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// An aggregation plus the windows it is served over.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregationSpec {
    /// The aggregation (function, input, filter, output type).
    pub aggregation: Aggregation,
    /// Served windows, ascending.
    pub windows: Vec<Span>,
}

/// Speed-layer settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeedSettings {
    /// Tile width (default 5 minutes).
    pub tile: Span,
    /// Watermark delay behind the max event time (default 30 s).
    pub out_of_orderness: Span,
    /// How far behind the watermark an event may still be applied (default 1 h).
    pub allowed_lateness: Span,
}

/// Batch-layer settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSettings {
    /// Object-store URL of the Parquet history (`file://…` or `s3://…`).
    pub history: String,
    /// The nightly cutoff is midnight UTC plus this offset (default 0).
    pub cutoff_offset: Span,
    /// Hand-written SQL replacing the generated one (path relative to the definition file).
    pub sql: Option<PathBuf>,
}

/// A validated feature view: the one definition both paths derive from.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureView {
    /// View name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// The event source.
    pub source: Source,
    /// Aggregations in definition order.
    pub aggregations: Vec<AggregationSpec>,
    /// Speed settings.
    pub speed: SpeedSettings,
    /// Batch settings.
    pub batch: BatchSettings,
}

/// One served feature: an aggregation over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    /// `<aggregation>_<window>`, e.g. `txn_count_5m`.
    pub name: String,
    /// Index into [`FeatureView::aggregations`].
    pub aggregation: usize,
    /// The window.
    pub window: Span,
}

impl FeatureView {
    /// Reads and validates a feature definition file.
    pub fn load(path: impl AsRef<Path>) -> Result<FeatureView, SpecError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        let mut view = Self::parse(&text, path)?;
        if let Some(sql) = &view.batch.sql
            && sql.is_relative()
        {
            view.batch.sql = Some(path.parent().unwrap_or(Path::new(".")).join(sql));
        }
        Ok(view)
    }

    /// Parses and validates definition text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<FeatureView, SpecError> {
        let raw: RawView = toml::from_str(text).map_err(|e| SpecError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        validate(raw, file)
    }

    /// The plain aggregations, in order (the unit states are kept for).
    pub fn aggs(&self) -> Vec<Aggregation> {
        self.aggregations
            .iter()
            .map(|a| a.aggregation.clone())
            .collect()
    }

    /// Every served feature, in definition order (aggregation, then window ascending).
    pub fn features(&self) -> Vec<Feature> {
        self.aggregations
            .iter()
            .enumerate()
            .flat_map(|(i, a)| {
                a.windows.iter().map(move |w| Feature {
                    name: format!("{}_{}", a.aggregation.name, w),
                    aggregation: i,
                    window: *w,
                })
            })
            .collect()
    }

    /// The longest window of any aggregation.
    pub fn max_window(&self) -> Span {
        self.aggregations
            .iter()
            .flat_map(|a| a.windows.iter().copied())
            .max()
            .unwrap_or(Span::from_millis(0))
    }

    /// The entity key column.
    pub fn entity_column(&self) -> &Column {
        &self.source.columns[self.source.entity]
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn validate(raw: RawView, file: &Path) -> Result<FeatureView, SpecError> {
    let err = |field: &str, message: String| SpecError::Invalid {
        file: file.to_path_buf(),
        field: field.to_string(),
        message,
    };
    if !is_identifier(&raw.name) {
        return Err(err(
            "name",
            format!("`{}` must be lower_snake_case (a-z, 0-9, _)", raw.name),
        ));
    }

    // Source schema.
    let src = raw.source;
    if src.columns.is_empty() {
        return Err(err(
            "source.columns",
            "the source needs at least one column".into(),
        ));
    }
    let mut columns = Vec::with_capacity(src.columns.len());
    let mut seen = HashSet::new();
    for (i, c) in src.columns.iter().enumerate() {
        if c.name.is_empty() {
            return Err(err(
                &format!("source.columns[{i}].name"),
                "column name is empty".into(),
            ));
        }
        if !seen.insert(c.name.as_str()) {
            return Err(err(
                &format!("source.columns[{i}].name"),
                format!("duplicate column `{}`", c.name),
            ));
        }
        let ty =
            ColumnType::parse(&c.ty).map_err(|m| err(&format!("source.columns[{i}].type"), m))?;
        columns.push(Column {
            name: c.name.clone(),
            ty,
            nullable: c.nullable,
        });
    }
    let find = |columns: &[Column], field: &str, name: &str| {
        columns.iter().position(|c| c.name == name).ok_or_else(|| {
            err(
                field,
                format!(
                    "unknown column `{name}` (the source has: {})",
                    columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
    };
    let entity = find(&columns, "source.entity", &src.entity)?;
    let event_time = find(&columns, "source.event-time", &src.event_time)?;
    let event_id = find(&columns, "source.event-id", &src.event_id)?;
    let col = |i: usize| &columns[i];
    if !matches!(col(entity).ty, ColumnType::String | ColumnType::Int64) || col(entity).nullable {
        return Err(err(
            "source.entity",
            format!(
                "entity column `{}` must be a non-nullable string or int64",
                src.entity
            ),
        ));
    }
    if col(event_time).ty != ColumnType::Timestamp || col(event_time).nullable {
        return Err(err(
            "source.event-time",
            format!(
                "event-time column `{}` must be a non-nullable timestamp",
                src.event_time
            ),
        ));
    }
    if col(event_id).ty != ColumnType::String || col(event_id).nullable {
        return Err(err(
            "source.event-id",
            format!(
                "event-id column `{}` must be a non-nullable string",
                src.event_id
            ),
        ));
    }
    let source = Source {
        name: src.name,
        columns,
        entity,
        event_time,
        event_id,
    };
    if !is_identifier(&source.name) {
        return Err(err(
            "source.name",
            format!("`{}` must be lower_snake_case", source.name),
        ));
    }

    // Speed settings first: windows are checked against the tile.
    let span = |field: &str, v: &Option<String>, default: Span| -> Result<Span, SpecError> {
        match v {
            None => Ok(default),
            Some(s) => s.parse::<Span>().map_err(|m| err(field, m)),
        }
    };
    let speed = SpeedSettings {
        tile: span("speed.tile", &raw.speed.tile, Span::minutes(5))?,
        out_of_orderness: span(
            "speed.out-of-orderness",
            &raw.speed.out_of_orderness,
            Span::from_millis(30_000),
        )?,
        allowed_lateness: span(
            "speed.allowed-lateness",
            &raw.speed.allowed_lateness,
            Span::hours(1),
        )?,
    };
    if speed.tile.millis() <= 0 || !Span::days(1).is_multiple_of(speed.tile) {
        return Err(err(
            "speed.tile",
            format!("tile `{}` must be positive and divide one day", speed.tile),
        ));
    }

    // Aggregations.
    if raw.aggregations.is_empty() {
        return Err(err(
            "aggregation",
            "the view needs at least one [[aggregation]]".into(),
        ));
    }
    let name_types = source.name_types();
    let mut aggregations = Vec::new();
    let mut agg_names = HashSet::new();
    for (i, a) in raw.aggregations.iter().enumerate() {
        let f = |name: &str| format!("aggregation[{i}].{name}");
        if !is_identifier(&a.name) {
            return Err(err(
                &f("name"),
                format!("`{}` must be lower_snake_case", a.name),
            ));
        }
        if !agg_names.insert(a.name.as_str()) {
            return Err(err(
                &f("name"),
                format!("duplicate aggregation name `{}`", a.name),
            ));
        }
        let function = AggFunction::parse(&a.function).map_err(|m| err(&f("function"), m))?;
        let input = match &a.input {
            Some(name) => Some(find(&source.columns, &f("input"), name)?),
            None => None,
        };
        let input_type = input.map(|i| source.columns[i].ty);
        let output_type = function.output_type(input_type).map_err(|m| {
            let field = if input.is_some() {
                f("function")
            } else {
                f("input")
            };
            err(&field, m)
        })?;
        let filter = match &a.filter {
            Some(text) => Some(Filter::parse(text, &name_types).map_err(|m| err(&f("filter"), m))?),
            None => None,
        };
        let window_texts = match (&a.windows, &raw.windows) {
            (Some(w), _) => (w, f("windows")),
            (None, Some(w)) => (w, "windows".to_string()),
            (None, None) => {
                return Err(err(
                    &f("windows"),
                    "no windows: set `windows` here or at the top level".into(),
                ));
            }
        };
        let (texts, wfield) = window_texts;
        if texts.is_empty() {
            return Err(err(&wfield, "the window list is empty".into()));
        }
        let mut windows = Vec::new();
        for (j, w) in texts.iter().enumerate() {
            let wf = format!("{wfield}[{j}]");
            let span: Span = w.parse().map_err(|m| err(&wf, m))?;
            if span.millis() <= 0 {
                return Err(err(&wf, "a window must be longer than zero".into()));
            }
            if !span.is_multiple_of(speed.tile) {
                return Err(err(
                    &wf,
                    format!(
                        "window {span} is not a multiple of the tile ({})",
                        speed.tile
                    ),
                ));
            }
            if !hop(span).is_multiple_of(speed.tile) {
                return Err(err(
                    &wf,
                    format!(
                        "window {span} is served in hops of {}, which the tile ({}) does not divide",
                        hop(span),
                        speed.tile
                    ),
                ));
            }
            if windows.contains(&span) {
                return Err(err(&wf, format!("window {span} is listed twice")));
            }
            windows.push(span);
        }
        windows.sort();
        aggregations.push(AggregationSpec {
            aggregation: Aggregation {
                name: a.name.clone(),
                function,
                input,
                input_type,
                output_type,
                filter,
            },
            windows,
        });
    }

    // Batch settings.
    let history = raw
        .batch
        .history
        .unwrap_or_else(|| format!("file://data/history/{}", source.name));
    if !(history.starts_with("file://") || history.starts_with("s3://")) {
        return Err(err(
            "batch.history",
            format!("`{history}` must be a file:// or s3:// URL"),
        ));
    }
    let cutoff_offset = span(
        "batch.cutoff-offset",
        &raw.batch.cutoff_offset,
        Span::from_millis(0),
    )?;
    if cutoff_offset >= Span::days(1) {
        return Err(err(
            "batch.cutoff-offset",
            format!("{cutoff_offset} must be less than one day"),
        ));
    }

    let view = FeatureView {
        name: raw.name,
        description: raw.description,
        source,
        aggregations,
        speed,
        batch: BatchSettings {
            history,
            cutoff_offset,
            sql: raw.batch.sql.map(PathBuf::from),
        },
    };
    let mut names = HashSet::new();
    let cols: HashSet<&str> = view
        .source
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for feat in view.features() {
        if !names.insert(feat.name.clone())
            || cols.contains(feat.name.as_str())
            || feat.name == "entity"
        {
            return Err(err(
                &format!("aggregation[{}].name", feat.aggregation),
                format!(
                    "feature name `{}` clashes with another feature or column",
                    feat.name
                ),
            ));
        }
    }
    Ok(view)
}
