//! The speed layer: an always-on consumer that keeps per-entity 5-minute event-time tiles of a
//! stream in the online store, fresh within about a second and exact through crashes and replays.
//!
//! * [`tiler`]: the pure core (tiles, dedup, lateness, replay bookkeeping);
//! * [`source`]: shards of records ([`source::FileSource`], the embedded default);
//! * [`consumer`]: the read → tile → flush → checkpoint loop with its exactly-once protocol;
//! * [`sink`]: dead letters and late events (written where the batch layer picks them up).
//!
//! Everything derives from the same feature definition as the batch layer, and tiles hold the
//! core's mergeable states, so serving merges both without translation.

pub mod consumer;
pub mod kinesis;
pub mod sink;
pub mod source;
pub mod tiler;
