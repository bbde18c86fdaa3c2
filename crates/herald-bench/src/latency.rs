//! Latency recording: sharded HdrHistograms, drained each second, and their percentiles.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency recorded, in microseconds (one hour); larger values are clamped.
const MAX_US: u64 = 3_600_000_000;

/// A histogram of microseconds with 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant histogram bounds are valid")
}

/// What a shard accumulates between two drains.
pub struct Interval {
    /// End-to-end latency of every delivery.
    pub all: Histogram<u64>,
    /// Latency of deliveries whose sender was connected to another URL than the receiver.
    pub cross: Histogram<u64>,
    /// Latency of a sender's own messages, echoed back to it (the connection that also
    /// receives the publish's ack).
    pub own: Histogram<u64>,
    /// Publish → ack round trips.
    pub ack: Histogram<u64>,
    /// Distinct deliveries.
    pub delivered: u64,
    pub duplicates: u64,
}

impl Interval {
    fn new() -> Self {
        Self {
            all: histogram(),
            cross: histogram(),
            own: histogram(),
            ack: histogram(),
            delivered: 0,
            duplicates: 0,
        }
    }

    /// Adds `other` into `self` and empties `other`.
    pub fn absorb(&mut self, other: &mut Interval) {
        // Same bounds on both sides, so `add` cannot fail.
        let _ = self.all.add(&other.all);
        let _ = self.cross.add(&other.cross);
        let _ = self.own.add(&other.own);
        let _ = self.ack.add(&other.ack);
        self.delivered += other.delivered;
        self.duplicates += other.duplicates;
        other.all.reset();
        other.cross.reset();
        other.own.reset();
        other.ack.reset();
        other.delivered = 0;
        other.duplicates = 0;
    }
}

impl Default for Interval {
    fn default() -> Self {
        Self::new()
    }
}

/// Histograms shared by every client, sharded to keep lock contention low.
pub struct Recorder {
    shards: Vec<Mutex<Interval>>,
}

impl Recorder {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(Interval::new()))
                .collect(),
        }
    }

    fn shard(&self, hint: usize) -> std::sync::MutexGuard<'_, Interval> {
        let shard = &self.shards[hint % self.shards.len()];
        shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records one distinct delivery that took `latency_us`.
    pub fn delivery(&self, hint: usize, latency_us: u64, cross: bool, own: bool) {
        let mut shard = self.shard(hint);
        let value = latency_us.clamp(1, MAX_US);
        shard.all.saturating_record(value);
        if own {
            shard.own.saturating_record(value);
        }
        if cross {
            shard.cross.saturating_record(value);
        }
        shard.delivered += 1;
    }

    /// Records a delivery the client had already seen.
    pub fn duplicate(&self, hint: usize) {
        self.shard(hint).duplicates += 1;
    }

    /// Records a publish whose ack came back after `rtt_us`.
    pub fn ack(&self, hint: usize, rtt_us: u64) {
        self.shard(hint)
            .ack
            .saturating_record(rtt_us.clamp(1, MAX_US));
    }

    /// Moves everything recorded since the last drain into `into`.
    pub fn drain(&self, into: &mut Interval) {
        for shard in &self.shards {
            let mut shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            into.absorb(&mut shard);
        }
    }
}

/// A latency distribution's summary, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The summary of `h` (microseconds); all zeros when it is empty.
pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: h.len(),
        mean_ms: h.mean() / 1000.0,
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// A histogram as (value, count) pairs of its non-empty buckets, for the JSON result, so
/// that the results of several generator processes can be merged exactly.
pub fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// The histogram `to_pairs` describes.
pub fn from_pairs(pairs: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = histogram();
    for (value, count) in pairs {
        let _ = h.record_n((*value).clamp(1, MAX_US), *count);
    }
    h
}

/// One point of the percentile spectrum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpectrumPoint {
    pub quantile: f64,
    pub latency_ms: f64,
}

/// Latency at quantiles from 0 to 0.99999 and the maximum, for the chart and the JSON.
pub fn spectrum(h: &Histogram<u64>) -> Vec<SpectrumPoint> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut quantiles = vec![0.0, 0.25, 0.5, 0.75, 0.9, 0.95];
    quantiles.extend([0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999]);
    let mut points: Vec<SpectrumPoint> = quantiles
        .into_iter()
        .map(|q| SpectrumPoint {
            quantile: q,
            latency_ms: ms(h.value_at_quantile(q)),
        })
        .collect();
    points.push(SpectrumPoint {
        quantile: 1.0,
        latency_ms: ms(h.max()),
    });
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        // Three significant digits.
        (a - b).abs() <= b.abs() * 0.001 + 1e-9
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut h = histogram();
        for us in 1..=10_000u64 {
            h.record(us).expect("in range");
        }
        let p = percentiles(&h);
        assert_eq!(p.count, 10_000);
        assert!(close(p.p50_ms, 5.0), "{p:?}");
        assert!(close(p.p90_ms, 9.0), "{p:?}");
        assert!(close(p.p99_ms, 9.9), "{p:?}");
        assert!(close(p.p999_ms, 9.99), "{p:?}");
        assert!(close(p.max_ms, 10.0), "{p:?}");
        assert!(close(p.mean_ms, 5.0005), "{p:?}");
    }

    #[test]
    fn a_single_outlier_moves_only_the_tail() {
        let mut h = histogram();
        for _ in 0..999 {
            h.record(1_000).expect("in range");
        }
        h.record(250_000).expect("in range");
        let p = percentiles(&h);
        assert!(close(p.p50_ms, 1.0) && close(p.p99_ms, 1.0), "{p:?}");
        assert!(close(p.max_ms, 250.0), "{p:?}");
        // p99.9 of 1,000 values is the 999th: still 1 ms; the outlier is only the max.
        assert!(close(p.p999_ms, 1.0), "{p:?}");
    }

    #[test]
    fn shards_drain_into_one_distribution() {
        let recorder = Recorder::new(4);
        for i in 0..100usize {
            recorder.delivery(i, 1_000 * (i as u64 + 1), i % 2 == 0, i == 7);
        }
        recorder.duplicate(3);
        recorder.ack(1, 500);
        let mut total = Interval::default();
        recorder.drain(&mut total);
        assert_eq!(total.delivered, 100);
        assert_eq!(total.duplicates, 1);
        assert_eq!(total.cross.len(), 50);
        assert_eq!(total.own.len(), 1);
        assert_eq!(total.ack.len(), 1);
        assert!(close(percentiles(&total.all).p50_ms, 50.0));
        // Drained shards start over.
        let mut again = Interval::default();
        recorder.drain(&mut again);
        assert_eq!(again.delivered, 0);
        assert!(again.all.is_empty());
    }

    #[test]
    fn histograms_survive_the_json_round_trip() {
        let mut h = histogram();
        for us in [1u64, 5, 5, 900, 12_345, 2_000_000] {
            h.record(us).expect("in range");
        }
        let back = from_pairs(&to_pairs(&h));
        assert_eq!(back.len(), h.len());
        assert_eq!(percentiles(&back), percentiles(&h));
        let mut merged = from_pairs(&to_pairs(&h));
        merged.add(&back).expect("same bounds");
        assert_eq!(merged.len(), 12);
        assert_eq!(percentiles(&merged).p50_ms, percentiles(&h).p50_ms);
    }

    #[test]
    fn out_of_range_values_are_clamped_and_empty_histograms_summarize_to_zero() {
        let recorder = Recorder::new(1);
        recorder.delivery(0, 0, false, false);
        recorder.delivery(0, u64::MAX, false, false);
        let mut total = Interval::default();
        recorder.drain(&mut total);
        assert_eq!(total.all.len(), 2);
        assert!(total.all.max() >= MAX_US);
        assert_eq!(percentiles(&histogram()), Percentiles::default());
        assert!(spectrum(&histogram()).is_empty());
        let points = spectrum(&total.all);
        assert_eq!(points.last().map(|p| p.quantile), Some(1.0));
    }
}
