//! The coordinator's HTTP/JSON API (served on `--workflow-api`, 127.0.0.1 by default).
//!
//! | Method and path | What |
//! |---|---|
//! | `POST /v1/workflows?file=` | register a definition (YAML or JSON body; errors name `file`, field and line, and the bound an expression or the step count exceeds) → `{workflow, version}` |
//! | `GET /v1/workflows` | latest version of each definition |
//! | `GET /v1/workflows/{ns}/{name}` | latest definition |
//! | `POST /v1/runs` | `{workflow, runId?, input?, signal?: {name, payload}}` → 201 created, 200 existing |
//! | `POST /v1/runs?wait=30s` | the same, then answers when the run is terminal: `{runId, created, status, output, error, run}` with 201/200; 202 with the same shape when the wait elapses first. With an existing `runId` it attaches to that run (nothing new starts), so a caller whose connection broke retries with the same id. Waits are cut to 60 s; more than `--workflow-max-waiters` (default 1,024) waiting callers → 429 with `Retry-After`, refused before anything starts (`meshflow_workflow_wait_rejected_total`); an error after the run started still carries its `runId` |
//! | `GET /v1/runs/{id}?wait=30s` | the run view when terminal (200), or as it is when the wait elapses (202) |
//! | `GET /v1/runs?workflow=&status=&limit=` | runs, newest first |
//! | `GET /v1/runs/{id}` | status, steps with attempts, outputs, errors, what it waits on |
//! | `GET /v1/runs/{id}/history` | the events |
//! | `POST /v1/runs/{id}/signals/{name}` | signal (JSON payload) → 202; 404 for an unknown run or a signal name the definition never uses; 409 (with the reason) unless the run is `Running` |
//! | `POST /v1/runs/{id}/cancel` · `/terminate` · `/retry` | 202; 409 (with the reason) when it cannot apply: cancel needs `Running`, terminate an unfinished run, retry `Failed` or `CompensationFailed` |
//!
//! Protected (401 otherwise): a request needs either
//! - `Authorization: Bearer <token>` (the API token file, `<state>/workflow-api-token`), or
//! - to arrive through the coordinator's own sidecar: the sidecar vouches with
//!   `x-meshflow-sidecar-auth: <secret>` ([`meshflow_api::SIDECAR_AUTH_HEADER`]; the secret is in
//!   `<state>/workflow-sidecar-secret` and the coordinator's bootstrap file, both 0600, and
//!   every sidecar strips the header from what it receives), and exactly one
//!   `x-forwarded-client-cert` naming the mTLS-verified caller (`URI=spiffe://…`). Which
//!   callers may come this way is decided by AuthorizationPolicy on the coordinator workload,
//!   enforced by that sidecar before forwarding; a plaintext (PERMISSIVE) caller has no
//!   verified identity and is refused here.
//!
//! An XFCC header alone proves nothing: any local process can send one to the loopback port.
//! Errors are JSON `{error}` with 400, 401, 404, 409, 429 or 500.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::coordinator::{Coordinator, CoordinatorError, WaitOutcome};
use crate::engine::Input;

/// API state.
#[derive(Clone)]
pub struct ApiState {
    /// The coordinator.
    pub coordinator: Arc<Coordinator>,
    /// The API token (constant-time compared).
    pub token: Arc<String>,
    /// The secret the coordinator's sidecar sends in [`meshflow_api::SIDECAR_AUTH_HEADER`]
    /// (constant-time compared); `None`: no caller is accepted through a sidecar.
    pub sidecar_secret: Option<Arc<String>>,
    /// Whether mesh callers are governed: true when an AuthorizationPolicy with action ALLOW
    /// selects the coordinator workload, so its sidecar admitted only the principals it names.
    /// Without one, a mesh caller vouched for by the sidecar is refused (403): the API is
    /// deny-by-default for workloads, never open to every SVID holder.
    pub mesh_callers_governed: Arc<dyn Fn() -> bool + Send + Sync>,
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({"error": message.to_string()}))).into_response()
}

impl CoordinatorError {
    /// The HTTP status of this error.
    fn status(&self) -> StatusCode {
        match self {
            CoordinatorError::NotFound(_) => StatusCode::NOT_FOUND,
            CoordinatorError::Invalid(_) => StatusCode::BAD_REQUEST,
            CoordinatorError::Conflict(_) => StatusCode::CONFLICT,
            CoordinatorError::Store(
                crate::store::StoreError::Conflict(_) | crate::store::StoreError::Fenced(_),
            ) => StatusCode::CONFLICT,
            CoordinatorError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            CoordinatorError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl IntoResponse for CoordinatorError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = error(status, self);
        if status == StatusCode::TOO_MANY_REQUESTS {
            // RFC 9110 §10.2.3: a waiter's place frees within a minute at most.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// Who is calling the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The holder of the API token (an operator, the CLI).
    Token,
    /// A mesh workload, mTLS-verified and authorized by the coordinator's sidecar.
    Peer(meshflow_policies::SpiffeId),
}

fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && !expected.is_empty()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The single value of header `name`, or `None` when it is absent, repeated or not text.
fn single<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()
}

/// The peer in the sidecar's XFCC (`By=<own>;URI=<peer>`, one element).
fn xfcc_peer(value: &str) -> Option<meshflow_policies::SpiffeId> {
    if value.contains(',') {
        return None;
    }
    let mut uris = value
        .split(';')
        .filter_map(|kv| kv.trim().strip_prefix("URI="));
    let uri = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    uri.parse().ok()
}

/// Authenticates a request: the bearer `token`, or the coordinator's sidecar vouching with
/// `sidecar_secret` for an mTLS-verified caller (XFCC). See the module docs.
pub fn authenticate(
    token: &str,
    sidecar_secret: Option<&str>,
    headers: &HeaderMap,
) -> Option<Caller> {
    // Exactly one Authorization field (RFC 9110 §11.6.2 allows one credential): with two, which
    // one counts would depend on who reads the request.
    if let Some(given) = single(headers, axum::http::header::AUTHORIZATION.as_str())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        if same_secret(given.as_bytes(), token.as_bytes()) {
            return Some(Caller::Token);
        }
    }
    let expected = sidecar_secret?;
    let given = single(headers, meshflow_api::SIDECAR_AUTH_HEADER)?;
    if !same_secret(given.as_bytes(), expected.as_bytes()) {
        return None;
    }
    xfcc_peer(single(headers, "x-forwarded-client-cert")?).map(Caller::Peer)
}

/// The router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/workflows", post(register).get(list_workflows))
        .route("/v1/workflows/:ns/:name", get(get_workflow))
        .route("/v1/runs", post(start).get(list_runs))
        .route("/v1/runs/:id", get(get_run))
        .route("/v1/runs/:id/history", get(history))
        .route("/v1/runs/:id/signals/:name", post(signal))
        .route("/v1/runs/:id/:command", post(command))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

async fn guard(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let secret = state.sidecar_secret.as_deref().map(String::as_str);
    let Some(caller) = authenticate(&state.token, secret, request.headers()) else {
        return error(StatusCode::UNAUTHORIZED, "an API token (Authorization: Bearer …) or an mTLS call through the coordinator's sidecar is required");
    };
    if let Caller::Peer(peer) = &caller {
        if !(state.mesh_callers_governed)() {
            tracing::warn!(caller = %peer, "workflow API: mesh caller refused: no ALLOW AuthorizationPolicy selects the coordinator workload");
            return error(
                StatusCode::FORBIDDEN,
                format!("{peer}: mesh callers are denied by default; an AuthorizationPolicy with action ALLOW on the coordinator workload (namespace meshflow-system) must name the principals that may use the workflow API"),
            );
        }
        tracing::debug!(caller = %peer, method = %request.method(), path = %request.uri().path(), "workflow API call through the coordinator's sidecar");
    }
    next.run(request).await
}

#[derive(Deserialize)]
struct RegisterQuery {
    /// The file the definition came from, named in errors (`?file=orders.yaml`).
    file: Option<String>,
}

async fn register(
    State(s): State<ApiState>,
    Query(q): Query<RegisterQuery>,
    body: Bytes,
) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not UTF-8");
    };
    let file = q.file.unwrap_or_else(|| "workflow.yaml".into());
    match s.coordinator.register(&file, text).await {
        Ok((workflow, version)) => (
            StatusCode::OK,
            Json(json!({"workflow": workflow, "version": version})),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list_workflows(State(s): State<ApiState>) -> Response {
    match s.coordinator.store().definitions().await {
        Ok(rows) => Json(
            rows.into_iter()
                .map(|r| json!({"workflow": r.workflow, "version": r.version, "createdMs": r.created_ms}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => CoordinatorError::from(e).into_response(),
    }
}

async fn get_workflow(
    State(s): State<ApiState>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    match s
        .coordinator
        .store()
        .definition(&format!("{ns}/{name}"), None)
        .await
    {
        Ok(Some(r)) => Json(json!({
            "workflow": r.workflow, "version": r.version, "createdMs": r.created_ms,
            "definition": serde_json::from_str::<Value>(&r.spec).unwrap_or(Value::Null),
        }))
        .into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("workflow {ns}/{name} not found"),
        ),
        Err(e) => CoordinatorError::from(e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StartRequest {
    workflow: String,
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    signal: Option<SignalBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    name: String,
    #[serde(default)]
    payload: Value,
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, format!("body: {e}"))))
}

/// `?wait=<duration>` (humantime: `30s`, `500ms`, `2m`) on starting or reading a run.
#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<String>,
}

impl WaitQuery {
    /// The wait asked for (`None`: answer at once).
    fn duration(&self) -> Result<Option<std::time::Duration>, Box<Response>> {
        match self.wait.as_deref() {
            None | Some("") => Ok(None),
            Some(text) => humantime::parse_duration(text).map(Some).map_err(|e| {
                Box::new(error(
                    StatusCode::BAD_REQUEST,
                    format!("wait={text:?}: not a duration (e.g. 30s, 500ms): {e}"),
                ))
            }),
        }
    }
}

/// The run as a waiting caller gets it: its status, output and error at the top, then the
/// whole view.
fn waited(view: &crate::coordinator::RunView) -> Value {
    json!({
        "runId": view.run_id,
        "status": view.status,
        "output": view.state.output,
        "error": view.state.error,
        "run": view,
    })
}

/// The `?wait=` query, or the JSON 400 for a query string that does not parse (axum's own
/// rejection is plain text; every error of this API is `{error}`).
fn wait_query(q: Result<Query<WaitQuery>, QueryRejection>) -> Result<WaitQuery, Box<Response>> {
    q.map(|Query(q)| q)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, format!("query: {e}"))))
}

async fn start(
    State(s): State<ApiState>,
    q: Result<Query<WaitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = match wait_query(q) {
        Ok(q) => q,
        Err(response) => return *response,
    };
    let wait = match q.duration() {
        Ok(wait) => wait,
        Err(response) => return *response,
    };
    let req: StartRequest = match json_body(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    // A waiter's place first: when too many wait, nothing starts.
    let slot = match wait.map(|_| s.coordinator.reserve_waiter()).transpose() {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let signal = req.signal.map(|s| (s.name, s.payload));
    match s
        .coordinator
        .start(
            &req.workflow,
            req.run_id,
            req.input,
            signal,
            // Exactly one line, as the sidecars require (two are ambiguous).
            match headers.get_all("traceparent").iter().count() {
                1 => headers.get("traceparent").and_then(|v| v.to_str().ok()),
                _ => None,
            },
        )
        .await
    {
        Ok((run_id, created)) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let (Some(wait), Some(slot)) = (wait, &slot) else {
                return (status, Json(json!({"runId": run_id, "created": created})))
                    .into_response();
            };
            // Started (or attached to the existing run of that id): answer when it ends.
            match s.coordinator.wait_in(slot, &run_id, wait).await {
                Ok(WaitOutcome::Finished(view)) => {
                    let mut body = waited(&view);
                    body["created"] = json!(created);
                    (status, Json(body)).into_response()
                }
                Ok(WaitOutcome::Elapsed(view)) => {
                    let mut body = waited(&view);
                    body["created"] = json!(created);
                    (StatusCode::ACCEPTED, Json(body)).into_response()
                }
                // The run exists: the caller needs its id to wait again (GET ?wait=).
                Err(e) => {
                    let status = e.status();
                    (
                        status,
                        Json(json!({"error": e.to_string(), "runId": run_id, "created": created})),
                    )
                        .into_response()
                }
            }
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    workflow: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

async fn list_runs(State(s): State<ApiState>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).min(10_000);
    // A status that no run can have is a mistake to report, not an empty list; any case.
    let status = match q.status.as_deref().filter(|v| !v.is_empty()) {
        None => None,
        Some(given) => match crate::engine::RunStatus::ALL
            .iter()
            .map(|s| s.as_str())
            .find(|name| name.eq_ignore_ascii_case(given))
        {
            Some(name) => Some(name),
            None => {
                let known: Vec<&str> = crate::engine::RunStatus::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect();
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("status {given:?}: not a run status ({})", known.join(", ")),
                );
            }
        },
    };
    match s.coordinator.store().runs(q.workflow.as_deref(), status, limit).await {
        Ok(rows) => Json(
            rows.into_iter()
                .map(|r| json!({"runId": r.run_id, "workflow": r.workflow, "version": r.version, "status": r.status, "createdMs": r.created_ms, "updatedMs": r.updated_ms, "events": r.seq}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => CoordinatorError::from(e).into_response(),
    }
}

async fn get_run(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, QueryRejection>,
) -> Response {
    let q = match wait_query(q) {
        Ok(q) => q,
        Err(response) => return *response,
    };
    match q.duration() {
        Err(response) => *response,
        Ok(None) => match s.coordinator.get(&id).await {
            Ok(view) => Json(view).into_response(),
            Err(e) => e.into_response(),
        },
        Ok(Some(wait)) => match s.coordinator.wait(&id, wait).await {
            Ok(WaitOutcome::Finished(view)) => Json(view).into_response(),
            Ok(WaitOutcome::Elapsed(view)) => (StatusCode::ACCEPTED, Json(view)).into_response(),
            Err(e) => e.into_response(),
        },
    }
}

async fn history(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    match s.coordinator.store().history(&id).await {
        Ok(events) if events.is_empty() => {
            error(StatusCode::NOT_FOUND, format!("run {id} not found"))
        }
        Ok(events) => Json(
            events
                .iter()
                .map(|e| serde_json::from_str::<Value>(e).unwrap_or(Value::Null))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => CoordinatorError::from(e).into_response(),
    }
}

async fn signal(
    State(s): State<ApiState>,
    Path((id, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let payload: Value = if body.is_empty() {
        Value::Null
    } else {
        match json_body(&body) {
            Ok(v) => v,
            Err(r) => return *r,
        }
    };
    match s
        .coordinator
        .send(&id, Input::Signal { name, payload })
        .await
    {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({"runId": id}))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn command(
    State(s): State<ApiState>,
    Path((id, command)): Path<(String, String)>,
) -> Response {
    let input = match command.as_str() {
        "cancel" => Input::Cancel,
        "terminate" => Input::Terminate,
        "retry" => Input::Retry,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no command {other:?} (cancel, terminate, retry)"),
            )
        }
    };
    match s.coordinator.send(&id, input).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({"runId": id}))).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod auth_tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    const XFCC: &str = "By=spiffe://cluster.local/ns/meshflow-system/sa/coordinator;URI=spiffe://cluster.local/ns/default/sa/frontend";

    #[test]
    fn xfcc_alone_is_not_enough() {
        let auth = |pairs: &[(&str, &str)]| authenticate("tok", Some("s3cret"), &headers(pairs));
        assert_eq!(auth(&[("x-forwarded-client-cert", "x")]), None);
        assert_eq!(auth(&[("x-forwarded-client-cert", XFCC)]), None);
        assert_eq!(
            auth(&[
                ("x-forwarded-client-cert", XFCC),
                ("x-meshflow-sidecar-auth", "guess")
            ]),
            None
        );
        // Vouched, but no verified caller (plaintext through the sidecar) or an ambiguous one.
        assert_eq!(auth(&[("x-meshflow-sidecar-auth", "s3cret")]), None);
        assert_eq!(
            auth(&[
                ("x-meshflow-sidecar-auth", "s3cret"),
                ("x-forwarded-client-cert", XFCC),
                ("x-forwarded-client-cert", XFCC)
            ]),
            None
        );
        assert_eq!(
            auth(&[
                ("x-meshflow-sidecar-auth", "s3cret"),
                ("x-meshflow-sidecar-auth", "s3cret"),
                ("x-forwarded-client-cert", XFCC)
            ]),
            None
        );
        assert_eq!(
            auth(&[
                ("x-meshflow-sidecar-auth", "s3cret"),
                ("x-forwarded-client-cert", XFCC)
            ]),
            Some(Caller::Peer(
                "spiffe://cluster.local/ns/default/sa/frontend"
                    .parse()
                    .unwrap()
            ))
        );
        // Without a configured secret nobody is vouched for.
        assert_eq!(
            authenticate(
                "tok",
                None,
                &headers(&[
                    ("x-meshflow-sidecar-auth", ""),
                    ("x-forwarded-client-cert", XFCC)
                ])
            ),
            None
        );
        assert_eq!(
            auth(&[("authorization", "Bearer tok")]),
            Some(Caller::Token)
        );
        assert_eq!(auth(&[("authorization", "Bearer tok2")]), None);
        // Two Authorization fields: neither counts, whichever comes first.
        assert_eq!(
            auth(&[
                ("authorization", "Bearer tok"),
                ("authorization", "Bearer bad")
            ]),
            None
        );
    }
}
