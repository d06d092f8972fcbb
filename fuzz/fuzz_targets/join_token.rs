//! Fuzz target: the untrusted text of a Join request, as the Join service reads it: the join
//! token (`parse_token`, first line) and the host name the agent id is made from
//! (`agent_id_for`, the rest).
#![no_main]

use archfarm_coordinator::grpc::join;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (token, hostname) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok((id, secret)) = join::parse_token(token) {
        assert_eq!((id.len(), secret.len()), (6, 16));
        assert_eq!(format!("{id}.{secret}"), token.trim());
        assert!(id
            .bytes()
            .chain(secret.bytes())
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    }
    let agent = join::agent_id_for(hostname);
    assert!(agent.len() <= 47 && !agent.starts_with('-'), "{agent:?}");
    assert!(
        agent
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "{agent:?}"
    );
});
