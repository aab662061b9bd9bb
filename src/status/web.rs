//! The status endpoints on the metrics listener (`crate::metrics::serve`
//! reads the request head, bounded, and hands it here): `GET /` (the
//! page), `GET /status.json`, `GET /minibatch.png`, `GET /status.js` (the
//! page's script). With a bearer token (`--auth-token`) all but the script
//! require it, as `Authorization: Bearer <token>` or `?token=<token>` (a
//! browser cannot set headers on a link; the page carries the parameter
//! on). Refusals reuse the gRPC messages: the viewer validates a request
//! with the same set lookup and order plan as GetBatch, and the status
//! code follows the usual gRPC → HTTP table ([`http_status`]).
use std::sync::Arc;
use std::time::Duration;

use super::png::{self, Grid, TensorRef};
use crate::batch::prepared::Prepared;
use crate::error::{ServeError, MAX_ECHOED_NAME};
use crate::metrics::Metrics;
use crate::order::{OrderSpec, Plan, Selection};

/// Query parameters read; more are refused (the head is at most 8 KiB, so
/// this only keeps a request from being mostly parameters).
pub const MAX_QUERY_PARAMS: usize = 16;
/// How long a PNG request waits for one of the render slots
/// ([`png::RENDER_SLOTS`]) before it is answered 503.
pub const RENDER_WAIT: Duration = Duration::from_secs(5);
/// Default number of images in the viewer: an 8×8 grid.
pub const DEFAULT_VIEW_SIZE: u32 = 64;

/// The status page's script, served as `/status.js` (kept out of the HTML
/// so the page's Content-Security-Policy allows no inline script).
pub const SCRIPT: &str = include_str!("status.js");

/// An HTTP response of the metrics listener.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A plain-text refusal (or any short message), newline-terminated.
    pub fn text(status: u16, message: &str) -> Self {
        Self::new(status, "text/plain; charset=utf-8", format!("{message}\n"))
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Status line and headers (`Connection: close`: one request per
    /// connection, as the listener serves them).
    pub fn head(&self) -> Vec<u8> {
        let mut h = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h.push_str("\r\n");
        h.into_bytes()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        412 => "Precondition Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        499 => "Client Closed Request",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// The HTTP status for a gRPC code, as gRPC gateways map them
/// (grpc-gateway's `HTTPStatusFromCode`).
pub fn http_status(code: tonic::Code) -> u16 {
    use tonic::Code::*;
    match code {
        Ok => 200,
        Cancelled => 499,
        InvalidArgument | FailedPrecondition | OutOfRange => 400,
        NotFound => 404,
        AlreadyExists | Aborted => 409,
        PermissionDenied => 403,
        Unauthenticated => 401,
        ResourceExhausted => 429,
        Unimplemented => 501,
        Unavailable => 503,
        DeadlineExceeded => 504,
        Unknown | Internal | DataLoss => 500,
    }
}

/// A refused request: status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn response(&self) -> Response {
        let r = Response::text(self.status, &self.message);
        if self.status == 401 {
            r.with("WWW-Authenticate", "Bearer realm=\"minibatchd\"")
        } else {
            r
        }
    }
}

impl From<ServeError> for Refusal {
    /// The gRPC status's message, and its code as HTTP.
    fn from(e: ServeError) -> Self {
        let st = tonic::Status::from(e);
        Self::new(http_status(st.code()), st.message())
    }
}

/// A request line and what the endpoints read of the headers.
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Decoded `name=value` pairs, in order.
    pub query: Vec<(String, String)>,
    /// The bearer token of an `Authorization` header.
    pub bearer: Option<Vec<u8>>,
}

/// `%XX` and `+` decoded (invalid escapes kept as they are).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Request {
    /// Parses a request head (request line and headers).
    pub fn parse(head: &[u8]) -> Result<Request, Refusal> {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let line = lines.next().unwrap_or_default();
        let mut parts = line.split(' ');
        let (Some(method), Some(target), Some(_version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::new(400, "not an HTTP request line"));
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut pairs = Vec::new();
        for p in query.split('&').filter(|p| !p.is_empty()) {
            if pairs.len() == MAX_QUERY_PARAMS {
                return Err(Refusal::new(
                    400,
                    format!("more than {MAX_QUERY_PARAMS} query parameters"),
                ));
            }
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            pairs.push((decode(k), decode(v)));
        }
        let bearer = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
            .and_then(|(_, v)| {
                let v = v.trim();
                v.get(..7)
                    .filter(|s| s.eq_ignore_ascii_case("bearer "))
                    .map(|_| v[7..].trim().as_bytes().to_vec())
            });
        Ok(Request {
            method: method.into(),
            path: path.into(),
            query: pairs,
            bearer,
        })
    }

    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the viewer is asked to show (query `dataset`, `set`, `index`,
/// `size`, `scale`), with defaults: the only dataset, its first set,
/// minibatch 0 of [`DEFAULT_VIEW_SIZE`], scale [`png::DEFAULT_SCALE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub dataset: String,
    /// Empty: the dataset's first set.
    pub set: String,
    pub index: u64,
    pub size: u32,
    pub scale: u32,
}

impl View {
    pub fn from_query(r: &Request) -> Result<View, Refusal> {
        fn num<T: std::str::FromStr + std::fmt::Display + Copy>(
            r: &Request,
            name: &str,
            default: T,
            max: T,
        ) -> Result<T, Refusal> {
            match r.param(name).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(v) => v.trim().parse().map_err(|_| {
                    let shown: String = v.chars().take(MAX_ECHOED_NAME).collect();
                    Refusal::new(
                        400,
                        format!("{name}: {shown:?} is not a whole number from 0 to {max}"),
                    )
                }),
            }
        }
        let text = |name| {
            r.param(name)
                .unwrap_or_default()
                .chars()
                .take(1024)
                .collect::<String>()
        };
        Ok(View {
            dataset: text("dataset"),
            set: text("set"),
            index: num(r, "index", 0, u64::MAX)?,
            size: num(r, "size", DEFAULT_VIEW_SIZE, u32::MAX)?,
            scale: num(r, "scale", png::DEFAULT_SCALE, u32::MAX)?,
        })
    }
}

/// A minibatch the viewer can draw: validated and placed.
pub struct Selected {
    pub dataset: String,
    pub prepared: Arc<Prepared>,
    pub set: usize,
    /// Examples `[start, end)`.
    pub start: usize,
    pub end: usize,
    pub grid: Grid,
}

impl Selected {
    /// The minibatch's labels (`None` where y is not one integer).
    pub fn labels(&self) -> Vec<Option<i64>> {
        let y = &self.prepared.sets[self.set].y.tensor;
        png::labels(
            y.dtype,
            y.row_elems(),
            self.end - self.start,
            &y.rows(self.start, self.end),
        )
    }

    /// The PNG (CPU-bound: run it off the async threads).
    pub fn render(&self) -> Result<Vec<u8>, String> {
        let s = &self.prepared.sets[self.set];
        let n = self.end - self.start;
        let shape = |t: &crate::store::Tensor| {
            let mut v = t.shape.clone();
            v[0] = n;
            v
        };
        let (xs, ys) = (shape(&s.x.tensor), shape(&s.y.tensor));
        let (x, y) = (
            s.x.tensor.rows(self.start, self.end),
            s.y.tensor.rows(self.start, self.end),
        );
        png::minibatch(
            TensorRef {
                dtype: s.x.tensor.dtype,
                shape: &xs,
                data: &x,
            },
            TensorRef {
                dtype: s.y.tensor.dtype,
                shape: &ys,
                data: &y,
            },
            self.grid.scale as u32,
        )
    }
}

/// Validates `v` against the served datasets: the dataset, then the set,
/// size and index exactly as GetBatch checks them (same messages), then
/// whether x is drawable and fits the PNG's bounds.
pub fn select(m: &Metrics, v: &View) -> Result<Selected, Refusal> {
    let catalog = m
        .status
        .catalog()
        .ok_or_else(|| Refusal::new(503, "the daemon is shutting down"))?;
    let p = catalog.get(&v.dataset)?;
    let dataset = &p.name;
    let set = if v.set.is_empty() && !p.sets.is_empty() {
        0
    } else {
        p.sets.iter().position(|s| s.name == v.set).ok_or_else(|| {
            ServeError::unknown_set(&v.set, p.sets.iter().map(|s| s.name.as_str()))
        })?
    };
    let s = &p.sets[set];
    let plan = Plan::new(
        s.examples(),
        v.size as usize,
        p.limits.max_batch_size,
        &OrderSpec::default(),
        &p.perms,
    )
    .map_err(ServeError::from)?;
    let (start, end) = match plan.batch(v.index).map_err(ServeError::from)? {
        Selection::Range(a, b) => (a, b),
        Selection::Indices(_) => {
            return Err(Refusal::new(500, "the tutorial order is not contiguous"))
        }
    };
    let x = &s.x.tensor;
    let drawable = |e: String| Refusal::new(400, format!("set {:?}: {e}", s.name));
    png::pixels(x.dtype, &[]).map_err(drawable)?;
    let geom = png::geometry(&x.shape[1..]).map_err(drawable)?;
    let grid = Grid::new(end - start, geom, v.scale).map_err(drawable)?;
    Ok(Selected {
        dataset: dataset.clone(),
        prepared: p.clone(),
        set,
        start,
        end,
        grid,
    })
}

/// Checks the daemon's token on a status request (header or `?token=`).
fn authorize(m: &Metrics, r: &Request) -> Result<(), Refusal> {
    let Some(auth) = m.status.auth() else {
        return Ok(());
    };
    let token = r
        .bearer
        .clone()
        .or_else(|| r.param("token").map(|t| t.as_bytes().to_vec()))
        .filter(|t| !t.is_empty());
    match token {
        None => Err(Refusal::new(
            401,
            "this daemon requires its bearer token: send \"Authorization: Bearer <token>\" or \
             add ?token=<token> to the URL",
        )),
        Some(t) if !auth.check(&t) => Err(Refusal::new(401, "invalid bearer token")),
        Some(_) => Ok(()),
    }
}

/// Headers every status answer carries: never cached (it is live, and
/// may be behind a token), never sniffed, and no token leaking in a
/// `Referer`.
fn guarded(r: Response) -> Response {
    r.with("Cache-Control", "no-store")
        .with("X-Content-Type-Options", "nosniff")
        .with("Referrer-Policy", "no-referrer")
}

/// Answers a request for anything but `/metrics` (see the module docs).
pub async fn answer(m: &Arc<Metrics>, head: &[u8]) -> Response {
    guarded(match route(m, head).await {
        Ok(r) => r,
        Err(e) => e.response(),
    })
}

async fn route(m: &Arc<Metrics>, head: &[u8]) -> Result<Response, Refusal> {
    let r = Request::parse(head)?;
    let known = ["/", "/status.json", "/minibatch.png", "/status.js"];
    if !known.contains(&r.path.as_str()) {
        let shown: String = r.path.chars().take(MAX_ECHOED_NAME).collect();
        return Err(Refusal::new(
            404,
            format!(
                "no page {shown:?} here: try / (the status page), /status.json, \
                 /minibatch.png?set=train&index=0&size=64 or /metrics"
            ),
        ));
    }
    if r.method != "GET" {
        return Ok(Refusal::new(405, "only GET is served here")
            .response()
            .with("Allow", "GET"));
    }
    if r.path == "/status.js" {
        return Ok(Response::new(200, "text/javascript; charset=utf-8", SCRIPT));
    }
    if !m.status.is_serving() {
        return Err(Refusal::new(
            503,
            "the daemon is starting: its datasets are not served yet",
        ));
    }
    authorize(m, &r)?;
    match r.path.as_str() {
        "/status.json" => {
            let body = serde_json::to_vec(&super::snapshot(m))
                .map_err(|e| Refusal::new(500, format!("status JSON: {e}")))?;
            Ok(Response::new(200, "application/json", body))
        }
        "/minibatch.png" => {
            let sel = select(m, &View::from_query(&r)?)?;
            Ok(Response::new(200, "image/png", render(m, sel).await?))
        }
        _ => {
            let view = View::from_query(&r)?;
            let sel = select(m, &view);
            let html = super::page::render(&super::snapshot(m), &view, &sel, r.param("token"));
            Ok(Response::new(200, "text/html; charset=utf-8", html).with(
                "Content-Security-Policy",
                "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self'; \
                 style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; \
                 frame-ancestors 'none'",
            ))
        }
    }
}

/// Renders `sel` on a blocking thread, in one of the render slots.
async fn render(m: &Metrics, sel: Selected) -> Result<Vec<u8>, Refusal> {
    let slots = m.status.renders.clone();
    let permit = tokio::time::timeout(RENDER_WAIT, slots.acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            Refusal::new(
                503,
                format!(
                    "busy: {} minibatch images are being drawn and none finished within {:?}; \
                     try again",
                    png::RENDER_SLOTS,
                    RENDER_WAIT
                ),
            )
        })?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        sel.render()
    })
    .await
    .map_err(|e| Refusal::new(500, format!("drawing the minibatch failed: {e}")))?
    .map_err(|e| Refusal::new(500, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse_and_never_panic() {
        let r = Request::parse(
            b"GET /minibatch.png?set=tr%61in&index=2&size=64&x=%zz%4&e HTTP/1.1\r\nHost: a\r\nauthorization: bearer  s3cret \r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.path, "/minibatch.png");
        assert_eq!(r.param("set"), Some("train"));
        assert_eq!(r.param("x"), Some("%zz%4"));
        assert_eq!(r.param("e"), Some(""));
        assert_eq!(r.bearer.as_deref(), Some(&b"s3cret"[..]));
        let v = View::from_query(&r).unwrap();
        assert_eq!((v.index, v.size, v.scale), (2, 64, png::DEFAULT_SCALE));
        for bad in [
            &b""[..],
            b"GET",
            b"\xff\xfe /",
            b"GET /?%",
            b"GET /?a=%f HTTP/1.1",
        ] {
            let _ = Request::parse(bad).map(|r| View::from_query(&r));
        }
        let many = format!("GET /?{} HTTP/1.1\r\n\r\n", "a=1&".repeat(17));
        assert_eq!(Request::parse(many.as_bytes()).unwrap_err().status, 400);
        let r = Request::parse(b"GET /?index=-1&size=x HTTP/1.1\r\n\r\n").unwrap();
        let e = View::from_query(&r).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.starts_with("index: \"-1\" is not a whole number"),
            "{}",
            e.message
        );
        assert_eq!(decode("%e2%9c%93+ok%"), "✓ ok%");
    }

    #[test]
    fn grpc_codes_map_to_http() {
        let e = Refusal::from(ServeError::unknown_set("nope", ["train"].into_iter()));
        assert_eq!(e.status, 404);
        assert_eq!(
            e.message,
            "unknown set \"nope\"; this dataset has \"train\""
        );
        let e = Refusal::from(ServeError::from(crate::order::OrderError::ZeroSize));
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "size must be at least 1")
        );
        assert_eq!(http_status(tonic::Code::Unauthenticated), 401);
    }
}
