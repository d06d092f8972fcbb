//! Fuzz target: a SubmitRequest from untrusted bytes, decoded and validated as the Jobs service
//! does on submit (`validate_spec`, `step_sets::validate`); a valid spec is expanded into its
//! actions (`plan_actions`) and each is sent as an Assign, encoded and decoded again.
#![no_main]

use archfarm_coordinator::farm::AgentCommand;
use archfarm_coordinator::grpc::convert;
use archfarm_coordinator::model::{JobId, Submitter};
use archfarm_coordinator::planning::{spec as jobs, step_sets};
use archfarm_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = v1::SubmitRequest::decode(data) else {
        return;
    };
    let Some(spec) = req.spec else {
        return;
    };
    let valid = jobs::validate_spec(&spec);
    if !spec.step_sets.is_empty() {
        if let Ok(sets) = step_sets::validate(&spec) {
            assert_eq!(sets.len(), spec.step_sets.len());
            for set in &sets {
                let names: std::collections::HashSet<&str> =
                    set.steps.iter().map(|s| s.name.as_str()).collect();
                assert!(!set.steps.is_empty() && names.len() == set.steps.len());
                for st in &set.steps {
                    assert!(st.cache_key.is_empty() || st.cache_key.len() == 64);
                    assert!(!st.cache_key.bytes().any(|b| b.is_ascii_uppercase()));
                }
            }
        }
        return;
    }
    let Ok(valid) = valid else {
        return;
    };
    assert!(!valid.platforms.is_empty());
    assert!(
        valid.env.windows(2).all(|w| w[0].0 < w[1].0),
        "env sorted and unique"
    );
    let job = JobId("j-000001".into());
    let submitter = Submitter::new("fuzz", false);
    let actions = jobs::plan_actions(&spec, &valid, &submitter, &job, 1, 0);
    assert_eq!(actions.len(), valid.platforms.len());
    for a in actions {
        assert_eq!(jobs::action_digest(&a.spec).hex(), a.action_digest);
        assert!(a.spec.argv.iter().all(|arg| !arg.contains('\0')));
        let msg = convert::command_to_proto(AgentCommand::Assign {
            action: Box::new(a.clone()),
            fence: 7,
            emulated: false,
        });
        let back = v1::CoordinatorMessage::decode(msg.encode_to_vec().as_slice())
            .expect("an encoded Assign decodes");
        assert_eq!(back, msg);
        let Some(v1::coordinator_message::Kind::Assign(assign)) = back.kind else {
            panic!("not an Assign: {back:?}");
        };
        assert_eq!(assign.action, Some(convert::action_to_proto(&a.spec)));
    }
});
