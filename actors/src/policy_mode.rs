//! `policy_mode` (workspace.yaml `control_plane.policy_mode`): how the control plane's policy
//! set combines with the workspace's own (`agent.json` `policies`), as the platform defines it
//! (`control-plane-sdk/src/policy-mode.ts`):
//! - `authoritative`: the control plane's decision, as it is;
//! - `tighten-only`: the local policies may only make a decision stricter (a local `deny`
//!   wins; a local `allow` never loosens a remote `deny`);
//! - `dev-override`: the local decision wins, with a warning when it loosens.
//!
//! The agent applies it to the one decision it acts on: whether to forward events at all
//! (`default_decision: deny` pauses forwarding; nothing is dropped).

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyMode {
    #[default]
    Authoritative,
    TightenOnly,
    DevOverride,
}

impl PolicyMode {
    pub fn parse(s: &str) -> Option<PolicyMode> {
        match s {
            "authoritative" => Some(PolicyMode::Authoritative),
            "tighten-only" => Some(PolicyMode::TightenOnly),
            "dev-override" => Some(PolicyMode::DevOverride),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PolicyMode::Authoritative => "authoritative",
            PolicyMode::TightenOnly => "tighten-only",
            PolicyMode::DevOverride => "dev-override",
        }
    }

    /// Is forwarding denied, given the control plane's and the local `default_decision`
    /// (`true` = deny)? The second value: a warning to log (a dev override loosening).
    pub fn deny(self, remote_deny: bool, local_deny: bool) -> (bool, Option<&'static str>) {
        match self {
            PolicyMode::Authoritative => (remote_deny, None),
            PolicyMode::TightenOnly => (remote_deny || local_deny, None),
            PolicyMode::DevOverride => (
                local_deny,
                (remote_deny && !local_deny).then_some(
                    "dev-override: the local policy (allow) loosens the control plane's deny",
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PolicyMode::*;

    #[test]
    fn the_three_modes() {
        for (mode, remote, local, deny) in [
            (Authoritative, true, false, true),
            (Authoritative, false, true, false),
            (TightenOnly, false, true, true),
            (TightenOnly, true, false, true),
            (TightenOnly, false, false, false),
            (DevOverride, true, false, false),
            (DevOverride, false, true, true),
        ] {
            assert_eq!(
                mode.deny(remote, local).0,
                deny,
                "{mode:?} {remote} {local}"
            );
        }
        assert!(DevOverride.deny(true, false).1.is_some());
    }
}
