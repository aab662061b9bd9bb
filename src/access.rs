//! Who may talk to the server: an optional bearer token (checked in constant
//! time) and optional TLS / mutual TLS. Health stays open so probes and
//! balancers need no credentials; reflection describes only the schema.
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
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
    /// Builds tonic's server TLS config, naming the file that fails.
    pub fn server_config(&self) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
        };
        let identity = tonic::transport::Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        let mut c = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        Ok(c)
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

    fn check(&self, presented: &[u8]) -> bool {
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
