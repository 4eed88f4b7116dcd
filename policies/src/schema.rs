//! JSON Schema pieces the derived schemas cannot express on their own, written so that the
//! CustomResourceDefinitions generated from the spec types are *structural* (Kubernetes'
//! `apiextensions.k8s.io/v1` rules: every node has a type, `x-kubernetes-preserve-unknown-fields`
//! only where the value is free-form JSON, `x-kubernetes-int-or-string` for int-or-string).

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

use crate::duration::SpecDuration;

/// Free-form JSON (a workflow's `output`, a call `body`, a JSON Schema, Istio fields meshflow
/// keeps but does not interpret): any value, kept as written.
pub fn any_json(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// Istio's `PolicyTargetReference` (`targetRef`, Gateway API attachment): meshflow refuses
/// the field with a hint, but types it, so that the API server prunes anything else in it
/// (an untyped field would take any JSON, nested beyond what a client can decode).
pub fn target_ref(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "properties": {
            "group": { "type": "string" },
            "kind": { "type": "string" },
            "name": { "type": "string" },
            "namespace": { "type": "string" }
        }
    })
}

/// A list of [`target_ref`]s (`targetRefs`).
pub fn target_refs(generator: &mut SchemaGenerator) -> Schema {
    let item = target_ref(generator);
    json_schema!({ "type": "array", "items": item })
}

/// Istio's CUSTOM `provider` (`{ name }`), refused by meshflow, typed as [`target_ref`] is.
pub fn provider(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "object", "properties": { "name": { "type": "string" } } })
}

/// A list of strings (Istio's `fromCookies`, refused by meshflow).
pub fn string_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "array", "items": { "type": "string" } })
}

/// A string (Istio's `outputPayloadToHeader`, refused by meshflow).
pub fn string(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string" })
}

/// Istio's `outputClaimToHeaders` (`[{ header, claim }]`), refused by meshflow.
pub fn claim_to_headers(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "properties": { "header": { "type": "string" }, "claim": { "type": "string" } }
        }
    })
}

/// An integer (Istio's retry `attempts`, refused by meshflow with a hint).
pub fn integer(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer" })
}

/// An integer or a string (a retry condition: an HTTP status like `503` or a name like
/// `5xx`); which names and codes are valid is checked by the spec's validation.
pub fn int_or_string(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-int-or-string": true,
        "anyOf": [{ "type": "integer" }, { "type": "string" }]
    })
}

/// What [`SpecDuration`] accepts: one or more `<number><unit>` groups (humantime's units), never
/// a bare number — `250ms`, `2s`, `1m30s`, `1h 30m`.
pub const DURATION_PATTERN: &str = r"^\s*([0-9]+\s*(nsec|ns|usec|us|µs|msec|ms|seconds|second|sec|s|minutes|minute|min|m|hours|hour|hr|h|days|day|d|weeks|week|w|months|month|M|years|year|y)\s*)+$";

impl JsonSchema for SpecDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration with a unit, e.g. 250ms, 2s, 1m30s (a bare number is refused)."
        })
    }
}

/// A map keyed by port number (`portLevelMtls`): an object whose values are `T`. (Kubernetes
/// schemas have no `patternProperties`; the keys are checked by the spec's validation.)
pub fn port_map<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    let values = generator.subschema_for::<T>();
    json_schema!({ "type": "object", "additionalProperties": values })
}
