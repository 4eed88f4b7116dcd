//! Bounded fuzzing on the stable toolchain (cargo-fuzz needs nightly, which this project does not
//! use): proptest feeds arbitrary input to the parsers at the trust boundary and checks they
//! never panic. Each property runs a fixed number of cases, so the test command stays bounded.

use std::path::Path;

use meshflow_policies::authz::AuthorizationPolicy;
use meshflow_policies::documents::PolicySet;
use meshflow_policies::path::normalize_path;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn normalize_never_panics_on_arbitrary_text(path in "\\PC{0,64}") {
        let _ = normalize_path(&path);
    }

    #[test]
    fn normalize_never_panics_on_path_like_input(path in "(/|%[0-9a-fA-F]{0,2}|\\.|\\.\\.|;|#|\\\\|[a-z]{1,3}){0,24}") {
        if let Ok(once) = normalize_path(&path) {
            prop_assert_eq!(normalize_path(&once), Ok(once.clone()));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn policy_parsing_never_panics(text in "\\PC{0,400}") {
        let _ = AuthorizationPolicy::parse(Path::new("fuzz.yaml"), &text);
        let _ = PolicySet::default().add_file(Path::new("fuzz.yaml"), &text);
    }

    #[test]
    fn policy_parsing_never_panics_on_policy_shaped_yaml(
        action in "(ALLOW|DENY|AUDIT|CUSTOM|allow|\\PC{0,6})",
        key in "(paths|methods|principals|hosts|notPaths|ports|ipBlocks|\\PC{0,8})",
        value in "\\PC{0,24}",
        when in "(request\\.headers\\[[a-z]{0,5}\\]?|source\\.ip|\\PC{0,12})",
    ) {
        let text = format!(
            "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{ name: f }}\nspec:\n  action: {action}\n  rules:\n  - to: [{{operation: {{{key}: [{value:?}]}}}}]\n    from: [{{source: {{{key}: [{value:?}]}}}}]\n    when: [{{key: {when:?}, values: [{value:?}]}}]\n"
        );
        let _ = PolicySet::default().add_file(Path::new("fuzz.yaml"), &text);
    }
}
