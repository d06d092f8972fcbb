//! The farm's certificate authority: created on first start, it signs the coordinator's
//! server certificate (SANs from --advertise), the admin credentials, and agents' CSRs.
use anyhow::Context;
use archfarm_proto::tls::{ca_pin, cert_fingerprint, parse_certs, ClientIdentity, Credentials};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The CA and the server's current certificate.
pub struct Pki {
    ca_cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// Server certificate chain (leaf, then CA), PEM.
    pub server_chain_pem: String,
    /// Server key, PEM.
    pub server_key_pem: String,
}

fn write_private(path: &Path, body: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, "archfarm CA");
    p.distinguished_name
        .push(DnType::OrganizationName, "archfarm");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    p.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
    Ok(p)
}

impl Pki {
    /// Loads the CA from `dir/pki`, creating it on first start, and issues a fresh server
    /// certificate for `advertise` (plus loopback names). Returns whether the CA is new.
    pub fn load_or_create(dir: &Path, advertise: &[String]) -> anyhow::Result<(Self, bool)> {
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki)
            .with_context(|| format!("failed to create {}", pki.display()))?;
        let (cert_path, key_path) = (pki.join("ca.pem"), pki.join("ca.key"));
        let created = !cert_path.exists();
        let (ca_cert_pem, issuer) = if created {
            let key = KeyPair::generate().context("failed to generate the CA key")?;
            let params = ca_params()?;
            let cert = params
                .self_signed(&key)
                .context("failed to create the CA certificate")?;
            write_private(&key_path, &key.serialize_pem())?;
            std::fs::write(&cert_path, cert.pem())
                .with_context(|| format!("failed to write {}", cert_path.display()))?;
            (cert.pem(), Issuer::new(params, key))
        } else {
            let key_pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("failed to read {}", key_path.display()))?;
            let key = KeyPair::from_pem(&key_pem).context("failed to parse the CA key")?;
            let cert_pem = std::fs::read_to_string(&cert_path)
                .with_context(|| format!("failed to read {}", cert_path.display()))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .context("failed to parse the CA certificate")?;
            (cert_pem, issuer)
        };
        let mut this = Self {
            ca_cert_pem,
            issuer,
            server_chain_pem: String::new(),
            server_key_pem: String::new(),
        };
        this.issue_server_cert(advertise)?;
        Ok((this, created))
    }

    fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    fn issue_server_cert(&mut self, advertise: &[String]) -> anyhow::Result<()> {
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        for a in advertise {
            if !names.contains(a) {
                names.push(a.clone());
            }
        }
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(
                    n.clone()
                        .try_into()
                        .with_context(|| format!("bad --advertise name {n:?}"))?,
                )),
            })
            .collect::<anyhow::Result<_>>()?;
        p.distinguished_name
            .push(DnType::CommonName, "archfarm coordinator");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        p.not_after = OffsetDateTime::now_utc() + Duration::days(365);
        let key = KeyPair::generate()?;
        let cert = p
            .signed_by(&key, self.issuer())
            .context("failed to issue the server certificate")?;
        self.server_chain_pem = format!("{}{}", cert.pem(), self.ca_cert_pem);
        self.server_key_pem = key.serialize_pem();
        Ok(())
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// `sha256:<hex>` of the CA certificate, for `--ca-hash`.
    pub fn ca_hash(&self) -> anyhow::Result<String> {
        Ok(ca_pin(&parse_certs(&self.ca_cert_pem)?[0]))
    }

    /// Issues a client certificate for `name` with a fresh key; returns credentials and the
    /// certificate's fingerprint.
    pub fn issue_client(&self, name: &str, days: i64) -> anyhow::Result<(Credentials, String)> {
        let key = KeyPair::generate()?;
        let cert = self
            .client_params(name, days)?
            .signed_by(&key, self.issuer())?;
        let fp = cert_fingerprint(cert.der());
        Ok((
            Credentials {
                identity: ClientIdentity {
                    cert_pem: cert.pem(),
                    key_pem: key.serialize_pem(),
                },
                ca_pem: self.ca_cert_pem.clone(),
            },
            fp,
        ))
    }

    fn client_params(&self, name: &str, days: i64) -> anyhow::Result<CertificateParams> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        p.not_after = OffsetDateTime::now_utc() + Duration::days(days);
        Ok(p)
    }

    /// Signs an agent's CSR. Only the CSR's public key is used: the subject, usages and
    /// lifetime are the farm's. Returns the PEM certificate and its fingerprint.
    pub fn sign_csr(&self, csr_pem: &str, agent_id: &str) -> anyhow::Result<(String, String)> {
        self.sign_client_csr(csr_pem, agent_id, 365)
    }

    /// Signs a CSR into a client certificate for `name` valid `days` days; only the CSR's
    /// public key is used. Returns the PEM certificate and its fingerprint.
    pub fn sign_client_csr(
        &self,
        csr_pem: &str,
        name: &str,
        days: i64,
    ) -> anyhow::Result<(String, String)> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).context("the CSR does not parse")?;
        let cert = self
            .client_params(name, days)?
            .signed_by(&csr.public_key, self.issuer())
            .context("failed to sign the CSR")?;
        Ok((cert.pem(), cert_fingerprint(cert.der())))
    }
}

/// Where the admin credentials live under a data dir.
pub fn admin_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("admin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_reloads_the_same_ca_and_signs_csrs() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = Pki::load_or_create(dir.path(), &["farm.example".into()]).unwrap();
        assert!(created);
        let (b, created) = Pki::load_or_create(dir.path(), &[]).unwrap();
        assert!(!created);
        assert_eq!(a.ca_hash().unwrap(), b.ca_hash().unwrap());
        assert!(a.ca_hash().unwrap().starts_with("sha256:"));
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["evil.example".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let (pem, fp) = b.sign_csr(&csr, "agent-1").unwrap();
        assert_eq!(fp.len(), 64);
        assert_eq!(cert_fingerprint(&parse_certs(&pem).unwrap()[0]), fp);
        assert!(b.sign_csr("not a csr", "x").is_err());
    }
}
