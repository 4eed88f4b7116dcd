//! `meshflow-shop --role inventory|payment|shipping [--listen 127.0.0.1:0]`: one service of
//! the order example. Each keeps its own records in memory and honours `Idempotency-Key`
//! (a repeated key gets the first answer and changes nothing), so the tests can check, per
//! key, that every effect was applied exactly once.
//!
//! | Role | Do | Undo (key `<run>/<step>/compensate` undoes `<run>/<step>`) |
//! |---|---|---|
//! | inventory | `POST /reservations {sku, qty}` → 201, 409 out of stock | `POST /reservations/release` |
//! | payment | `POST /charges {customer, amount}` → 201, 402 over the limit | `POST /refunds` |
//! | shipping | `POST /shipments {order, address}` → 201; `address: "nowhere"` → 422 | `POST /shipments/cancel` |
//!
//! Test hooks: `flakyFirst: true` in a body answers 503 to the first try of its key;
//! `delayMs: n` delays the answer. `--journal <file>` makes the records survive `kill -9`: every
//! call that applies (or answers) a key is appended to the file and fsynced before the answer
//! is sent, and replayed at start. `GET /__records` shows records, applied effects per key
//! (`applied`), every attempt (key, attempt header, caller XFCC, start and end ms) and undos.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// inventory, payment or shipping.
    #[arg(long)]
    role: String,
    /// Listen address; default 127.0.0.1:$PORT (or :0).
    #[arg(long)]
    listen: Option<String>,
    /// Append-only journal (JSON lines, fsynced per call) replayed at start.
    #[arg(long)]
    journal: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Books {
    /// First answer per idempotency key.
    answers: BTreeMap<String, (u16, Value)>,
    /// Effects applied per key (must never exceed 1).
    applied: BTreeMap<String, u32>,
    /// Undone keys (the original key).
    undone: BTreeMap<String, u32>,
    /// Every attempt seen.
    attempts: Vec<Value>,
    /// Tries per key (for `flakyFirst`).
    tries: BTreeMap<String, u32>,
    /// Records (reservations, charges, shipments) by key.
    records: BTreeMap<String, Value>,
    stock: i64,
}

#[derive(Clone)]
struct Shop {
    books: Arc<Mutex<Books>>,
    journal: Option<Arc<Mutex<std::fs::File>>>,
}

type Shared = Shop;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The shared part of every mutating call: key check, replay of the first answer, test hooks,
/// attempt log, journal. [`apply`] runs once per key.
async fn idempotent(
    shop: Shop,
    route: &'static str,
    headers: HeaderMap,
    body: Value,
) -> axum::response::Response {
    let key = header(&headers, "idempotency-key");
    if key.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Idempotency-Key is required"})),
        )
            .into_response();
    }
    let xfcc = header(&headers, "x-forwarded-client-cert");
    let started = now_ms();
    if let Some(ms) = body.get("delayMs").and_then(Value::as_u64) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let mut b = shop.books.lock().unwrap_or_else(|e| e.into_inner());
    let tries = {
        let t = b.tries.entry(key.clone()).or_default();
        *t += 1;
        *t
    };
    let (status, answer) = if body.get("flakyFirst") == Some(&json!(true)) && tries == 1 {
        (503, json!({"error": "busy, try again"}))
    } else if let Some(first) = b.answers.get(&key) {
        first.clone()
    } else {
        let (status, answer) = answer_first(&mut b, route, &key, &body, &xfcc);
        if let Some(journal) = &shop.journal {
            use std::io::Write;
            let line = json!({"route": route, "key": key, "body": body, "xfcc": xfcc});
            let mut file = journal.lock().unwrap_or_else(|e| e.into_inner());
            let written = writeln!(file, "{line}").and_then(|()| file.sync_data());
            if let Err(e) = written {
                eprintln!("meshflow-shop: journal write failed: {e}");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({"error": "journal"})),
                )
                    .into_response();
            }
        }
        (status, answer)
    };
    b.attempts.push(json!({
        "key": key, "attempt": header(&headers, "meshflow-attempt"), "xfcc": xfcc,
        "coordinator": header(&headers, "meshflow-coordinator"),
        "startMs": started, "endMs": now_ms(), "status": status,
    }));
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        Json(answer),
    )
        .into_response()
}

/// The first answer to `key` on `route`: applies the call and books it (also on replay).
fn answer_first(b: &mut Books, route: &str, key: &str, body: &Value, xfcc: &str) -> (u16, Value) {
    let (status, answer) = apply(b, route, key, body, xfcc);
    if (200..300).contains(&status) {
        *b.applied.entry(key.to_string()).or_default() += 1;
    }
    if status != 503 {
        b.answers.insert(key.to_string(), (status, answer.clone()));
    }
    (status, answer)
}

/// What a call does, by route.
fn apply(b: &mut Books, route: &str, key: &str, body: &Value, xfcc: &str) -> (u16, Value) {
    match route {
        "/reservations" => {
            let qty = body["qty"].as_i64().unwrap_or(1);
            if qty > b.stock {
                return (409, json!({"error": "out of stock"}));
            }
            b.stock -= qty;
            let record = json!({"id": key, "sku": body["sku"], "qty": qty});
            b.records.insert(key.to_string(), record.clone());
            (201, record)
        }
        "/charges" => {
            let amount = body["amount"].as_i64().unwrap_or(0);
            if amount > 10_000 {
                return (402, json!({"error": "over the limit"}));
            }
            let record =
                json!({"id": key, "customer": body["customer"], "amount": amount, "xfcc": xfcc});
            b.records.insert(key.to_string(), record.clone());
            (201, record)
        }
        "/shipments" => {
            if body["address"] == json!("nowhere") {
                return (422, json!({"error": "cannot ship to that address"}));
            }
            let record = json!({"id": key, "order": body["order"], "address": body["address"]});
            b.records.insert(key.to_string(), record.clone());
            (201, record)
        }
        _ => undo(b, key),
    }
}

/// Replays `path` into `b` (a torn last line, from a kill during the write, is skipped).
fn replay(b: &mut Books, path: &std::path::Path) -> std::io::Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for line in text.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let route = entry["route"].as_str().unwrap_or_default();
        let key = entry["key"].as_str().unwrap_or_default();
        answer_first(
            b,
            route,
            key,
            &entry["body"],
            entry["xfcc"].as_str().unwrap_or_default(),
        );
        n += 1;
    }
    Ok(n)
}

/// Undo of the record made under the original key (the compensation key minus `/compensate`).
fn undo(b: &mut Books, key: &str) -> (u16, Value) {
    let original = key.strip_suffix("/compensate").unwrap_or(key).to_string();
    match b.records.get_mut(&original) {
        Some(record) if record["undone"] != json!(true) => {
            record["undone"] = json!(true);
            let qty = record["qty"].as_i64().unwrap_or(0);
            b.stock += qty;
            *b.undone.entry(original.clone()).or_default() += 1;
            (200, json!({"undone": original}))
        }
        // Nothing to undo (never applied, or undone already): fine.
        _ => (200, json!({"undone": null, "nothingToUndo": original})),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listen = args.listen.unwrap_or_else(|| {
        format!(
            "127.0.0.1:{}",
            std::env::var("PORT").unwrap_or_else(|_| "0".into())
        )
    });
    let mut books = Books {
        stock: 1_000_000,
        ..Default::default()
    };
    let journal = match &args.journal {
        Some(path) => {
            let n = replay(&mut books, path)?;
            if n > 0 {
                eprintln!("meshflow-shop: replayed {n} calls from {}", path.display());
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            Some(Arc::new(Mutex::new(file)))
        }
        None => None,
    };
    let shop = Shop {
        books: Arc::new(Mutex::new(books)),
        journal,
    };
    let role = args.role.clone();
    let routes: &[&'static str] = match role.as_str() {
        "inventory" => &["/reservations", "/reservations/release"],
        "payment" => &["/charges", "/refunds"],
        "shipping" => &["/shipments", "/shipments/cancel"],
        other => {
            eprintln!("meshflow-shop: unknown role {other:?} (inventory, payment, shipping)");
            std::process::exit(64);
        }
    };
    let mut app = Router::new();
    for &route in routes {
        // The do-routes need a JSON body; the undo-routes take any (or none).
        app = if route.ends_with("/release") || route == "/refunds" || route.ends_with("/cancel") {
            app.route(
                route,
                post(move |State(s): State<Shared>, h: HeaderMap, body: Option<Json<Value>>| async move {
                    idempotent(s, route, h, body.map(|j| j.0).unwrap_or(Value::Null)).await
                }),
            )
        } else {
            app.route(
                route,
                post(move |State(s): State<Shared>, h: HeaderMap, Json(body): Json<Value>| async move {
                    idempotent(s, route, h, body).await
                }),
            )
        };
    }
    let app = app
        .route("/__records", get(|State(s): State<Shared>| async move {
            let b = s.books.lock().unwrap_or_else(|e| e.into_inner());
            Json(json!({"records": b.records, "applied": b.applied, "undone": b.undone, "attempts": b.attempts, "stock": b.stock}))
        }))
        .route("/admin/reset", post(|| async { (StatusCode::OK, "admin\n") }))
        .with_state(shop);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!(
        "meshflow-shop {role} listening on {}",
        listener.local_addr()?
    );
    axum::serve(listener, app).await
}
