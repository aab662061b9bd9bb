//! The status page (`GET /`): one self-contained HTML file
//! (`page.html`, compiled in) with every table rendered here, so it reads
//! with JavaScript off; `/status.js` (`status.js`, a few KB) only
//! refreshes the throughput and streams every 2 s. The minibatch viewer is
//! a GET form, so it works without JavaScript too.
//!
//! Everything from outside (dataset, set and file names, trainer ids that
//! clients send) is HTML-escaped here and written as text by the script.
use std::fmt::Write as _;

use super::web::{Refusal, Selected, View};
use super::{png, Snapshot, StreamView};

/// The page's template: `{{name}}` marks where [`render`] puts its parts.
const TEMPLATE: &str = include_str!("page.html");

/// `s` safe as HTML text and as a quoted attribute value.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// `s` as a URL query value (unreserved characters kept).
pub fn url_value(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

/// Bytes in decimal units, as `status.js` writes them.
pub fn bytes(b: f64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let (mut v, mut i) = (b, 0);
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    match i {
        0 => format!("{v:.0} {}", units[i]),
        _ if v < 10.0 => format!("{v:.2} {}", units[i]),
        _ => format!("{v:.1} {}", units[i]),
    }
}

/// A rate, as `status.js` writes it.
pub fn rate(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// Seconds as `4.2s`, `3m05s` or `2h03m05s`.
pub fn age(s: f64) -> String {
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let t = s as u64;
    let (h, m, sec) = (t / 3600, t / 60 % 60, t % 60);
    if h > 0 {
        format!("{h}h{m:02}m{sec:02}s")
    } else {
        format!("{m}m{sec:02}s")
    }
}

/// A stream's order, position and peer as the page and the CLI show them.
pub fn order(t: &StreamView) -> String {
    let o = if t.shuffle {
        format!("shuffled, seed {}, epoch {}", t.seed, t.epoch)
    } else {
        "in order".to_string()
    };
    if t.offset > 0 {
        format!("{o}, offset {}", t.offset)
    } else {
        o
    }
}

/// `sent/total` minibatches (`from start` when it did not start at 0).
pub fn position(t: &StreamView) -> String {
    if t.method == "Attach" {
        return "attached".into();
    }
    let p = format!("{}/{}", t.sent, t.end.saturating_sub(t.start));
    if t.start > 0 {
        format!("{p} from {}", t.start)
    } else {
        p
    }
}

/// The peer with its pid when known.
pub fn peer(t: &StreamView) -> String {
    match t.pid {
        Some(pid) => format!("{} pid {pid}", t.peer),
        None => t.peer.clone(),
    }
}

/// The cells of a stream's row, in the table's column order.
pub fn stream_cells(t: &StreamView) -> [String; 12] {
    let attach = t.method == "Attach";
    let blank_if = |b: bool, s: String| if b { String::new() } else { s };
    [
        t.id.to_string(),
        t.method.clone(),
        t.dataset.clone(),
        if t.set.is_empty() {
            "(all)".into()
        } else {
            t.set.clone()
        },
        blank_if(attach, order(t)),
        blank_if(attach, format!("{}/{}", t.rank, t.world_size)),
        position(t),
        blank_if(attach, rate(t.minibatches_per_s)),
        bytes(t.bytes as f64),
        peer(t),
        t.trainer.clone(),
        age(t.seconds),
    ]
}

fn streams(s: &Snapshot) -> String {
    if s.streams.is_empty() {
        return "<tr><td colspan=\"12\" class=\"muted\">no open streams</td></tr>".into();
    }
    let mut o = String::new();
    for t in &s.streams {
        o.push_str("<tr>");
        for (i, c) in stream_cells(t).iter().enumerate() {
            let class = if matches!(i, 0 | 7 | 8) {
                " class=\"num\""
            } else {
                ""
            };
            let _ = write!(o, "<td{class}>{}</td>", escape(c));
        }
        o.push_str("</tr>");
    }
    o
}

fn datasets(s: &Snapshot) -> String {
    let mut o = String::new();
    for d in &s.datasets {
        let _ = write!(
            o,
            "<p><b>{}</b>: {} ({}), {} in memory, {}, tiers: {}; fingerprint <code>{}</code></p>",
            escape(&d.name),
            escape(&d.source),
            escape(&d.format),
            bytes(d.memory_bytes as f64),
            if d.pinned { "pinned" } else { "not pinned" },
            escape(&d.tiers.join(", ")),
            escape(d.fingerprint.as_deref().unwrap_or("(computing)")),
        );
    }
    o.push_str(
        "<table id=\"datasets\"><thead><tr><th>dataset</th><th>set</th><th>examples</th>\
         <th>x</th><th>y</th><th>x sha256</th><th>y sha256</th></tr></thead><tbody>",
    );
    for d in &s.datasets {
        for set in &d.sets {
            let t = |v: &super::TensorView| format!("{} {:?}", v.dtype, v.shape);
            let sha = |v: &super::TensorView| {
                v.sha256.as_deref().map_or("(computing)".into(), |h| {
                    format!("{}…", &h[..h.len().min(16)])
                })
            };
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td>\
                 <td class=\"mono\">{}</td><td class=\"mono\">{}</td></tr>",
                escape(&d.name),
                escape(&set.name),
                set.examples,
                escape(&t(&set.x)),
                escape(&t(&set.y)),
                escape(&sha(&set.x)),
                escape(&sha(&set.y)),
            );
        }
    }
    o.push_str("</tbody></table>");
    o
}

/// The viewer's form: the current values, and the token carried on.
fn form(s: &Snapshot, v: &View, sel: &Result<Selected, Refusal>, token: Option<&str>) -> String {
    let mut o = String::new();
    let current = sel.as_ref().ok().map(|x| x.dataset.as_str());
    if s.datasets.len() > 1 {
        o.push_str("<label>dataset <select name=\"dataset\">");
        for d in &s.datasets {
            let on = if Some(d.name.as_str()) == current || d.name == v.dataset {
                " selected"
            } else {
                ""
            };
            let _ = write!(o, "<option{on} value=\"{0}\">{0}</option>", escape(&d.name));
        }
        o.push_str("</select></label>");
    }
    let ds = s
        .datasets
        .iter()
        .find(|d| Some(d.name.as_str()) == current || d.name == v.dataset)
        .or(s.datasets.first());
    let chosen_set = sel
        .as_ref()
        .ok()
        .map(|x| x.prepared.sets[x.set].name.clone())
        .unwrap_or_else(|| v.set.clone());
    o.push_str("<label>set <select name=\"set\">");
    for set in ds.map(|d| d.sets.as_slice()).unwrap_or_default() {
        let on = if set.name == chosen_set {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            o,
            "<option{on} value=\"{0}\">{0}</option>",
            escape(&set.name)
        );
    }
    o.push_str("</select></label>");
    let _ = write!(
        o,
        "<label>index <input type=\"number\" name=\"index\" min=\"0\" value=\"{}\"></label>\
         <label>size <input type=\"number\" name=\"size\" min=\"1\" max=\"{}\" value=\"{}\"></label>\
         <label>scale <input type=\"number\" name=\"scale\" min=\"1\" max=\"{}\" value=\"{}\"></label>",
        v.index,
        png::MAX_IMAGES,
        v.size,
        png::MAX_SCALE,
        v.scale
    );
    if let Some(t) = token {
        let _ = write!(
            o,
            "<input type=\"hidden\" name=\"token\" value=\"{}\">",
            escape(t)
        );
    }
    o
}

/// The image and its labels, or why there is none.
fn viewer(v: &View, sel: &Result<Selected, Refusal>, token: Option<&str>) -> String {
    let sel = match sel {
        Ok(s) => s,
        Err(e) => {
            return format!(
                "<p class=\"err\" id=\"viewer-error\">{} {}</p>",
                e.status,
                escape(&e.message)
            )
        }
    };
    let set = &sel.prepared.sets[sel.set].name;
    let mut src = format!(
        "/minibatch.png?dataset={}&set={}&index={}&size={}&scale={}",
        url_value(&sel.dataset),
        url_value(set),
        v.index,
        v.size,
        v.scale
    );
    if let Some(t) = token {
        let _ = write!(src, "&token={}", url_value(t));
    }
    let labels = sel.labels();
    let mut text = String::new();
    for row in labels.chunks(sel.grid.cols) {
        let cells: Vec<String> = row
            .iter()
            .map(|l| format!("{:>4}", png::label_text(*l)))
            .collect();
        text.push_str(&cells.join(" "));
        text.push('\n');
    }
    format!(
        "<p>{} / {}: minibatch {} of size {}, examples {}..{} (the tutorial's order), labels \
         under each image</p>\
         <img class=\"grid\" id=\"minibatch\" src=\"{}\" width=\"{}\" height=\"{}\" alt=\"minibatch {} of set {}\">\
         <pre class=\"labels\" id=\"labels\">{}</pre>",
        escape(&sel.dataset),
        escape(set),
        v.index,
        v.size,
        sel.start,
        sel.end,
        escape(&src),
        sel.grid.width().unwrap_or(0),
        sel.grid.height().unwrap_or(0),
        v.index,
        escape(set),
        escape(&text),
    )
}

/// The page for `snapshot`, with the viewer showing `view` (`sel`: its
/// validation) and `token` carried on in its links and form.
pub fn render(
    s: &Snapshot,
    v: &View,
    sel: &Result<Selected, Refusal>,
    token: Option<&str>,
) -> String {
    let t = &s.throughput;
    let unlisted = if s.streams_unlisted > 0 {
        format!(
            "{} more open streams not listed (the list holds {})",
            s.streams_unlisted, s.limits.max_listed_streams
        )
    } else {
        String::new()
    };
    let part = |name: &str| -> String {
        match name {
            "version" => escape(&s.version),
            "uptime" => age(s.uptime_s),
            "bps" => format!("{}/s", bytes(t.bytes_per_s)),
            "mbps" => rate(t.minibatches_per_s),
            "bytes" => bytes(t.bytes_total as f64),
            "minibatches" => t.minibatches_total.to_string(),
            "active" => t.active_streams.to_string(),
            "attached" => t.attached.to_string(),
            "datasets" => datasets(s),
            "streams" => streams(s),
            "unlisted" => unlisted.clone(),
            "form" => form(s, v, sel, token),
            "viewer" => viewer(v, sel, token),
            _ => String::new(),
        }
    };
    // One pass over the template: inserted text is never searched again.
    let mut out = String::with_capacity(TEMPLATE.len() + 4096);
    let mut rest = TEMPLATE;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find("}}") {
            Some(j) => {
                out.push_str(&part(&after[..j]));
                rest = &after[j + 2..];
            }
            None => {
                out.push_str(&rest[i..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_match_the_script() {
        assert_eq!(bytes(999.0), "999 B");
        assert_eq!(bytes(1234.0), "1.23 kB");
        assert_eq!(bytes(15_680_000.0), "15.7 MB");
        assert_eq!(age(4.31), "4.3s");
        assert_eq!(age(185.0), "3m05s");
        assert_eq!(age(7385.0), "2h03m05s");
        assert_eq!(
            escape("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(url_value("a b&c=✓"), "a%20b%26c%3D%E2%9C%93");
        assert!(TEMPLATE.contains("{{viewer}}") && TEMPLATE.contains("/status.js"));
    }
}
