//! `cargo xtask farm token create`: makes a join token for agents and prints what an operator
//! pastes on the donated box (token, CA hash, the agent's command line).
use super::args::{parse_label, LabelArg};
use super::{rpc, FarmClient};
use anyhow::Context;
use archfarm_proto::v1;
use serde_json::json;
use std::time::{Duration, UNIX_EPOCH};

/// `cargo xtask farm token ...`.
#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a join token.
    Create(CreateTokenArgs),
}

/// `cargo xtask farm token create`.
#[derive(clap::Args, Debug)]
pub struct CreateTokenArgs {
    /// How long the token works.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Labels bound to agents joining with it: k=v,k2=v2 (or a bare key for a flag).
    #[arg(long, value_name = "K=V,...", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<LabelArg>,
    /// The token works only once.
    #[arg(long)]
    pub single_use: bool,
    /// Free text, e.g. who the box belongs to.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Print {"token","ca_hash","expires_unix_ms"} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs a token command.
pub async fn command(client: &mut FarmClient, command: &TokenCommand) -> anyhow::Result<u8> {
    match command {
        TokenCommand::Create(args) => {
            let t = create_token(
                client,
                args.ttl,
                &args.labels,
                args.single_use,
                &args.description,
            )
            .await?;
            if args.json {
                println!(
                    "{}",
                    json!({
                        "token": t.token,
                        "ca_hash": t.ca_hash,
                        "expires_unix_ms": t.expires_unix_ms,
                    })
                );
            } else {
                print!(
                    "{}",
                    describe_token(&t, client.coordinator_url(), &args.labels)
                );
            }
            Ok(0)
        }
    }
}

/// Admin.CreateToken.
pub async fn create_token(
    client: &mut FarmClient,
    ttl: Duration,
    labels: &[LabelArg],
    single_use: bool,
    description: &str,
) -> anyhow::Result<v1::CreateTokenResponse> {
    super::args::ensure_unique("label", labels.iter().map(|l| l.key.as_str()))?;
    rpc(client
        .admin
        .create_token(v1::CreateTokenRequest {
            ttl_s: ttl.as_secs().max(1),
            labels: labels.iter().map(LabelArg::to_proto).collect(),
            single_use,
            description: description.to_string(),
        })
        .await)
    .context("failed to create a join token")
}

/// The agent command line that joins with this token.
pub fn agent_command_line(coordinator_url: &str, token: &v1::CreateTokenResponse) -> String {
    format!(
        "archfarm-agent --coordinator {coordinator_url} --token {} --ca-hash {} --data-dir /var/lib/archfarm-agent",
        token.token, token.ca_hash
    )
}

/// The token on the first line, then the CA hash, expiry and the agent command line.
pub fn describe_token(
    token: &v1::CreateTokenResponse,
    coordinator_url: &str,
    labels: &[LabelArg],
) -> String {
    let expires = UNIX_EPOCH + Duration::from_millis(token.expires_unix_ms);
    let mut out = format!(
        "{}\n--ca-hash {}  (the agent checks the coordinator's CA against it)\nexpires {}\n",
        token.token,
        token.ca_hash,
        humantime::format_rfc3339_seconds(expires)
    );
    if !labels.is_empty() {
        let l: Vec<String> = labels
            .iter()
            .map(|l| format!("{}={}", l.key, l.value))
            .collect();
        out.push_str(&format!(
            "agents joining with it get labels {}\n",
            l.join(", ")
        ));
    }
    out.push_str(&format!(
        "start an agent on the box with:\n  {}\n",
        agent_command_line(coordinator_url, token)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_first_and_the_command_line_is_ready_to_paste() {
        let t = v1::CreateTokenResponse {
            token: "abc123.0123456789abcdef".into(),
            ca_hash: "sha256:00ff".into(),
            expires_unix_ms: 86_400_000,
        };
        let text = describe_token(&t, "https://farm:7443", &[]);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("abc123.0123456789abcdef"));
        assert!(text.contains("expires 1970-01-02T00:00:00Z"), "{text}");
        assert!(text.contains(
            "archfarm-agent --coordinator https://farm:7443 --token abc123.0123456789abcdef \
             --ca-hash sha256:00ff --data-dir /var/lib/archfarm-agent"
        ));
    }
}
