//! `kind: Workflow` (`meshflow.io/v1alpha1`): a durable multi-step call chain — a DAG of steps,
//! each one `call` (an HTTP request to a mesh service), `sleep` or `waitForSignal`, with retries,
//! timeouts, compensations (saga), `when` conditions and `${…}` templates in CEL
//! (<https://github.com/google/cel-spec>, evaluated by the `cel-interpreter` crate) over
//! `input`, `steps.<name>.output`, `steps.<name>.status`, `signals.<name>` and `run`.
//!
//! Registration ([`Workflow::parse`]) refuses, with file, line and field: duplicate step names,
//! unknown or self `dependsOn`, cycles (naming the cycle), templates that do not compile, and
//! references to steps that are not upstream of the step using them or to fields a step result
//! does not have (`steps.x.outptu`). Diamonds are valid.
//!
//! Bounds, so that one definition or one run input cannot crash or stall the process: at most
//! [`MAX_STEPS`] steps and [`MAX_EXPRESSIONS`] expressions per definition; each expression
//! within the limits of [`expr`] (length, tokens, nesting, AST size, comprehension nesting),
//! checked before the parser sees it; each evaluation within [`MAX_EVAL_COST`], estimated over
//! the actual context before it runs. Validation is linear in the definition (plus one bit
//! per pair of steps for the upstream sets).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use cel_parser::ast::{EntryExpr, Expr, IdedExpr};
use serde::{Deserialize, Serialize};

use crate::duration::SpecDuration;
use crate::load::{find_line, parse_yaml, LoadError, Result};
use crate::mesh::{ObjectMeta, API_VERSION};

pub mod expr;

pub use expr::{
    MAX_AST_DEPTH, MAX_AST_NODES, MAX_COMPREHENSION_NESTING, MAX_EVAL_COST, MAX_EXPRESSION_BYTES,
    MAX_EXPRESSION_NESTING, MAX_EXPRESSION_TOKENS,
};

/// Most steps in one definition.
pub const MAX_STEPS: usize = 1000;
/// Most expressions (`when` conditions and `${…}` templates) in one definition.
pub const MAX_EXPRESSIONS: usize = 5000;

/// Fields of `steps.<name>` a template may read.
pub const STEP_FIELDS: &[&str] = &["output", "status", "attempts"];
/// Top-level names a template may read.
pub const ROOTS: &[&str] = &["input", "steps", "signals", "run"];
/// Default history limit (events per run).
pub const DEFAULT_HISTORY_LIMIT: u32 = 10_000;

/// A whole `Workflow` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workflow {
    /// `meshflow.io/v1alpha1`.
    pub api_version: String,
    /// `Workflow`.
    pub kind: String,
    /// Name and namespace (default `default`): the workflow is `namespace/name`.
    pub metadata: ObjectMeta,
    /// The definition.
    pub spec: WorkflowSpec,
}

/// The definition.
#[cfg_attr(
    feature = "kubernetes",
    derive(kube::CustomResource),
    kube(
        group = "meshflow.io",
        version = "v1alpha1",
        kind = "Workflow",
        doc = "A durable multi-step call chain (saga), registered with the meshflow coordinator; runs stay in its store.",
        root = "WorkflowResource",
        namespaced,
        status = "crate::crd::WorkflowStatus",
        printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
        printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.registeredVersion"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkflowSpec {
    /// The steps (a DAG through `dependsOn`).
    pub steps: Vec<Step>,
    /// Run output: a JSON value whose strings may hold `${…}` templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::any_json")]
    pub output: Option<serde_json::Value>,
    /// Whole-run timeout (e.g. `10m`); on expiry the run compensates and ends `TimedOut`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<SpecDuration>,
    /// History events per run before the run ends `HistoryLimitExceeded` (default 10 000; a
    /// warning is logged at 80 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_limit: Option<u32>,
    /// Largest step output kept, bytes (default 1 MiB); a larger response fails the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_payload_bytes: Option<u64>,
    /// JSON Schema (draft 2020-12 and earlier, via the `jsonschema` crate) every run input
    /// must satisfy; a start with another input is refused (400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::any_json")]
    pub input_schema: Option<serde_json::Value>,
}

/// One step: exactly one of `call`, `sleep`, `waitForSignal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Step {
    /// Unique name (`[a-z0-9_-]`, starting with a letter; used in `steps.<name>`).
    pub name: String,
    /// Steps that must finish (completed or skipped) first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// CEL condition; false → the step is skipped (its dependents still run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// An HTTP call through the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<Call>,
    /// A durable timer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep: Option<Sleep>,
    /// Wait for a signal sent to the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_signal: Option<WaitForSignal>,
    /// Retry policy for `call` (default: 3 tries, 1 s doubling to 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Timeouts for `call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<StepTimeouts>,
    /// The call that undoes this step (saga); must tolerate "nothing to undo".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<Call>,
}

/// An HTTP request to a mesh service (sent through the coordinator's outbound sidecar).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Call {
    /// Destination service name.
    pub service: String,
    /// Its namespace (default: the workflow's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Method (default POST).
    #[serde(default = "default_method")]
    pub method: String,
    /// Path and query, may hold templates (RFC 3986 path-absolute).
    pub path: String,
    /// Extra headers (values may hold templates).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// JSON body (strings may hold templates); absent = no body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::any_json")]
    pub body: Option<serde_json::Value>,
}

fn default_method() -> String {
    "POST".into()
}

/// `sleep: { duration: 30s }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Sleep {
    /// How long.
    pub duration: SpecDuration,
}

/// `waitForSignal: { name, timeout, onTimeout }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WaitForSignal {
    /// Signal name.
    pub name: String,
    /// Give up after this long (absent: wait forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<SpecDuration>,
    /// What a timeout does: `fail` (default) or `continue` (output `null`).
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

/// What a `waitForSignal` timeout does.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// The step fails (the run compensates).
    #[default]
    Fail,
    /// The step completes with output `null`.
    Continue,
}

/// Per-step retry policy (Temporal's shape). `maxAttempts` counts TOTAL tries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Total tries, ≥ 1 (default 3).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Wait before the 2nd try (default 1 s).
    #[serde(default = "default_initial")]
    pub initial_interval: SpecDuration,
    /// Each wait is the previous × this (default 2.0, ≥ 1).
    #[serde(default = "default_coefficient")]
    pub backoff_coefficient: f64,
    /// Cap on a wait (default 60 s).
    #[serde(default = "default_max_interval")]
    pub max_interval: SpecDuration,
    /// Statuses that retry (default 408, 429 and every 5xx). Transport errors and attempt
    /// timeouts always retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable_status: Option<Vec<u16>>,
    /// Statuses that never retry (wins over `retryableStatus`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub non_retryable_status: Vec<u16>,
}

fn default_attempts() -> u32 {
    3
}
fn default_initial() -> SpecDuration {
    SpecDuration(std::time::Duration::from_secs(1))
}
fn default_coefficient() -> f64 {
    2.0
}
fn default_max_interval() -> SpecDuration {
    SpecDuration(std::time::Duration::from_secs(60))
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            initial_interval: default_initial(),
            backoff_coefficient: default_coefficient(),
            max_interval: default_max_interval(),
            retryable_status: None,
            non_retryable_status: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// Whether an HTTP `status` (not 2xx) may be retried.
    pub fn retryable(&self, status: u16) -> bool {
        if self.non_retryable_status.contains(&status) {
            return false;
        }
        match &self.retryable_status {
            Some(list) => list.contains(&status),
            None => status == 408 || status == 429 || (500..600).contains(&status),
        }
    }

    /// The wait after try number `attempt` (1-based) failed:
    /// min(initialInterval × coefficient^(attempt−1), maxInterval).
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let base = self.initial_interval.get().as_secs_f64();
        let exp = self
            .backoff_coefficient
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let wait = (base * exp).min(self.max_interval.get().as_secs_f64());
        std::time::Duration::from_secs_f64(wait.max(0.0))
    }
}

/// Per-step timeouts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StepTimeouts {
    /// One try, from dispatch to response (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_attempt: Option<SpecDuration>,
    /// All tries and waits together, from the step's start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<SpecDuration>,
}

/// Default per-attempt timeout.
pub const DEFAULT_PER_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(30);

impl Step {
    /// The step's kind, for messages and status.
    pub fn kind(&self) -> &'static str {
        if self.call.is_some() {
            "call"
        } else if self.sleep.is_some() {
            "sleep"
        } else {
            "waitForSignal"
        }
    }

    /// The retry policy in force (the default when none is given).
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry.clone().unwrap_or_default()
    }

    /// The per-attempt timeout in force.
    pub fn per_attempt(&self) -> std::time::Duration {
        self.timeouts
            .as_ref()
            .and_then(|t| t.per_attempt)
            .map_or(DEFAULT_PER_ATTEMPT, SpecDuration::get)
    }

    /// The total timeout, if any.
    pub fn total(&self) -> Option<std::time::Duration> {
        self.timeouts
            .as_ref()
            .and_then(|t| t.total)
            .map(SpecDuration::get)
    }
}

/// A template or `when` expression that failed to evaluate at run time.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{expression}: {message}")]
pub struct EvalError {
    /// The CEL source.
    pub expression: String,
    /// What went wrong.
    pub message: String,
}

/// Parses CEL within the bounds of [`expr`]: the raw text is checked first (the parser
/// recurses per nesting level, so deep input would overflow the stack), then the AST. The
/// parser (antlr4rust) can also panic on some malformed input instead of returning an error;
/// that panic is caught here and reported as a parse error, so bad input never takes the
/// process down.
fn compile(expression: &str) -> std::result::Result<IdedExpr, String> {
    expr::lexical(expression)?;
    let ast = std::panic::catch_unwind(|| {
        cel_parser::Parser::new()
            .parse(expression)
            .map_err(|e| e.to_string().replace("ERROR: <input>:", "at "))
    })
    .unwrap_or_else(|_| Err("malformed expression".to_string()))?;
    expr::shape(&ast)?;
    Ok(ast)
}

/// JSON → CEL: integers become `int` (CEL's default integer type, so `input.qty * 2` works),
/// other numbers `double`.
fn to_cel(value: &serde_json::Value) -> cel_interpreter::Value {
    use cel_interpreter::objects::{Key, Map};
    use cel_interpreter::Value;
    use std::sync::Arc;
    match value {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => n
                .as_u64()
                .map(Value::UInt)
                .unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(f64::NAN))),
        },
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => {
            Value::List(Arc::new(items.iter().map(to_cel).collect()))
        }
        serde_json::Value::Object(map) => Value::Map(Map {
            map: Arc::new(
                map.iter()
                    .map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v)))
                    .collect(),
            ),
        }),
    }
}

/// The `${…}` expressions in `text`, in order. An unterminated `${` is an error.
pub fn template_expressions(text: &str) -> std::result::Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated ${{ in {text:?}"))?;
        out.push(after[..end].trim());
        rest = &after[end + 1..];
    }
    Ok(out)
}

/// Every template expression inside a JSON value's strings (keys included).
fn value_expressions(
    value: &serde_json::Value,
    out: &mut Vec<String>,
) -> std::result::Result<(), String> {
    match value {
        serde_json::Value::String(s) => {
            out.extend(template_expressions(s)?.into_iter().map(str::to_string));
        }
        serde_json::Value::Array(items) => {
            for item in items {
                value_expressions(item, out)?;
            }
        }
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.extend(template_expressions(k)?.into_iter().map(str::to_string));
                value_expressions(v, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A reference `steps.<name>.<field?>` found in an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StepRef {
    step: String,
    field: Option<String>,
}

/// Walks a CEL AST collecting root identifiers and `steps.<name>.<field>` selections.
fn walk(
    expr: &IdedExpr,
    roots: &mut BTreeSet<String>,
    steps: &mut Vec<StepRef>,
    bound: &BTreeSet<String>,
) {
    match &expr.expr {
        Expr::Ident(name) => {
            if !name.starts_with('@') && !bound.contains(name) {
                roots.insert(name.clone());
            }
        }
        Expr::Select(select) => {
            // steps.<name> or steps.<name>.<field>
            if let Expr::Ident(root) = &select.operand.expr {
                if root == "steps" && !bound.contains(root) {
                    roots.insert(root.clone());
                    steps.push(StepRef {
                        step: select.field.clone(),
                        field: None,
                    });
                    return;
                }
            }
            if let Expr::Select(inner) = &select.operand.expr {
                if let Expr::Ident(root) = &inner.operand.expr {
                    if root == "steps" && !bound.contains(root) {
                        roots.insert(root.clone());
                        steps.push(StepRef {
                            step: inner.field.clone(),
                            field: Some(select.field.clone()),
                        });
                        return;
                    }
                }
            }
            walk(&select.operand, roots, steps, bound);
        }
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                walk(target, roots, steps, bound);
            }
            for arg in &call.args {
                walk(arg, roots, steps, bound);
            }
        }
        Expr::Comprehension(c) => {
            let mut inner = bound.clone();
            inner.insert(c.iter_var.clone());
            if let Some(v) = &c.iter_var2 {
                inner.insert(v.clone());
            }
            inner.insert(c.accu_var.clone());
            walk(&c.iter_range, roots, steps, bound);
            walk(&c.accu_init, roots, steps, bound);
            walk(&c.loop_cond, roots, steps, &inner);
            walk(&c.loop_step, roots, steps, &inner);
            walk(&c.result, roots, steps, &inner);
        }
        Expr::List(list) => {
            for e in &list.elements {
                walk(e, roots, steps, bound);
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                if let EntryExpr::MapEntry(e) = &entry.expr {
                    walk(&e.key, roots, steps, bound);
                    walk(&e.value, roots, steps, bound);
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    walk(&f.value, roots, steps, bound);
                }
            }
        }
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// Collects the `signals.<name>` an expression reads into `names`; true when it reads
/// `signals` some other way (any name could be meant). `bound`: comprehension variables in
/// scope (they shadow roots).
fn signal_reads(e: &IdedExpr, bound: &mut Vec<String>, names: &mut BTreeSet<String>) -> bool {
    let free = |name: &str, bound: &[String]| name == "signals" && !bound.iter().any(|b| b == name);
    match &e.expr {
        Expr::Select(s) => match &s.operand.expr {
            Expr::Ident(root) if free(root, bound) => {
                names.insert(s.field.clone());
                false
            }
            _ => signal_reads(&s.operand, bound, names),
        },
        Expr::Ident(name) => free(name, bound),
        Expr::Comprehension(c) => {
            if signal_reads(&c.iter_range, bound, names) || signal_reads(&c.accu_init, bound, names)
            {
                return true;
            }
            let before = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.iter().cloned());
            bound.push(c.accu_var.clone());
            let any = [&c.loop_cond, &c.loop_step, &c.result]
                .into_iter()
                .any(|x| signal_reads(x, bound, names));
            bound.truncate(before);
            any
        }
        _ => expr::children(e)
            .into_iter()
            .any(|(child, _)| signal_reads(child, bound, names)),
    }
}

/// What expressions in one place may read.
struct Scope<'a> {
    /// Every step of the workflow by name (to tell "unknown" from "not upstream").
    index: &'a HashMap<&'a str, usize>,
    /// The steps whose results are visible (the upstream steps), one bit per step index;
    /// `None`: every step.
    upstream: Option<&'a [u64]>,
    /// A step visible besides its upstream (a compensation reads its own step).
    own: Option<usize>,
}

impl Scope<'_> {
    fn is_step(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn sees(&self, name: &str) -> bool {
        let Some(&i) = self.index.get(name) else {
            return false;
        };
        self.own == Some(i)
            || self
                .upstream
                .is_none_or(|up| (up[i / 64] >> (i % 64)) & 1 == 1)
    }
}

fn check_expression(source: &str, scope: &Scope<'_>) -> std::result::Result<(), String> {
    let ast = compile(source).map_err(|e| format!("CEL error in {:?}: {e}", shorten(source)))?;
    let mut roots = BTreeSet::new();
    let mut steps = Vec::new();
    walk(&ast, &mut roots, &mut steps, &BTreeSet::new());
    if let Some(unknown) = roots.iter().find(|r| !ROOTS.contains(&r.as_str())) {
        return Err(format!(
            "{source:?} reads {unknown:?}; templates may read {}",
            ROOTS.join(", ")
        ));
    }
    for r in steps {
        if !scope.is_step(&r.step) {
            return Err(format!(
                "{source:?} reads steps.{}, which is not a step",
                r.step
            ));
        }
        if !scope.sees(&r.step) {
            return Err(format!(
                "{source:?} reads steps.{}, which is not upstream of here (add it to dependsOn)",
                r.step
            ));
        }
        if let Some(field) = &r.field {
            if !STEP_FIELDS.contains(&field.as_str()) {
                return Err(format!(
                    "{source:?} reads steps.{}.{field}; a step result has {}",
                    r.step,
                    STEP_FIELDS.join(", ")
                ));
            }
        }
    }
    Ok(())
}

impl Workflow {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace(), self.metadata.name)
    }

    /// Namespace (default `default`).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// The step named `name`.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.spec.steps.iter().find(|s| s.name == name)
    }

    /// Whether a signal named `name` can ever be used by a run of this workflow: a
    /// `waitForSignal` step waits on it, or an expression reads `signals.<name>` (or reads
    /// `signals` in a way that could mean any name, such as `signals[input.kind]`). A signal
    /// no run can use is refused (404) instead of being stored and ignored.
    pub fn accepts_signal(&self, name: &str) -> bool {
        let waited = self
            .spec
            .steps
            .iter()
            .any(|s| s.wait_for_signal.as_ref().is_some_and(|w| w.name == name));
        waited
            || self.expressions().iter().any(|source| {
                source.contains("signals")
                    && compile(source).is_ok_and(|ast| {
                        let mut names = BTreeSet::new();
                        signal_reads(&ast, &mut Vec::new(), &mut names) || names.contains(name)
                    })
            })
    }

    /// Every expression of the definition (`when` conditions and `${…}` templates).
    fn expressions(&self) -> Vec<String> {
        let mut out = Vec::new();
        let strings = |text: &str, out: &mut Vec<String>| {
            if let Ok(list) = template_expressions(text) {
                out.extend(list.into_iter().map(str::to_string));
            }
        };
        for step in &self.spec.steps {
            out.extend(step.when.iter().cloned());
            for call in [&step.call, &step.compensate].into_iter().flatten() {
                strings(&call.path, &mut out);
                for v in call.headers.values() {
                    strings(v, &mut out);
                }
                if let Some(body) = &call.body {
                    let _ = value_expressions(body, &mut out);
                }
            }
        }
        if let Some(output) = &self.spec.output {
            let _ = value_expressions(output, &mut out);
        }
        out
    }

    /// History limit in force.
    pub fn history_limit(&self) -> u32 {
        self.spec.history_limit.unwrap_or(DEFAULT_HISTORY_LIMIT)
    }

    /// Largest step output kept, bytes.
    pub fn max_payload_bytes(&self) -> u64 {
        self.spec.max_payload_bytes.unwrap_or(1 << 20)
    }

    /// Checks a run input against `spec.inputSchema` (none: any input).
    ///
    /// # Errors
    /// Up to three schema violations, each with the input path.
    pub fn check_input(&self, input: &serde_json::Value) -> std::result::Result<(), String> {
        let Some(schema) = &self.spec.input_schema else {
            return Ok(());
        };
        let validator = jsonschema::validator_for(schema).map_err(|e| e.to_string())?;
        let errors: Vec<String> = validator
            .iter_errors(input)
            .take(3)
            .map(|e| {
                let path = e.instance_path.to_string();
                format!(
                    "input{}: {e}",
                    if path.is_empty() { String::new() } else { path }
                )
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Every step upstream of `name` (transitively through `dependsOn`).
    pub fn upstream(&self, name: &str) -> BTreeSet<String> {
        let steps: HashMap<&str, &Step> = self
            .spec
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&str> = vec![name];
        while let Some(current) = stack.pop() {
            if let Some(step) = steps.get(current) {
                for dep in &step.depends_on {
                    if seen.insert(dep.clone()) {
                        stack.push(dep);
                    }
                }
            }
        }
        seen
    }

    /// Parses and validates a definition (`file` for messages).
    ///
    /// # Errors
    /// [`LoadError`] naming file, line and field: see the module docs for what is refused.
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let workflow: Workflow = parse_yaml(file, text)?;
        workflow.validate(file, text)?;
        Ok(workflow)
    }

    fn validate(&self, file: &Path, text: &str) -> Result<()> {
        let invalid = |field: String, line: usize, message: String| LoadError::Invalid {
            file: file.to_path_buf(),
            line,
            field,
            message,
        };
        if self.api_version != API_VERSION {
            return Err(invalid(
                "apiVersion".into(),
                find_line(text, "apiVersion", ""),
                format!("must be {API_VERSION}"),
            ));
        }
        if self.kind != "Workflow" {
            return Err(invalid(
                "kind".into(),
                find_line(text, "kind", ""),
                "must be Workflow".into(),
            ));
        }
        if self.metadata.name.is_empty() {
            return Err(invalid(
                "metadata.name".into(),
                find_line(text, "metadata", ""),
                "a name is required".into(),
            ));
        }
        if self.spec.steps.is_empty() {
            return Err(invalid(
                "spec.steps".into(),
                find_line(text, "steps", ""),
                "at least one step is required".into(),
            ));
        }
        if self.spec.steps.len() > MAX_STEPS {
            return Err(invalid(
                "spec.steps".into(),
                find_line(text, "steps", ""),
                format!(
                    "{} steps; a workflow may have at most {MAX_STEPS}",
                    self.spec.steps.len()
                ),
            ));
        }
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(self.spec.steps.len());
        for (i, step) in self.spec.steps.iter().enumerate() {
            index.entry(step.name.as_str()).or_insert(i);
        }
        let mut seen = HashSet::new();
        for (i, step) in self.spec.steps.iter().enumerate() {
            let at = |f: &str| format!("spec.steps[{i}].{f}");
            // Only on error: a search per step would make validation quadratic.
            let line = || find_line(text, "name", &step.name);
            let valid_name =
                step.name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase())
                    && step.name.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
                    });
            if !valid_name {
                return Err(invalid(
                    at("name"),
                    line(),
                    format!("{:?}: step names are [a-z][a-z0-9_-]*", step.name),
                ));
            }
            if !seen.insert(step.name.as_str()) {
                return Err(invalid(
                    at("name"),
                    line(),
                    format!("duplicate step name {:?}", step.name),
                ));
            }
            let kinds = [
                step.call.is_some(),
                step.sleep.is_some(),
                step.wait_for_signal.is_some(),
            ]
            .into_iter()
            .filter(|k| *k)
            .count();
            if kinds != 1 {
                return Err(invalid(
                    format!("spec.steps[{i}]"),
                    line(),
                    format!(
                        "step {:?} needs exactly one of call, sleep, waitForSignal",
                        step.name
                    ),
                ));
            }
            for dep in &step.depends_on {
                if dep == &step.name {
                    return Err(invalid(
                        at("dependsOn"),
                        line(),
                        format!("step {:?} depends on itself", step.name),
                    ));
                }
                if !index.contains_key(dep.as_str()) {
                    return Err(invalid(
                        at("dependsOn"),
                        line(),
                        format!(
                            "step {:?} depends on {dep:?}, which is not a step",
                            step.name
                        ),
                    ));
                }
            }
            if let Some(retry) = &step.retry {
                if retry.max_attempts == 0 {
                    return Err(invalid(
                        at("retry.maxAttempts"),
                        find_line(text, "maxAttempts", ""),
                        "maxAttempts counts total tries and must be ≥ 1".into(),
                    ));
                }
                if !(retry.backoff_coefficient >= 1.0 && retry.backoff_coefficient.is_finite()) {
                    return Err(invalid(
                        at("retry.backoffCoefficient"),
                        find_line(text, "backoffCoefficient", ""),
                        "must be a number ≥ 1".into(),
                    ));
                }
            }
            for (field, call) in [("call", &step.call), ("compensate", &step.compensate)] {
                if let Some(call) = call {
                    if !call.path.starts_with('/') {
                        return Err(invalid(
                            at(&format!("{field}.path")),
                            find_line(text, "path", ""),
                            format!(
                                "{:?} must start with '/' (RFC 3986 path-absolute)",
                                call.path
                            ),
                        ));
                    }
                }
            }
            if step.compensate.is_some() && step.call.is_none() {
                return Err(invalid(
                    at("compensate"),
                    line(),
                    "only call steps can be compensated".into(),
                ));
            }
        }
        if let Some(schema) = &self.spec.input_schema {
            if let Err(e) = jsonschema::validator_for(schema) {
                return Err(invalid(
                    "spec.inputSchema".into(),
                    find_line(text, "inputSchema", ""),
                    format!("not a valid JSON Schema: {e}"),
                ));
            }
        }
        let deps: Vec<Vec<usize>> = self
            .spec
            .steps
            .iter()
            .map(|s| s.depends_on.iter().map(|d| index[d.as_str()]).collect())
            .collect();
        let order = match topological_order(&deps) {
            Ok(order) => order,
            Err(cycle) => {
                let names: Vec<&str> = cycle
                    .iter()
                    .map(|&i| self.spec.steps[i].name.as_str())
                    .collect();
                return Err(invalid(
                    format!("spec.steps[{}].dependsOn", cycle[0]),
                    find_line(text, "name", names[0]),
                    format!("dependsOn cycle: {}", names.join(" → ")),
                ));
            }
        };
        // Upstream sets, one bit per step, in dependency order: O(edges × steps / 64).
        let words = self.spec.steps.len().div_ceil(64);
        let mut upstream = vec![0u64; words * self.spec.steps.len()];
        for &i in &order {
            for &d in &deps[i] {
                let (done, rest) = upstream.split_at_mut(i.max(d) * words);
                let (from, to) = if d < i {
                    (&done[d * words..(d + 1) * words], &mut rest[..words])
                } else {
                    (&rest[..words], &mut done[i * words..(i + 1) * words])
                };
                for (t, f) in to.iter_mut().zip(from) {
                    *t |= f;
                }
                to[d / 64] |= 1 << (d % 64);
            }
        }
        let mut expressions = 0usize;
        // Templates and conditions: compile, and read only upstream steps.
        for (i, step) in self.spec.steps.iter().enumerate() {
            let line = || find_line(text, "name", &step.name);
            let up = &upstream[i * words..(i + 1) * words];
            let scope = Scope {
                index: &index,
                upstream: Some(up),
                own: None,
            };
            let compensate_scope = Scope {
                index: &index,
                upstream: Some(up),
                own: Some(i),
            };
            let mut checks: Vec<(String, String, &Scope<'_>)> = Vec::new();
            if let Some(when) = &step.when {
                checks.push((format!("spec.steps[{i}].when"), when.clone(), &scope));
            }
            for (field, call, scope) in [
                ("call", &step.call, &scope),
                ("compensate", &step.compensate, &compensate_scope),
            ] {
                let Some(call) = call else { continue };
                let mut exprs = Vec::new();
                let prefix = format!("spec.steps[{i}].{field}");
                let mut add = |f: &str, r: std::result::Result<Vec<&str>, String>| -> Result<()> {
                    let list = r.map_err(|e| invalid(format!("{prefix}.{f}"), line(), e))?;
                    exprs.extend(
                        list.into_iter()
                            .map(|e| (format!("{prefix}.{f}"), e.to_string())),
                    );
                    Ok(())
                };
                add("path", template_expressions(&call.path))?;
                for v in call.headers.values() {
                    add("headers", template_expressions(v))?;
                }
                if let Some(body) = &call.body {
                    let mut out = Vec::new();
                    value_expressions(body, &mut out)
                        .map_err(|e| invalid(format!("{prefix}.body"), line(), e))?;
                    exprs.extend(out.into_iter().map(|e| (format!("{prefix}.body"), e)));
                }
                for (f, e) in exprs {
                    checks.push((f, e, scope));
                }
            }
            expressions += checks.len();
            if expressions > MAX_EXPRESSIONS {
                return Err(invalid(
                    format!("spec.steps[{i}]"),
                    line(),
                    format!(
                        "more than {MAX_EXPRESSIONS} expressions (when and ${{…}}) in one workflow"
                    ),
                ));
            }
            for (field, source, scope) in checks {
                check_expression(&source, scope).map_err(|e| invalid(field, line(), e))?;
            }
        }
        if let Some(output) = &self.spec.output {
            let mut out = Vec::new();
            let line = find_line(text, "output", "");
            value_expressions(output, &mut out)
                .map_err(|e| invalid("spec.output".into(), line, e))?;
            if expressions + out.len() > MAX_EXPRESSIONS {
                return Err(invalid(
                    "spec.output".into(),
                    line,
                    format!(
                        "more than {MAX_EXPRESSIONS} expressions (when and ${{…}}) in one workflow"
                    ),
                ));
            }
            let scope = Scope {
                index: &index,
                upstream: None,
                own: None,
            };
            for source in out {
                check_expression(&source, &scope)
                    .map_err(|e| invalid("spec.output".into(), line, e))?;
            }
        }
        Ok(())
    }
}

/// Kahn's algorithm over `deps` (step index → the indices it depends on): the steps in an
/// order where every step comes after its dependencies, or a cycle as step indices with the
/// first repeated at the end (`a → b → a`), found from the first step (in definition order)
/// left over. Linear in steps plus edges; no recursion.
fn topological_order(deps: &[Vec<usize>]) -> std::result::Result<Vec<usize>, Vec<usize>> {
    let n = deps.len();
    let mut waiting: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    let mut order: Vec<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        let i = order[next];
        next += 1;
        for &j in &dependents[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                order.push(j);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Every step left over waits on another one left over: follow those until one repeats.
    let Some(mut current) = (0..n).find(|&i| waiting[i] > 0) else {
        return Ok(order);
    };
    let mut position: HashMap<usize, usize> = HashMap::new();
    let mut path = Vec::new();
    loop {
        if let Some(&p) = position.get(&current) {
            let mut cycle = path[p..].to_vec();
            cycle.push(current);
            return Err(cycle);
        }
        position.insert(current, path.len());
        path.push(current);
        current = match deps[current].iter().find(|&&d| waiting[d] > 0) {
            Some(&d) => d,
            None => return Err(path),
        };
    }
}

/// Evaluates one CEL expression against `context` (a JSON object whose keys are the roots).
///
/// # Errors
/// [`EvalError`] for a compile or evaluation error, or a result JSON cannot hold.
pub fn evaluate(
    source: &str,
    context: &serde_json::Value,
) -> std::result::Result<serde_json::Value, EvalError> {
    let err = |message: String| EvalError {
        expression: shorten(source),
        message,
    };
    let ast = compile(source).map_err(err)?;
    let cost = expr::estimate(&ast, context);
    if cost > MAX_EVAL_COST {
        return Err(err(format!(
            "too costly for this input: about {cost} operations, at most {MAX_EVAL_COST} \
             (comprehensions over large lists multiply)"
        )));
    }
    let mut ctx = cel_interpreter::Context::default();
    if let Some(map) = context.as_object() {
        for (k, v) in map {
            ctx.add_variable_from_value(k.clone(), to_cel(v));
        }
    }
    // cel-interpreter panics (`todo!`) on some inputs, e.g. a comprehension over a number.
    let value = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cel_interpreter::Value::resolve(&ast, &ctx)
    }))
    .map_err(|_| err("cannot be evaluated over this input".into()))?
    .map_err(|e| err(e.to_string()))?;
    // Checked before the value is copied into JSON: building a list of references to one
    // large string is cheap, copying it is not.
    let mut budget = expr::MAX_RESULT_BYTES;
    if !expr::cel_size_within(&value, &mut budget) {
        return Err(err(format!(
            "result too large: over {} bytes",
            expr::MAX_RESULT_BYTES
        )));
    }
    value.json().map_err(|e| err(format!("{e:?}")))
}

/// `source` for messages: at most 80 characters.
fn shorten(source: &str) -> String {
    match source.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &source[..i]),
        None => source.to_string(),
    }
}

/// Evaluates a `when` condition: it must yield a boolean.
///
/// # Errors
/// [`EvalError`] as [`evaluate`], or when the result is not a boolean.
pub fn evaluate_condition(
    source: &str,
    context: &serde_json::Value,
) -> std::result::Result<bool, EvalError> {
    match evaluate(source, context)? {
        serde_json::Value::Bool(b) => Ok(b),
        other => Err(EvalError {
            expression: source.to_string(),
            message: format!("a condition must be true or false, got {other}"),
        }),
    }
}

/// Renders the templates in a string: a string that is exactly one `${expr}` takes the
/// expression's JSON value; otherwise each `${expr}` is replaced by its value as text.
///
/// # Errors
/// [`EvalError`] from the first expression that fails.
pub fn render_str(
    text: &str,
    context: &serde_json::Value,
) -> std::result::Result<serde_json::Value, EvalError> {
    let exprs = template_expressions(text).map_err(|message| EvalError {
        expression: text.to_string(),
        message,
    })?;
    let trimmed = text.trim();
    if exprs.len() == 1
        && trimmed.starts_with("${")
        && trimmed.ends_with('}')
        && trimmed.matches("${").count() == 1
    {
        return evaluate(exprs[0], context);
    }
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').unwrap_or(after.len());
        let value = evaluate(after[..end].trim(), context)?;
        match value {
            serde_json::Value::String(s) => out.push_str(&s),
            other => out.push_str(&other.to_string()),
        }
        if out.len() > expr::MAX_RENDERED_BYTES {
            return Err(EvalError {
                expression: shorten(text),
                message: format!(
                    "rendered text too large: over {} bytes",
                    expr::MAX_RENDERED_BYTES
                ),
            });
        }
        rest = after.get(end + 1..).unwrap_or("");
    }
    out.push_str(rest);
    Ok(serde_json::Value::String(out))
}

/// Renders every template in a JSON value (strings and object keys).
///
/// # Errors
/// [`EvalError`] from the first expression that fails.
pub fn render_value(
    value: &serde_json::Value,
    context: &serde_json::Value,
) -> std::result::Result<serde_json::Value, EvalError> {
    let mut budget = expr::MAX_RENDERED_BYTES;
    render_within(value, context, &mut budget)
}

/// [`render_value`] with a size budget across the whole value (see
/// [`expr::MAX_RENDERED_BYTES`]): many templates each under the per-result bound cannot add up
/// to an unbounded body.
fn render_within(
    value: &serde_json::Value,
    context: &serde_json::Value,
    budget: &mut usize,
) -> std::result::Result<serde_json::Value, EvalError> {
    let rendered_str = |s: &str, budget: &mut usize| {
        let v = render_str(s, context)?;
        if expr::json_size_within(&v, budget) {
            Ok(v)
        } else {
            Err(EvalError {
                expression: shorten(s),
                message: format!(
                    "rendered value too large: over {} bytes in all",
                    expr::MAX_RENDERED_BYTES
                ),
            })
        }
    };
    Ok(match value {
        serde_json::Value::String(s) => rendered_str(s, budget)?,
        serde_json::Value::Array(items) => serde_json::Value::Array(
            items
                .iter()
                .map(|v| render_within(v, context, budget))
                .collect::<std::result::Result<_, _>>()?,
        ),
        serde_json::Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = match rendered_str(k, budget)? {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                out.insert(key, render_within(v, context, budget)?);
            }
            serde_json::Value::Object(out)
        }
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(steps: &str) -> Result<Workflow> {
        Workflow::parse(
            Path::new("wf.yaml"),
            &format!("apiVersion: meshflow.io/v1alpha1\nkind: Workflow\nmetadata: {{ name: order }}\nspec:\n  steps:\n{steps}"),
        )
    }

    fn err(steps: &str) -> String {
        parse(steps).unwrap_err().to_string()
    }

    #[test]
    fn graph_errors_name_what_is_wrong() {
        let call = "call: { service: s, path: /x }";
        assert!(err(&format!("  - {{ name: a, dependsOn: [a], {call} }}\n"))
            .contains("step \"a\" depends on itself"));
        let two = err(&format!("  - {{ name: a, dependsOn: [b], {call} }}\n  - {{ name: b, dependsOn: [a], {call} }}\n"));
        assert!(two.contains("dependsOn cycle: a → b → a"), "{two}");
        let three = err(&format!("  - {{ name: a, dependsOn: [c], {call} }}\n  - {{ name: b, dependsOn: [a], {call} }}\n  - {{ name: c, dependsOn: [b], {call} }}\n"));
        assert!(three.contains("dependsOn cycle: a → c → b → a"), "{three}");
        assert!(
            err(&format!("  - {{ name: a, dependsOn: [zz], {call} }}\n"))
                .contains("depends on \"zz\", which is not a step")
        );
        assert!(err(&format!(
            "  - {{ name: a, {call} }}\n  - {{ name: a, {call} }}\n"
        ))
        .contains("duplicate step name"));
        assert!(err("  - { name: a }\n").contains("exactly one of call, sleep, waitForSignal"));
        // A diamond is fine.
        parse(&format!("  - {{ name: a, {call} }}\n  - {{ name: b, dependsOn: [a], {call} }}\n  - {{ name: c, dependsOn: [a], {call} }}\n  - {{ name: d, dependsOn: [b, c], {call} }}\n")).unwrap();
    }

    #[test]
    fn templates_may_read_only_upstream_steps_and_real_fields() {
        let e = err("  - { name: a, call: { service: s, path: /x } }\n  - { name: b, call: { service: s, path: \"/y/${steps.a.output.id}\" } }\n");
        assert!(e.contains("not upstream of here"), "{e}");
        assert!(e.contains("spec.steps[1].call.path"), "{e}");
        let e = err("  - { name: a, call: { service: s, path: /x } }\n  - { name: b, dependsOn: [a], call: { service: s, path: \"/y/${steps.a.outptu.id}\" } }\n");
        assert!(
            e.contains("steps.a.outptu; a step result has output, status, attempts"),
            "{e}"
        );
        let e = err("  - { name: a, call: { service: s, path: /x, body: { n: \"${steps.nope.output}\" } } }\n");
        assert!(e.contains("steps.nope, which is not a step"), "{e}");
        let e = err("  - { name: a, when: \"input.x >\", call: { service: s, path: /x } }\n");
        assert!(e.contains("CEL error"), "{e}");
        let e = err("  - { name: a, call: { service: s, path: \"/${secrets.k}\" } }\n");
        assert!(
            e.contains("templates may read input, steps, signals, run"),
            "{e}"
        );
        // Compensation may read its own step; comprehension variables are not roots.
        parse("  - name: a\n    call: { service: s, path: /x }\n    compensate: { service: s, method: DELETE, path: \"/x/${steps.a.output.id}\" }\n  - { name: b, dependsOn: [a], when: \"input.items.all(i, i.qty > 0)\", call: { service: s, path: /y } }\n").unwrap();
    }

    #[test]
    fn rendering_keeps_types_for_whole_templates() {
        let ctx = serde_json::json!({"input": {"qty": 3, "sku": "A-1"}, "steps": {"a": {"output": {"id": 7}}}});
        assert_eq!(
            render_str("${input.qty}", &ctx).unwrap(),
            serde_json::json!(3)
        );
        assert_eq!(
            render_str("/r/${steps.a.output.id}/${input.sku}", &ctx).unwrap(),
            serde_json::json!("/r/7/A-1")
        );
        assert_eq!(
            render_value(
                &serde_json::json!({"n": "${input.qty * 2}", "s": "x"}),
                &ctx
            )
            .unwrap(),
            serde_json::json!({"n": 6, "s": "x"})
        );
        assert!(evaluate_condition("input.qty > 2", &ctx).unwrap());
        assert!(evaluate_condition("input.qty", &ctx).is_err());
        // An optional input field with a default (the demo's `flakyShipping`).
        let optional = "${has(input.flaky) && input.flaky}";
        assert_eq!(
            render_str(optional, &ctx).unwrap(),
            serde_json::json!(false)
        );
        let with = serde_json::json!({"input": {"flaky": true}});
        assert_eq!(
            render_str(optional, &with).unwrap(),
            serde_json::json!(true)
        );
    }

    #[test]
    fn input_schema_is_checked_at_registration_and_start() {
        let e = Workflow::parse(
            Path::new("wf.yaml"),
            "apiVersion: meshflow.io/v1alpha1\nkind: Workflow\nmetadata: { name: o }\nspec:\n  inputSchema: { type: 7 }\n  steps:\n  - { name: a, sleep: { duration: 1s } }\n",
        )
        .unwrap_err();
        assert_eq!(e.field(), "spec.inputSchema");
        let wf = Workflow::parse(
            Path::new("wf.yaml"),
            "apiVersion: meshflow.io/v1alpha1\nkind: Workflow\nmetadata: { name: o }\nspec:\n  inputSchema: { type: object, required: [sku], properties: { qty: { type: integer, minimum: 1 } } }\n  steps:\n  - { name: a, sleep: { duration: 1s } }\n",
        )
        .unwrap();
        assert!(wf
            .check_input(&serde_json::json!({"sku": "A", "qty": 2}))
            .is_ok());
        let e = wf.check_input(&serde_json::json!({"qty": 0})).unwrap_err();
        assert!(e.contains("sku") && e.contains("input/qty"), "{e}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_interval: SpecDuration(std::time::Duration::from_millis(100)),
            max_interval: SpecDuration(std::time::Duration::from_millis(350)),
            ..Default::default()
        };
        let waits: Vec<u128> = (1..=4).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 350, 350]);
        assert!(p.retryable(503) && p.retryable(429) && !p.retryable(400));
    }
}
