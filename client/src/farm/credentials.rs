//! `archfarm credentials create --role client --name NAME [--trusted] --out DIR`: a key pair made
//! here (the private key never leaves this machine), its CSR signed by the farm CA through
//! Admin.IssueCredentials, written as a credentials directory for `--credentials`;
//! `credentials revoke NAME` makes them useless at once.
use super::{rpc, FarmClient};
use anyhow::Context;
use archfarm_proto::tls::{ClientIdentity, Credentials};
use archfarm_proto::v1;
use std::path::PathBuf;

/// `archfarm credentials ...`.
#[derive(clap::Subcommand, Debug)]
pub enum CredentialsCommand {
    /// Issue credentials and write cert.pem, key.pem and ca.pem into DIR.
    Create(CreateCredentialsArgs),
    /// Make every client certificate issued under NAME useless at once.
    Revoke {
        /// The name given at `credentials create`.
        name: String,
    },
}

/// `archfarm credentials create`.
#[derive(clap::Args, Debug)]
pub struct CreateCredentialsArgs {
    /// Role of the certificate; only `client` (submit jobs, read status, use the CAS).
    #[arg(long, default_value = "client")]
    pub role: String,
    /// Name the farm records as the submitter: [a-z0-9][a-z0-9._-]*.
    #[arg(long)]
    pub name: String,
    /// Lifetime in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Trusted: its jobs' results go to the shared cache scope every job reads (for
    /// postsubmit and periodic CI). Without it (e.g. for pull-request jobs) its results are
    /// cached for its own jobs only, and its jobs never run on an agent without a sandbox.
    #[arg(long)]
    pub trusted: bool,
    /// Directory to write cert.pem, key.pem (owner-only), ca.pem and `coordinator` (this
    /// farm's URL) into; must not hold credentials already.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Runs a credentials command.
pub async fn command(client: &mut FarmClient, command: &CredentialsCommand) -> anyhow::Result<u8> {
    let args = match command {
        CredentialsCommand::Create(args) => args,
        CredentialsCommand::Revoke { name } => {
            let answer = rpc(client
                .admin
                .revoke_credentials(v1::RevokeCredentialsRequest { name: name.clone() })
                .await)
            .with_context(|| format!("failed to revoke the credentials of {name}"))?;
            println!("{}", answer.message);
            return Ok(0);
        }
    };
    if args.out.join("key.pem").exists() {
        anyhow::bail!(
            "{} already holds credentials; pick another --out",
            args.out.display()
        );
    }
    let key = rcgen::KeyPair::generate().context("failed to generate a key pair")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .context("failed to make a certificate request")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, args.name.as_str());
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .context("failed to make a certificate request")?;
    let issued = rpc(client
        .admin
        .issue_credentials(v1::IssueCredentialsRequest {
            role: args.role.clone(),
            name: args.name.clone(),
            csr_pem,
            days: args.days,
            trusted: args.trusted,
        })
        .await)
    .with_context(|| {
        format!(
            "failed to issue {} credentials for {}",
            args.role, args.name
        )
    })?;
    Credentials {
        identity: ClientIdentity {
            cert_pem: issued.certificate_pem,
            key_pem: key.serialize_pem(),
        },
        ca_pem: issued.ca_certificate_pem,
    }
    .store(&args.out)?;
    // The URL goes with them, so that ARCHFARM_CREDENTIALS alone selects the farm.
    let url_file = args.out.join(crate::config::COORDINATOR_FILE);
    std::fs::write(&url_file, format!("{}\n", client.coordinator_url()))
        .with_context(|| format!("failed to write {}", url_file.display()))?;
    println!(
        "{} {} credentials for {} in {} (use them with --credentials {} or \
         ARCHFARM_CREDENTIALS; {} names this coordinator)",
        if args.trusted { "trusted" } else { "untrusted" },
        args.role,
        args.name,
        args.out.display(),
        args.out.display(),
        url_file.display()
    );
    Ok(0)
}
