//! `minibatchd info`: a server's GetInfo answer as a table.
use std::fmt::Write as _;

use crate::proto::{DatasetInfo, Dtype};

/// numpy's name of a wire dtype value (empty for an unknown one).
fn dtype_name(v: i32) -> &'static str {
    Dtype::try_from(v)
        .ok()
        .and_then(crate::store::DType::from_proto)
        .map_or("", |d| d.name())
}

/// The table `info` prints: the server, then every dataset of the answer
/// (or only the one asked for, `named`).
pub fn table(i: &DatasetInfo, named: bool) -> String {
    let mut o = String::new();
    let _ = write!(o, "server {}", i.server_version);
    if let Some(l) = &i.limits {
        let _ = write!(
            o,
            "; limits: max batch {}, max message {} bytes, chunk {} bytes",
            l.max_batch_size, l.max_message_bytes, l.chunk_bytes
        );
    }
    o.push('\n');
    // Servers before named datasets send no list: the answer is the one.
    let all: Vec<&DatasetInfo> = if named || i.datasets.is_empty() {
        vec![i]
    } else {
        i.datasets.iter().collect()
    };
    for d in all {
        dataset(&mut o, d);
    }
    o
}

/// One dataset's lines of the table.
fn dataset(o: &mut String, i: &DatasetInfo) {
    let name = if i.name.is_empty() { "-" } else { &i.name };
    let _ = writeln!(
        o,
        "dataset {name}: source {} ({}), fingerprint {}",
        i.source, i.format, i.fingerprint
    );
    let _ = writeln!(o, "  memory {} bytes, pinned: {}", i.memory_bytes, i.pinned);
    for s in &i.sets {
        let (x, y) = (
            s.x.clone().unwrap_or_default(),
            s.y.clone().unwrap_or_default(),
        );
        let wire: Vec<_> = x.wire_dtypes.iter().map(|&d| dtype_name(d)).collect();
        let _ = writeln!(
            o,
            "  {:<6} {:>7} examples  x {} {:?} (wire: {})  y {} {:?}  classes {:?}",
            s.name,
            s.examples,
            dtype_name(x.dtype),
            x.shape,
            wire.join(","),
            dtype_name(y.dtype),
            y.shape,
            s.classes
        );
    }
}
