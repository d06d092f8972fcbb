//! TLS for every client of the farm: a tonic Channel over rustls that trusts either the
//! farm CA or, while joining, a CA certificate pinned by its SHA-256 (like kubeadm's
//! discovery-token-ca-cert-hash), and presents a client certificate when it has one.
use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest as _, Sha256};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

/// Installs ring as rustls' process-wide crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// "sha256:<hex>" of a certificate's DER bytes: the CA pin agents are given.
pub fn ca_pin(ca_der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(ca_der)))
}

/// SHA-256 hex of a certificate's DER bytes: how the coordinator names a client certificate.
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Parses the PEM certificates in `pem`.
pub fn parse_certs(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("failed to parse PEM certificates")?;
    if certs.is_empty() {
        bail!("no certificate in PEM input");
    }
    Ok(certs)
}

/// Parses the first PEM private key in `pem`.
pub fn parse_key(pem: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .context("failed to parse PEM private key")?
        .context("no private key in PEM input")
}

/// How the client decides to trust the server.
#[derive(Clone)]
pub enum ServerTrust {
    /// The farm CA, PEM.
    Ca(String),
    /// "sha256:<hex>" of the CA certificate, which the server sends in its chain.
    Pin(String),
}

/// A client certificate chain and key, PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    /// PEM certificate chain.
    pub cert_pem: String,
    /// PEM private key.
    pub key_pem: String,
}

/// A credentials directory: `cert.pem`, `key.pem`, `ca.pem`.
#[derive(Clone)]
pub struct Credentials {
    /// The client certificate and key.
    pub identity: ClientIdentity,
    /// The farm CA, PEM.
    pub ca_pem: String,
}

impl Credentials {
    /// Reads `dir/{cert,key,ca}.pem`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |n: &str| {
            std::fs::read_to_string(dir.join(n))
                .with_context(|| format!("failed to read {}", dir.join(n).display()))
        };
        Ok(Self {
            identity: ClientIdentity {
                cert_pem: read("cert.pem")?,
                key_pem: read("key.pem")?,
            },
            ca_pem: read("ca.pem")?,
        })
    }

    /// Writes `dir/{cert,key,ca}.pem` (key readable by the owner only).
    pub fn store(&self, dir: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        for (name, body, mode) in [
            ("cert.pem", &self.identity.cert_pem, 0o644),
            ("key.pem", &self.identity.key_pem, 0o600),
            ("ca.pem", &self.ca_pem, 0o644),
        ] {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, body)
                .with_context(|| format!("failed to write {}", tmp.display()))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("failed to write {}", path.display()))?;
        }
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}

/// Accepts a server whose chain contains the pinned CA certificate and whose leaf that CA
/// signed for the expected name. Remembers the CA it found.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    found: Arc<Mutex<Option<CertificateDer<'static>>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| ca_pin(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the coordinator's CA does not match the pin {} (it sent {} chain certificates)",
                    self.pin,
                    intermediates.len()
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA is unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        if let Ok(mut f) = self.found.lock() {
            *f = Some(ca.clone().into_owned());
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A connected channel, and the CA certificate the server proved (for a pinned connection).
pub struct Connected {
    /// The gRPC channel.
    pub channel: Channel,
    /// The pinned CA certificate, when trust was a pin.
    pub pinned_ca: Option<CertificateDer<'static>>,
}

/// Parses `https://host:port` into host and port.
pub fn parse_coordinator_url(url: &str) -> anyhow::Result<(String, u16)> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("bad coordinator URL {url:?}"))?;
    if uri.scheme_str() != Some("https") {
        bail!("coordinator URL {url:?} must start with https://");
    }
    let host = uri
        .host()
        .with_context(|| format!("coordinator URL {url:?} has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

/// Opens a TLS gRPC channel to `url` (`https://host:port`).
pub async fn connect(
    url: &str,
    trust: &ServerTrust,
    identity: Option<&ClientIdentity>,
) -> anyhow::Result<Connected> {
    install_crypto_provider();
    let (host, port) = parse_coordinator_url(url)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("failed to set TLS versions")?;
    let found = Arc::new(Mutex::new(None));
    let builder = match trust {
        ServerTrust::Ca(pem) => {
            let mut roots = RootCertStore::empty();
            for c in parse_certs(pem)? {
                roots.add(c).context("failed to add the farm CA")?;
            }
            builder.with_root_certificates(roots)
        }
        ServerTrust::Pin(pin) => {
            let pin = pin.trim().to_ascii_lowercase();
            if !pin.starts_with("sha256:") || pin.len() != 7 + 64 {
                bail!("CA hash {pin:?} must look like sha256:<64 hex digits>");
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
                    pin,
                    found: found.clone(),
                    provider: provider.clone(),
                }))
        }
    };
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(parse_certs(&id.cert_pem)?, parse_key(&id.key_pem)?)
            .context("failed to use the client certificate")?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    let server_name = ServerName::try_from(host.clone())
        .with_context(|| format!("bad server name {host:?}"))?
        .to_owned();
    // tonic sees plain http; the connector below does the TLS.
    let endpoint = Endpoint::from_shared(format!(
        "http://{}:{port}",
        if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        }
    ))?
    .connect_timeout(Duration::from_secs(10))
    .http2_keep_alive_interval(Duration::from_secs(10))
    .keep_alive_timeout(Duration::from_secs(20))
    .keep_alive_while_idle(true);
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        let server_name = server_name.clone();
        let host = host.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))
        .with_context(|| format!("failed to connect to {url}"))?;
    let pinned_ca = found.lock().ok().and_then(|f| f.clone());
    Ok(Connected { channel, pinned_ca })
}

/// Formats an error and all its sources on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
