//! Parity helpers for the Python tests (`tests/sidecar/test_engine_parity.py`): the head
//! recogniser and the response relay on their own, fed bytes directly.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::head;
use crate::response::{self, Release};

/// What `recognise` finds in a head the engine takes: its length, the upstream head, the
/// host key and whether the connection is kept alive.
type Recognised = (usize, Py<PyBytes>, Py<PyBytes>, bool);
/// The head recogniser on its own, for the parity tests against llhttp: None when the
/// engine would hand the request to Python, else (head length, upstream head, host key).
#[pyfunction]
pub fn recognise(py: Python<'_>, raw: &[u8], forwarding: &[u8], xff: &[u8]) -> PyResult<Option<Recognised>> {
    let limits = head::Limits { max_header_bytes: 65536, max_body: 65536, trusted_peer: false, wanted: &[] };
    match head::parse(raw, &limits) {
        head::Verdict::Native(h) => {
            let mut out = Vec::new();
            h.build(raw, forwarding, xff, &mut out);
            Ok(Some((h.len, PyBytes::new(py, &out).unbind(), PyBytes::new(py, &h.host_key).unbind(), h.keep_alive)))
        }
        _ => Ok(None),
    }
}

/// One response fed in the given reads (then end-of-file when `eof`), for parity tests:
/// (client bytes, outcome: more, idle, idle+pre, retired, broken or fail).
#[pyfunction]
#[pyo3(signature = (reads, head_only, v10, keep_allowed, eof=false))]
pub fn relay_response(
    py: Python<'_>,
    reads: Vec<Vec<u8>>,
    head_only: bool,
    v10: bool,
    keep_allowed: bool,
    eof: bool,
) -> PyResult<(Py<PyBytes>, String)> {
    let mut r = response::Resp::new(Vec::new());
    let ctx = response::Ctx { head_only, v10, keep_allowed };
    let mut out = Vec::new();
    let mut outcome = String::from("more");
    let mut steps: Vec<Option<Vec<u8>>> = reads.into_iter().map(Some).collect();
    if eof {
        steps.push(None);
    }
    for step in steps {
        let o = match step {
            Some(read) => r.feed(&read, &ctx, &mut out),
            None => r.eof(&mut out),
        };
        match o {
            response::Outcome::More => continue,
            response::Outcome::Done(rel) => {
                outcome = match rel {
                    Release::Idle { pre } if pre.is_empty() => "idle".into(),
                    Release::Idle { .. } => "idle+pre".into(),
                    Release::Retired => "retired".into(),
                    Release::Broken => "broken".into(),
                };
                break;
            }
            response::Outcome::Fail => {
                outcome = "fail".into();
                break;
            }
        }
    }
    Ok((PyBytes::new(py, &out).unbind(), outcome))
}
