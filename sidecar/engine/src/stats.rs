//! Counters the engine bumps inline; Python reads them when `/metrics` is scraped and
//! adds them to its own (`ProxyStats` and the pool's per-slice queue figures).

pub const LATENCY_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Default)]
pub struct Histogram {
    pub counts: [u64; 14],
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        // bisect_left: the first bound >= v
        let i = LATENCY_BUCKETS.iter().position(|&b| v <= b).unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += v;
    }
}

#[derive(Clone)]
pub struct SliceStats {
    pub status: Vec<u64>,
    pub latency: Histogram,
    pub wait: Histogram,
    /// queue_full, timeout, draining
    pub rejected: [u64; 3],
}

impl Default for SliceStats {
    fn default() -> Self {
        SliceStats { status: vec![0; 600], latency: Histogram::default(), wait: Histogram::default(), rejected: [0; 3] }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    QueueFull = 0,
    Timeout = 1,
    Draining = 2,
}

impl Rejection {
    pub fn name(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::Timeout => "timeout",
            Rejection::Draining => "draining",
        }
    }
}

/// `ProxyStats` counters, by the same names.
#[derive(Default, Clone)]
pub struct Counters {
    pub connections_total: i64,
    pub connections_active: i64,
    pub requests_active: i64,
    pub upstream_failed: i64,
    pub upstream_broken_mid_response: i64,
    pub upstream_timeouts: i64,
    pub retries: i64,
    pub responses_streamed: i64,
    pub responses_spilled: i64,
    pub response_memory_full: i64,
    pub client_aborts: i64,
    pub untrusted_forwarding: i64,
    pub handovers: i64,
    /// Scheduling policy switches (cpu.rs), and switches the kernel refused.
    pub cpu_policy_switches: i64,
    pub cpu_policy_refused: i64,
    pub unavailable: [i64; 3],
}

impl Counters {
    pub fn named(&self) -> Vec<(&'static str, i64)> {
        vec![
            ("connections_total", self.connections_total),
            ("connections_active", self.connections_active),
            ("requests_active", self.requests_active),
            ("upstream_failed", self.upstream_failed),
            ("upstream_broken_mid_response", self.upstream_broken_mid_response),
            ("upstream_timeouts", self.upstream_timeouts),
            ("retries", self.retries),
            ("responses_streamed", self.responses_streamed),
            ("responses_spilled", self.responses_spilled),
            ("response_memory_full", self.response_memory_full),
            ("client_aborts", self.client_aborts),
            ("untrusted_forwarding", self.untrusted_forwarding),
            ("handovers", self.handovers),
            ("cpu_policy_switches", self.cpu_policy_switches),
            ("cpu_policy_refused", self.cpu_policy_refused),
        ]
    }
}

/// Bytes held by every user of one worker against a limit (`spool.Budget`).
#[derive(Default, Clone, Copy)]
pub struct Budget {
    pub limit: i64,
    pub used: i64,
    pub refused: i64,
}

impl Budget {
    pub fn take(&mut self, n: i64) -> bool {
        if self.used + n > self.limit {
            self.refused += 1;
            return false;
        }
        self.used += n;
        true
    }
}

/// `http1.error_response`: a small complete plain-text answer, byte for byte.
pub fn canned(status: u16, close: bool, keep10: bool, head_only: bool, retry_after: i64) -> Vec<u8> {
    let reason: &[u8] = match status {
        408 => b"Request Timeout",
        502 => b"Bad Gateway",
        503 => b"Service Unavailable",
        504 => b"Gateway Timeout",
        _ => b"Error",
    };
    let body: Vec<u8> = reason.iter().map(|b| b.to_ascii_lowercase()).chain(std::iter::once(b'\n')).collect();
    let mut out = Vec::with_capacity(200);
    out.extend_from_slice(b"HTTP/1.1 ");
    crate::head::push_decimal(&mut out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\nServer: backdial\r\n");
    if retry_after >= 0 {
        out.extend_from_slice(b"Retry-After: ");
        crate::head::push_decimal(&mut out, retry_after as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: ");
    crate::head::push_decimal(&mut out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if keep10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&body);
    }
    out
}
