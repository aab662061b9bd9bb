//! `minibatchd inspect`: a loaded dataset described, as a typed report
//! printed as a table or as JSON.
use std::fmt::Write as _;

use serde::Serialize;

use crate::analyze::{DatasetStats, TensorStats};
use crate::batch::convert::wire_dtypes;
use crate::store::{Dataset, Tensor};

/// Everything `inspect` says about a dataset.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub source: String,
    pub format: &'static str,
    pub fingerprint: String,
    pub tensor_bytes: usize,
    pub memory_bytes: usize,
    /// Time to load (read, inflate, parse), milliseconds.
    pub load_ms: f64,
    /// Load and analysis, milliseconds.
    pub total_ms: f64,
    pub sets: Vec<SetReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SetReport {
    pub name: String,
    pub examples: usize,
    pub x: TensorReport,
    pub y: TensorReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    /// Wire dtypes that reproduce every value, the stored one first.
    pub wire_dtypes: Vec<&'static str>,
    #[serde(flatten)]
    pub stats: TensorStats,
}

impl TensorReport {
    fn new(t: &Tensor, stats: &TensorStats) -> Self {
        Self {
            dtype: t.dtype.name(),
            shape: t.shape.clone(),
            wire_dtypes: wire_dtypes(t, stats).iter().map(|d| d.name()).collect(),
            stats: stats.clone(),
        }
    }
}

impl Report {
    /// The report of `ds`, whose statistics are `stats`.
    pub fn new(ds: &Dataset, stats: &DatasetStats, load_ms: f64, total_ms: f64) -> Self {
        let t = |set: &str, name: &str, t: &Tensor| {
            TensorReport::new(t, stats.get(set, name).expect("stats cover every tensor"))
        };
        Self {
            source: ds.source.clone(),
            format: ds.format.name(),
            fingerprint: stats.fingerprint.clone(),
            tensor_bytes: ds.tensor_bytes(),
            memory_bytes: ds.memory_bytes,
            load_ms,
            total_ms,
            sets: ds
                .sets
                .iter()
                .map(|s| SetReport {
                    name: s.name.clone(),
                    examples: s.examples(),
                    x: t(&s.name, "x", &s.x),
                    y: t(&s.name, "y", &s.y),
                })
                .collect(),
        }
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "source      {} ({})", self.source, self.format);
        let _ = writeln!(o, "fingerprint {}", self.fingerprint);
        let _ = writeln!(
            o,
            "memory      {} bytes of tensors, {} bytes held; loaded in {:.1} ms",
            self.tensor_bytes, self.memory_bytes, self.load_ms
        );
        for s in &self.sets {
            let _ = writeln!(o, "\nset {} — {} examples", s.name, s.examples);
            for (k, t) in [("x", &s.x), ("y", &s.y)] {
                let st = &t.stats;
                let num = |v: Option<f64>| v.map_or("null".to_string(), |v| v.to_string());
                let _ = writeln!(o, "  {k}: {} {:?}  sha256 {}", t.dtype, t.shape, st.sha256);
                let _ = writeln!(
                    o,
                    "     range [{}, {}]  wire dtypes {:?}",
                    num(st.min),
                    num(st.max),
                    t.wire_dtypes
                );
                if t.dtype.starts_with("float") {
                    let _ = writeln!(
                        o,
                        "     multiples of 1/256: {}  of 1/255: {}",
                        st.multiple_of_1_256, st.multiple_of_1_255
                    );
                }
                if let Some(h) = &st.histogram {
                    let hs: Vec<String> = h.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    let _ = writeln!(o, "     labels {}", hs.join(" "));
                }
            }
        }
        o
    }
}
