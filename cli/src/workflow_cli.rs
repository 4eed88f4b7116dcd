//! `meshflow workflow …`: a client of the coordinator's HTTP API (see
//! `meshflow_control_plane::workflow::api`), with human tables or `-o json`.

use std::path::PathBuf;

use serde_json::{json, Value};

/// Where the API is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// Workflow API base URL, e.g. `http://127.0.0.1:7070` (printed by `meshflow up`).
    #[arg(long, env = "MESHFLOW_WORKFLOW_API", global = true)]
    pub api: Option<String>,
    /// File holding the API token (`<state-dir>/workflow-api-token`).
    #[arg(long, env = "MESHFLOW_WORKFLOW_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Output: `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", global = true)]
    pub output: String,
}

/// The subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum WorkflowCommand {
    /// Register definitions (`kind: Workflow` YAML; several documents per file allowed).
    Apply {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Start a run of a workflow (`namespace/name`); idempotent with `--id`.
    Start {
        /// Workflow `namespace/name`, or `name` in namespace `default`.
        workflow: String,
        /// Run id (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// Input JSON.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Also send this signal (signal-with-start).
        #[arg(long)]
        signal: Option<String>,
        /// The signal's JSON payload.
        #[arg(long, default_value = "null")]
        payload: String,
        /// Wait for the run to end, at most this long (e.g. `30s`; the coordinator waits 60 s
        /// at most), and print its output. Exit code: 0 Completed, 3 ended otherwise (Failed,
        /// Compensated, …), 4 still running when the wait elapsed, 1 an error (64 bad
        /// arguments). Without `--id` an id is generated here, so a wait cut by a lost
        /// connection can be resumed (`meshflow workflow get <id> --wait …`).
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// Show a run: status, steps, attempts, what it waits on.
    Get {
        /// Run id.
        id: String,
        /// Wait for the run to end, at most this long (e.g. `30s`); exit codes as for
        /// `start --wait`.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// List runs, newest first.
    List {
        /// Only this workflow: `namespace/name`, or `name` in namespace `default`.
        #[arg(long)]
        workflow: Option<String>,
        /// Only runs with this status (any case).
        #[arg(long, value_enum, ignore_case = true)]
        status: Option<RunStatus>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// A run's history (events).
    History {
        /// Run id.
        id: String,
    },
    /// Send a signal to a run.
    Signal {
        /// Run id.
        id: String,
        /// Signal name.
        name: String,
        /// JSON payload.
        #[arg(long, default_value = "null")]
        payload: String,
    },
    /// Cancel a run (its completed steps are compensated).
    Cancel {
        /// Run id.
        id: String,
    },
    /// Terminate a run (nothing more runs, no compensation).
    Terminate {
        /// Run id.
        id: String,
    },
    /// Retry a failed run from its failed step (or its failed compensation).
    Retry {
        /// Run id.
        id: String,
    },
}

/// A run status, as `workflow list --status` takes it (matched without regard to case; the
/// API's spelling is the first name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunStatus {
    /// Steps are running or waiting.
    #[value(name = "Running")]
    Running,
    /// Compensations are running.
    #[value(name = "Compensating")]
    Compensating,
    /// Every step completed.
    #[value(name = "Completed")]
    Completed,
    /// A step failed for good with nothing to compensate.
    #[value(name = "Failed")]
    Failed,
    /// A step failed for good; the compensations ran.
    #[value(name = "Compensated")]
    Compensated,
    /// A compensation failed for good.
    #[value(name = "CompensationFailed", alias = "compensation-failed")]
    CompensationFailed,
    /// Cancelled by an operator.
    #[value(name = "Cancelled", alias = "canceled")]
    Cancelled,
    /// Terminated by an operator.
    #[value(name = "Terminated")]
    Terminated,
    /// The workflow timeout passed.
    #[value(name = "TimedOut", alias = "timed-out")]
    TimedOut,
    /// The run reached its history limit.
    #[value(name = "HistoryLimitExceeded", alias = "history-limit-exceeded")]
    HistoryLimitExceeded,
}

impl RunStatus {
    /// The API's spelling (`Compensated`, …).
    pub fn as_api(self) -> String {
        use clap::ValueEnum as _;
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// `namespace/name` for a workflow given as `namespace/name` or `name` (namespace `default`).
pub fn qualified_workflow(workflow: &str) -> String {
    if workflow.contains('/') {
        workflow.to_string()
    } else {
        format!("default/{workflow}")
    }
}

/// Turns an API answer into the human output.
type Render = Box<dyn Fn(&Value) -> String>;

struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    fn new(args: &ApiArgs) -> Result<Self, String> {
        let base = args.api.clone().ok_or(
            "no workflow API: give --api or MESHFLOW_WORKFLOW_API (meshflow up prints it)",
        )?;
        let base = if base.starts_with("http") {
            base
        } else {
            format!("http://{base}")
        };
        let token = match &args.token_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("token file {}: {e} ({TOKEN_HINT})", path.display()))?
                .trim()
                .to_string(),
            None => std::env::var("MESHFLOW_WORKFLOW_TOKEN").unwrap_or_default(),
        };
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::new(),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &str,
    ) -> Result<(u16, Value), String> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let response = request.send().await.map_err(|e| {
            // reqwest's own text ("error sending request for url") hides the cause.
            let mut cause = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                cause = format!("{cause}: {s}");
                source = s.source();
            }
            format!(
                "cannot reach the workflow API at {} ({cause}). Is the mesh running, and is --api (or MESHFLOW_WORKFLOW_API) the address `meshflow up` or `meshflow demo --keep-running` printed as \"workflow API\"?",
                self.base
            )
        })?;
        let status = response.status().as_u16();
        let value = response.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, value))
    }

    /// [`Client::call`] for a `?wait=` request: bounded by the wait (at most the coordinator's
    /// 60 s) plus 15 s, so a connection that went silent cannot hang the CLI.
    async fn call_waiting(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        wait: std::time::Duration,
    ) -> Result<(u16, Value), String> {
        let limit =
            wait.min(std::time::Duration::from_secs(60)) + std::time::Duration::from_secs(15);
        match tokio::time::timeout(limit, self.call(method, path, body, "application/json")).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no answer from the workflow API at {} within {limit:?}",
                self.base
            )),
        }
    }

    /// The message for an error answer, with a hint at what to fix where the answer shows it.
    fn error(&self, status: u16, value: &Value) -> String {
        let Some(error) = value["error"].as_str() else {
            // Every answer of the workflow API carries `{"error": …}`; something else answered.
            return format!(
                "HTTP {status} from {} without a workflow API error: is --api (or MESHFLOW_WORKFLOW_API) the address `meshflow up` printed as \"workflow API\"?",
                self.base
            );
        };
        if status == 401 {
            let given = if self.token.is_empty() {
                "no token was given"
            } else {
                "the token was refused"
            };
            return format!("HTTP 401: {error}: {given} ({TOKEN_HINT})");
        }
        format!("HTTP {status}: {error}")
    }
}

/// Where the token comes from.
const TOKEN_HINT: &str = "give --token-file <state-dir>/workflow-api-token or set MESHFLOW_WORKFLOW_TOKEN_FILE; `meshflow up` prints the file next to the workflow API address";

fn parse_json(what: &str, text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("{what}: not JSON: {e}"))
}

fn table(rows: &[Vec<String>]) -> String {
    let mut widths = vec![0; rows.iter().map(Vec::len).max().unwrap_or(0)];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn human_run(run: &Value) -> String {
    let state = &run["state"];
    let mut out = format!(
        "run        {}\nworkflow   {} (version {})\nstatus     {}\n",
        s(&run["runId"]),
        s(&run["workflow"]),
        s(&run["version"]),
        s(&run["status"])
    );
    if let Some(waiting) = run["waitingOn"].as_array().filter(|w| !w.is_empty()) {
        out.push_str(&format!(
            "waiting on {}\n",
            waiting.iter().map(s).collect::<Vec<_>>().join("; ")
        ));
    }
    if !state["error"].is_null() {
        out.push_str(&format!("error      {}\n", s(&state["error"])));
    }
    if !state["output"].is_null() {
        out.push_str(&format!("output     {}\n", state["output"]));
    }
    let mut rows = vec![vec![
        "STEP".to_string(),
        "STATUS".into(),
        "ATTEMPTS".into(),
        "LAST".into(),
        "OUTPUT / ERROR".into(),
    ]];
    let finished = !matches!(
        run["status"].as_str(),
        Some("Running" | "Compensating") | None
    );
    if let Some(steps) = state["steps"].as_object() {
        for (name, step) in steps_in_run_order(steps) {
            let attempts = step["attempts"].as_array().cloned().unwrap_or_default();
            let calls = attempts
                .iter()
                .filter(|a| a["compensation"] != json!(true))
                .count();
            let comps = attempts.len() - calls;
            let last = attempts.last().map(|a| {
                let status =
                    a["status"]
                        .as_u64()
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| match s(&a["result"]) {
                            // The run ended with the attempt in flight: its answer is not waited for.
                            r if finished && r == "in-flight" => "abandoned".to_string(),
                            r => r,
                        });
                format!(
                    "{}{}",
                    if a["compensation"] == json!(true) {
                        "comp "
                    } else {
                        ""
                    },
                    status
                )
            });
            let detail = if !step["error"].is_null() {
                s(&step["error"])
            } else {
                s(&step["output"])
            };
            let detail: String = detail.chars().take(60).collect();
            rows.push(vec![
                name.clone(),
                step_status(&run["status"], &step["status"]),
                if comps > 0 {
                    format!("{calls}+{comps} comp")
                } else {
                    calls.to_string()
                },
                last.unwrap_or_else(|| "-".into()),
                detail,
            ]);
        }
    }
    out.push_str(&table(&rows));
    out
}

/// A run's steps in the order they ran (by start time; steps that never started last, by
/// name).
fn steps_in_run_order(steps: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut ordered: Vec<(&String, &Value)> = steps.iter().collect();
    let started = |step: &Value| {
        step["startedMs"].as_u64().or_else(|| {
            step["attempts"]
                .as_array()
                .and_then(|a| a.iter().filter_map(|x| x["startedMs"].as_u64()).min())
        })
    };
    ordered.sort_by_key(|(name, step)| (started(step).unwrap_or(u64::MAX), name.to_string()));
    ordered
}

/// A step's status as shown: a step still "in progress" in a run that has ended (an attempt in
/// flight when the run was cancelled or terminated) shows how the run ended.
fn step_status(run_status: &Value, step_status: &Value) -> String {
    let step = s(step_status);
    let run = run_status.as_str().unwrap_or("");
    let in_progress = matches!(
        step.as_str(),
        "Running" | "Backoff" | "Sleeping" | "Waiting"
    );
    if !in_progress || matches!(run, "Running" | "Compensating" | "") {
        return step;
    }
    match run {
        "Cancelled" | "Terminated" | "TimedOut" => run.to_string(),
        _ => format!("Abandoned ({run})"),
    }
}

/// An event's time (`at_ms`, Unix ms) as `YYYY-MM-DD HH:MM:SS.mmm` UTC; `-` for events that
/// carry none (or 0: histories written before an event kind recorded its time).
fn event_time(event: &Value) -> String {
    match event["at_ms"].as_u64().or_else(|| event["atMs"].as_u64()) {
        Some(ms) if ms > 0 => utc(ms),
        _ => "-".into(),
    }
}

/// Unix ms as `YYYY-MM-DD HH:MM:SS.mmm` (UTC).
fn utc(ms: u64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Runs one `meshflow workflow` command; returns the exit code (0 ok, 1 API error, 64 bad
/// input or no API).
pub async fn run(args: ApiArgs, command: WorkflowCommand) -> i32 {
    match run_inner(&args, command).await {
        Ok(()) => 0,
        // A run's status as the exit code: already printed.
        Err((code, message)) if message.is_empty() => code,
        Err((code, message)) => {
            eprintln!("meshflow workflow: {message}");
            code
        }
    }
}

async fn run_inner(args: &ApiArgs, command: WorkflowCommand) -> Result<(), (i32, String)> {
    let usage = |m: String| (64, m);
    let client = Client::new(args).map_err(usage)?;
    let json_out = args.output == "json";
    use reqwest::Method;
    let (status, value, human): (u16, Value, Render) = match command {
        WorkflowCommand::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| usage(format!("{}: {e}", file.display())))?;
            let mut results = Vec::new();
            // Query-safe file name, so the coordinator's errors name it.
            let name: String = file
                .display()
                .to_string()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "._-/".contains(*c))
                .collect();
            for (offset, doc) in meshflow_policies::documents::split_documents(&text) {
                // Pad with the lines before this document so errors give lines of the file.
                let doc = format!("{}{doc}", "\n".repeat(offset));
                let (status, value) = client
                    .call(
                        Method::POST,
                        &format!("/v1/workflows?file={name}"),
                        Some(doc.into_bytes()),
                        "application/yaml",
                    )
                    .await
                    .map_err(|e| (1, e))?;
                if status >= 400 {
                    return Err((1, client.error(status, &value)));
                }
                results.push(value);
            }
            (
                200,
                Value::Array(results),
                Box::new(|v: &Value| {
                    v.as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| {
                            format!(
                                "workflow {} registered as version {}\n",
                                s(&r["workflow"]),
                                s(&r["version"])
                            )
                        })
                        .collect()
                }),
            )
        }
        WorkflowCommand::Start {
            workflow,
            id,
            input,
            signal,
            payload,
            wait,
        } => {
            let workflow = qualified_workflow(&workflow);
            let mut body = json!({"workflow": workflow, "input": parse_json("--input", &input).map_err(usage)?});
            // Waiting, the id is chosen here: a caller who loses the connection knows which
            // run to attach to again.
            let id = match (id, wait) {
                (Some(id), _) => Some(id),
                (None, Some(_)) => Some(generated_run_id()),
                (None, None) => None,
            };
            if let Some(id) = &id {
                body["runId"] = json!(id);
            }
            if let Some(name) = signal {
                body["signal"] = json!({"name": name, "payload": parse_json("--payload", &payload).map_err(usage)?});
            }
            if let Some(wait) = wait {
                let id = id.unwrap_or_default();
                let result = client
                    .call_waiting(
                        Method::POST,
                        &format!("/v1/runs?wait={}ms", wait.as_millis()),
                        Some(body.to_string().into_bytes()),
                        wait,
                    )
                    .await;
                return finish_wait(
                    &client,
                    json_out,
                    result,
                    &format!("meshflow workflow get {id} --wait 60s"),
                    Some(&format!(
                        "if that answers 404 the run never started: repeat this command with --id {id}"
                    )),
                );
            }
            let (status, value) = client
                .call(
                    Method::POST,
                    "/v1/runs",
                    Some(body.to_string().into_bytes()),
                    "application/json",
                )
                .await
                .map_err(|e| (1, e))?;
            (
                status,
                value,
                Box::new(|v: &Value| {
                    format!(
                        "run {} {}\n",
                        s(&v["runId"]),
                        if v["created"] == json!(true) {
                            "started"
                        } else {
                            "already exists"
                        }
                    )
                }),
            )
        }
        WorkflowCommand::Get {
            id,
            wait: Some(wait),
        } => {
            let result = client
                .call_waiting(
                    Method::GET,
                    &format!("/v1/runs/{id}?wait={}ms", wait.as_millis()),
                    None,
                    wait,
                )
                .await;
            return finish_wait(
                &client,
                json_out,
                result,
                &format!("meshflow workflow get {id} --wait 60s"),
                None,
            );
        }
        WorkflowCommand::Get { id, wait: None } => {
            let (status, value) = client
                .call(Method::GET, &format!("/v1/runs/{id}"), None, "")
                .await
                .map_err(|e| (1, e))?;
            (status, value, Box::new(human_run))
        }
        WorkflowCommand::List {
            workflow,
            status,
            limit,
        } => {
            let mut query = format!("?limit={limit}");
            if let Some(w) = workflow {
                query.push_str(&format!("&workflow={}", qualified_workflow(&w)));
            }
            if let Some(st) = status {
                query.push_str(&format!("&status={}", st.as_api()));
            }
            let (code, value) = client
                .call(Method::GET, &format!("/v1/runs{query}"), None, "")
                .await
                .map_err(|e| (1, e))?;
            (
                code,
                value,
                Box::new(|v: &Value| {
                    let mut rows = vec![vec![
                        "RUN".to_string(),
                        "WORKFLOW".into(),
                        "VERSION".into(),
                        "STATUS".into(),
                        "EVENTS".into(),
                    ]];
                    for r in v.as_array().into_iter().flatten() {
                        rows.push(vec![
                            s(&r["runId"]),
                            s(&r["workflow"]),
                            s(&r["version"]),
                            s(&r["status"]),
                            s(&r["events"]),
                        ]);
                    }
                    table(&rows)
                }),
            )
        }
        WorkflowCommand::History { id } => {
            let (code, value) = client
                .call(Method::GET, &format!("/v1/runs/{id}/history"), None, "")
                .await
                .map_err(|e| (1, e))?;
            (
                code,
                value,
                Box::new(|v: &Value| {
                    let mut rows = vec![vec![
                        "#".to_string(),
                        "TIME (UTC)".into(),
                        "EVENT".into(),
                        "STEP".into(),
                        "DETAIL".into(),
                    ]];
                    for (i, e) in v.as_array().into_iter().flatten().enumerate() {
                        let detail = ["attempt", "status", "error", "name", "reason"]
                            .iter()
                            .filter(|k| !e[**k].is_null())
                            .map(|k| format!("{k}={}", s(&e[*k])))
                            .collect::<Vec<_>>()
                            .join(" ");
                        rows.push(vec![
                            (i + 1).to_string(),
                            event_time(e),
                            s(&e["type"]),
                            s(&e["step"]),
                            detail.chars().take(80).collect(),
                        ]);
                    }
                    table(&rows)
                }),
            )
        }
        WorkflowCommand::Signal { id, name, payload } => {
            let body = parse_json("--payload", &payload).map_err(usage)?;
            let (code, value) = client
                .call(
                    Method::POST,
                    &format!("/v1/runs/{id}/signals/{name}"),
                    Some(body.to_string().into_bytes()),
                    "application/json",
                )
                .await
                .map_err(|e| (1, e))?;
            (
                code,
                value,
                Box::new(|v: &Value| format!("signal sent to run {}\n", s(&v["runId"]))),
            )
        }
        WorkflowCommand::Cancel { id }
        | WorkflowCommand::Terminate { id }
        | WorkflowCommand::Retry { id } => unreachable!("{id}"),
    };
    if status >= 400 {
        return Err((1, client.error(status, &value)));
    }
    if json_out {
        crate::output::println(&serde_json::to_string_pretty(&value).unwrap_or_default());
    } else {
        crate::output::print(&human(&value));
    }
    Ok(())
}

/// A run id made by the CLI (same form as the coordinator's: 32 hex digits).
fn generated_run_id() -> String {
    use rand::Rng as _;
    let mut rng = rand::thread_rng();
    (0..16)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

/// Prints what a `--wait` answer says and turns the run's status into the exit code (see
/// `start --wait`). `resume` is the command that attaches again after a lost connection.
fn finish_wait(
    client: &Client,
    json_out: bool,
    result: Result<(u16, Value), String>,
    resume: &str,
    never_started: Option<&str>,
) -> Result<(), (i32, String)> {
    let (status, value) = result.map_err(|e| {
        (
            1,
            format!(
                "{e}\nThe run may still be going: `{resume}` waits for it again (it does not start another){}.",
                never_started.map(|h| format!("; {h}")).unwrap_or_default()
            ),
        )
    })?;
    if status >= 400 {
        return Err((1, client.error(status, &value)));
    }
    // POST answers {runId, status, output, error, run}; GET answers the run view.
    let run_status = value["status"].as_str().unwrap_or_default().to_string();
    let id = s(&value["runId"]);
    if json_out {
        crate::output::println(&serde_json::to_string_pretty(&value).unwrap_or_default());
    } else if status == 202 {
        crate::output::print(&format!(
            "run {id} is still {run_status} (the wait elapsed); `{resume}` waits again\n"
        ));
    } else {
        let (output, error) = match value.get("run") {
            Some(_) => (&value["output"], &value["error"]),
            None => (&value["state"]["output"], &value["state"]["error"]),
        };
        let mut text = format!("run {id} {run_status}\n");
        if !output.is_null() {
            text.push_str(&format!(
                "{}\n",
                serde_json::to_string_pretty(output).unwrap_or_default()
            ));
        }
        if let Some(error) = error.as_str() {
            text.push_str(&format!("error: {error}\n"));
        }
        crate::output::print(&text);
    }
    match (status, run_status.as_str()) {
        (202, _) => Err((4, String::new())),
        (_, "Completed") => Ok(()),
        _ => Err((3, String::new())),
    }
}

/// `cancel`, `terminate`, `retry`.
pub async fn command(args: ApiArgs, verb: &str, id: &str) -> i32 {
    let client = match Client::new(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshflow workflow: {e}");
            return 64;
        }
    };
    match client
        .call(
            reqwest::Method::POST,
            &format!("/v1/runs/{id}/{verb}"),
            Some(Vec::new()),
            "application/json",
        )
        .await
    {
        Ok((status, _)) if status < 400 => {
            println!("{verb}: requested for run {id}");
            0
        }
        Ok((status, value)) => {
            eprintln!("meshflow workflow: {}", client.error(status, &value));
            1
        }
        Err(e) => {
            eprintln!("meshflow workflow: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(951_782_400_123), "2000-02-29 00:00:00.123");
        assert_eq!(utc(1_796_416_445_678), "2026-12-04 20:34:05.678");
    }

    #[test]
    fn steps_show_in_run_order_and_how_a_finished_run_left_them() {
        let run = json!({
            "runId": "r", "workflow": "default/w", "version": 1, "status": "Cancelled",
            "state": {"steps": {
                "a-last": {"status": "Pending", "attempts": []},
                "ship": {"status": "Running", "startedMs": 30,
                         "attempts": [{"attempt": 1, "compensation": false, "startedMs": 30, "result": "in-flight"}]},
                "reserve": {"status": "Compensated", "startedMs": 10,
                            "attempts": [{"attempt": 1, "compensation": false, "startedMs": 10, "status": 201, "result": "ok"}]},
                "charge": {"status": "Compensated", "startedMs": 20,
                           "attempts": [{"attempt": 1, "compensation": false, "startedMs": 20, "status": 201, "result": "ok"}]}
            }}
        });
        let text = human_run(&run);
        let order: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("STEP"))
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(order, ["reserve", "charge", "ship", "a-last"], "{text}");
        let ship = text.lines().find(|l| l.starts_with("ship")).unwrap();
        assert!(
            ship.contains("Cancelled") && ship.contains("abandoned"),
            "{ship}"
        );
        assert!(!ship.contains("Running"), "{ship}");
    }

    #[test]
    fn history_rows_carry_the_event_time() {
        assert_eq!(
            event_time(&json!({"type": "RunStarted", "at_ms": 1000})),
            "1970-01-01 00:00:01.000"
        );
        assert_eq!(event_time(&json!({"type": "StepSkipped"})), "-");
    }

    #[test]
    fn workflow_names_default_to_namespace_default() {
        assert_eq!(qualified_workflow("place-order"), "default/place-order");
        assert_eq!(qualified_workflow("shop/place-order"), "shop/place-order");
        assert_eq!(RunStatus::CompensationFailed.as_api(), "CompensationFailed");
    }
}
