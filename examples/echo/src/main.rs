//! `meshflow-echo --name <name> --listen 127.0.0.1:0 [--ready-file F]`. `$PORT` is used when
//! `--listen` is absent.

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Name reported in every reply.
    #[arg(long, default_value = "echo")]
    name: String,
    /// Listen address; default 127.0.0.1:$PORT (or :0).
    #[arg(long)]
    listen: Option<String>,
    /// Answer every HTTP request with this status (a broken endpoint for tests).
    #[arg(long)]
    always: Option<u16>,
    /// Delay every HTTP response by this many milliseconds (a slow endpoint for tests).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Written once listening: `{"pid":…,"addresses":{"http":"127.0.0.1:…"}}`.
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
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
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let addr = listener.local_addr()?;
    if let Some(path) = &args.ready_file {
        let mut ready = meshflow_api::ReadyFile {
            pid: std::process::id(),
            ..Default::default()
        };
        ready.addresses.insert("http".into(), addr.to_string());
        ready.write(path)?;
    }
    eprintln!("meshflow-echo {} listening on {addr}", args.name);
    meshflow_example_echo::serve(
        listener,
        &args.name,
        args.always,
        std::time::Duration::from_millis(args.delay_ms),
    )
    .await
}
