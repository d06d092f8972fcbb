//! `archfarm token create|list|delete`: makes a join token for agents and prints what
//! an operator pastes on the donated box (token, CA hash, the agent's command line); lists the
//! tokens (never their secrets) and deletes one so it can no longer join.
use super::args::{parse_label, LabelArg};
use super::{rpc, FarmClient};
use anyhow::Context;
use archfarm_proto::v1;
use serde_json::json;
use std::time::{Duration, UNIX_EPOCH};

/// `archfarm token ...`.
#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a join token.
    Create(CreateTokenArgs),
    /// List join tokens: id, labels, created, expires, single-use, uses (never the secret).
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a join token: it can no longer join; agents that joined with it stay.
    Delete {
        /// The token's id (the part before the dot).
        token_id: String,
    },
}

/// `archfarm token create`.
#[derive(clap::Args, Debug)]
pub struct CreateTokenArgs {
    /// How long the token works.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Labels bound to agents joining with it: k=v,k2=v2 (or a bare key for a flag).
    /// `trusted=true` makes its agents trusted: their results are stored in the farm's cache.
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
        TokenCommand::List { json } => {
            let tokens = rpc(client.admin.list_tokens(v1::ListTokensRequest {}).await)
                .context("failed to list join tokens")?
                .tokens;
            if *json {
                let list: Vec<serde_json::Value> = tokens.iter().map(token_json).collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                print!("{}", render_tokens(&tokens, now_unix_ms()));
            }
            Ok(0)
        }
        TokenCommand::Delete { token_id } => {
            // Accept a whole token too, but never send its secret.
            let id = token_id.split('.').next().unwrap_or_default();
            let answer = rpc(client
                .admin
                .delete_token(v1::DeleteTokenRequest {
                    token_id: id.to_string(),
                })
                .await)
            .with_context(|| format!("failed to delete join token {id}"))?;
            println!("{}", answer.message);
            Ok(0)
        }
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// A listed token as JSON: the TokenInfo fields, labels as an object.
pub fn token_json(t: &v1::TokenInfo) -> serde_json::Value {
    json!({
        "id": t.id,
        "labels": super::job::labels_json(&t.labels),
        "created_unix_ms": t.created_unix_ms,
        "expires_unix_ms": t.expires_unix_ms,
        "single_use": t.single_use,
        "uses": t.uses,
        "description": t.description,
    })
}

/// The tokens as a table; expired and used-up ones say so.
pub fn render_tokens(tokens: &[v1::TokenInfo], now_unix_ms: u64) -> String {
    if tokens.is_empty() {
        return "no join tokens; make one with `archfarm token create`\n".into();
    }
    let mut t = super::status::table(vec![
        "id",
        "labels",
        "created",
        "expires",
        "single-use",
        "uses",
        "description",
    ]);
    for tok in tokens {
        let mut expires = rfc3339(tok.expires_unix_ms);
        if tok.expires_unix_ms < now_unix_ms {
            expires.push_str(" (expired)");
        }
        t.add_row(vec![
            tok.id.clone(),
            super::job::format_labels(&tok.labels),
            rfc3339(tok.created_unix_ms),
            expires,
            if tok.single_use {
                if tok.uses > 0 {
                    "yes (used)"
                } else {
                    "yes"
                }
            } else {
                "no"
            }
            .to_string(),
            tok.uses.to_string(),
            tok.description.clone(),
        ]);
    }
    format!("{t}\n")
}

/// The label that makes agents trusted: their results are stored in the farm's cache.
pub fn trusted_label() -> LabelArg {
    LabelArg {
        key: "trusted".into(),
        value: "true".into(),
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
    fn listed_tokens_show_labels_and_expiry_but_no_secret() {
        let tokens = vec![v1::TokenInfo {
            id: "abc123".into(),
            labels: vec![v1::Label {
                key: "trusted".into(),
                value: "true".into(),
            }],
            created_unix_ms: 1_000,
            expires_unix_ms: 86_400_000,
            single_use: true,
            uses: 1,
            description: "lab box".into(),
        }];
        let text = render_tokens(&tokens, 90_000_000);
        assert!(text.contains("abc123"), "{text}");
        assert!(text.contains("trusted=true"), "{text}");
        assert!(text.contains("1970-01-02T00:00:00Z (expired)"), "{text}");
        assert!(text.contains("yes (used)"), "{text}");
        let v = token_json(&tokens[0]);
        assert_eq!(v["labels"]["trusted"], "true");
        assert_eq!(v["uses"], 1);
    }

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
