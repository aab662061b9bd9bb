//! Connection settings → a tonic endpoint.
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::{
    ClientError, CONNECTION_WINDOW, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_EXAMPLE_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES, FRAME_SIZE_RANGE, MAX_FRAME_SIZE, STREAM_WINDOW,
};

/// How to reach one server, and what to accept from it.
#[derive(Clone)]
pub struct Config {
    /// `host:port`, or a URI (`http://host:port`, `https://host:port`). A
    /// bare address gets `https` when `tls` is set, else `http`.
    pub address: String,
    /// TLS settings; None: plaintext (unless the address says `https`).
    pub tls: Option<Tls>,
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<String>,
    pub connect_timeout: Duration,
    /// HTTP/2 max frame size to advertise ([`MAX_FRAME_SIZE`]; clamped to
    /// [`FRAME_SIZE_RANGE`]).
    pub max_frame_size: u32,
    /// Largest response message accepted ([`DEFAULT_MAX_MESSAGE_BYTES`]);
    /// lowered to the server's advertised limit once it is known.
    pub max_message_bytes: usize,
    /// Largest example (row of `x` or `y`) accepted while the dataset's
    /// shapes are unknown ([`DEFAULT_MAX_EXAMPLE_BYTES`]).
    pub max_example_bytes: u64,
    /// Opt-in busy polling: for up to this long from the start of a GetBatch
    /// call ([`crate::Connection::one_batch`]), the calling task polls the
    /// socket instead of sleeping until the response arrives (zero, the
    /// default: never).
    ///
    /// Why: a GetBatch waits about 0.1 ms for its first bytes and then for
    /// each burst of the ~25 TCP segments a 1.6 MB minibatch takes on
    /// loopback. Each time the calling thread sleeps in `epoll_wait`, the
    /// kernel must wake it when the next segment lands: a context switch on
    /// the client and, on a virtual machine whose vCPU went idle, an
    /// inter-processor interrupt that the server's sending thread pays for
    /// (`sock_def_readable`, 10 % of the server's CPU samples for
    /// GetBatch(500); BENCHMARKS.md "Issue 18"). With a budget, the call's
    /// task yields to the runtime instead of sleeping
    /// (`tokio::task::yield_now`: the runtime polls its sockets with a zero
    /// timeout and runs the task again) until the answer is complete or the
    /// budget since the call started is spent, then sleeps as usual. Each
    /// turn also yields the core to the kernel (`sched_yield`), so a server
    /// or any other thread waiting for this core runs first: without that,
    /// a client that shared its core with the server delayed the answer it
    /// was waiting for (throughput fell by half in the same measurement).
    /// It keeps the client's core busy for at most the budget per call, and
    /// never while no call is in flight: hence opt-in.
    pub busy_poll: Duration,
}

impl Config {
    /// The defaults for `address`: plaintext, no token, the measured HTTP/2
    /// settings and the documented bounds.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            tls: None,
            token: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_frame_size: MAX_FRAME_SIZE,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_example_bytes: DEFAULT_MAX_EXAMPLE_BYTES,
            busy_poll: Duration::ZERO,
        }
    }

    /// The URI dialed: the address with a scheme.
    pub fn uri(&self) -> String {
        if self.address.contains("://") {
            self.address.clone()
        } else if self.tls.is_some() {
            format!("https://{}", self.address)
        } else {
            format!("http://{}", self.address)
        }
    }

    /// The endpoint: TLS as configured, TCP_NODELAY, and the HTTP/2 frame
    /// size and flow-control windows (see the constants for why).
    pub fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let uri = self.uri();
        let mut ep = Endpoint::from_shared(uri.clone()).map_err(|e| ClientError::Address {
            address: self.address.clone(),
            why: e.to_string(),
        })?;
        if let Some(t) = &self.tls {
            ep = ep
                .tls_config(t.client_config()?)
                .map_err(|source| ClientError::Connect { addr: uri, source })?;
        }
        Ok(ep
            .tcp_nodelay(true)
            .connect_timeout(self.connect_timeout)
            .max_frame_size(
                self.max_frame_size
                    .clamp(*FRAME_SIZE_RANGE.start(), *FRAME_SIZE_RANGE.end()),
            )
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW))
    }

    /// The `authorization` header the token makes.
    pub(crate) fn auth(&self) -> Result<Option<http::HeaderValue>, ClientError> {
        self.token
            .as_ref()
            .map(|t| {
                http::HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| ClientError::Config("the token is not valid header text".into()))
            })
            .transpose()
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("max_frame_size", &self.max_frame_size)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_example_bytes", &self.max_example_bytes)
            .field("busy_poll", &self.busy_poll)
            .finish()
    }
}

/// TLS settings (PEM contents, not paths).
#[derive(Clone, Default)]
pub struct Tls {
    /// CA certificate(s) to verify the server against. None: the bundled
    /// Mozilla roots, with the `webpki-roots` feature (else an error).
    pub ca_pem: Option<Vec<u8>>,
    /// Certificate and key to present (mutual TLS).
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to verify in the server's certificate (default: the host).
    pub domain: Option<String>,
}

impl Tls {
    fn client_config(&self) -> Result<ClientTlsConfig, ClientError> {
        let mut tls = match &self.ca_pem {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
            #[cfg(feature = "webpki-roots")]
            None => ClientTlsConfig::new().with_webpki_roots(),
            #[cfg(not(feature = "webpki-roots"))]
            None => {
                return Err(ClientError::Config(
                    "TLS needs a CA certificate (this build has no bundled roots)".into(),
                ))
            }
        };
        if let Some((cert, key)) = &self.identity_pem {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &self.domain {
            tls = tls.domain_name(d.clone());
        }
        Ok(tls)
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .field(
                "identity_pem",
                &self.identity_pem.as_ref().map(|_| "<redacted>"),
            )
            .field("domain", &self.domain)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_the_scheme_tls_asks_for() {
        let mut c = Config::new("127.0.0.1:50051");
        assert_eq!(c.uri(), "http://127.0.0.1:50051");
        c.tls = Some(Tls::default());
        assert_eq!(c.uri(), "https://127.0.0.1:50051");
        c.address = "http://h:1".into();
        assert_eq!(c.uri(), "http://h:1");
        assert!(matches!(
            Config::new("bad address with spaces").endpoint(),
            Err(ClientError::Address { .. })
        ));
        c.token = Some("line\nbreak".into());
        assert!(matches!(c.auth(), Err(ClientError::Config(_))));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let mut c = Config::new("h:1");
        c.token = Some("s3cret".into());
        c.tls = Some(Tls {
            identity_pem: Some((b"cert".to_vec(), b"PRIVATE KEY".to_vec())),
            ..Tls::default()
        });
        let d = format!("{c:?}");
        assert!(!d.contains("s3cret") && !d.contains("PRIVATE"), "{d}");
    }
}
