//! Prometheus metrics (text exposition format), kept in atomics.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// A monotonically increasing counter.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge that also remembers its highest value.
#[derive(Default, Debug)]
pub struct Gauge {
    value: AtomicI64,
    max: AtomicI64,
}

impl Gauge {
    /// Adds one and updates the high-water mark.
    pub fn inc(&self) {
        let v = self.value.fetch_add(1, Ordering::Relaxed) + 1;
        self.max.fetch_max(v, Ordering::Relaxed);
    }
    /// Subtracts one.
    pub fn dec(&self) {
        self.value.fetch_sub(1, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }
    /// Highest value seen.
    pub fn max(&self) -> i64 {
        self.max.load(Ordering::Relaxed)
    }
}

const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// A latency histogram with fixed buckets (seconds).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 14],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: Option<&str>, labels: &str) {
        if let Some(help) = help {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        }
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let lb = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{lb} {sum}\n{name}_count{lb} {count}");
    }
}

/// All gateway metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests per API: chat, messages, responses.
    pub requests: [Counter; 3],
    /// Requests answered with an error, per API.
    pub errors: [Counter; 3],
    /// Calls recorded durably.
    pub recorded: Counter,
    /// Record writes that failed.
    pub record_errors: Counter,
    /// Upstream attempts that failed (and were retried or reported).
    pub upstream_errors: Counter,
    /// Retries on another upstream.
    pub retries: Counter,
    /// Streams that failed after their first byte.
    pub stream_errors: Counter,
    /// Streams whose caller went away before the end.
    pub client_disconnects: Counter,
    /// Streams open now (and the highest number seen).
    pub active_streams: Gauge,
    /// Time from request to complete answer, per API.
    pub request_seconds: [Histogram; 3],
    /// Time to write a record durably.
    pub record_seconds: Histogram,
}

impl Metrics {
    /// Renders the Prometheus text format; `extra` lines are appended.
    pub fn render(&self, upstream_inflight: &[(String, usize)], recorded_total: usize) -> String {
        let mut out = String::with_capacity(4096);
        let apis = ["chat", "messages", "responses"];
        let _ = writeln!(
            out,
            "# HELP arbor_gateway_requests_total Model calls received.\n# TYPE arbor_gateway_requests_total counter"
        );
        for (i, a) in apis.iter().enumerate() {
            let _ = writeln!(
                out,
                "arbor_gateway_requests_total{{api=\"{a}\"}} {}",
                self.requests[i].get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP arbor_gateway_errors_total Model calls answered with an error.\n# TYPE arbor_gateway_errors_total counter"
        );
        for (i, a) in apis.iter().enumerate() {
            let _ = writeln!(
                out,
                "arbor_gateway_errors_total{{api=\"{a}\"}} {}",
                self.errors[i].get()
            );
        }
        for (name, help, c) in [
            (
                "arbor_gateway_calls_recorded_total",
                "Calls written durably since start.",
                &self.recorded,
            ),
            (
                "arbor_gateway_record_errors_total",
                "Record writes that failed.",
                &self.record_errors,
            ),
            (
                "arbor_gateway_upstream_errors_total",
                "Upstream attempts that failed.",
                &self.upstream_errors,
            ),
            (
                "arbor_gateway_upstream_retries_total",
                "Retries on another upstream.",
                &self.retries,
            ),
            (
                "arbor_gateway_stream_errors_total",
                "Streams that failed after their first byte.",
                &self.stream_errors,
            ),
            (
                "arbor_gateway_client_disconnects_total",
                "Streams abandoned by their caller.",
                &self.client_disconnects,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP arbor_gateway_active_streams Streams open now.\n# TYPE arbor_gateway_active_streams gauge\narbor_gateway_active_streams {}",
            self.active_streams.get()
        );
        let _ = writeln!(
            out,
            "# HELP arbor_gateway_active_streams_max Most streams open at once since start.\n# TYPE arbor_gateway_active_streams_max gauge\narbor_gateway_active_streams_max {}",
            self.active_streams.max()
        );
        let _ = writeln!(
            out,
            "# HELP arbor_gateway_store_calls Calls in the store.\n# TYPE arbor_gateway_store_calls gauge\narbor_gateway_store_calls {recorded_total}"
        );
        let _ = writeln!(
            out,
            "# HELP arbor_gateway_upstream_inflight Requests in flight per upstream.\n# TYPE arbor_gateway_upstream_inflight gauge"
        );
        for (u, n) in upstream_inflight {
            let _ = writeln!(
                out,
                "arbor_gateway_upstream_inflight{{upstream=\"{u}\"}} {n}"
            );
        }
        for (i, a) in apis.iter().enumerate() {
            self.request_seconds[i].render(
                &mut out,
                "arbor_gateway_request_seconds",
                (i == 0).then_some("Time from request to complete answer."),
                &format!("api=\"{a}\""),
            );
        }
        self.record_seconds.render(
            &mut out,
            "arbor_gateway_record_seconds",
            Some("Time to write a record durably."),
            "",
        );
        out
    }
}
