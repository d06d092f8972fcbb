//! `archfarm agents drain|revoke ID`: an admin's two levers on an agent.
use super::{rpc, FarmClient};
use anyhow::Context;
use archfarm_proto::v1;

/// `archfarm agents ...`.
#[derive(clap::Subcommand, Debug)]
pub enum AgentsCommand {
    /// Give the agent no new work; what runs finishes.
    Drain {
        /// The agent's id.
        agent_id: String,
    },
    /// Make the agent's certificate useless at once and requeue its actions.
    Revoke {
        /// The agent's id.
        agent_id: String,
    },
}

/// Runs an agents command and prints the coordinator's answer.
pub async fn command(client: &mut FarmClient, command: &AgentsCommand) -> anyhow::Result<u8> {
    let (answer, fallback) = match command {
        AgentsCommand::Drain { agent_id } => (
            rpc(client
                .admin
                .drain_agent(v1::AgentRequest {
                    agent_id: agent_id.clone(),
                })
                .await)
            .with_context(|| format!("failed to drain agent {agent_id}"))?,
            format!("agent {agent_id} is draining"),
        ),
        AgentsCommand::Revoke { agent_id } => (
            rpc(client
                .admin
                .revoke_agent(v1::AgentRequest {
                    agent_id: agent_id.clone(),
                })
                .await)
            .with_context(|| format!("failed to revoke agent {agent_id}"))?,
            format!("agent {agent_id} is revoked"),
        ),
    };
    if answer.message.is_empty() {
        println!("{fallback}");
    } else {
        println!("{}", answer.message);
    }
    Ok(0)
}
