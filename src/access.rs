//! Who may talk to the server: an optional bearer token (checked in constant
//! time) and optional TLS / mutual TLS. Health stays open so probes and
//! balancers need no credentials; reflection describes only the schema.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tonic::Status;

/// TLS material, read from PEM files at start-up.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Builds the rustls server config, naming the file that fails.
    ///
    /// The server runs the TLS handshake itself (under its handshake
    /// deadline, see [`crate::server`]) rather than through tonic's
    /// `tls_config`, so this is the same config tonic would build: the
    /// `ring` provider, HTTP/2 by ALPN, and, with `client_ca`, a verifier
    /// that refuses clients without a certificate signed by it (mTLS is
    /// enforced inside the handshake).
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
        };
        let certs = |p: &Path| -> anyhow::Result<Vec<CertificateDer<'static>>> {
            let v = CertificateDer::pem_slice_iter(&read(p)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", p.display()))?;
            if v.is_empty() {
                anyhow::bail!("{}: no PEM certificate in it", p.display());
            }
            Ok(v)
        };
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|e| anyhow::anyhow!("{}: no PEM private key: {e}", self.key.display()))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certs(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
                }
                builder.with_client_cert_verifier(
                    WebPkiClientVerifier::builder_with_provider(roots.into(), provider).build()?,
                )
            }
        };
        let mut config = builder
            .with_single_cert(certs(&self.cert)?, key)
            .map_err(|e| {
                anyhow::anyhow!("{} / {}: {e}", self.cert.display(), self.key.display())
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Reads a token file: the token is its content without surrounding whitespace.
pub fn read_token_file(p: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(p)
        .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", p.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        anyhow::bail!("token file {} is empty", p.display());
    }
    Ok(t)
}

/// Checks `authorization: Bearer <token>` on every BatchService call.
#[derive(Clone)]
pub struct BearerAuth {
    /// sha256 of the expected token: comparing digests takes the same time
    /// whatever the presented token's length or content.
    digest: [u8; 32],
}

impl BearerAuth {
    pub fn new(token: &str) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the token (in constant time).
    pub fn check(&self, presented: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(presented).into();
        d.iter()
            .zip(self.digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl BearerAuth {
    /// The check itself, on raw HTTP/2 headers, made by the BatchService's
    /// routes ([`crate::routes`]) before a request is read.
    pub fn authorize(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        let Some(v) = headers.get("authorization") else {
            return Err(Status::unauthenticated(
                "missing authorization metadata: send \"authorization: Bearer <token>\"",
            ));
        };
        let token = v.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b"");
        if token.is_empty() || !self.check(token) {
            return Err(Status::unauthenticated("invalid bearer token"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_checks() {
        let a = BearerAuth::new("s3cret");
        let with = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("authorization", v.parse().unwrap());
            a.authorize(&h).map_err(|e| e.code())
        };
        let unauth = Err(tonic::Code::Unauthenticated);
        assert_eq!(
            a.authorize(&http::HeaderMap::new()).map_err(|e| e.code()),
            unauth
        );
        assert_eq!(with("Bearer s3cret"), Ok(()));
        assert_eq!(with("Bearer s3cre"), unauth);
        assert_eq!(with("Bearer s3cret2"), unauth);
        assert_eq!(with("s3cret"), unauth);
        assert_eq!(with("Bearer "), unauth);
    }
}
