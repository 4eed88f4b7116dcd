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
        /// Workflow `namespace/name`.
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
    },
    /// Show a run: status, steps, attempts, what it waits on.
    Get {
        /// Run id.
        id: String,
    },
    /// List runs, newest first.
    List {
        /// Only this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only this status (Running, Completed, Compensated, …).
        #[arg(long)]
        status: Option<String>,
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
                .map_err(|e| format!("{}: {e}", path.display()))?
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
        let response = request
            .send()
            .await
            .map_err(|e| format!("{}: {e}", self.base))?;
        let status = response.status().as_u16();
        let value = response.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, value))
    }
}

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
    if let Some(steps) = state["steps"].as_object() {
        for (name, step) in steps {
            let attempts = step["attempts"].as_array().cloned().unwrap_or_default();
            let calls = attempts
                .iter()
                .filter(|a| a["compensation"] != json!(true))
                .count();
            let comps = attempts.len() - calls;
            let last = attempts.last().map(|a| {
                let status = a["status"]
                    .as_u64()
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| s(&a["result"]));
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
                s(&step["status"]),
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

/// Runs one `meshflow workflow` command; returns the exit code (0 ok, 1 API error, 64 bad
/// input or no API).
pub async fn run(args: ApiArgs, command: WorkflowCommand) -> i32 {
    match run_inner(&args, command).await {
        Ok(()) => 0,
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
                    return Err((1, s(&value["error"])));
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
        } => {
            let mut body = json!({"workflow": workflow, "input": parse_json("--input", &input).map_err(usage)?});
            if let Some(id) = id {
                body["runId"] = json!(id);
            }
            if let Some(name) = signal {
                body["signal"] = json!({"name": name, "payload": parse_json("--payload", &payload).map_err(usage)?});
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
        WorkflowCommand::Get { id } => {
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
                query.push_str(&format!("&workflow={w}"));
            }
            if let Some(st) = status {
                query.push_str(&format!("&status={st}"));
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
        return Err((1, format!("HTTP {status}: {}", s(&value["error"]))));
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        print!("{}", human(&value));
    }
    Ok(())
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
            eprintln!("meshflow workflow: HTTP {status}: {}", s(&value["error"]));
            1
        }
        Err(e) => {
            eprintln!("meshflow workflow: {e}");
            1
        }
    }
}
